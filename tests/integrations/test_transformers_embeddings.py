"""`from_pretrained` on XFP folders with a quantized token embedding and/or lm_head.

Folders come from the real pipeline (`quantize_model(..., quantize_embeddings=True)`, the default QuantConfig)
for tiny Llamas with and without tie_word_embeddings, and from hand-written folders for the rarer shapes
(a tied pair stored twice, a dense lm_head beside a quantized embedding, Gemma's scaled embedding).

Reference: the source model with every stored matrix replaced by its exact decode (`fake_quantized`). With
`XFP_KERNEL=reference` the runtime computes exactly what that model computes (the embedding decodes the rows
of W_hat bit for bit, the lm_head runs F.linear with W_hat), so fp32 logits are compared with rtol=0, atol=0;
with the automatic kernel (the fused CPU kernels) the lm_head is held to 1e-5 relative error on the logits.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from xfp.config import QuantConfig
from xfp.errors import FormatError, XFPError
from xfp.format import io
from xfp.format.folder import iter_shards
from xfp.format.reference import Packed, decode
from xfp.runtime import XFPEmbedding, XFPLinear
from xfp.runtime.dispatch import ENV_VAR
from helpers import fake_quantized
from helpers import logits as model_logits

IDS = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 120, 77], [0, 127, 127, 8, 8, 8, 50, 2, 1]])
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")


def tiny_llama(folder: Path, *, tied: bool, seed: int = 0) -> Path:
    """A random tiny Llama (vocab 128, hidden 64); one 5-sigma weight in every 4th row of the embedding and
    lm_head, so that mode v2 at floor 0.995 stores outliers there (the default v2a config needs none)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in {id(p): p for p in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
            rows = torch.arange(0, w.shape[0], 4)
            w[rows, torch.randint(0, w.shape[1], (rows.numel(),), generator=g)] = 0.1
    model.save_pretrained(folder)
    return folder


def stored_matrices(folder: Path) -> dict[str, Packed]:
    return {name: p for _, content in iter_shards(folder) for name, p in content.matrices.items()}


def logits(model, ids=IDS) -> torch.Tensor:
    return model_logits(model, ids)


@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory) -> dict[bool, tuple[Path, Path]]:
    """{tied: (source, XFP folder)} quantized by the real pipeline with quantize_embeddings=True."""
    from xfp.pipeline import quantize_model

    root = tmp_path_factory.mktemp("emb")
    out = {}
    for tied in (True, False):
        src = tiny_llama(root / f"src-{tied}", tied=tied)
        folder = root / f"xfp-{tied}"
        quantize_model(src, folder, QuantConfig(), quantize_embeddings=True, progress=False)
        out[tied] = (src, folder)
    return out


# -- what the quantizer writes --------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_quantizer_writes_one_matrix_for_a_tied_model_and_two_otherwise(pipeline_folders, tied):
    _, folder = pipeline_folders[tied]
    names = set(json.loads((folder / "config.json").read_text())["quantization_config"]["matrices"])
    assert EMBED in names
    assert (HEAD in names) is (not tied)  # a tied checkpoint stores the embedding only; so does its XFP folder


# -- loading and running --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_loads_with_no_missing_or_unexpected_keys(pipeline_folders, tied):
    _, folder = pipeline_folders[tied]
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, XFPEmbedding) and isinstance(head, XFPLinear)
    assert emb.dtype == torch.float32 and emb.scale is None and emb.padding_idx == model.config.pad_token_id
    matrices = stored_matrices(folder)
    assert torch.equal(emb.xfp_codes, matrices[EMBED].codes)
    head_buffers = {n for n, _ in model.named_buffers() if n.startswith("lm_head.")}
    if tied:  # the lm_head reads the embedding's tensors: no buffers of its own, no second copy
        assert head.is_tied and head.source is emb and head_buffers == set()
        assert head.packed().codes is emb.xfp_codes
        assert not hasattr(head, "weight") and model.all_tied_weights_keys == {}
    else:
        assert not head.is_tied and "lm_head.xfp_codes" in head_buffers
        assert torch.equal(head.xfp_codes, matrices[HEAD].codes)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_fake_quantized_reference(pipeline_folders, tied, reference_kernel):
    src, folder = pipeline_folders[tied]
    model = AutoModelForCausalLM.from_pretrained(folder)
    ref = fake_quantized(src, stored_matrices(folder))
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)  # min: a random model may say EOS early
    out = model.generate(IDS[:1], **greedy)
    assert out.shape == (1, IDS.shape[1] + 8)
    assert torch.equal(out, ref.generate(IDS[:1], **greedy))


