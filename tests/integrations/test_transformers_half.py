"""`from_pretrained(..., dtype=torch.float32)` on XFP folders whose dense token embedding (and lm_head) are
stored in float16: they load as `HalfEmbedding` / `HalfLinear` over the stored float16 tensor
(`keep_float16_dense`), not widened to float32.

Folders come from the real pipeline (default QuantConfig, embeddings not quantized) on tiny models saved in
float16. Reference: the source model loaded in float32 (its float16 weights widened, exactly) with every
quantized matrix replaced by its exact decode (`fake_quantized`). With `XFP_KERNEL=reference` the runtime
computes exactly that (logits compared with rtol=0, atol=0); with the fused kernels the lm_head is a float32
dot product in another order (held to 1e-5 relative error on the logits).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from xfp.config import QuantConfig
from xfp.errors import FormatError
from xfp.format.folder import iter_shards
from xfp.runtime.dispatch import ENV_VAR
from xfp.runtime.half import HalfEmbedding, HalfLinear
from helpers import fake_quantized, logits

EMBED = "model.embed_tokens.weight"
IDS = torch.tensor([[1, 17, 42, 99, 5, 64, 3], [0, 127, 127, 8, 8, 8, 50]])  # 7 tokens: the fused lm_head path


def tiny(folder: Path, *, kind: str, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    if kind == "gemma":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=True)
        model = Gemma3ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, tie_word_embeddings=kind == "tied")
        model = LlamaForCausalLM(cfg)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{kind: (source saved in float16, its XFP folder)} for a tied and an untied Llama and a (tied) Gemma 3,
    plus "float32": a tied Llama saved in float32."""
    from xfp.pipeline import quantize_model

    root = tmp_path_factory.mktemp("half")
    out = {}
    for kind, dtype in (("tied", torch.float16), ("untied", torch.float16), ("gemma", torch.float16),
                        ("float32", torch.float32)):
        src = tiny(root / f"src-{kind}", kind="tied" if kind == "float32" else kind, dtype=dtype)
        folder = root / f"xfp-{kind}"
        quantize_model(src, folder, QuantConfig(), progress=False)
        out[kind] = (src, folder)
    return out


def reference(src: Path, folder: Path, kind: str):
    matrices = {name: p for _, content in iter_shards(folder) for name, p in content.matrices.items()}
    model = fake_quantized(src, matrices, cls=Gemma3ForCausalLM if kind == "gemma" else None)
    return model.float()


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["tied", "untied", "gemma"])
def test_float16_dense_matrices_stay_float16(folders, kind):
    src, folder = folders[kind]
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, HalfEmbedding) and isinstance(head, HalfLinear)
    assert emb.weight.dtype == torch.float16 and emb.dtype == torch.float32 and model.dtype == torch.float32
    assert emb.padding_idx == model.config.pad_token_id
    if kind == "gemma":
        assert emb.scale == pytest.approx(64 ** 0.5)
    big = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.shape == (128, 64)]
    if kind == "untied":
        assert not head.is_tied and head.weight.dtype == torch.float16
        assert sorted(big) == ["lm_head.weight", "model.embed_tokens.weight"]
    else:  # one float16 copy, read by both
        assert head.is_tied and head.half_weight() is emb.weight
        assert big == ["model.embed_tokens.weight"] and model.all_tied_weights_keys == {}


@pytest.mark.parametrize("kind", ["tied", "untied", "gemma"])
def test_logits_equal_the_widened_reference(folders, kind, monkeypatch):
    src, folder = folders[kind]
    model = load(folder)
    ref = reference(src, folder, kind)
    monkeypatch.setenv(ENV_VAR, "reference")
    torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), rtol=0, atol=0)
    monkeypatch.delenv(ENV_VAR)
    got, want = logits(model, IDS), logits(ref, IDS)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], **greedy), ref.generate(IDS[:1], **greedy))


def test_float32_folder_and_bf16_load_are_left_as_they_are(folders):
    _, folder = folders["float32"]
    model = load(folder)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    _, folder = folders["tied"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # widening would not be exact
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_tie_weights_afterwards_changes_nothing(folders, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    _, folder = folders["tied"]
    model = load(folder)
    before = logits(model, IDS)
    model.tie_weights()  # recomputed from the config: the pair has left transformers' tying
    assert isinstance(model.lm_head, HalfLinear) and model.lm_head.half_weight() is model.model.embed_tokens.weight
    assert torch.equal(logits(model, IDS), before)


# -- hostile folders --------------------------------------------------------------------------------------


def broken_copy(folder: Path, out: Path, edit) -> Path:
    """A copy of `folder` whose float16 embedding is replaced by edit(embedding), the header metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(shard))
    tensors[EMBED] = edit(tensors[EMBED].clone())
    save_file(tensors, str(shard), metadata=metadata)
    return out


def test_a_non_finite_float16_embedding_is_a_format_error(folders, tmp_path):
    def nan(t):
        t[3, 5] = float("nan")
        return t

    bad = broken_copy(folders["tied"][1], tmp_path / "nan", nan)
    with pytest.raises(FormatError, match=r"model\.safetensors.*'model\.embed_tokens\.weight'.*finite"):
        load(bad)


@pytest.mark.parametrize("kind", ["tied", "float32"])
def test_a_dense_tensor_of_the_wrong_shape_is_a_format_error(folders, tmp_path, kind):
    bad = broken_copy(folders[kind][1], tmp_path / kind, lambda t: t[:100])
    with pytest.raises(FormatError, match=r"'model\.embed_tokens\.weight': must have shape \[128, 64\] .* got \[100, 64\]"):
        load(bad)
