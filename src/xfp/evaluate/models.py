"""What `xfp eval` / `xfp compare` accept as a model, how it is loaded, and how text becomes token ids.

A model is named by
- an alias: `smollm2` (or `default`): the default model GGUF, `gemma-270m`: Gemma 3 270M GGUF (fetched once);
- a folder with config.json: a Hugging Face folder or an XFP folder (loaded by transformers, XFP through
  the quantizer `import xfp` registers);
- a GGUF file: converted once to a float32 HF folder by `xfp.sources.export.write_hf_folder` into
  `$XFP_CACHE/eval/<stem>-<sha256[:16]>-transformers-<version>` (the two fetched models reuse the folders
  `xfp.sources.fetch` already keeps for them).

BOS: a window is preceded by the BOS token exactly when the model's tokenizer adds one itself when asked
for special tokens (`tokenizer(text, add_special_tokens=True)` starts with `bos_token_id`). That is how
the GGUF's `tokenizer.ggml.add_bos_token` / the tokenizer config's `add_bos_token` reach transformers:
SmolLM2 says no (its `bos_token` is `<|im_start|>`, a chat marker), Gemma says yes (`<bos>`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from xfp.errors import XFPError

ALIASES = ("smollm2", "default", "gemma-270m")


def resolve(spec: str | Path) -> Path:
    """An alias or a path -> the path of a folder or a GGUF file (fetching the aliased models once)."""
    from xfp.sources import fetch

    text = str(spec)
    if text in ("smollm2", "default"):
        return fetch.default_model_gguf()
    if text == "gemma-270m":
        return fetch.gemma_270m_gguf()
    path = Path(spec)
    if not path.exists():
        raise XFPError(f"{path}: does not exist (give a model folder, a GGUF file or one of {', '.join(ALIASES)})")
    return path


def hf_folder(path: str | Path) -> Path:
    """A folder with config.json as is; a GGUF file as its cached float32 HF folder (built on first use)."""
    import transformers

    from xfp.sources import fetch
    from xfp.sources.base import GGUF_MAGIC, sha256_file

    path = resolve(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise XFPError(f"{path}: not a model folder (no config.json)")
        return path
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise XFPError(f"{path}: neither a model folder nor a GGUF file")
    digest = sha256_file(path)
    if digest == fetch.SMOLLM2_SHA256:
        return fetch.default_model_hf()
    if digest == fetch.GEMMA_SHA256:
        return fetch.gemma_270m_hf()
    target = fetch.cache_dir() / "eval" / f"{path.stem}-{digest[:16]}-transformers-{transformers.__version__}"
    if target.exists():
        return target
    from xfp.sources.export import write_hf_folder
    from xfp.sources.gguf_file import GGUFSource

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
        staged = Path(tmp) / target.name
        write_hf_folder(GGUFSource(path), staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not target.exists():
                raise
    return target


def load(spec: str | Path):
    """An alias, folder or GGUF file -> (model in eval mode, float32, tokenizer)."""
    from xfp.evaluate.generation import load_model

    return load_model(hf_folder(spec))


def bos_to_prepend(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds BOS itself with special tokens (see the module doc), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def default_text() -> Path:
    """The default evaluation text: Canterbury alice29.txt + lcet10.txt (`xfp.sources.fetch.canterbury_text`)."""
    from xfp.sources import fetch

    return fetch.canterbury_text()


def text_ids(tokenizer, text_file: str | Path | None = None) -> list[int]:
    """The text (default: `default_text()`) tokenized once, without special tokens."""
    path = Path(text_file) if text_file is not None else default_text()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise XFPError(f"{path}: cannot read the text ({error})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise XFPError(f"{path}: too short to score ({len(ids)} tokens)")
    return ids


def same_vocabulary(model, source) -> None:
    """KL needs one vocabulary: refuse two models whose output sizes differ."""
    a, b = (m.config.get_text_config().vocab_size for m in (model, source))
    if a != b:
        raise XFPError(f"the model has a vocabulary of {a} tokens and the source {b}: KL needs the same one")


__all__ = ["ALIASES", "resolve", "hf_folder", "load", "bos_to_prepend", "default_text", "text_ids",
           "same_vocabulary"]
