"""Compile the C++ CPU kernels on first use and cache the shared library.

Nothing prebuilt travels with the package: the first process that needs the kernels runs the machine's
C++ compiler (`$CXX`, else `c++`) on `csrc/`, one translation unit per instruction set with its own `-m`
flags (scalar, AVX2, AVX-512 on x86-64; scalar elsewhere), so a single library serves every CPU and the
choice is made at run time. `api.cpp` includes only `ATen/Parallel.h` from torch, to split rows over
torch's own threads; `ops.cpp` registers the fused GEMV as a torch operator (torch's library headers), and
`python.cpp` is its eager shortcut, a CPython function (torch's Python headers: the library links
libtorch_python, and is built per Python version). The whole build takes ~30 seconds on 2 cores (no ninja).

The library lands in `$XFP_CACHE/kernels/xfp_cpu-<key>/` (`~/.cache/xfp` without `$XFP_CACHE`), where
`<key>` hashes the sources, the flags, the compiler's version and torch's version: a change to any of them
builds anew, anything else reuses the file. A build is written under a temporary name and renamed into
place, so concurrent first uses and interrupted builds are harmless.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
LIBRARY_NAME = "libxfp_cpu.so"
COMPILE_TIMEOUT_S = 300

_COMMON = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-Wall"]
_X86_UNITS = {
    "scalar.cpp": [],
    "avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why (and the reference path applies)."""


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).parent
    return root / "include", root / "lib"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _units() -> dict[str, list[str]]:
    """Translation unit -> its extra flags. api.cpp gets torch's headers and OpenMP, ops.cpp torch's headers,
    python.cpp torch's and Python's (it is a CPython function)."""
    include, _ = _torch_dirs()
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    x86 = ["-DXFP_X86"] if _is_x86() else []
    units = {name: flags + x86 for name, flags in _X86_UNITS.items()} if _is_x86() else {"scalar.cpp": []}
    units["api.cpp"] = x86 + ["-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(include),
                              "-Wno-unused-parameter"]
    units["ops.cpp"] = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(include), "-Wno-unused-parameter"]
    units["python.cpp"] = units["ops.cpp"] + ["-isystem", str(include / "torch" / "csrc" / "api" / "include"),
                                              "-isystem", sysconfig.get_paths()["include"]]
    return units


OPTIONAL_UNITS = ("python.cpp",)
"""Units the library can do without: if one does not compile (e.g. no Python headers here), the build links
the rest, logging why (python.cpp: eager calls then take the torch operator, ~4 us slower each)."""


def _link_flags(python: bool = True) -> list[str]:
    _, lib = _torch_dirs()
    return ["-shared", "-fopenmp", f"-L{lib}", "-lc10", "-ltorch_cpu", *(["-ltorch_python"] if python else []),
            f"-Wl,-rpath,{lib}"]


def _compiler_version(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"no usable C++ compiler {cxx!r} ({exc}); set $CXX or install g++") from None
    if done.returncode != 0:
        raise BuildError(f"C++ compiler {cxx!r} does not run: {done.stderr.strip()[:200]}")
    return done.stdout.splitlines()[0] if done.stdout else ""


def cache_root() -> Path:
    # Same rule as xfp.sources.fetch.cache_dir; repeated here so the runtime imports nothing quantize-time.
    return Path(os.environ.get("XFP_CACHE") or Path.home() / ".cache" / "xfp") / "kernels"


def build_key(cxx: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name, flags in sorted(_units().items()):
        digest.update(f"{name}:{' '.join(_COMMON + flags)}\n".encode())
    digest.update(" ".join(_link_flags()).encode())
    digest.update(f"{_compiler_version(cxx)}|torch {torch.__version__}|{platform.machine()}|{sys.version}".encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """The compiled library, built now if this exact build is not cached yet. Raises BuildError."""
    cxx = compiler()
    if shutil.which(cxx) is None and not Path(cxx).is_file():
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX, or install g++)")
    target = cache_root() / f"xfp_cpu-{build_key(cxx)}" / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        staged = Path(tmp) / LIBRARY_NAME
        _compile(cxx, Path(tmp), staged)
        os.replace(staged, target)  # atomic: a concurrent build of the same key writes the same bytes
    log.info("XFP: compiled the CPU kernels into %s in %.1f s", target, time.perf_counter() - start)
    return target


def _compile(cxx: str, workdir: Path, output: Path) -> None:
    """Compile every unit in parallel, then link `output`."""
    jobs = []
    for name, flags in _units().items():
        obj = workdir / (Path(name).stem + ".o")
        command = [cxx, *_COMMON, *flags, "-c", str(CSRC / name), "-o", str(obj)]
        jobs.append((name, obj, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True)))
    failures, skipped = [], {}
    for name, _, proc in jobs:
        try:
            _, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = f"timed out after {COMPILE_TIMEOUT_S} s"
        else:
            if proc.returncode == 0:
                continue
            err = _first_error(err)
        if name in OPTIONAL_UNITS:
            skipped[name] = err
        else:
            failures.append(f"{name}: {err}")
    if failures:
        raise BuildError(f"compiling the CPU kernels with {cxx} failed: " + "; ".join(failures))
    for name, err in skipped.items():
        log.warning("XFP: building the CPU kernels without %s (%s)", name, err)
    objects = [str(obj) for name, obj, _ in jobs if name not in skipped]
    command = [cxx, *objects, "-o", str(output), *_link_flags(python="python.cpp" not in skipped)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    if done.returncode != 0:
        raise BuildError(f"linking the CPU kernels failed: {_first_error(done.stderr)}")


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no message)"])[0][:300]


__all__ = ["BuildError", "CSRC", "build_key", "cache_root", "compiler", "library_path"]
