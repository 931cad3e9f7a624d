"""A tiny random Llama and an XFP folder written from it by hand (no pipeline, no download).

`build_tiny_llama(folder)` and `write_xfp_folder(src, out)` are plain functions, reachable from tests
through the `tiny_builders` fixture; `tiny_llama` / `tiny_xfp` are session-wide read-only folders
(copy them before mutating).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xfp.config import QuantConfig
from xfp.format import io
from xfp.format.reference import Packed
from xfp.quantize.autoselect import quantize_matrix

QUANTIZED = re.compile(r"\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$")


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny LlamaForCausalLM (fp32, init std 0.02) into `folder`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if QUANTIZED.search(name):  # one 5-sigma weight per row: auto-select then stores outliers
                rows, cols = param.shape
                col = torch.randint(0, cols, (rows,), generator=g)
                param[torch.arange(rows), col] = 0.1 * torch.sign(torch.randn(rows, generator=g))
    model.save_pretrained(folder)
    return Path(folder)


@dataclass
class XFPFolder:
    path: Path
    matrices: dict[str, Packed]  # stored weight name -> what was written


def matrix_entry(packed: Packed) -> dict:
    """The quantization_config.matrices entry of a stored matrix: its layout's entry, except that a mode V2
    entry is written as version 1 folders wrote it, {"bits", "outliers"} (an absent "mode" means "v2")."""
    entry = packed.layout.entry()
    return {k: entry[k] for k in ("bits", "outliers")} if entry["mode"] == "v2" else entry


def write_xfp_folder(src: Path, out: Path, config: QuantConfig | None = None, floor: float = 0.99) -> XFPFolder:
    """Quantize the q/k/v/o/gate/up/down weights of the HF folder `src` into the XFP folder `out` (one shard),
    in mode v2 unless `config` says otherwise (no kept columns)."""
    config = config or QuantConfig(mode="v2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    content = io.XFPFile()
    for name, tensor in load_file(str(Path(src) / "model.safetensors")).items():
        if QUANTIZED.search(name):
            content.matrices[name] = quantize_matrix(tensor, floor, config, name).packed
        else:
            content.dense[name] = tensor
    io.save(out / "model.safetensors", content)
    model_config = json.loads((Path(src) / "config.json").read_text())
    model_config["quantization_config"] = {
        "quant_method": "xfp",
        **config.to_dict(),  # includes format_version
        "matrices": {name: matrix_entry(p) for name, p in content.matrices.items()},
    }
    (out / "config.json").write_text(json.dumps(model_config, indent=2))
    return XFPFolder(out, content.matrices)


@pytest.fixture(scope="session")
def tiny_builders():
    """The builder functions, for tests that need their own folders."""
    return build_tiny_llama, write_xfp_folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_xfp(tiny_llama, tmp_path_factory) -> XFPFolder:
    folder = write_xfp_folder(tiny_llama, tmp_path_factory.mktemp("tiny_xfp"))
    assert any(p.outlier_pos.numel() >= 2 for p in folder.matrices.values())
    return folder
