"""`xfp fit` on a tiny random Llama: user mistakes end in one line, a fit writes a loadable XFP folder."""

from __future__ import annotations

import json

import pytest

from xfp.cli import main
from xfp.fit import boundaries


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["fit", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args, message", [
    (["--budget", "lots"], "expected a size such as 60MiB"),
    (["--budget", "1MB", "--budget-fraction", "0.5"], "exactly one of"),
    (["--budget-fraction", "1.5"], "--budget-fraction must be in (0, 1]"),
    (["--budget", "1MB", "--min-floor-strict", "0.995"], "must not exceed the floors"),
    (["--budget", "1MB", "--floor-strict", "0.95", "--floor-lazy", "0.97"], "must not exceed floor_strict"),
    (["--budget", "1MB", "--min-floor-strict", "0.9", "--min-floor-lazy", "0.92"], "out of order"),
])
def test_user_mistakes_are_one_line(capsys, tiny_llama, tmp_path, args, message):
    rc, _, err = _run(capsys, tiny_llama, tmp_path / "out", *args, "--table-cache", tmp_path / "cache",
                      "--no-progress", "--no-check")
    assert rc == 2
    assert err.count("\n") == 1 and message in err


def test_budget_below_the_smallest_plan_is_refused_naming_it(capsys, tiny_llama, tmp_path):
    rc, _, err = _run(capsys, tiny_llama, tmp_path / "out", "--budget-fraction", "0.5", "--table-cache",
                      tmp_path / "cache", "--no-progress", "--no-check")
    assert rc == 2 and err.count("\n") == 1
    # without the quality check nothing is named as passing: the smallest plan, marked unchecked
    assert "the smallest plan (any plan) is" in err and "not quality-checked" in err and "passe" not in err
    assert not (tmp_path / "out").exists()


def test_fit_writes_a_loadable_folder_within_budget(capsys, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import xfp  # noqa: F401  (registers the quantizer)

    out = tmp_path / "out"
    rc, printed, err = _run(capsys, tiny_llama, out, "--budget-fraction", "0.9", "--table-cache", tmp_path / "cache",
                            "--no-progress", "--no-check")
    assert rc == 0, err
    assert "plan (allocate)" in printed
    report = json.loads((out / "fit.json").read_text())
    assert report["outcome"] == "fitted"
    written = report["attempts"][0]["written"]["output_bytes"]
    assert written == (out / "model.safetensors").stat().st_size <= report["budget_bytes"]
    assert report["memory"]["quantize_peak_bytes"] > 0
    for name in ("FIT.md", "fit.png", "fit-plan.txt", "report.json"):
        assert (out / name).is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(x).logits
        assert torch.isfinite(logits).all()
        # the quality checks run on the decoded matrices as dense layers: the same model, at dense speed
        assert boundaries.densify(model) == report["matrices"]
        torch.testing.assert_close(model(x).logits, logits, rtol=1e-3, atol=1e-3)  # kernel vs dense matmul


def test_fit_with_quantized_embeddings_writes_a_folder_that_loads(capsys, tiny_llama, tmp_path):
    """The quality check loads the folder in transformers: embeddings are XFPEmbedding, lm_head an XFPLinear."""
    import torch
    from transformers import AutoModelForCausalLM

    import xfp  # noqa: F401  (registers the quantizer)
    from xfp.runtime.embedding import XFPEmbedding
    from xfp.runtime.linear import XFPLinear

    out = tmp_path / "out"
    rc, _, err = _run(capsys, tiny_llama, out, "--budget-fraction", "0.9", "--quantize-embeddings", "--table-cache",
                      tmp_path / "cache", "--no-progress", "--no-check")
    assert rc == 0, err
    report = json.loads((out / "fit.json").read_text())
    assert report["outcome"] == "fitted" and report["quantize_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model.model.embed_tokens, XFPEmbedding) and isinstance(model.lm_head, XFPLinear)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = model(x).logits
        assert torch.isfinite(logits).all()
        # densify replaces the XFPLinear layers (lm_head included); the embedding keeps decoding its rows exactly
        assert boundaries.densify(model) == report["matrices"] - 1
        torch.testing.assert_close(model(x).logits, logits, rtol=1e-3, atol=1e-3)
