"""The registry of quantization methods `xfp compare` measures, and fake-quantizing a model with one.

A method is a callable `(name, w, ctx) -> (w_hat, stored_bytes)`:
  name: the tensor's parameter name, e.g. `model.layers.0.mlp.up_proj.weight`;
  w: [out, in] float32, the source weight (never modify it);
  ctx: a `MethodContext` (the source checkpoint, its config, the source model...);
  w_hat: [out, in] float32 (or float16), exactly the matrix a real decoder of the stored format gives;
  stored_bytes: every byte the format stores for this matrix (indices, scales, offsets, codebooks,
  outliers), counted as docs/FORMAT.md §5 counts XFP's.
It is applied to every tensor `xfp.classify.classify` marks STRICT or LAZY (a 3-D [E, N, K] stack one
[N, K] slice at a time); embeddings, lm_head and norms stay as in the source.

Adding a method is one function and one `register` line:

    def my_method(name, w, ctx):
        w_hat = ...
        return w_hat, stored_bytes

    register("mine-3", my_method, family="mine", about="what it stores")

Names of the form `xfp-<floor>` (e.g. `xfp-0.985`) resolve to XFP at that floor without registering.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from xfp.classify import TensorClass, classify, family_for
from xfp.config import OutlierConfig
from xfp.errors import XFPError
from xfp.evaluate import baselines
from xfp.pipeline.worker import is_float_label
from xfp.sources.base import TensorSource


@dataclass
class MethodContext:
    """What a method may look at besides the weight itself; one context serves a whole model.

    source: the checkpoint (`TensorSource`; `source.load(name)` gives any tensor as float32);
    config: its config.json dict; model: the source transformers model with the original weights (while
    methods run; read it, never change it), or None; cache: scratch space a method may fill once per model
    (e.g. calibration statistics), keyed by the method's own names.
    """

    source: TensorSource
    config: dict
    model: torch.nn.Module | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def tensor_class(self, name: str) -> TensorClass:
        """STRICT / LAZY / KEEP of a source tensor, as the quantizer decides it."""
        return classify(name, self.source.tensor_shape(name), True, self.config).cls

    def input_scale(self, name: str) -> torch.Tensor | None:
        """[in] float32: the RMSNorm scale that multiplies this projection's input, or None.

        Llama-like (q/k/v <- input_layernorm, gate/up <- post_attention_layernorm: the weight itself) and
        Gemma (q/k/v <- input_layernorm, gate/up <- pre_feedforward_layernorm: 1 + weight, Gemma's RMSNorm
        convention). o_proj, down_proj and unknown families have none.
        """
        family = family_for(self.config)
        for pattern, norm in _INPUT_NORMS.get(family, ()):
            match = pattern.search(name)
            if match:
                norm_name = name[:match.start()] + norm
                if norm_name not in self.source.tensor_names():
                    return None
                scale = self.source.load(norm_name)
                return 1.0 + scale if family == "gemma" else scale
        return None


_LLAMA_NORMS = ((re.compile(r"\.self_attn\.[qkv]_proj\.weight$"), ".input_layernorm.weight"),
                (re.compile(r"\.mlp\.(?:gate|up)_proj\.weight$"), ".post_attention_layernorm.weight"))
_INPUT_NORMS = {
    "llama": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "gemma": ((re.compile(r"\.self_attn\.[qkv]_proj\.weight$"), ".input_layernorm.weight"),
              (re.compile(r"\.mlp\.(?:gate|up)_proj\.weight$"), ".pre_feedforward_layernorm.weight")),
}

Method = Callable[[str, torch.Tensor, MethodContext], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Method
    family: str  # groups methods in tables and plots: "rtn", "nf", "hqq", "xfp", ...
    about: str


REGISTRY: dict[str, MethodSpec] = {}
DEFAULT_METHODS: list[str] = []
"""What `xfp compare` runs without --methods, in table order."""


def register(name: str, fn: Method, *, family: str, about: str, default: bool = True) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ValueError(f"method names are letters, digits and _.+- (no commas), got {name!r}")
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    REGISTRY[name] = MethodSpec(name, fn, family, about)
    if default:
        DEFAULT_METHODS.append(name)


_XFP_NAME = re.compile(r"xfp-(0?\.\d+|1(?:\.0*)?)(?:-L(\d+))?")


def get(name: str) -> MethodSpec:
    """A registered method, or `xfp-<floor>` for any floor (`xfp-<floor>-L<n>`: with a library of n codebooks per
    matrix, family "xfp-library"); XFPError listing the known names otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    match = _XFP_NAME.fullmatch(name)
    if match and match.group(2) is None:
        floor = float(match.group(1))
        return MethodSpec(name, functools.partial(xfp, floor=floor), "xfp", f"XFP auto-select, floor {floor} (p1)")
    if match and 1 <= int(match.group(2)) <= 256:
        floor, size = float(match.group(1)), int(match.group(2))
        return MethodSpec(name, functools.partial(xfp, floor=floor, library_size=size), "xfp-library",
                          f"XFP auto-select, floor {floor} (p1), library of {size} codebooks per matrix")
    raise XFPError(f"unknown method {name!r}; known: {', '.join(REGISTRY)} (or xfp-<floor>, xfp-<floor>-L<1..256>)")


