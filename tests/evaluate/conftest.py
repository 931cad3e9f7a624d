"""A tiny random Llama with a character tokenizer (vocab 99 < 128) and a short text: enough to run
`xfp eval` / `xfp compare` end to end in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_tiny_llama

TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
        "to do: once or twice she had peeped into the book her sister was reading, but it had no pictures "
        "or conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or "
        "conversations?'\n") * 3


def save_char_tokenizer(folder: Path, *, add_bos: bool = False) -> None:
    """A character-level tokenizer: ids 0-2 are <unk> <bos> <eos>, then printable ASCII and newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-lm") / "src", seed=1)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_bos(tmp_path_factory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny-lm-bos") / "src", seed=1)
    save_char_tokenizer(folder, add_bos=True)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "alice.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path
