"""XFPExperts: same routing arithmetic as transformers' fused experts; hostile layouts refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xfp.errors import XFPError
from xfp.moe.runtime import XFPExperts, prepare_experts


class _Fused(nn.Module):
    def __init__(self, e: int, h: int, i: int, down_i: int | None = None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.randn(e, h, i if down_i is None else down_i))
        self.act_fn = nn.SiLU()


class _Model(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = experts


def _names(e: int, skip: str | None = None) -> list[str]:
    names = [f"mlp.experts.{k}.{p}.weight" for k in range(e) for p in ("gate_proj", "up_proj", "down_proj")]
    return [n for n in names if n != skip]


def test_forward_matches_the_fused_arithmetic():
    torch.manual_seed(0)
    fused = _Fused(3, 8, 5)
    experts = XFPExperts(3, 8, 5, fused.act_fn)
    for k, expert in enumerate(experts):
        gate, up = fused.gate_up_proj[k].detach().chunk(2)
        for layer, w in ((expert.gate_proj, gate), (expert.up_proj, up), (expert.down_proj, fused.down_proj[k].detach())):
            layer.weight = nn.Parameter(w.clone())
    x = torch.randn(6, 8)
    index = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]])
    weights = torch.rand(6, 2)
    want = torch.zeros(6, 8)
    for t in range(6):
        for s in range(2):
            k = int(index[t, s])
            gate, up = (fused.gate_up_proj[k] @ x[t]).chunk(2)
            want[t] += weights[t, s] * (fused.down_proj[k] @ (fused.act_fn(gate) * up))
    with torch.no_grad():
        assert torch.allclose(experts(x, index, weights), want, atol=1e-5)


def test_prepare_replaces_only_complete_fused_modules():
    model = _Model(_Fused(2, 8, 4))
    assert prepare_experts(model, _names(2), Path("folder")) == ["mlp.experts"]
    assert isinstance(model.mlp.experts, XFPExperts) and model.mlp.experts[1].down_proj.in_features == 4
    with pytest.raises(XFPError, match=r"folder: stores routed experts of 'mlp\.experts' but not "
                                       r"'mlp\.experts\.1\.up_proj\.weight' \(1 of 6"):
        prepare_experts(_Model(_Fused(2, 8, 4)), _names(2, skip="mlp.experts.1.up_proj.weight"), Path("folder"))
    with pytest.raises(XFPError, match=r"do not describe \[E, 2I, H\] and \[E, H, I\]"):
        prepare_experts(_Model(_Fused(2, 8, 4, down_i=3)), _names(2), Path("folder"))
    with pytest.raises(XFPError, match="is not a fused experts module"):
        prepare_experts(_Model(nn.Linear(2, 2)), _names(2), Path("folder"))