def parse_methods(text: str | None) -> list[MethodSpec]:
    """`rtn3-g64,xfp-0.99` -> specs, in the given order (None: the defaults)."""
    names = DEFAULT_METHODS if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise XFPError("--methods names no method")
    if len(set(names)) != len(names):
        raise XFPError(f"--methods repeats a name: {','.join(names)}")
    return [get(name) for name in names]


# -- the methods ----------------------------------------------------------------------------------


def rtn(name: str, w: torch.Tensor, ctx: MethodContext, *, bits: int, group: int) -> tuple[torch.Tensor, int]:
    return baselines.rtn_asymmetric_matrix(w, bits, group), baselines.rtn_bytes(*w.shape, bits, group)


def nf(name: str, w: torch.Tensor, ctx: MethodContext, *, bits: int, group: int) -> tuple[torch.Tensor, int]:
    return baselines.nf_absmax_matrix(w, bits, group), baselines.nf_bytes(*w.shape, bits, group)


def hqq(name: str, w: torch.Tensor, ctx: MethodContext, *, bits: int, group: int) -> tuple[torch.Tensor, int]:
    return baselines.hqq_matrix(w, bits, group), baselines.rtn_bytes(*w.shape, bits, group)


def hot_columns(ctx: MethodContext, ratio: float, sandwich: bool = True):
    """The model's `xfp.quantize.hot_columns.HotColumns` at `ratio`, found once per model; sandwich=False: without
    the sandwich-norm rule (the residual vote everywhere, as before that rule existed), for its ablation."""
    from xfp.quantize import hot_columns as hot

    key = f"hot_columns:{ratio}:{sandwich}"
    if key not in ctx.cache:
        names = quantized_names(ctx.source, ctx.config)
        ctx.cache[key] = hot.find(names, ctx.source.load, ratio,
                                  tensor_names=ctx.source.tensor_names() if sandwich else (), config=ctx.config)
    return ctx.cache[key]


def xfp(name: str, w: torch.Tensor, ctx: MethodContext, *, floor: float, sandwich: bool = True,
        **options) -> tuple[torch.Tensor, int]:
    """XFP auto-select at `floor` for both classes, the default QuantConfig changed by `options`; W_hat is the
    in-memory reconstruction, which equals the decoded stored matrix bit for bit."""
    from xfp.config import QuantConfig
    from xfp.quantize.autoselect import quantize_matrix

    config = QuantConfig(floor_strict=floor, floor_lazy=floor, **options)
    kept = None
    if config.mode == "v2a" and config.keep_columns > 0:
        kept = hot_columns(ctx, config.keep_columns, sandwich).columns(name, w)
    result = quantize_matrix(w, floor, config, name, kept)
    return result.reconstruction, result.layout.total_bytes


def _published_outliers():
    from xfp.config import OutlierConfig

    return OutlierConfig(k=4.0, budgets=(0.02,))


def xfp_fixed(name: str, w: torch.Tensor, ctx: MethodContext, *, bits: int, **options) -> tuple[torch.Tensor, int]:
    """XFP at one width (no floor: every matrix at `bits`), for ablations."""
    return xfp(name, w, ctx, floor=-1.0, bits=(bits,), escalation_bits=(), **options)


for _bits in (3, 4):
    for _group in (64, 128):
        register(f"rtn{_bits}-g{_group}", functools.partial(rtn, bits=_bits, group=_group), family="rtn",
                 about=f"RTN asymmetric, {_bits}-bit, group {_group}, fp16 scale + min")
for _bits in (3, 4):
    register(f"nf{_bits}-g64", functools.partial(nf, bits=_bits, group=64), family="nf",
             about=f"NF{_bits} absmax, group 64, fp16 absmax")
for _bits in (3, 4):
    register(f"hqq{_bits}-g64", functools.partial(hqq, bits=_bits, group=64), family="hqq",
             about=f"HQQ (hqq package), {_bits}-bit, group 64, fp16 scale + zero")
for _floor in (0.95, 0.97, 0.975, 0.98, 0.985, 0.99, 0.9925, 0.994, 0.995):
    register(f"xfp-{_floor}", functools.partial(xfp, floor=_floor), family="xfp",
             about=f"XFP auto-select, floor {_floor} (p1 per-channel cosine)")

