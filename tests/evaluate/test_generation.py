"""Generation sanity: the signals on known token sequences, the score's arithmetic, and a real run."""

from __future__ import annotations

import math

import pytest

from xfp.evaluate import generation as g
from xfp.evaluate.generation import Continuation


def test_signals_on_known_sequences():
    assert g.repetition(list(range(32))) == 0.0
    assert g.repetition([7] * 32) == pytest.approx(1 - 1 / 29)
    assert g.repetition([1, 2] * 16) == pytest.approx(1 - 2 / 29)
    assert g.collapse(list(range(32))) == pytest.approx(0.0)
    assert g.collapse([7] * 32) == pytest.approx(1.0)
    assert g.collapse([1, 2] * 16) == pytest.approx(1 - math.log(2) / math.log(32))
    assert g.common_prefix([1, 2, 3], [1, 2, 4]) == 2 and g.common_prefix([], [1]) == 0


def runs(*seqs):
    return [Continuation(f"p{i}", [0], list(s)) for i, s in enumerate(seqs)]


def test_score_arithmetic():
    healthy = list(range(100, 132))
    loop = [5, 6] * 16
    source = runs(healthy, healthy, healthy, healthy)
    # identical to the source: 0
    same = g.garbage_report(source, source, [1.0] * 4, [1.0] * 4)
    assert same.score == 0.0 and same.passed and all(d["first_divergence"] == 32 for d in same.details)
    # one prompt loops, one is implausible to the judge (excess 3 nats -> 1), one paraphrases (excess 0.4 -> 0)
    cand = runs(loop, list(range(200, 232)), list(range(300, 332)), healthy)
    report = g.garbage_report(cand, source, [1.0, 4.0, 1.4, 1.0], [1.0] * 4)
    expected = [g.repetition(loop), 1.0, 0.0, 0.0]
    assert [d["garbage"] for d in report.details] == pytest.approx(expected)
    assert report.score == pytest.approx(sum(expected) / 4) and report.passed  # 0.48 <= 0.5
    # the judge's ramp: 0.5 nats free, 3 nats or more is garbage
    ramp = g.garbage_report(cand[1:2], source[1:2], [2.75], [1.0])
    assert ramp.score == pytest.approx((1.75 - 0.5) / 2.5)
    # without a source: loops and collapse only, raw
    alone = g.garbage_report(runs(loop, healthy), None, None, None)
    assert alone.details[0]["garbage"] == pytest.approx(g.repetition(loop)) and alone.details[1]["garbage"] == 0
    assert "first_divergence" not in alone.details[0]
    broken = g.garbage_report(runs([9] * 32, [9] * 32), source[:2], [12.0, 12.0], [1.0, 1.0])
    assert broken.score == 1.0 and not broken.passed


def test_garbage_score_on_a_real_model(tiny_lm):
    model, tokenizer = g.load_model(tiny_lm)
    prompts = g.PROMPTS[:2]
    report = g.garbage_score(model, tokenizer, model, prompts=prompts)
    assert report.score == 0.0 and report.passed and len(report.details) == 2
    assert all(d["judge_excess"] == 0.0 and d["first_divergence"] == g.NEW_TOKENS for d in report.details)
    runs_ = g.greedy_continuations(model, tokenizer, prompts)
    assert [len(r.ids) for r in runs_] == [g.NEW_TOKENS] * 2
    assert runs_ == g.greedy_continuations(model, tokenizer, prompts)  # deterministic
    alone = g.garbage_score(model, tokenizer, prompts=prompts)
    assert 0.0 <= alone.score <= 1.0
