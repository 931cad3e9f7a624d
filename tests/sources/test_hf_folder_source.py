"""HFFolderSource: lazy safetensors reading, and one-line errors for hostile folders."""

from __future__ import annotations

import json
import re

import pytest
import torch

from xfp.errors import FormatError, SourceError
from xfp.sources.base import open_source
from xfp.sources.hf_folder import HFFolderSource


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.10.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "model.layers.2.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(torch.float16),
        "model.embed_tokens.weight": torch.randn(16, 4, generator=g),
        "model.rotary.position_ids": torch.arange(6),
        "model.mask": torch.tensor([True, False]),
    }


@pytest.fixture
def folder(tmp_path, make_hf_folder):
    return make_hf_folder(tmp_path / "m", {"model.safetensors": _tensors()})


def test_names_shapes_dtypes_and_exact_float32_load(folder):
    source = open_source(folder)
    assert isinstance(source, HFFolderSource)
    expected = _tensors()
    assert source.tensor_names() == [
        "model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight",
        "model.mask", "model.rotary.position_ids"]
    assert source.tensor_dtype("model.layers.10.mlp.up_proj.weight") == "BF16"
    assert source.tensor_dtype("model.rotary.position_ids") == "I64"
    assert source.tensor_shape("model.embed_tokens.weight") == (16, 4)
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight",
                 "model.layers.10.mlp.up_proj.weight"):
        loaded = source.load(name)
        assert loaded.dtype == torch.float32
        torch.testing.assert_close(loaded, expected[name].float(), rtol=0, atol=0)
    assert source.config()["model_type"] == "llama"


def test_load_returns_a_fresh_tensor(folder):
    source = HFFolderSource(folder)
    first = source.load("model.embed_tokens.weight")
    first.fill_(7.0)
    assert not torch.equal(source.load("model.embed_tokens.weight"), first)
    source.config()["model_type"] = "changed"
    assert source.config()["model_type"] == "llama"


@pytest.mark.parametrize("name", ["model.rotary.position_ids", "model.mask"])
def test_load_of_non_float_tensor_names_file_and_tensor(folder, name):
    with pytest.raises(SourceError, match=rf"model\.safetensors: tensor '{name}' is (I64|BOOL)"):
        HFFolderSource(folder).load(name)


def test_unknown_tensor_name(folder):
    with pytest.raises(SourceError, match="no tensor named 'nope'"):
        HFFolderSource(folder).tensor_shape("nope")


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(SourceError, match=r"config\.json: file not found"):
        HFFolderSource(folder)
    with pytest.raises(SourceError, match=re.escape(f"{folder}: folder has no config.json")):
        open_source(folder)


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "\xff\xfe", '["not", "an", "object"]', '{"a": 1}'])
def test_corrupt_config_json(folder, text):
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    expected = re.escape(str(folder / "config.json")) + ": (not valid JSON|not a transformers config)"
    with pytest.raises(SourceError, match=expected):
        HFFolderSource(folder)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_safetensors_names_the_file(folder, keep):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    with pytest.raises(FormatError, match=re.escape(f"{file}: not a valid safetensors file")) as error:
        HFFolderSource(folder)
    assert "\n" not in str(error.value)


def test_no_weight_files(tmp_path, make_hf_folder):
    folder = make_hf_folder(tmp_path / "m", {})
    with pytest.raises(SourceError, match=r"no \*\.safetensors weight files"):
        HFFolderSource(folder)


def test_duplicate_tensor_without_index(tmp_path, make_hf_folder):
    t = {"w": torch.zeros(2)}
    folder = make_hf_folder(tmp_path / "m", {"a.safetensors": t, "b.safetensors": t}, index=False)
    with pytest.raises(FormatError, match=r"b\.safetensors: tensor 'w': also stored in a\.safetensors"):
        HFFolderSource(folder)


@pytest.fixture
def sharded(tmp_path, make_hf_folder):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:2]},
              "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[2:]}}
    return make_hf_folder(tmp_path / "m", shards)


def test_sharded_with_index(sharded):
    source = HFFolderSource(sharded)
    assert sorted(source.tensor_names()) == sorted(_tensors())
    torch.testing.assert_close(source.load("model.layers.10.mlp.up_proj.weight"),
                               _tensors()["model.layers.10.mlp.up_proj.weight"].float(), rtol=0, atol=0)


def _edit_index(folder, edit) -> None:
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    edit(content["weight_map"])
    index.write_text(json.dumps(content))


def test_index_lists_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match=r"index\.json: lists shard 'model-00002-of-00002\.safetensors', which is"):
        HFFolderSource(sharded)


def test_index_lists_tensor_not_in_its_shard(sharded):
    _edit_index(sharded, lambda m: m.update({"model.ghost.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(FormatError, match=r"index\.json: tensor 'model\.ghost\.weight': listed in shard"):
        HFFolderSource(sharded)


def test_index_shard_outside_folder(sharded):
    _edit_index(sharded, lambda m: m.update({"x": "../model-00001-of-00002.safetensors"}))
    with pytest.raises(SourceError, match="which is not a file in"):
        HFFolderSource(sharded)


@pytest.mark.parametrize("text", ["{", '{"weight_map": []}', '{"metadata": {}}'])
def test_corrupt_index(sharded, text):
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(SourceError, match=r"model\.safetensors\.index\.json: (not valid JSON|no 'weight_map')"):
        HFFolderSource(sharded)


def test_write_aux_files_copies_tokenizer_not_config(folder, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja", "merges.txt"):
        (folder / name).write_text(f"{{\"{name}\": 1}}")
    out = tmp_path / "out"
    HFFolderSource(folder).write_aux_files(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "generation_config.json", "merges.txt", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_fingerprint_is_stable_and_content_sensitive(folder, tmp_path, make_hf_folder):
    fingerprint = HFFolderSource(folder).fingerprint()
    assert fingerprint == HFFolderSource(folder).fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    other = make_hf_folder(tmp_path / "other", {"model.safetensors": _tensors(seed=1)})
    assert HFFolderSource(other).fingerprint() != fingerprint
