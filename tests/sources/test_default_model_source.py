"""The real default model (SmolLM2-135M-Instruct Q4_1): GGUFSource against transformers, and its HF folder."""

from __future__ import annotations

import pytest
import torch

from xfp.sources.base import open_source
from xfp.sources.fetch import default_model_hf
from xfp.sources.hf_folder import HFFolderSource


@pytest.fixture(scope="module")
def gguf_model(smollm2_gguf):
    """transformers' own load of the GGUF: the ground truth."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def test_every_tensor_equals_transformers_gguf_load(smollm2_source, gguf_model):
    state = gguf_model.state_dict()
    names = smollm2_source.tensor_names()
    assert set(state) - set(names) == {"lm_head.weight"}  # tied to the embeddings, not in the file
    assert smollm2_source.config()["tie_word_embeddings"] is True
    assert {smollm2_source.tensor_dtype(n) for n in names} >= {"Q4_1", "F32"}
    for name in names:
        torch.testing.assert_close(smollm2_source.load(name), state[name], rtol=0, atol=0, msg=name)


def test_default_model_hf_is_the_same_model(smollm2_source, gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_hf()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    hf = open_source(folder)
    assert isinstance(hf, HFFolderSource)
    assert hf.tensor_names() == smollm2_source.tensor_names()
    for name in hf.tensor_names():
        assert hf.tensor_dtype(name) == "F32"
        assert torch.equal(hf.load(name), smollm2_source.load(name)), name

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)
    text = "Hello world, 123!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
