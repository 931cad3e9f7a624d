"""Kernel selection: the reference is always there, `XFP_KERNEL` forces a choice, unknown names refuse."""

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


def test_environment_reader_sees_every_change_made_through_os_environ(monkeypatch):
    import os

    name = "XFP_TEST_READER_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    read = dispatch.environment_reader(name, dispatch.ENV_VAR)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    unset = read()
    assert unset[0] is None and unset == read()
    monkeypatch.setenv(name, "a")
    set_a = read()
    assert set_a != unset
    os.environ[name] = "b"
    assert read() not in (unset, set_a)
    os.environ[name] = "a"
    assert read() == set_a
    del os.environ[name]
    assert read() == unset
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert read() != unset