# Ablations (not in the default set): one width everywhere, one ingredient changed at a time.
for _bits in (3, 4):
    for _group in (64, 128):
        register(f"xfp{_bits}-g{_group}", functools.partial(xfp_fixed, bits=_bits, group_size=(_group,)),
                 family="xfp-fixed", default=False,
                 about=f"XFP v2a at {_bits} bits, group {_group}: layer codebook, coded scales, kept hot columns")
    register(f"xfp{_bits}-g128-nokeep", functools.partial(xfp_fixed, bits=_bits, group_size=(128,), keep_columns=0.0),
             family="ablation", default=False, about=f"as xfp{_bits}-g128 without kept hot columns")
    register(f"xfp{_bits}-g128-resid",
             functools.partial(xfp_fixed, bits=_bits, group_size=(128,), sandwich=False), family="ablation",
             default=False, about=f"as xfp{_bits}-g128 with the residual-vote rule for every model's kept columns "
                                  "(no sandwich-norm rule)")
    register(f"xfp{_bits}-g128-L32", functools.partial(xfp_fixed, bits=_bits, group_size=(128,), library_size=32),
             family="ablation", default=False, about=f"as xfp{_bits}-g128 with the published library of 32 codebooks")
    register(f"lloyd{_bits}-channel",
             functools.partial(xfp_fixed, bits=_bits, mode="v2", outliers=_published_outliers()),
             family="ablation", default=False,
             about=f"the published recipe: one {_bits}-bit Lloyd codebook per output channel, 4-sigma fp16 outliers <= 2%")

for _floor in (0.99, 0.9925):
    register(f"xfp-{_floor}-g64-128", functools.partial(xfp, floor=_floor, group_size=(64, 128)), family="ablation",
             default=False, about=f"as xfp-{_floor} without groups of 256 (auto-select among groups of 64 and 128)")
register("xfp-0.99-noout", functools.partial(xfp, floor=0.99, outliers=OutlierConfig(budgets=(0.0,))),
         family="ablation", default=False, about="as xfp-0.99 without fp16 outliers")


# -- applying a method to a model -----------------------------------------------------------------


@dataclass
class FakeQuantized:
    """One method applied to every quantized tensor of a model.

    w_hat: {parameter name: W_hat}, float16 where that is exact, else float32; stored_bytes / weights:
    totals over the quantized tensors; seconds: time spent inside the method.
    """

    method: MethodSpec
    w_hat: dict[str, torch.Tensor]
    stored_bytes: int
    weights: int
    seconds: float

    @property
    def honest_bits(self) -> float:
        return 8.0 * self.stored_bytes / self.weights if self.weights else float("nan")


def quantized_names(source: TensorSource, config: Mapping) -> list[str]:
    """Every source tensor classified STRICT or LAZY (what XFP quantizes by default)."""
    names = []
    for name in source.tensor_names():
        if classify(name, source.tensor_shape(name), is_float_label(source.tensor_dtype(name)), config).cls is not TensorClass.KEEP:
            names.append(name)
    return names


def _compact(w_hat: torch.Tensor) -> torch.Tensor:
    half = w_hat.half()
    return half if torch.equal(half.float(), w_hat.float()) else w_hat.float()


def _check_output(spec: MethodSpec, name: str, w: torch.Tensor, out: object) -> tuple[torch.Tensor, int]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise XFPError(f"method {spec.name}: tensor '{name}': must return (w_hat, stored_bytes), got {type(out)}")
    w_hat, stored = out
    if not isinstance(w_hat, torch.Tensor) or w_hat.shape != w.shape or not w_hat.is_floating_point():
        raise XFPError(f"method {spec.name}: tensor '{name}': w_hat must be a float tensor of shape "
                       f"{tuple(w.shape)}, got {getattr(w_hat, 'shape', type(w_hat))}")
    if not torch.isfinite(w_hat).all():
        raise XFPError(f"method {spec.name}: tensor '{name}': w_hat has NaN or Inf")
    if isinstance(stored, bool) or not isinstance(stored, int) or stored <= 0:
        raise XFPError(f"method {spec.name}: tensor '{name}': stored_bytes must be a positive int, got {stored!r}")
    return w_hat, stored


def fake_quantize(spec: MethodSpec, ctx: MethodContext, names: list[str], progress: bool = True) -> FakeQuantized:
    """Apply `spec` to each tensor in `names` of `ctx.source` (3-D stacks slice by slice)."""
    w_hats: dict[str, torch.Tensor] = {}
    stored = weights = 0
    seconds = 0.0
    for name in tqdm(names, desc=spec.name, disable=not progress, unit="tensor", leave=False):
        w = ctx.source.load(name)
        slices = [w] if w.dim() == 2 else list(w)
        outs = []
        for part in slices:
            began = time.perf_counter()
            out = spec.fn(name, part, ctx)
            seconds += time.perf_counter() - began
            w_hat, n_bytes = _check_output(spec, name, part, out)
            outs.append(w_hat.float())
            stored += n_bytes
            weights += part.numel()
        w_hats[name] = _compact(outs[0] if w.dim() == 2 else torch.stack(outs))
    return FakeQuantized(spec, w_hats, stored, weights, seconds)