@pytest.mark.parametrize("tied", [True, False])
def test_automatic_kernel_stays_within_its_bound_and_generates(pipeline_folders, tied):
    src, folder = pipeline_folders[tied]
    model = AutoModelForCausalLM.from_pretrained(folder)
    ref = logits(fake_quantized(src, stored_matrices(folder)))
    got = logits(model)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    out = model.generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 6)


def test_tie_weights_afterwards_does_not_re_tie(pipeline_folders, reference_kernel):
    src, folder = pipeline_folders[True]
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = logits(model)
    model.tie_weights()  # transformers' own re-tying, recomputed from the config: nothing left to tie
    assert model.lm_head.is_tied and model.lm_head.source is model.model.embed_tokens
    assert not hasattr(model.lm_head, "weight")
    assert torch.equal(logits(model), before)


def test_bf16_cast_keeps_one_float16_copy(pipeline_folders):
    src, folder = pipeline_folders[True]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    emb = model.model.embed_tokens
    assert emb.dtype == torch.bfloat16 and emb.xfp_library.dtype == torch.float16
    got = logits(model)
    assert got.dtype == torch.bfloat16
    torch.nn.Module.float(model)  # (PreTrainedModel.float refuses quantized models) the output follows casts
    assert emb.dtype == torch.float32 and emb.xfp_library.dtype == torch.float16
    assert model.lm_head.packed().library is emb.xfp_library
    ref = logits(fake_quantized(src, stored_matrices(folder)))
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0) > 0.999


# -- hand-written folders -------------------------------------------------------------------------


def write_folder(src: Path, out: Path, quantized: dict[str, torch.Tensor] | None = None, *,
                 extra: dict[str, torch.Tensor] | None = None, floor: float = 0.995) -> dict[str, Packed]:
    """An XFP folder of the HF folder `src` (mode v2): the tensors in `quantized` (name -> the weight to
    quantize, in `src` or not) stored quantized, every other tensor of `src` and of `extra` kept dense."""
    from xfp.quantize.autoselect import quantize_matrix

    config = QuantConfig(mode="v2")
    out.mkdir(parents=True)
    tensors = {**load_file(str(src / "model.safetensors")), **(extra or {}), **(quantized or {})}
    content = io.XFPFile()
    for name, tensor in tensors.items():
        if name in (quantized or {}):
            content.matrices[name] = quantize_matrix(quantized[name], floor, config, name).packed
        else:
            content.dense[name] = tensor
    io.save(out / "model.safetensors", content)
    model_config = json.loads((src / "config.json").read_text())
    model_config["quantization_config"] = {
        "quant_method": "xfp", **config.to_dict(),
        "matrices": {n: {"bits": p.bits, "outliers": p.layout.n_outliers} for n, p in content.matrices.items()}}
    (out / "config.json").write_text(json.dumps(model_config))
    return content.matrices


