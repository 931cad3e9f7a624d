"""Running quantized routed experts: `XFPExperts` stands in for transformers 5's fused experts module.

transformers 5 holds a MoE layer's routed experts as one module with 3-D parameters (`Qwen2MoeExperts`,
`MixtralExperts`, `OlmoeExperts`...: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn`, and
`forward(hidden_states, top_k_index, top_k_weights)`). An XFP folder stores expert e of such a module at
`<module>.<e>.{gate_proj,up_proj,down_proj}.weight` (`xfp.moe.experts`), as 2-D matrices. Before the weights
load, `prepare_experts` swaps each such module for an `XFPExperts` (a ModuleList of E gate/up/down MLPs,
whose linear layers then become `XFPLinear` like any other quantized layer): the experts stay quantized in
memory and the stored tensor names are its buffer names, so transformers fills them directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from xfp.errors import XFPError

EXPERT_NAME = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
PROJS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device="meta")
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device="meta")
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device="meta")
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class XFPExperts(nn.ModuleList):
    """E experts with the forward of transformers' fused experts module: hidden_states [tokens, H],
    top_k_index [tokens, k] int64, top_k_weights [tokens, k] -> [tokens, H], the routing-weighted sum."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__([ExpertMLP(hidden, intermediate, act_fn) for _ in range(num_experts)])
        self.num_experts = num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue  # an index past the last expert marks a dropped slot (as in transformers)
            token, slot = torch.where(top_k_index == expert)
            y = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _fused_shape(module: nn.Module, path: str, where: Path) -> tuple[int, int, int]:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    ok = (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
          and down.dim() == 3 and hasattr(module, "act_fn") and not getattr(module, "has_bias", False)
          and not getattr(module, "is_transposed", False))
    if not ok:
        raise XFPError(f"{where}: stores routed experts of '{path}', but {type(module).__name__} is not a fused "
                       "experts module with gate_up_proj [E, 2I, H], down_proj [E, H, I] and act_fn; "
                       "XFP cannot run it")
    experts, two_i, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, two_i // 2) or two_i % 2:
        raise XFPError(f"{where}: '{path}': gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} "
                       "do not describe [E, 2I, H] and [E, H, I]")
    return experts, hidden, two_i // 2


def prepare_experts(model: nn.Module, names: Iterable[str], where: Path) -> list[str]:
    """Replace every fused experts module whose experts the folder stores (`names`: the stored matrices)
    by an `XFPExperts` of meta-device linears; returns the replaced module paths.

    XFPError unless the folder stores all three projections of every expert of the module."""
    stored: dict[str, set[tuple[int, str]]] = {}
    for name in names:
        m = EXPERT_NAME.match(name)
        if m:
            stored.setdefault(m["module"], set()).add((int(m["expert"]), m["proj"]))
    prefix = getattr(model, "base_model_prefix", "") or ""
    replaced = []
    for path, have in stored.items():
        candidates = [path, path.removeprefix(f"{prefix}.")] if prefix and path.startswith(f"{prefix}.") else [path]
        module = None
        for candidate in candidates:
            try:
                module = model.get_submodule(candidate)
                path = candidate
                break
            except AttributeError:
                continue
        if module is None or isinstance(module, XFPExperts):
            continue  # no such module (resolve_targets reports it) or already a list of expert layers
        if isinstance(module, nn.ModuleList):
            continue  # per-expert modules already (older MoE implementations): plain linears, nothing to do
        experts, hidden, inter = _fused_shape(module, path, where)
        missing = sorted({(e, p) for e in range(experts) for p in PROJS} - have)
        if missing:
            e, p = missing[0]
            raise XFPError(f"{where}: stores routed experts of '{path}' but not '{path}.{e}.{p}.weight' "
                           f"({len(missing)} of {3 * experts} expert matrices missing); XFP needs all of them")
        model.set_submodule(path, XFPExperts(experts, hidden, inter, module.act_fn))
        replaced.append(path)
    return replaced


__all__ = ["EXPERT_NAME", "ExpertMLP", "XFPExperts", "prepare_experts"]
