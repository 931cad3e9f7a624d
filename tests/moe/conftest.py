"""Fixtures: the small upcycled MoE (real SmolLM2-135M weights, `xfp.moe.upcycle.CI_SPEC`) in both expert
layouts, and its XFP folders, built once per session in temporary folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from xfp.config import QuantConfig
from xfp.moe.upcycle import CI_SPEC, upcycle

STACK_CONFIG = QuantConfig(expert_select="stack", expert_sample=2, stack_library=True)
"""Stack-wide auto-select from 2 of the 4 experts, one codebook per stack."""


@pytest.fixture(scope="session")
def dense_hf() -> Path:
    from xfp.sources import default_model_hf

    return default_model_hf()


@pytest.fixture(scope="session")
def moe_src(dense_hf, tmp_path_factory) -> Path:
    """Routed experts stored one tensor per expert (published Qwen-MoE layout)."""
    return upcycle(dense_hf, tmp_path_factory.mktemp("moe") / "per_expert", CI_SPEC)


@pytest.fixture(scope="session")
def moe_fused_src(dense_hf, tmp_path_factory) -> Path:
    """The same model with routed experts fused into [E, N, K] stacks (transformers 5 layout)."""
    return upcycle(dense_hf, tmp_path_factory.mktemp("moe") / "fused", dataclasses.replace(CI_SPEC, layout="fused"))


@pytest.fixture(scope="session")
def xfp_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xfp_cache")


@pytest.fixture(scope="session")
def moe_xfp(moe_src, xfp_cache) -> Path:
    """moe_src quantized at the default config, through the quantize-on-load cache (`quantized_folder`)."""
    from xfp.integrations.transformers import XFPConfig, quantized_folder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XFP_CACHE", str(xfp_cache))
        return quantized_folder(moe_src, XFPConfig(), progress=False)


@pytest.fixture(scope="session")
def moe_xfp_stack(moe_fused_src, tmp_path_factory) -> Path:
    """moe_fused_src quantized with STACK_CONFIG."""
    from xfp.pipeline import quantize_model

    out = tmp_path_factory.mktemp("moe_xfp_stack") / "out"
    quantize_model(moe_fused_src, out, STACK_CONFIG, progress=False)
    return out
