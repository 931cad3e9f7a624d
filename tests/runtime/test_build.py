"""The kernel build (xfp.runtime.kernels.build): optional units that fail leave the rest usable."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest

from xfp.runtime.kernels import build

pytestmark = pytest.mark.skipif(shutil.which(build.compiler()) is None or shutil.which("nm") is None,
                                reason="needs a C++ compiler and nm")


def test_an_optional_unit_that_does_not_compile_is_left_out_with_a_warning(tmp_path, monkeypatch, caplog):
    units = build._units()
    # scalar.cpp stands for the units that must compile (fast to build); python.cpp cannot find a header
    monkeypatch.setattr(build, "_units", lambda: {"scalar.cpp": units["scalar.cpp"],
                                                  "python.cpp": ["-include", "xfp_no_such_header.h"]})
    monkeypatch.setenv("XFP_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        path = build.library_path()
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert any("without python.cpp" in r.getMessage() and "xfp_no_such_header.h" in r.getMessage()
               for r in caplog.records)
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True,
                             check=True).stdout
    assert "xfp_fast_linear_function" not in symbols and "scalar_kernels" in symbols


def test_a_required_unit_that_does_not_compile_fails_the_build_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "_units", lambda: {"scalar.cpp": ["-include", "xfp_no_such_header.h"]})
    monkeypatch.setenv("XFP_CACHE", str(tmp_path))
    with pytest.raises(build.BuildError, match="scalar.cpp: .*xfp_no_such_header.h"):
        build.library_path()
