"""Window arithmetic and the metrics, on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from xfp.evaluate.perplexity import perplexity, token_windows, window_input
from xfp.evaluate.scoring import kl_divergence, score_windows, token_nll, top1_agreement


def scored_positions(n: int, ctx: int, stride: int, bos: bool, max_windows=None) -> list[int]:
    out = []
    for start, end, first in token_windows(n, ctx, stride, max_windows, bos=bos):
        assert 0 <= start <= first <= end <= n and end - start <= ctx
        out.extend(range(first, end))
    return out


@pytest.mark.parametrize("n", [2, 7, 64, 65, 1000, 1001])
@pytest.mark.parametrize("ctx,stride", [(16, 16), (16, 8), (16, 5), (2, 1)])
def test_every_token_is_scored_once(n, ctx, stride):
    with_bos = scored_positions(n, ctx, stride, bos=True)
    assert with_bos == list(range(n))
    no_bos = scored_positions(n, ctx, stride, bos=False)
    assert len(no_bos) == len(set(no_bos)) and no_bos == sorted(no_bos)
    if stride < ctx:  # overlapping windows give every token after the first some context
        assert no_bos == list(range(1, n))
    else:  # a window's first token has no context without BOS
        assert set(no_bos) == set(range(n)) - set(range(0, n, stride))


def test_windows_stop_at_max_and_reject_bad_arguments():
    assert token_windows(100, 10, 10, 3) == [(0, 10, 1), (10, 20, 11), (20, 30, 21)]
    assert token_windows(100, 10, 10, 2, bos=True) == [(0, 10, 0), (10, 20, 10)]
    assert token_windows(25, 10, 5, None) == [(0, 10, 1), (5, 15, 10), (10, 20, 15), (15, 25, 20)]
    for ctx, stride, mw in ((1, 1, None), (8, 0, None), (8, 9, None), (8, 8, 0)):
        with pytest.raises(ValueError):
            token_windows(100, ctx, stride, mw)


def test_window_input_prepends_bos():
    assert window_input([5, 6, 7, 8], 1, 3, None).tolist() == [[6, 7]]
    assert window_input([5, 6, 7, 8], 1, 3, 1).tolist() == [[1, 6, 7]]


def test_kl_of_identical_distributions_is_zero():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(37, 50) * 4, dim=-1)
    assert torch.equal(kl_divergence(logp, logp.clone()), torch.zeros(37, dtype=torch.float64))


def test_kl_of_a_known_pair():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])
    q = torch.tensor([[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    with torch.no_grad():
        kl = kl_divergence(p.log(), q.log(), chunk=1)  # log(0) = -inf in p: the term counts 0
    expected = [math.log(2.0), 0.9 * math.log(0.9 * 3) + 2 * 0.05 * math.log(0.05 * 3)]
    assert kl.tolist() == pytest.approx(expected, rel=1e-6)
    # Bernoulli closed form: KL(B(a) || B(b)) = a log(a/b) + (1-a) log((1-a)/(1-b))
    a, b = 0.3, 0.6
    kl = kl_divergence(torch.tensor([[a, 1 - a]]).log(), torch.tensor([[b, 1 - b]]).log())
    assert float(kl) == pytest.approx(a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)), rel=1e-6)


def test_token_nll_and_top1():
    logp = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert token_nll(logp, torch.tensor([0, 1])).tolist() == pytest.approx([-math.log(0.7), -math.log(0.1)])
    other = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    assert top1_agreement(logp, other).tolist() == [True, False]


class Uniform(torch.nn.Module):
    """A language model that predicts every token with probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return type("Out", (), {"logits": torch.zeros(x.shape[0], x.shape[1], self.vocab)})()


class Bigram(torch.nn.Module):
    """Deterministic logits that depend on the current token, to exercise KL / top-1 between models."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def forward(self, x):
        return type("Out", (), {"logits": self.table[x]})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ids = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    for bos in (None, 299):
        result = perplexity(Uniform(300), ids, ctx=64, stride=48, progress=False, bos_id=bos)
        assert result.ppl == pytest.approx(300.0, rel=1e-6)  # log_softmax is float32
        assert result.tokens == (1000 if bos is not None else 999)


def test_scoring_against_a_reference():
    ids = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = token_windows(ids, 32, 32, None)
    a, b = Bigram(40, 0), Bigram(40, 1)
    scores = score_windows(ids, windows, {"same": lambda: a, "other": lambda: b}, reference=lambda: a,
                           progress=False)
    assert list(scores) == ["source", "same", "other"]
    assert scores["same"].kl == 0.0 and scores["same"].top1 == 1.0
    assert scores["same"].ppl == scores["source"].ppl
    assert scores["source"].kl is None and scores["source"].tokens == 300 - len(windows)
    # independent recomputation of KL(a || b) over the scored tokens (bigram: position-wise)
    scored = [ids[i - 1] for s, e, f in windows for i in range(f, e)]
    lp, lq = (torch.log_softmax(m.table[torch.tensor(scored)], -1) for m in (a, b))
    expected = float((lp.exp() * (lp - lq)).sum(-1).double().mean())
    assert scores["other"].kl == pytest.approx(expected, rel=1e-5)
    expected_top1 = float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
    assert scores["other"].top1 == pytest.approx(expected_top1)
    with pytest.raises(ValueError):
        score_windows(ids, windows, {"source": lambda: a}, reference=lambda: a, progress=False)
