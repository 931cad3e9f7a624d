"""Expert stacks: grouping per-expert and fused sources into the same stored matrices, and the sample."""

from __future__ import annotations

import pytest
import torch

from xfp.classify import Decision, TensorClass
from xfp.errors import SourceError
from xfp.evaluate.verify import SourceMatrices
from xfp.moe.experts import ExpertStack, plan
from xfp.moe.select import sample_experts
from xfp.sources.hf_folder import HFFolderSource


def _units(src):
    from xfp.moe.pipeline import plan_units
    from xfp.pipeline.run import _decide

    source = HFFolderSource(src)
    return source, plan_units(source, _decide(source, False))


def test_both_layouts_give_the_same_stacks(moe_src, moe_fused_src):
    (per, per_units), (fused, fused_units) = _units(moe_src), _units(moe_fused_src)
    stacks = [u for u in per_units if isinstance(u, ExpertStack)]
    assert [s.name for s in stacks] == [s.name for s in fused_units if isinstance(s, ExpertStack)]
    assert [s.name.rsplit(".", 1)[1] for s in stacks] == ["down_proj", "gate_proj", "up_proj"]
    assert all(s.cls is TensorClass.LAZY and len(s.members) == 4 for s in stacks)
    a, b = SourceMatrices(per), SourceMatrices(fused)
    for s in stacks:
        for m in s.members:
            assert m.name in a and m.name in b
            assert torch.equal(a.load(m.name), b.load(m.name)), m.name
    kinds = {u.name: u.cls for u in per_units if not isinstance(u, ExpertStack)}
    p = "model.layers.0.mlp"
    assert kinds[f"{p}.gate.weight"] is TensorClass.KEEP  # router
    assert kinds[f"{p}.shared_expert_gate.weight"] is TensorClass.KEEP
    assert kinds[f"{p}.shared_expert.down_proj.weight"] is TensorClass.STRICT
    assert kinds["model.layers.0.self_attn.q_proj.weight"] is TensorClass.STRICT


def _lazy(name):
    return Decision(name, TensorClass.LAZY, "test")


def test_stack_numbering_and_shapes_are_checked():
    p = "model.layers.0.mlp.experts"
    with pytest.raises(SourceError, match=r"numbered 0\.\.1 exactly once, got \[0, 2\]"):
        plan([_lazy(f"{p}.0.up_proj.weight"), _lazy(f"{p}.2.up_proj.weight")], lambda n: (8, 4))
    with pytest.raises(SourceError, match="differ in shape"):
        plan([_lazy(f"{p}.0.up_proj.weight"), _lazy(f"{p}.1.up_proj.weight")],
             lambda n: (8, 4) if "experts.0." in n else (8, 5))
    with pytest.raises(SourceError, match="even number of rows"):
        plan([_lazy(f"{p}.gate_up_proj")], lambda n: (2, 7, 4))


def test_sample_is_evenly_spaced():
    assert sample_experts(4, 2) == [0, 3]
    assert sample_experts(64, 4) == [0, 21, 42, 63]
    assert sample_experts(3, 8) == [0, 1, 2]
    assert sample_experts(5, 1) == [0]


def test_expert_select_options_check_themselves():
    from xfp.config import QuantConfig

    cfg = QuantConfig(expert_select="stack", expert_sample=2, stack_library=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="expert_select must be one of"):
        QuantConfig(expert_select="layer")
    with pytest.raises(ValueError, match="expert_sample"):
        QuantConfig(expert_sample=0)
    with pytest.raises(ValueError, match="stack_library needs expert_select 'stack'"):
        QuantConfig(stack_library=True)
    with pytest.raises(ValueError, match="stack_library needs"):
        QuantConfig(expert_select="stack", stack_library=True, library_size=4)
