"""Kernel selection: the reference is always there, `XFP_KERNEL` forces a choice, unknown names refuse."""

import os

import pytest
import torch

from xfp.runtime import dispatch


def test_reference_is_the_fallback(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    # no fused kernel runs float64 inputs (the `cpu` kernel's choices are tested in test_kernels.py)
    assert dispatch.select(torch.device("cpu"), torch.float64) is dispatch.REFERENCE
    assert dispatch.kernel_names()[-1] == "reference"


@pytest.mark.parametrize("value", ["reference", "auto", ""])
def test_env_override(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    expected = dispatch.REFERENCE if value == "reference" else dispatch.CPU
    assert dispatch.select(torch.device("cpu"), torch.bfloat16) is expected


def test_unknown_kernel_is_refused(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "marlin")
    with pytest.raises(ValueError, match="XFP_KERNEL='marlin' is not a known kernel.*reference"):
        dispatch.select(torch.device("cpu"), torch.float32)


def test_overrides_follow_every_change_of_the_environment(monkeypatch):
    """The fast path's cheap read of $XFP_KERNEL and $XFP_CPU_ISA sees what os.environ.get sees, after
    setting, changing and deleting either, and a patched os.environ as a whole."""
    from unittest import mock

    from xfp.runtime.kernels import cpu

    def expected():
        return os.environ.get(dispatch.ENV_VAR), os.environ.get(cpu.ISA_ENV_VAR)

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(cpu.ISA_ENV_VAR, raising=False)
    assert dispatch.overrides() == expected() == (None, None)
    for name, value in ((dispatch.ENV_VAR, "reference"), (cpu.ISA_ENV_VAR, "avx2"), (dispatch.ENV_VAR, "cpu")):
        monkeypatch.setenv(name, value)
        assert dispatch.overrides() == expected()
    with mock.patch.dict(os.environ, {cpu.ISA_ENV_VAR: "scalar"}):
        assert dispatch.overrides() == expected() == ("cpu", "scalar")
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.overrides() == expected() == (None, "avx2")
