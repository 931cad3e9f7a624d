"""Loading a model folder through transformers, greedy generation, and the generation sanity check.

Generation sanity (`garbage_score`) is one number in [0, 1] per model: 0 is healthy text, 1 is garbage;
`passed` is score <= GARBAGE_THRESHOLD (0.5). For each of the 8 fixed `PROMPTS`, 32 greedy tokens are
generated and three signals in [0, 1] are taken; the prompt's garbage is the largest of them, and the
score is the mean over the prompts:

- loop: repeated 4-grams, `repetition(ids)`, in excess of the source's own continuation of that prompt;
- collapse: a narrowed token histogram, `collapse(ids)`, in excess of the source's;
- divergence from the source: the source model, used as judge, scores the model's continuation
  (teacher-forced mean NLL, nats/token); its excess e over the NLL the source gives its own greedy
  continuation is mapped to clip((e - 0.5) / 2.5, 0, 1): within 0.5 nats counts 0, 3 nats or more counts 1.

Without a source, loop and collapse are taken raw (collapse as clip((c - 0.4) / 0.6, 0, 1), since healthy
32-token text reaches c = 0.35) and there is no judge: fluent-looking nonsense is then not seen.

Calibration (SmolLM2-135M-Instruct): continuations of healthy 4-5 bit models score 0.10-0.15 (the judge
excess stays under 1.1 nats, occasional loops), while RTN 3-bit g128 (visibly broken text) scores ~0.6 and
2-bit RTN or noised weights ~1 (judge excess 4-11 nats). The token at which greedy output first leaves the
source's (`first_divergence` in the details) is reported, not scored: at 5.2 honest bits XFP already
leaves it within 4 tokens on every prompt of this small model, so it does not separate garbage from
harmless paraphrase.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
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


def compile_decode_steps(model) -> None:
    """From now on `model.generate` runs its decode steps compiled by torch.compile (inductor), with a static
    KV cache, on any device (the CPU included). The prompt's prefill stays eager. The first generate call
    compiles (about half a minute for SmolLM2 on 2 cores) and a new prompt length or cache size may compile
    again. Each XFP module is one operator call in the compiled step (xfp.runtime.opaque). Guards: all of
    torch.compile's but those on XFP stored tensors, which `xfp::fused_linear` checks itself
    (`without_stored_tensor_guards`)."""
    from transformers import CompileConfig

    from xfp.runtime.opaque import without_stored_tensor_guards

    config = CompileConfig(mode=None, options={"guard_filter_fn": without_stored_tensor_guards})
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config


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


# -- generation sanity ----------------------------------------------------------------------------

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The three primary colours are",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and",
    "In 1969, the first humans to walk on the Moon were",
)
"""The fixed prompt set of the generation sanity check (plain text, no chat template)."""

NEW_TOKENS = 32
"""Greedy tokens generated per prompt (EOS does not stop generation: every continuation has this length)."""

NGRAM = 4
"""Repetition is judged on n-grams of this many tokens."""

GARBAGE_THRESHOLD = 0.5
"""`GarbageReport.passed` is `score <= GARBAGE_THRESHOLD`."""


@dataclass(frozen=True)
class Continuation:
    """One greedy continuation: the prompt's ids (BOS included when used) and the generated ids."""

    prompt: str
    prompt_ids: list[int]
    ids: list[int]


@dataclass(frozen=True)
class GarbageReport:
    """score in [0, 1] (0 healthy, 1 garbage), passed = score <= threshold, and the per-prompt evidence."""

    score: float
    passed: bool
    threshold: float
    details: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"score": self.score, "passed": self.passed, "threshold": self.threshold, "details": self.details}


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: tuple[str, ...] = PROMPTS, new_tokens: int = NEW_TOKENS,
                         bos_id: int | None = None) -> list[Continuation]:
    """Greedy, with a KV cache, exactly `new_tokens` tokens per prompt (EOS is just another token)."""
    out = []
    for prompt in prompts:
        prompt_ids = ([] if bos_id is None else [bos_id]) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt_ids])
        step = model(x, use_cache=True)
        ids: list[int] = []
        for _ in range(new_tokens):
            nxt = int(step.logits[0, -1].float().argmax())
            ids.append(nxt)
            if len(ids) == new_tokens:
                break
            step = model(torch.tensor([[nxt]]), cache=step.cache, use_cache=True)
        out.append(Continuation(prompt, prompt_ids, ids))
    return out


