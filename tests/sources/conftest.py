"""Fixtures for xfp.sources: tiny GGUF / HF checkpoints written on the spot, and the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors.torch import save_file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 128, 48

# (gguf name, torch shape, storage type); one of each type gguf-py can both quantize and dequantize.
_BLOCK = [
    ("attn_norm.weight", (HIDDEN,), Q.F32),
    ("attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), Q.Q4_0),
    ("attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q4_1),
    ("attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q5_0),
    ("attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), Q.F16),
    ("ffn_norm.weight", (HIDDEN,), Q.F32),
    ("ffn_gate.weight", (FFN, HIDDEN), Q.Q5_1),
    ("ffn_up.weight", (FFN, HIDDEN), Q.BF16),
    ("ffn_down.weight", (HIDDEN, FFN), Q.Q8_0),
]
_GEMMA3_EXTRA = [
    ("attn_q_norm.weight", (HEAD_DIM,), Q.F32),
    ("attn_k_norm.weight", (HEAD_DIM,), Q.F32),
    ("post_attention_norm.weight", (HIDDEN,), Q.F32),
    ("post_ffw_norm.weight", (HIDDEN,), Q.F32),
]


def _metadata(writer: GGUFWriter, arch: str, layers: int) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    else:
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
        writer.add_sliding_window(64)


def write_tiny_gguf(path: Path, *, arch: str = "llama", layers: int = 2, tied: bool = True,
                    override: dict[str, Q] | None = None, seed: int = 0) -> Path:
    """A random `arch` (llama or gemma3) GGUF using F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 storage.

    `override` maps a GGUF tensor name to another storage type (its bytes are then zeros).
    """
    rng = np.random.default_rng(seed)
    tensors = [("token_embd.weight", (VOCAB, HIDDEN), Q.Q8_0), ("output_norm.weight", (HIDDEN,), Q.F32)]
    if not tied:
        tensors.append(("output.weight", (VOCAB, HIDDEN), Q.Q8_0))
    block = _BLOCK + (_GEMMA3_EXTRA if arch == "gemma3" else [])
    tensors += [(f"blk.{i}.{leaf}", shape, kind) for i in range(layers) for leaf, shape, kind in block]

    writer = GGUFWriter(path, arch)
    _metadata(writer, arch, layers)
    for name, shape, kind in tensors:
        kind = (override or {}).get(name, kind)
        values = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * values  # llama.cpp stores gemma norms as 1 + w
        if kind == Q.F32:
            writer.add_tensor(name, values)
        elif kind == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif kind in (Q.Q8_1, Q.I32):
            block_size, type_size = GGML_QUANT_SIZES[kind]
            raw = np.zeros((*shape[:-1], shape[-1] // block_size * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=kind)
        else:
            writer.add_tensor(name, quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors_folder(folder: Path, shards: dict[str, dict[str, torch.Tensor]], *, index: bool | None = None,
                    config: dict | None = None) -> Path:
    """A HF folder: config.json plus `{file name: {tensor: value}}` safetensors files (and an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    for file, tensors in shards.items():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    if index is None:
        index = len(shards) > 1
    if index:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def make_tiny_gguf():
    return write_tiny_gguf


@pytest.fixture
def make_hf_folder():
    return write_safetensors_folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1), fetched once into the shared XFP cache."""
    from xfp.sources.fetch import default_model_gguf

    return default_model_gguf()


@pytest.fixture(scope="session")
def smollm2_source(smollm2_gguf):
    from xfp.sources.gguf_file import GGUFSource

    return GGUFSource(smollm2_gguf)
