"""The upcycled test MoE: loadable by stock transformers in both expert layouts, equal to the dense model
when unperturbed, deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from xfp.errors import SourceError
from xfp.moe.upcycle import CI_SPEC, UpcycleSpec, dense_slice, upcycle
from xfp.sources.hf_folder import HFFolderSource

IDS = torch.arange(200, 248).unsqueeze(0)


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_unperturbed_moe_equals_the_dense_slice(dense_hf, tmp_path):
    spec = dataclasses.replace(CI_SPEC, perturb=0.0)
    dense = _logits(dense_slice(dense_hf, tmp_path / "dense", layers=spec.layers, intermediate=spec.intermediate))
    for layout in ("per_expert", "fused"):
        moe = _logits(upcycle(dense_hf, tmp_path / layout, dataclasses.replace(spec, layout=layout)))
        assert torch.allclose(moe, dense, rtol=0, atol=1e-3), layout


def test_perturbed_experts_differ_and_layouts_agree(moe_src, moe_fused_src):
    per, fused = HFFolderSource(moe_src), HFFolderSource(moe_fused_src)
    p = "model.layers.0.mlp.experts"
    e0, e1 = per.load(f"{p}.0.gate_proj.weight"), per.load(f"{p}.1.gate_proj.weight")
    assert not torch.equal(e0, e1)
    cos = torch.nn.functional.cosine_similarity(e0.flatten(), e1.flatten(), dim=0)
    assert 0.99 < cos < 1.0
    gate_up = fused.load(f"{p}.gate_up_proj")
    inter = CI_SPEC.intermediate
    assert gate_up.shape == (CI_SPEC.experts, 2 * inter, 576)
    assert torch.equal(gate_up[1, :inter], e1) and torch.equal(gate_up[1, inter:], per.load(f"{p}.1.up_proj.weight"))
    assert torch.equal(fused.load(f"{p}.down_proj")[3], per.load(f"{p}.3.down_proj.weight"))
    assert torch.allclose(_logits(moe_src), _logits(moe_fused_src), rtol=0, atol=1e-4)


def test_upcycle_is_deterministic(dense_hf, moe_src, tmp_path):
    again = upcycle(dense_hf, tmp_path / "again", CI_SPEC)
    for shard in sorted(p.name for p in moe_src.glob("*.safetensors")):
        with safe_open(moe_src / shard, "pt") as a, safe_open(again / shard, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_bad_specs(dense_hf, tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        UpcycleSpec(experts=2, top_k=3)
    with pytest.raises(ValueError, match="layout"):
        UpcycleSpec(layout="stacked")
    with pytest.raises(SourceError, match="asked for 31 layers"):
        upcycle(dense_hf, tmp_path / "x", UpcycleSpec(layers=31))
