"""GGUFSource on tiny synthetic files: exact agreement with transformers, and hostile files."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from xfp.errors import FormatError, SourceError
from xfp.sources.base import open_source
from xfp.sources.gguf_file import GGUFSource


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_tensor_equals_transformers_gguf_load(tmp_path, make_tiny_gguf, arch, tied):
    """The oracle: what `from_pretrained(..., gguf_file=...)` puts in the model, bit for bit."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_gguf(tmp_path / "tiny.gguf", arch=arch, tied=tied)
    source = open_source(path)
    assert isinstance(source, GGUFSource)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()

    names = source.tensor_names()
    assert ("lm_head.weight" in names) == (not tied)  # a tied head is never invented
    assert source.config()["tie_word_embeddings"] == tied
    assert set(state) - set(names) == ({"lm_head.weight"} if tied else set())
    for name in names:
        loaded = source.load(name)
        assert loaded.dtype == torch.float32 and tuple(loaded.shape) == source.tensor_shape(name)
        torch.testing.assert_close(loaded, state[name], rtol=0, atol=0, msg=name)
    config = source.config()
    assert config["architectures"] == [type(model).__name__]
    for key, value in model.config.to_dict().items():
        if key not in ("_name_or_path", "architectures", "dtype", "quantization_config"):
            assert config[key] == value, key


def test_llama_qk_permutation_and_gemma_norm_offset_are_undone(tmp_path, make_tiny_gguf):
    """Non-trivial transforms happen (so the equality test above would catch their absence)."""
    llama = GGUFSource(make_tiny_gguf(tmp_path / "llama.gguf", arch="llama"))
    q = llama._tensors["blk.0.attn_q.weight"]
    raw_q = torch.from_numpy(dequantize(q.data, q.tensor_type).copy())
    loaded_q = llama.load("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(loaded_q, raw_q)
    assert torch.equal(loaded_q.sort(dim=0).values, raw_q.sort(dim=0).values)  # rows reordered only

    gemma = GGUFSource(make_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma3"))
    norm = gemma._tensors["blk.0.attn_norm.weight"]
    stored = torch.from_numpy(norm.data.copy())
    assert torch.equal(gemma.load("model.layers.0.input_layernorm.weight"), stored - 1)


def test_names_dtypes_and_gguf_names(tmp_path, make_tiny_gguf):
    source = GGUFSource(make_tiny_gguf(tmp_path / "t.gguf", layers=11))
    names = source.tensor_names()
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.layers.10.mlp.up_proj.weight")
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (source.tensor_dtype(q), source.tensor_shape(q), source.gguf_name(q)) == ("Q4_0", (64, 64),
                                                                                    "blk.0.attn_q.weight")
    assert source.tensor_dtype("model.layers.0.mlp.up_proj.weight") == "BF16"
    with pytest.raises(SourceError, match="no tensor named 'blk.0.attn_q.weight'"):
        source.load("blk.0.attn_q.weight")


def test_load_is_a_fresh_copy(tmp_path, make_tiny_gguf):
    path = make_tiny_gguf(tmp_path / "t.gguf")
    before = path.read_bytes()
    source = GGUFSource(path)
    norm = source.load("model.norm.weight")  # F32 in the file: dequantize would hand back an mmap view
    norm.fill_(0.0)
    assert not torch.equal(source.load("model.norm.weight"), norm)
    assert path.read_bytes() == before


def test_fingerprint_is_the_file_sha256(tmp_path, make_tiny_gguf):
    path = make_tiny_gguf(tmp_path / "t.gguf")
    assert GGUFSource(path).fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", [Q.Q8_1, Q.I32])
def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path, make_tiny_gguf, kind):
    path = make_tiny_gguf(tmp_path / "t.gguf", override={"blk.1.ffn_up.weight": kind})
    source = GGUFSource(path)
    name = "model.layers.1.mlp.up_proj.weight"
    assert source.tensor_dtype(name) == kind.name
    with pytest.raises(SourceError, match=re.escape(f"{path}: tensor '{name}' (blk.1.ffn_up.weight) is stored as "
                                                    f"{kind.name}")):
        source.load(name)
    source.load("model.layers.1.mlp.gate_proj.weight")  # the rest of the file is still readable


def test_bad_magic(tmp_path, make_tiny_gguf):
    path = make_tiny_gguf(tmp_path / "t.gguf")
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    with pytest.raises(FormatError, match=re.escape(f"{path}: not a GGUF file")):
        GGUFSource(path)
    with pytest.raises(SourceError, match=re.escape(f"{path}: not a model source")):
        open_source(path)


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.3, 0.9999])
def test_truncated_gguf_is_one_line_naming_the_file(tmp_path, make_tiny_gguf, fraction):
    path = make_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: max(5, int(len(data) * fraction))])
    with pytest.raises(FormatError, match=re.escape(f"{path}: truncated or corrupt GGUF")) as error:
        open_source(path)
    assert "\n" not in str(error.value)


def test_empty_and_missing_paths(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="not a model source"):
        open_source(empty)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing.gguf")


@pytest.mark.parametrize("arch, message", [("lfm2", "new GGUF loader"), ("nosucharch", "cannot read this GGUF")])
def test_unsupported_architecture(tmp_path, arch, message):
    from gguf import GGUFWriter

    path = tmp_path / "x.gguf"
    writer = GGUFWriter(path, arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SourceError, match=re.escape(f"{path}: ") + ".*" + message):
        GGUFSource(path).tensor_names()