@torch.inference_mode()
def continuation_nll(model, continuation: Continuation) -> float:
    """Mean NLL (nats/token) that `model` gives the continuation's tokens after its prompt (teacher forced)."""
    x = torch.tensor([continuation.prompt_ids + continuation.ids])
    n = len(continuation.prompt_ids)
    logp = torch.log_softmax(model(x).logits[0, n - 1:-1].float(), dim=-1)
    return float(-logp.gather(1, torch.tensor(continuation.ids).unsqueeze(1)).mean())


def repetition(ids: list[int], n: int = NGRAM) -> float:
    """1 - distinct n-grams / n-grams: 0 when no n-gram repeats, -> 1 for a loop of one token."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def collapse(ids: list[int]) -> float:
    """1 - entropy of the token histogram / log(length): 0 when every token differs, 1 for one token."""
    if len(ids) < 2:
        return 0.0
    counts = Counter(ids).values()
    h = -sum(c / len(ids) * math.log(c / len(ids)) for c in counts)
    return 1.0 - h / math.log(len(ids))


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


JUDGE_FREE_NATS = 0.5
"""Judge excess (nats/token) that still counts as healthy paraphrase."""

JUDGE_SPAN_NATS = 2.5
"""Judge excess above JUDGE_FREE_NATS at which a continuation counts as fully garbage."""

COLLAPSE_FREE = 0.4
"""Without a source: collapse up to this counts 0 (healthy 32-token text reaches 0.35)."""


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def garbage_report(runs: list[Continuation], source_runs: list[Continuation] | None, judge_nll: list[float] | None,
                   source_judge_nll: list[float] | None, tokenizer=None,
                   threshold: float = GARBAGE_THRESHOLD) -> GarbageReport:
    """The score of `runs` (see the module doc); `source_runs` / the judge NLLs are None without a source.

    judge_nll[i]: the source's mean NLL on runs[i]; source_judge_nll[i]: on source_runs[i].
    """
    details = []
    for i, run in enumerate(runs):
        rep, col = repetition(run.ids), collapse(run.ids)
        d = {"prompt": run.prompt, "repetition": rep, "collapse": col}
        if tokenizer is not None:
            d["text"] = tokenizer.decode(run.ids)
        if source_runs is None:
            loop, narrowed, judged = rep, _clip((col - COLLAPSE_FREE) / (1 - COLLAPSE_FREE)), 0.0
        else:
            ref = source_runs[i]
            if ref.prompt != run.prompt:
                raise ValueError(f"continuations out of order: {run.prompt!r} vs the source's {ref.prompt!r}")
            loop = max(0.0, rep - repetition(ref.ids))
            narrowed = max(0.0, col - collapse(ref.ids))
            judged = 0.0
            d["first_divergence"] = common_prefix(run.ids, ref.ids)
            if judge_nll is not None and source_judge_nll is not None:
                excess = judge_nll[i] - source_judge_nll[i]
                judged = _clip((excess - JUDGE_FREE_NATS) / JUDGE_SPAN_NATS)
                d.update(judge_nll=judge_nll[i], source_judge_nll=source_judge_nll[i], judge_excess=excess)
        d.update(loop=loop, collapse_signal=narrowed, divergence=judged, garbage=max(loop, narrowed, judged))
        details.append(d)
    score = sum(d["garbage"] for d in details) / len(details) if details else 0.0
    return GarbageReport(score, score <= threshold, threshold, details)


def garbage_score(model, tokenizer, source_model=None, *, prompts: tuple[str, ...] = PROMPTS,
                  new_tokens: int = NEW_TOKENS, threshold: float = GARBAGE_THRESHOLD) -> GarbageReport:
    """Generation sanity of `model` (judged against `source_model` when given): see the module doc.

    BOS is prepended to each prompt when the tokenizer adds one (`xfp.evaluate.models.bos_to_prepend`).
    """
    from xfp.evaluate.models import bos_to_prepend

    bos = bos_to_prepend(tokenizer)
    runs = greedy_continuations(model, tokenizer, prompts, new_tokens, bos)
    if source_model is None:
        return garbage_report(runs, None, None, None, tokenizer, threshold)
    source_runs = greedy_continuations(source_model, tokenizer, prompts, new_tokens, bos)
    return garbage_report(runs, source_runs, [continuation_nll(source_model, r) for r in runs],
                          [continuation_nll(source_model, r) for r in source_runs], tokenizer, threshold)
