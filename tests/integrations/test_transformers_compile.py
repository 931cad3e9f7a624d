"""`generate` with its decode steps compiled by torch.compile (inductor) on an XFP model:
`xfp.evaluate.generation.compile_decode_steps` and `xfp generate --compile`.

The folder comes from the real pipeline on a tiny tied Llama saved in float16, so the compiled steps hold
every kind of XFP module a default folder loads: XFPLinear (both attention and MLP matrices), the
float16 HalfEmbedding and its tied HalfLinear lm_head. Each traces as one `xfp::module_forward` call whose
implementation is the eager forward, so the logits of a compiled step differ from eager ones only where
inductor fuses the model's own float32 arithmetic (norms, rotary embedding, attention): the greedy tokens
are compared exactly, the logits to 1e-4 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from integrations.test_transformers_half import tiny
from xfp.cli import main
from xfp.config import QuantConfig
from xfp.evaluate.generation import compile_decode_steps, greedy_ids, load_model
from xfp.runtime import XFPLinear
from xfp.runtime.half import HalfEmbedding, HalfLinear

PROMPT = [1, 17, 42, 99, 5]
NEW_TOKENS = 12


def character_tokenizer(folder) -> None:
    """A tokenizer for the tiny model's 128 ids: one token per printable ASCII character (its code point)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(i): i for i in range(32, 127)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from xfp.pipeline import quantize_model

    root = tmp_path_factory.mktemp("compile")
    src = tiny(root / "src", kind="tied", dtype=torch.float16)
    character_tokenizer(src)
    out = root / "xfp"
    quantize_model(src, out, QuantConfig(), progress=False)
    return out


def test_compiled_decode_steps_generate_the_eager_tokens_without_graph_breaks(folder):
    torch._dynamo.reset()
    model, _ = load_model(folder)
    kinds = {type(m) for m in model.modules()}
    assert {XFPLinear, HalfEmbedding, HalfLinear} <= kinds
    eager = greedy_ids(model, PROMPT, NEW_TOKENS)
    counters.clear()
    compile_decode_steps(model)
    compiled = greedy_ids(model, PROMPT, NEW_TOKENS)
    again = greedy_ids(model, PROMPT, NEW_TOKENS)  # the compiled steps are reused
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled == eager and again == eager
    torch._dynamo.reset()


def test_cli_generate_compile_prints_the_eager_text(folder, capsys):
    torch._dynamo.reset()
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "6"]) == 0
    eager = capsys.readouterr().out
    assert eager.startswith("hello") and len(eager) > len("hello\n")
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "6", "--compile"]) == 0
    assert capsys.readouterr().out == eager
    torch._dynamo.reset()
