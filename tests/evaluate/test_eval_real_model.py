"""The must-show: `xfp eval` on the real default model (SmolLM2-135M-Instruct) gives the perplexity an
independent, plain transformers loop gives over the same windows (4 windows of 512 tokens)."""

from __future__ import annotations

import json
import math

import torch

from xfp.cli import main
from xfp.sources import fetch

WINDOWS, CTX = 4, 512


def plain_transformers_perplexity(folder, text: str) -> float:
    """The textbook loop: consecutive 512-token chunks, labels = inputs, transformers' own shifted loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(WINDOWS):
            chunk = ids[i * CTX:(i + 1) * CTX].unsqueeze(0)
            loss = model(chunk, labels=chunk).loss  # mean over the CTX - 1 predicted tokens
            nll += float(loss) * (CTX - 1)
            count += CTX - 1
    return math.exp(nll / count)


def test_xfp_eval_matches_a_plain_transformers_loop(tmp_path, capsys):
    folder = fetch.default_model_hf()
    report = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--max-windows", str(WINDOWS), "--json", str(report), "--no-progress"]) == 0
    assert "no BOS" in capsys.readouterr().out  # SmolLM2's tokenizer adds no BOS
    ours = json.loads(report.read_text())["model_scores"]
    assert ours["tokens"] == WINDOWS * (CTX - 1)
    reference = plain_transformers_perplexity(folder, fetch.canterbury_text().read_text(encoding="utf-8"))
    assert abs(ours["ppl"] / reference - 1) < 0.005, (ours["ppl"], reference)
