"""`from_pretrained` on an XFP folder whose matrices are mode V2a (buffers sized from the config entries)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from xfp.config import QuantConfig
from xfp.errors import FormatError
from xfp.format import io
from xfp.format.reference import decode
from xfp.quantize.autoselect import quantize_matrix
from xfp.runtime import XFPLinear

QUANTIZED = re.compile(r"\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$")
IDS = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 120, 77]])
CONFIG = QuantConfig(mode="v2a", group_size=(48,), library_size=4)  # 64 and 128 inputs: ragged groups
KEPT = {"mlp.up_proj": [0, 63], "mlp.down_proj": [5, 127], "self_attn.o_proj": [17]}
"""Kept columns of the MLP and o_proj matrices of every layer (q/k/v and gate keep none)."""


def kept_columns(name: str) -> torch.Tensor | None:
    for module, cols in KEPT.items():
        if f".{module}." in name:
            return torch.tensor(cols)
    return None


def write_v2a_folder(src: Path, out: Path) -> dict:
    """Quantize the q/k/v/o/gate/up/down weights of `src` in mode v2a into the XFP folder `out`; the
    config entries are what the pipeline writes: {"class", **MatrixResult.summary() layout keys}."""
    out.mkdir(parents=True)
    content = io.XFPFile()
    entries = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if QUANTIZED.search(name):
            result = quantize_matrix(tensor, 0.99, CONFIG, name, kept_cols=kept_columns(name))
            content.matrices[name] = result.packed
            s = result.summary()
            entries[name] = {"class": "strict",
                             **{k: s[k] for k in ("mode", "bits", "outliers", "group", "library", "kept")}}
        else:
            content.dense[name] = tensor
    io.save(out / "model.safetensors", content)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "xfp", **CONFIG.to_dict(), "matrices": entries}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return content.matrices


@pytest.fixture(scope="module")
def v2a_folder(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2a") / "xfp"
    return out, write_v2a_folder(tiny_llama, out)


def test_loads_v2a_layers_and_matches_the_decoded_reference(tiny_llama, v2a_folder):
    folder, matrices = v2a_folder
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, XFPLinear)}
    assert {f"{n}.weight" for n in layers} == set(matrices) and {m.mode for m in layers.values()} == {"v2a"}
    assert {m.layout.kept for m in layers.values()} == {0, 1, 2}
    ref = LlamaForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, packed in matrices.items():
            assert torch.equal(decode(model.get_submodule(name.removesuffix(".weight")).packed()), decode(packed))
            ref.get_parameter(name).copy_(decode(packed).float())
        torch.testing.assert_close(model(IDS).logits, ref.eval()(IDS).logits, rtol=0, atol=0)


def _edit_entry(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    entry = config["quantization_config"]["matrices"]["model.layers.0.mlp.up_proj.weight"]
    change(entry)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, words", [
    (lambda e: e.pop("group"), "needs an integer 'group'"),
    (lambda e: e.update(library=300), "library"),
    (lambda e: e.update(mode="v2"), "belong to mode 'v2a'"),
    (lambda e: e.update(group=e["group"] * 2), r"group=\d+, library=4, kept=2 \(quantization_config.matrices\)"),
    (lambda e: e.update(kept=-1), "'kept'.*integer >= 0"),
    (lambda e: e.update(kept=3), r"xfp_kept_cols': must be int32 \[3\] for a 128x64 layer .*kept=3.*got int32 \[2\]"),
    (lambda e: e.update(kept=65), r"kept columns must be an integer in \[0, 64\]"),
    (lambda e: e.pop("kept"), r"xfp_kept_cols': must be int32 \[0\] .*got int32 \[2\]"),  # absent means 0
])
def test_bad_v2a_entries_are_refused(v2a_folder, tmp_path, change, words):
    folder = tmp_path / "bad"
    shutil.copytree(v2a_folder[0], folder)
    _edit_entry(folder, change)
    with pytest.raises(FormatError, match=words) as exc:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(exc.value)
