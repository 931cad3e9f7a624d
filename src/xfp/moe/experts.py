"""Routed expert stacks: which source tensors hold the experts of one projection, and how XFP stores them.

A stack is the routed experts of one projection of one MoE layer, e.g. `model.layers.3.mlp.experts.gate_proj`.
Sources hold it in one of two layouts (both occur in published checkpoints):
- per expert: one 2-D tensor per expert, `<prefix>.experts.<e>.<proj>.weight` (Qwen-MoE, OLMoE, DeepSeek:
  gate_proj/up_proj/down_proj; Mixtral: w1/w2/w3);
- fused: transformers 5's module layout, `<prefix>.experts.gate_up_proj` [E, 2I, H] (gate rows first, then
  up rows) and `<prefix>.experts.down_proj` [E, H, I].
XFP always stores expert e of a stack as its own 2-D matrix named like the per-expert layout
(`<prefix>.experts.<e>.<proj>.weight`; a fused gate_up_proj becomes gate_proj and up_proj), so a folder
does not depend on the source's layout, and the runtime (`xfp.moe.runtime`) reassembles the experts.

Only tensors classified LAZY (routed experts, `xfp.classify`) form stacks; shared experts are ordinary
STRICT matrices. All of this is pure naming and shape arithmetic: nothing is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xfp.classify import Decision, TensorClass
from xfp.errors import SourceError

PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<fused>gate_up_proj|down_proj)$")
FUSED_SPLIT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""A fused tensor -> the projections it holds, in row order (gate_up_proj: [gate; up] along dim 1)."""


def stored_name(prefix: str, expert: int, proj: str) -> str:
    """The name XFP stores expert `expert` of stack `<prefix>.<proj>` under."""
    return f"{prefix}.{expert}.{proj}.weight"


@dataclass(frozen=True)
class Member:
    """One expert of a stack: stored as `name`, read from `source` (a 2-D tensor, or expert `expert` of a
    3-D fused one, rows [row0, row1))."""

    name: str
    expert: int
    source: str
    fused: bool
    row0: int = 0
    row1: int = 0


@dataclass(frozen=True)
class ExpertStack:
    """The routed experts of one projection; stands where a `Decision` stands in the pipeline's plan."""

    name: str  # e.g. model.layers.0.mlp.experts.gate_proj
    cls: TensorClass
    reason: str
    warning: str | None
    members: tuple[Member, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.source for m in self.members))


def _member_of(d: Decision, shape: tuple[int, ...]) -> list[tuple[str, Member]] | None:
    """(stack name, member) pairs a LAZY tensor contributes, or None when it is not a routed expert."""
    m = PER_EXPERT.match(d.name)
    if m and len(shape) == 2:
        stack = f"{m['prefix']}.{m['proj']}"
        return [(stack, Member(d.name, int(m["expert"]), d.name, False))]
    m = FUSED.match(d.name)
    if m and len(shape) == 3:
        projs = FUSED_SPLIT[m["fused"]]
        experts, rows, _ = shape
        if rows % len(projs):
            raise SourceError(f"tensor '{d.name}': fused {m['fused']} must have an even number of rows "
                              f"(gate then up), got shape {list(shape)}")
        step = rows // len(projs)
        return [(f"{m['prefix']}.{proj}", Member(stored_name(m["prefix"], e, proj), e, d.name, True, k * step,
                                                 (k + 1) * step))
                for k, proj in enumerate(projs) for e in range(experts)]
    return None


def plan(decisions: list[Decision], shape_of: Callable[[str], tuple[int, ...]]) -> list[Decision | ExpertStack]:
    """Group the routed experts among `decisions` into stacks, each placed where its first tensor was.

    Every other decision passes through unchanged. SourceError when a stack's experts are not 0..E-1
    exactly once, or differ in shape."""
    stacks: dict[str, list[Member]] = {}
    first: dict[str, Decision] = {}
    out: list[Decision | str] = []
    for d in decisions:
        pairs = _member_of(d, shape_of(d.name)) if d.cls is TensorClass.LAZY else None
        if not pairs:
            out.append(d)
            continue
        for stack, member in pairs:
            if stack not in stacks:
                stacks[stack], first[stack] = [], d
                out.append(stack)
            stacks[stack].append(member)
    result: list[Decision | ExpertStack] = []
    for item in out:
        if isinstance(item, Decision):
            result.append(item)
            continue
        members = sorted(stacks[item], key=lambda m: m.expert)
        experts = [m.expert for m in members]
        if experts != list(range(len(members))):
            raise SourceError(f"stack '{item}': routed experts must be numbered 0..{len(members) - 1} exactly once, "
                              f"got {experts}")
        shapes = {_member_shape(m, shape_of) for m in members}
        if len(shapes) != 1:
            raise SourceError(f"stack '{item}': routed experts differ in shape: {sorted(shapes)}")
        d = first[item]
        result.append(ExpertStack(item, d.cls, f"{d.reason} (stack of {len(members)})", d.warning, tuple(members)))
    return result


def _member_shape(m: Member, shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, int]:
    shape = shape_of(m.source)
    return (m.row1 - m.row0, shape[2]) if m.fused else (shape[0], shape[1])


class MemberLoader:
    """Loads a stack's experts as [rows, cols] float32, reading each fused source tensor once."""

    def __init__(self, load: Callable[[str], torch.Tensor]):
        self._load = load
        self._cache: tuple[str, torch.Tensor] | None = None

    def __call__(self, m: Member) -> torch.Tensor:
        if not m.fused:
            return self._load(m.source)
        if self._cache is None or self._cache[0] != m.source:
            self._cache = (m.source, self._load(m.source))
        return self._cache[1][m.expert, m.row0:m.row1].contiguous()


def stored_members(plan_: list[Decision | ExpertStack]) -> dict[str, Member]:
    """{stored matrix name: member} over every stack of a plan (what `xfp verify` reads back)."""
    return {m.name: m for item in plan_ if isinstance(item, ExpertStack) for m in item.members}


__all__ = ["ExpertStack", "FUSED", "FUSED_SPLIT", "Member", "MemberLoader", "PER_EXPERT", "plan", "stored_members",
           "stored_name"]
