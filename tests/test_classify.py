"""Tensor classes against the real parameter names of tiny transformers models built on the meta device."""

from __future__ import annotations

import functools
import logging
import re

import pytest
import torch

from xfp.classify import Decision, TensorClass, classify, family_for

S, L, K = TensorClass.STRICT, TensorClass.LAZY, TensorClass.KEEP

_TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_DEEPSEEK = dict(
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
    first_k_dense_replace=1, n_group=1, topk_group=1, **_MLA,
)  # fmt: skip
# model_type -> (extra config fields, expected family)
MODELS = {
    "llama": ({}, "llama"),
    "mistral": ({}, "llama"),
    "smollm3": ({}, "llama"),
    "qwen2": ({}, "qwen2"),
    "qwen3": ({}, "qwen2"),
    "gemma3_text": ({"head_dim": 16}, "gemma"),
    "phi": ({}, "phi"),
    "phi3": ({}, "phi"),
    "gpt_neox": ({}, "gpt_neox"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "mixtral"),
    "qwen2_moe": (
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 64},
        "qwen_moe",
    ),  # fmt: skip
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}, "qwen_moe"),
    "deepseek_v2": (_DEEPSEEK, "deepseek"),
    "deepseek_v3": (_DEEPSEEK, "deepseek"),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, "olmoe"),
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"}


@functools.cache
def tensors(model_type: str) -> tuple[dict, list[tuple[str, tuple[int, ...], bool]]]:
    """config.json dict and (name, shape, is_float) of every parameter and buffer of a tiny model."""
    transformers = pytest.importorskip("transformers")
    extra, _ = MODELS[model_type]
    cfg = transformers.AutoConfig.for_model(model_type, **_TINY, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    named = [*model.named_parameters(), *model.named_buffers()]
    return cfg.to_dict(), [(n, tuple(t.shape), t.is_floating_point()) for n, t in named]


def expected(name: str, shape: tuple[int, ...]) -> TensorClass:
    """An independent, coarse oracle: what the brief says, from the name's words alone."""
    if len(shape) < 2 or re.search(r"(embed|lm_head|norm)", name):
        return K
    if re.search(r"\.gate\.weight$|shared_expert_gate", name):
        return K
    if ".experts." in name:
        return L
    return S


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_real_names_get_expected_class(model_type, caplog):
    config, named = tensors(model_type)
    assert family_for(config) == MODELS[model_type][1]
    with caplog.at_level(logging.WARNING, logger="xfp.classify"):
        decisions = [classify(n, s, f, config) for n, s, f in named]
    assert not caplog.records
    for d, (n, s, _) in zip(decisions, named):
        assert d.warning is None, d
        assert d.cls is expected(n, s), d
        assert d.reason.startswith(MODELS[model_type][1] + ": ")
    counts = {c: sum(d.cls is c for d in decisions) for c in TensorClass}
    assert counts[S] > 0 and counts[K] > 0
    assert (counts[L] > 0) == (model_type in MOE)


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_roles(model_type):
    config, named = tensors(model_type)
    by_name = {n: classify(n, s, f, config) for n, s, f in named}
    experts = [d for n, d in by_name.items() if re.search(r"\.experts\.", n)]
    assert experts and all(d.cls is L for d in experts)
    routers = [d for n, d in by_name.items() if n.endswith("mlp.gate.weight")]
    assert routers and all(d.cls is K and "router" in d.reason for d in routers)
    shared = [d for n, d in by_name.items() if re.search(r"shared_experts?\.", n)]
    assert all(d.cls is S for d in shared)
    assert bool(shared) == (model_type in {"qwen2_moe", "deepseek_v2", "deepseek_v3"})


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_quantize_embeddings_flips_embed_and_lm_head(model_type):
    config, named = tensors(model_type)
    embeds = [(n, s, f) for n, s, f in named if re.search(r"(embed_tokens|embed_in|lm_head)\.weight$", n)]
    assert embeds
    for n, s, f in embeds:
        assert classify(n, s, f, config).cls is K
        assert classify(n, s, f, config, quantize_embeddings=True).cls is S


def test_tied_embeddings_noted():
    config, _ = tensors("gemma3_text")
    assert config["tie_word_embeddings"]
    d = classify("model.embed_tokens.weight", (128, 64), True, config, quantize_embeddings=True)
    assert d.cls is S and "tie_word_embeddings" in d.reason


# On-disk names of checkpoints saved before transformers 5 fused the experts (and FP8 extras).
ON_DISK = [
    ("mixtral", "model.layers.0.block_sparse_moe.experts.7.w1.weight", (128, 64), L),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w2.weight", (64, 128), L),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", (8, 64), K),
    ("qwen2_moe", "model.layers.3.mlp.experts.59.gate_proj.weight", (32, 64), L),
    ("qwen2_moe", "model.layers.3.mlp.shared_expert.down_proj.weight", (64, 32), S),
    ("qwen2_moe", "model.layers.3.mlp.shared_expert_gate.weight", (1, 64), K),
    ("qwen3_moe", "model.layers.0.mlp.experts.3.up_proj.weight", (32, 64), L),
    ("olmoe", "model.layers.0.mlp.experts.63.down_proj.weight", (64, 32), L),
    ("deepseek_v3", "model.layers.5.mlp.experts.255.gate_proj.weight", (32, 64), L),
    ("deepseek_v3", "model.layers.5.mlp.shared_experts.up_proj.weight", (32, 64), S),
    ("deepseek_v3", "model.layers.5.mlp.gate.e_score_correction_bias", (256,), K),
    ("deepseek_v3", "model.layers.0.self_attn.q_a_proj.weight_scale_inv", (12, 56), K),
    ("deepseek_v3", "model.layers.61.eh_proj.weight", (7168, 14336), S),
    ("deepseek_v3", "model.layers.61.shared_head.head.weight", (129280, 7168), K),
    ("deepseek_v2", "model.layers.0.self_attn.q_proj.weight", (64, 64), S),  # V2-Lite: no q_lora_rank
    ("gpt_neox", "embed_out.weight", (128, 64), K),
    ("gemma3_text", "language_model.model.layers.0.mlp.gate_proj.weight", (128, 64), S),
]


