"""Gemma 3 270M (Q4_K_M GGUF): the same exactness checks as the default model. Slow (~2-3 min on 2 cores,
262k-token vocabulary), so it runs only with XFP_TEST_GEMMA=1."""

from __future__ import annotations

import os

import pytest
import torch

from xfp.sources.fetch import gemma_270m_gguf, gemma_270m_hf
from xfp.sources.gguf_file import GGUFSource
from xfp.sources.hf_folder import HFFolderSource

pytestmark = pytest.mark.skipif(os.environ.get("XFP_TEST_GEMMA") != "1", reason="slow; set XFP_TEST_GEMMA=1")


@pytest.fixture(scope="module")
def gguf():
    return gemma_270m_gguf()


@pytest.fixture(scope="module")
def gguf_model(gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_every_tensor_equals_transformers_gguf_load(gguf, gguf_model):
    source = GGUFSource(gguf)
    assert source.architecture == "gemma3" and source.config()["model_type"] == "gemma3_text"
    state = gguf_model.state_dict()
    assert set(state) - set(source.tensor_names()) == {"lm_head.weight"}
    for name in source.tensor_names():
        torch.testing.assert_close(source.load(name), state[name], rtol=0, atol=0, msg=name)


def test_hf_folder_is_the_same_model_and_generates(gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gemma_270m_hf()
    assert isinstance(HFFolderSource(folder), HFFolderSource)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model(**ids).logits, rtol=0, atol=0)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "France" in text or "Paris" in text, text
