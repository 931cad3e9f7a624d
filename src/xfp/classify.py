"""Which quality class each tensor of a Hugging Face causal-LM checkpoint gets.

STRICT: attention projections, dense MLP, shared experts (floor_strict).
LAZY:   routed MoE experts, per-expert 2-D or fused [E, N, K] stacks (floor_lazy).
KEEP:   embeddings and lm_head (unless quantize_embeddings), norms, routers, biases, buffers,
        anything that is not a 2-D/3-D float matrix; stored unchanged.

One name table per architecture family, picked by the config's model_type (then text_config's,
then `architectures`). Rows are regexes over the tensor name, anchored at a dot on the left and at
the end on the right, so `mlp.gate.weight` (router) never matches `mlp.gate_proj.weight`.
Both the on-disk checkpoint names (`block_sparse_moe.experts.0.w1.weight`,
`mlp.experts.3.gate_proj.weight`) and transformers 5's fused module names
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) are rows. Classification is pure: no model is loaded.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

log = logging.getLogger(__name__)


class TensorClass(enum.Enum):
    STRICT = "strict"
    LAZY = "lazy"
    KEEP = "keep"


@dataclass(frozen=True)
class Decision:
    """The class of one tensor; `reason` names the table row, `warning` is for the caller's report."""

    name: str
    cls: TensorClass
    reason: str
    warning: str | None = None


EMBEDDING: Final = "embedding"
"""Row class for token embeddings / lm_head: STRICT when quantize_embeddings, else KEEP."""


@dataclass(frozen=True)
class _Row:
    what: str
    cls: TensorClass | str  # a TensorClass, or EMBEDDING
    pattern: re.Pattern[str]


def _row(what: str, cls: TensorClass | str, tail: str) -> _Row:
    return _Row(what, cls, re.compile(rf"(?:^|\.)(?:{tail})$"))


S, L, K = TensorClass.STRICT, TensorClass.LAZY, TensorClass.KEEP

# Rows every family shares; they come first, so a bias of a projection is never quantized.
_COMMON = (
    _row("bias", K, r"[^.]*\.bias"),
    _row("norm", K, r"(?:[^.]*norm[^.]*|ln_[^.]*)\.weight"),
    _row("rotary buffer", K, r"rotary_emb\.[^.]+"),
    _row("scale of an already-quantized source", K, r"[^.]*_scale(?:_inv)?"),
    _row("token embedding", EMBEDDING, r"embed_tokens\.weight"),
    _row("lm_head", EMBEDDING, r"lm_head\.weight"),
)
_ATTN = _row("attention projection", S, r"self_attn\.[qkvo]_proj\.weight")
_MLP = _row("dense MLP", S, r"mlp\.(?:gate|up|down)_proj\.weight")
_ROUTER = _row("MoE router", K, r"mlp\.gate\.weight")
_EXPERT = _row("routed expert", L, r"mlp\.experts\.\d+\.(?:gate|up|down)_proj\.weight")
_FUSED_EXPERTS = _row("routed experts, fused [E, N, K]", L, r"mlp\.experts\.(?:gate_up|down)_proj")

