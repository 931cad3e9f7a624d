"""Loading a model folder through transformers and greedy generation."""

from __future__ import annotations

from pathlib import Path

import torch

from xfp.errors import XFPError


def load_model(folder: Path):
    """An XFP folder or a plain HF folder -> (model in eval mode, tokenizer). XFP folders load through the
    quantizer registered by `import xfp`."""
    import xfp  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise XFPError(f"{folder}: not a model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except XFPError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XFPError(f"{folder}: transformers could not load it ({first})") from None
    return model.eval(), tokenizer


@torch.no_grad()
def greedy_ids(model, ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                         else model.config.pad_token_id)
    return out[0, len(ids):].tolist()


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """The prompt followed by its greedy continuation."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return prompt + tokenizer.decode(greedy_ids(model, ids, max_new_tokens), skip_special_tokens=True)
