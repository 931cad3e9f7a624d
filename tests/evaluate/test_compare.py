"""`xfp compare` and `xfp eval` end to end on a tiny random Llama with a character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from xfp.cli import main
from xfp.errors import XFPError
from xfp.evaluate import compare, methods, models
from xfp.evaluate.generation import PROMPTS, load_model


@pytest.fixture(scope="module")
def result(tiny_lm, text_file):
    identity = methods.MethodSpec("identity", lambda n, w, c: (w.clone(), 4 * w.numel()), "test", "the source")
    specs = [methods.get("rtn4-g64"), methods.get("nf3-g64"), methods.get("xfp-0.99"), identity]
    return compare.run_compare(tiny_lm, specs, text=text_file, ctx=48, max_windows=4, prompts=PROMPTS[:2],
                               progress=False)


def test_rows_and_their_numbers(result):
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["source", "rtn4-g64", "nf3-g64", "xfp-0.99", "identity"]
    src = rows["source"]
    assert src["kl"] is None and src["honest_bits"] is None and src["ppl"] > 1
    ident = rows["identity"]
    assert ident["kl"] == 0.0 and ident["top1"] == 1.0 and ident["ppl"] == src["ppl"] and ident["delta_ppl"] == 0
    assert ident["honest_bits"] == 32.0 and ident["garbage"] == 0.0 and ident["garbage_passed"]
    assert rows["rtn4-g64"]["honest_bits"] == pytest.approx(4.5)
    assert rows["nf3-g64"]["honest_bits"] == pytest.approx(3.25)
    for name in ("rtn4-g64", "nf3-g64", "xfp-0.99"):
        r = rows[name]
        assert r["kl"] > 0 and 0 <= r["top1"] <= 1 and r["quantize_s"] >= 0
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - src["ppl"])
        assert 0 <= r["garbage"] <= 1
    assert rows["nf3-g64"]["kl"] > rows["rtn4-g64"]["kl"]  # 3 bits lose more than 4
    assert result["windows"] == 4 and result["tokens"] == 4 * 47 and result["bos"] is None
    assert result["source_format"] is None  # a HF folder, not a GGUF


def test_outputs_are_written(result, tmp_path):
    paths = compare.write_outputs(result, tmp_path / "cmp")
    assert json.loads(paths["json"].read_text())["rows"] == result["rows"]
    table = paths["table"].read_text()
    assert "| rtn4-g64 | 4.500 |" in table and "| source | - |" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    points = [(3.0, 0.5), (4.0, 0.1), (3.5, 0.6), (4.0, 0.2), (5.0, 0.1), (2.0, 2.0)]
    assert compare.pareto_front(points) == [5, 0, 1]


def test_weight_swap_restores_the_source(tiny_lm):
    model, _ = load_model(tiny_lm)
    name = "model.layers.0.mlp.up_proj.weight"
    original = model.get_parameter(name).detach().clone()
    swap = compare.WeightSwap(model, [name])
    swap.activate({name: torch.zeros_like(original).half()})
    assert model.get_parameter(name).dtype == torch.float32 and not model.get_parameter(name).any()
    swap.activate(None)
    assert torch.equal(model.get_parameter(name), original)


def test_cli_compare(tiny_lm, text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", str(tiny_lm), "--methods", "rtn3-g64,xfp-0.95", "--text", str(text_file), "--ctx", "32",
                 "--max-windows", "2", "--no-garbage", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| rtn3-g64 | 3.500 |" in printed and "xfp-0.95" in printed
    assert {p.name for p in out.iterdir()} == {"compare.json", "compare.md", "pareto.png"}
    assert main(["compare", "--list-methods"]) == 0
    assert "hqq4-g64" in capsys.readouterr().out
    assert main(["compare", str(tiny_lm), "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_eval_with_source(tiny_lm, text_file, tmp_path, capsys):
    report = tmp_path / "eval.json"
    code = main(["eval", str(tiny_lm), "--source", str(tiny_lm), "--text", str(text_file), "--ctx", "40",
                 "--max-windows", "3", "--json", str(report), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "KL 0.00000" in printed and "top-1 agreement 1.0000" in printed
    data = json.loads(report.read_text())
    assert data["model_scores"]["ppl"] == data["source_scores"]["ppl"] and data["windows"] == 3
    assert data["model_scores"]["tokens"] == 3 * 39  # no BOS: a window's first token is not scored


def test_bos_policy_follows_the_tokenizer(tiny_lm, tiny_lm_bos, text_file):
    _, plain = load_model(tiny_lm)
    _, with_bos = load_model(tiny_lm_bos)
    assert models.bos_to_prepend(plain) is None
    assert models.bos_to_prepend(with_bos) == 1
    assert models.text_ids(with_bos, text_file)[0] != 1  # the text itself is tokenized without specials


def test_eval_with_bos_scores_every_token(tiny_lm_bos, text_file, capsys):
    assert main(["eval", str(tiny_lm_bos), "--text", str(text_file), "--ctx", "40", "--max-windows", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "BOS <bos> prepended" in printed and "120 tokens" in printed


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.bin").write_bytes(b"nope")
    assert main(["eval", str(tmp_path / "x.bin")]) == 2
    assert "neither a model folder nor a GGUF file" in capsys.readouterr().err


def test_eval_reads_an_xfp_folder_and_compare_refuses_it(tiny_lm, text_file, tmp_path, capsys):
    from xfp.config import QuantConfig
    from xfp.pipeline import quantize_model

    out = tmp_path / "xfp"
    quantize_model(tiny_lm, out, QuantConfig(), progress=False)
    assert main(["eval", str(out), "--source", str(tiny_lm), "--text", str(text_file), "--ctx", "40",
                 "--max-windows", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    kl = float(printed.split("KL ")[1].split()[0])
    assert 0 < kl < 0.05  # floor 0.99 keeps the tiny model close to its source
    assert main(["compare", str(out), "--methods", "rtn4-g64", "--no-progress"]) == 2
    assert "already quantized (xfp)" in capsys.readouterr().err


def test_an_interrupted_compare_resumes_where_it_stopped(tiny_lm, text_file, tmp_path, monkeypatch):
    specs = [methods.get("rtn3-g64"), methods.get("nf4-g64")]
    kwargs = dict(text=text_file, ctx=32, max_windows=4, garbage=False, progress=False)
    fresh = compare.run_compare(tiny_lm, specs, **kwargs)

    real, calls = compare.score_windows, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    out = tmp_path / "cmp"
    monkeypatch.setattr(compare, "score_windows", flaky)
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(tiny_lm, specs, out=out, **kwargs)
    assert (out / ".compare-work" / "journal.jsonl").exists() and not (out / "compare.json").exists()
    calls.clear()
    monkeypatch.setattr(compare, "score_windows", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    resumed = compare.run_compare(tiny_lm, specs, out=out, resume=True, **kwargs)
    assert len(calls) == 2  # the two windows the first run had not finished
    assert resumed["resumed"] and not (out / ".compare-work").exists() and (out / "compare.json").exists()
    for a, b in zip(fresh["rows"], resumed["rows"]):
        assert (a["method"], a["ppl"], a["kl"], a["top1"], a["honest_bits"]) == \
            (b["method"], b["ppl"], b["kl"], b["top1"], b["honest_bits"])
    # other settings: the journal is not reused
    calls.clear()
    compare.run_compare(tiny_lm, specs[:1], out=out, resume=True, **kwargs)
    assert len(calls) == 4


def test_a_rerun_replaces_its_rows_and_keeps_the_others(result, tiny_lm, text_file):
    fresh = compare.run_compare(tiny_lm, [methods.get("xfp-0.95"), methods.get("nf3-g64")], text=text_file, ctx=48,
                                max_windows=4, prompts=PROMPTS[:2], progress=False)
    merged = compare.merge_rerun(result, fresh)
    names = [r["method"] for r in merged["rows"]]
    assert names == [r["method"] for r in result["rows"]] + ["xfp-0.95"]  # old order, the new method last
    by = {r["method"]: r for r in merged["rows"]}
    old = {r["method"]: r for r in result["rows"]}
    new = {r["method"]: r for r in fresh["rows"]}
    assert by["nf3-g64"] is new["nf3-g64"] and by["rtn4-g64"] is old["rtn4-g64"] and by["source"] is old["source"]
    assert merged["garbage"]["xfp-0.95"] == fresh["garbage"]["xfp-0.95"]
    assert merged["reruns"][-1]["methods"] == ["xfp-0.95", "nf3-g64"] and "reruns" not in result
    pruned = compare.merge_rerun(result, fresh, drop=("identity",))
    assert "identity" not in {r["method"] for r in pruned["rows"]} | set(pruned["garbage"])
    assert pruned["reruns"][-1]["dropped"] == ["identity"] and len(pruned["rows"]) == len(merged["rows"]) - 1
    with pytest.raises(XFPError, match="cannot also be dropped"):
        compare.merge_rerun(result, fresh, drop=("nf3-g64",))
    other = compare.run_compare(tiny_lm, [methods.get("nf3-g64")], text=text_file, ctx=48, max_windows=3,
                                prompts=PROMPTS[:2], progress=False)
    with pytest.raises(XFPError, match="windows"):
        compare.merge_rerun(result, other)
    shifted = {**fresh, "rows": [{**r, "ppl": r["ppl"] * 1.01} if r["method"] == "source" else r
                                 for r in fresh["rows"]]}
    with pytest.raises(XFPError, match="source ppl"):
        compare.merge_rerun(result, shifted)