def test_tied_pair_stored_twice_identical_keeps_one_copy(tmp_path, reference_kernel):
    src = tiny_llama(tmp_path / "src", tied=True)
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    matrices = write_folder(src, tmp_path / "xfp", {EMBED: embed, HEAD: embed.clone()})
    assert torch.equal(matrices[EMBED].codes, matrices[HEAD].codes)  # quantization is deterministic
    assert matrices[EMBED].outlier_pos.numel() > 0  # the looked-up rows put outliers back
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "xfp")
    assert model.lm_head.is_tied and model.lm_head.source is model.model.embed_tokens
    assert not any(n.startswith("lm_head.") for n, _ in model.named_buffers())
    ref = fake_quantized(src, {EMBED: matrices[EMBED]})
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_tied_pair_stored_twice_different_keeps_both(tmp_path, reference_kernel, caplog):
    src = tiny_llama(tmp_path / "src", tied=True)
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    head = embed + 0.01 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    matrices = write_folder(src, tmp_path / "xfp", {EMBED: embed, HEAD: head})
    with caplog.at_level(logging.WARNING, logger="xfp.integrations.transformers"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "xfp")
    assert "different quantized matrices" in caplog.text
    assert not model.lm_head.is_tied and torch.equal(model.lm_head.xfp_codes, matrices[HEAD].codes)
    # reference: an untied model with both decoded matrices (transformers does not tie differing values either)
    untied = tmp_path / "untied"
    shutil.copytree(src, untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    save_file({**load_file(str(src / "model.safetensors")), HEAD: head}, str(untied / "model.safetensors"),
              metadata={"format": "pt"})
    ref = fake_quantized(untied, matrices)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_dense_lm_head_beside_a_quantized_tied_embedding_loads_as_stored(tmp_path, reference_kernel, caplog):
    src = tiny_llama(tmp_path / "src", tied=True)
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    matrices = write_folder(src, tmp_path / "xfp", {EMBED: embed}, extra={HEAD: embed.clone()})
    with caplog.at_level(logging.WARNING, logger="xfp.integrations.transformers"):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "xfp", output_loading_info=True)
    assert "no longer tied" in caplog.text and info["missing_keys"] == set()
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, embed)  # not re-tied
    assert isinstance(model.model.embed_tokens, XFPEmbedding)
    ids = IDS[:, :4]
    torch.testing.assert_close(model.model.embed_tokens(ids), decode(matrices[EMBED])[ids].float(), rtol=0, atol=0)


def test_gemma_scaled_embedding_keeps_its_scale(tmp_path, reference_kernel):
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=12)  # ties by default
    src = tmp_path / "gemma"
    GemmaForCausalLM(cfg).save_pretrained(src)
    embed = load_file(str(src / "model.safetensors"))[EMBED]
    matrices = write_folder(src, tmp_path / "xfp", {EMBED: embed})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "xfp")
    emb = model.model.embed_tokens
    assert isinstance(emb, XFPEmbedding) and emb.scale == 48**0.5
    assert model.lm_head.is_tied and model.lm_head.source is emb
    ids = IDS[:, :5]
    expected = decode(matrices[EMBED])[ids].float() * torch.tensor(48**0.5, dtype=torch.float32)
    assert torch.equal(emb(ids), expected)
    ref = fake_quantized(src, matrices, GemmaForCausalLM)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


# -- hostile folders ------------------------------------------------------------------------------


def _set_vocab(folder: Path, vocab: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))


def _cut_embedding_rows(folder: Path, rows: int) -> None:
    path = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    for part in ("codes", "codebook", "scale", "offset", "ids", "kept_val"):
        key = f"model.embed_tokens.xfp_{part}"
        if key in tensors:
            tensors[key] = tensors[key][:rows].clone()
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("how, change", [("config vocab", lambda f: _set_vocab(f, 120)),
                                         ("stored rows", lambda f: _cut_embedding_rows(f, 100))])
def test_embedding_shape_against_config_vocab_is_a_one_line_format_error(pipeline_folders, tmp_path, tied, how,
                                                                         change):
    _, folder = pipeline_folders[tied]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    change(bad)
    with pytest.raises(FormatError) as exc:
        AutoModelForCausalLM.from_pretrained(bad)
    message = str(exc.value)
    assert "\n" not in message
    # the first layer whose stored rows disagree is named: the embedding (or, untied, the lm_head before it)
    named = ("'model.embed_tokens.xfp_" in message
             or (not tied and how == "config vocab" and "'lm_head.xfp_" in message))
    assert str(bad / "model.safetensors") in message and named, message
    assert "128x64" in message if how == "stored rows" else "120x64" in message, message


def test_embedding_with_its_own_forward_is_refused_by_name(pipeline_folders):
    from xfp.integrations.transformers import matrix_entries, resolve_targets

    class DoubledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    _, folder = pipeline_folders[True]
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "quantization_config"}))
        model.model.embed_tokens = DoubledEmbedding(128, 64)
    entries = matrix_entries(config["quantization_config"]["matrices"], folder / "config.json")
    with pytest.raises(XFPError, match="'model.embed_tokens' is a DoubledEmbedding, which has its own forward"):
        resolve_targets(model, entries, folder)