@pytest.mark.parametrize("model_type,name,shape,cls", ON_DISK)
def test_on_disk_names(model_type, name, shape, cls):
    d = classify(name, shape, True, {"model_type": model_type})
    assert d.cls is cls and d.warning is None, d


def test_unmatched_matrix_is_strict_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="xfp.classify"):
        d = classify("model.layers.0.mystery.mixer.weight", (64, 64), True, {"model_type": "llama"})
    assert d == Decision(d.name, S, "llama: unmatched matrix", d.warning)
    assert d.warning and "no llama row" in d.warning
    assert "mystery" in caplog.text


def test_expert_name_in_dense_family_is_flagged():
    d = classify("model.layers.0.mlp.experts.0.gate_proj.weight", (32, 64), True, {"model_type": "llama"})
    assert d.cls is S and d.warning


@pytest.mark.parametrize(
    "name,shape,is_float,why",
    [
        ("model.layers.0.mlp.down_proj.weight", (64,), True, "1-D"),
        ("model.layers.0.mystery.scale", (64,), True, "1-D tensor"),
        ("model.layers.0.self_attn.q_proj.weight", (64, 64), False, "not a float"),
        ("model.layers.0.self_attn.q_proj.bias", (64,), True, "bias"),
        ("model.layers.0.conv.weight", (8, 8, 3, 3), True, "4-D"),
    ],
)
def test_not_a_float_matrix_is_kept(name, shape, is_float, why):
    d = classify(name, shape, is_float, {"model_type": "llama"})
    assert d.cls is K and why in d.reason


def test_unknown_model_type_uses_generic_table_with_warning():
    config = {"model_type": "brand_new_moe", "architectures": ["BrandNewMoeForCausalLM"]}
    assert family_for(config) == "generic"
    d = classify("model.layers.0.mlp.experts.2.up_proj.weight", (32, 64), True, config)
    assert d.cls is L and d.reason.startswith("generic: ") and "brand_new_moe" in d.warning
    assert classify("model.layers.0.self_attn.q_proj.weight", (64, 64), True, {}).cls is S
    assert classify("weird.thing.weight", (4, 4), True, {}).warning


def test_family_from_architectures_and_text_config():
    assert family_for({"architectures": ["Qwen3MoeForCausalLM"]}) == "qwen_moe"
    assert family_for({"architectures": ["GPTNeoXForCausalLM"]}) == "gpt_neox"
    assert family_for({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}) == "gemma"
    assert family_for({"model_type": "x", "text_config": {"model_type": "mixtral"}}) == "mixtral"