_TABLES: dict[str, tuple[_Row, ...]] = {
    "llama": (*_COMMON, _ATTN, _MLP),
    "qwen2": (*_COMMON, _ATTN, _MLP),
    "gemma": (*_COMMON, _ATTN, _MLP),
    "phi": (
        *_COMMON,
        _row("attention projection", S, r"self_attn\.(?:[qkv]_proj|dense|qkv_proj|o_proj)\.weight"),
        _row("dense MLP", S, r"mlp\.(?:fc1|fc2|gate_up_proj|down_proj)\.weight"),
    ),
    "gpt_neox": (
        *_COMMON,
        _row("token embedding", EMBEDDING, r"embed_in\.weight"),
        _row("lm_head", EMBEDDING, r"embed_out\.weight"),
        _row("attention projection", S, r"attention\.(?:query_key_value|dense)\.weight"),
        _row("dense MLP", S, r"mlp\.dense_(?:h_to_4h|4h_to_h)\.weight"),
    ),
    "mixtral": (
        *_COMMON,
        _ATTN,
        _row("MoE router", K, r"(?:block_sparse_moe|mlp)\.gate\.weight"),
        _row("routed expert", L, r"block_sparse_moe\.experts\.\d+\.w[123]\.weight"),
        _FUSED_EXPERTS,
    ),
    "qwen_moe": (
        *_COMMON,
        _ATTN,
        _MLP,  # dense layers (mlp_only_layers, decoder_sparse_step)
        _row("shared expert", S, r"mlp\.shared_expert\.(?:gate|up|down)_proj\.weight"),
        _row("shared-expert gate", K, r"mlp\.shared_expert_gate\.weight"),
        _ROUTER,
        _EXPERT,
        _FUSED_EXPERTS,
    ),
    "deepseek": (
        *_COMMON,
        _row(
            "MLA attention projection",
            S,
            r"self_attn\.(?:q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight",
        ),
        _MLP,  # first_k_dense_replace layers
        _row("shared experts", S, r"mlp\.shared_experts\.(?:gate|up|down)_proj\.weight"),
        _ROUTER,
        _EXPERT,
        _FUSED_EXPERTS,
        _row("MTP projection", S, r"eh_proj\.weight"),  # DeepSeek-V3 next-token-prediction layer
        _row("MTP lm_head", EMBEDDING, r"shared_head\.head\.weight"),
    ),
    "olmoe": (*_COMMON, _ATTN, _ROUTER, _EXPERT, _FUSED_EXPERTS),
}
# Unknown architectures: every row of every family; the row semantics never conflict.
_TABLES["generic"] = tuple({r.pattern.pattern: r for t in _TABLES.values() for r in t}.values())

_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "smollm3": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "phi": "phi",
    "phi3": "phi",
    "gpt_neox": "gpt_neox",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "olmoe": "olmoe",
}
# "Qwen3MoeForCausalLM" -> "qwen3moe" -> qwen_moe: architectures need no table of their own.
_ARCH_STEMS = {k.replace("_", ""): v for k, v in _MODEL_TYPES.items()}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else {}


def family_for(config: Mapping[str, Any]) -> str:
    """The name-table family of a config.json dict; "generic" when nothing is recognised."""
    for model_type in (config.get("model_type"), _text_config(config).get("model_type")):
        if isinstance(model_type, str) and model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
    for arch in config.get("architectures") or ():
        stem = re.sub(r"For[A-Z]\w*$", "", str(arch)).lower()
        if stem in _ARCH_STEMS:
            return _ARCH_STEMS[stem]
    return "generic"


@functools.lru_cache(maxsize=None)
def _unknown_family_warning(model_type: str, architectures: tuple[str, ...]) -> str:
    msg = (
        f"unknown model_type {model_type} (architectures {list(architectures)}): "
        "generic name table used, check the class of every tensor"
    )
    log.warning(msg)  # once per architecture, not once per tensor
    return msg


def classify(
    name: str,
    shape: tuple[int, ...],
    dtype_is_float: bool,
    config: Mapping[str, Any],
    *,
    quantize_embeddings: bool = False,
) -> Decision:
    """The class of tensor `name` of `shape` in a checkpoint whose config.json is `config`."""
    family = family_for(config)
    warnings: list[str] = []
    if family == "generic":
        arch = tuple(str(a) for a in config.get("architectures") or ())
        warnings.append(_unknown_family_warning(repr(config.get("model_type")), arch))

    def decide(cls: TensorClass, what: str, warning: str | None = None) -> Decision:
        if warning:
            log.warning("%s %s: %s", name, list(shape), warning)
            warnings.append(warning)
        return Decision(name, cls, f"{family}: {what}", "; ".join(warnings) or None)

    if not dtype_is_float:
        return decide(K, "not a float tensor")
    row = next((r for r in _TABLES[family] if r.pattern.search(name)), None)
    if row is None:
        if len(shape) < 2:
            return decide(K, f"{len(shape)}-D tensor")
        if len(shape) > 3:
            return decide(K, f"{len(shape)}-D tensor", f"no {family} row matches, {len(shape)}-D: kept")
        return decide(S, "unmatched matrix", f"no {family} row matches: quantized as STRICT")
    cls = row.cls
    what = row.what
    if cls == EMBEDDING:
        cls = S if quantize_embeddings else K
        tied = config.get("tie_word_embeddings", _text_config(config).get("tie_word_embeddings"))
        if quantize_embeddings and tied:
            what += " (tie_word_embeddings: one stored matrix serves as embedding and lm_head)"
    if cls is not K and len(shape) not in (2, 3):
        return decide(K, f"{what}, but {len(shape)}-D")
    return decide(cls, what)
