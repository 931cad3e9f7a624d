"""Test helpers importable from any test module (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    seed: int = 0) -> Path:
    """A random Llama saved as a HF folder (fp32 safetensors + config.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def linear_at_threads(packed, state, x, rows: tuple[int, ...]) -> dict[int, list]:
    """{threads: [cpu.linear(x[:m]) for m in rows]} at 1 and 2 torch threads (restored afterwards)."""
    import torch

    from xfp.runtime.kernels import cpu

    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = [cpu.linear(x[:m], packed, None, state) for m in rows]
    finally:
        torch.set_num_threads(before)
    return results


def fake_quantized(src: Path, matrices, cls=None):
    """The source model (a transformers class, LlamaForCausalLM by default) with each stored matrix's parameter
    set to its exact reference decode, float32 (a tied parameter is one tensor: setting the embedding sets the
    lm_head too)."""
    from transformers import LlamaForCausalLM

    from xfp.format.reference import decode

    model = (cls or LlamaForCausalLM).from_pretrained(src)
    with torch.no_grad():
        for name, packed in matrices.items():
            model.get_parameter(name).copy_(decode(packed).float())
    return model.eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits
