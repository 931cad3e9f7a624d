"""`fit_model` end to end on a synthetic table, with the write and the quality check faked: which sizes are
written and checked, what the refusal names, what OUT keeps."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from xfp.cli import main
from xfp.errors import XFPError
from xfp.fit import boundaries, run, search, table as tables
from xfp.fit.search import BudgetError, Floors

FP16 = 10_000_000  # the synthetic table's fp16 size (tests/fit/conftest.py)
# 20 matrices, each 100k..250k bytes in steps of 50k: plans from 2.0 MB (minimum) to 5.0 MB (operator floors)
MATRIX = ("strict", [(100_000, 0.96, 0.40), (150_000, 0.97, 0.20), (200_000, 0.98, 0.10), (250_000, 0.995, 0.05)])
UP, LOW = Floors(0.99, 0.97), run.DEFAULT_MIN_FLOORS


class FakeModel:
    """Stands in for `boundaries.write_measured` / `check_quality`: the 'folder' is one file recording the
    plan's size; KL is 0.5 at `threshold` bytes and falls with size."""

    def __init__(self, threshold: int):
        self.threshold, self.checked = threshold, []

    def write(self, src, out, table, plan) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_text(str(plan.total_bytes))
        return {"bare_bytes": 1, "peak_bytes": 2, "output_bytes": plan.total_bytes, "seconds": 0.0}

    def check(self, out, src, *, windows, ctx) -> dict:
        size = int((out / "model.safetensors").read_text())
        self.checked.append(size)
        return {"bare_bytes": 1, "load_peak_bytes": 2, "kl": 0.5 * self.threshold / size, "top1": 0.9, "ppl": 1.0,
                "garbage": 0.01, "garbage_passed": True, "garbage_threshold": 0.3}


@pytest.fixture
def synthetic(make_table, monkeypatch):
    table = make_table([MATRIX] * 20)

    def install(threshold: int) -> FakeModel:
        fake = FakeModel(threshold)
        monkeypatch.setattr(tables, "measure", lambda *a, **k: table)
        monkeypatch.setattr(boundaries, "write_measured", fake.write)
        monkeypatch.setattr(boundaries, "check_quality", fake.check)
        return fake

    return table, install


def _fit(tmp_path, fraction: float, **kwargs) -> dict:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    return run.fit_model(src, tmp_path / "out", budget_fraction=fraction, progress=False, echo=lambda *_: None,
                         **kwargs)


def _mibs(text: str) -> list[str]:
    return re.findall(r"(\d+\.\d\d) MiB", text)


def test_a_budget_that_passes_is_one_attempt_and_keeps_the_model(synthetic, tmp_path):
    _, install = synthetic
    fake = install(3_700_000)
    report = _fit(tmp_path, 0.45)
    assert report["outcome"] == "fitted" and len(report["attempts"]) == 1 == len(fake.checked)
    size = report["attempts"][0]["plan"]["total_bytes"]
    assert 3_700_000 <= size <= 4_500_000
    assert int((tmp_path / "out" / "model.safetensors").read_text()) == size  # the passing point, within budget
    assert (tmp_path / "out" / "fit-plan.txt").is_file()


def test_a_failing_budget_is_refused_naming_the_smallest_checked_pass(synthetic, tmp_path):
    table, install = synthetic
    fake = install(3_700_000)
    with pytest.raises(BudgetError) as err:
        _fit(tmp_path, 0.33)
    message = str(err.value)
    report = json.loads((tmp_path / "out" / "fit.json").read_text())
    attempts = report["attempts"]
    assert [a["plan"]["total_bytes"] for a in attempts] == fake.checked  # every check recorded
    assert len(fake.checked) == len(set(fake.checked)) <= run.DEFAULT_RETRIES + 1
    passed = [a["plan"]["total_bytes"] for a in attempts if a["verdict"] == "passed"]
    failed = [a["plan"]["total_bytes"] for a in attempts if a["verdict"] != "passed"]
    smallest = min(passed)
    assert smallest >= 3_700_000 and smallest - max(failed) <= 0.01 * FP16 + 50_000  # bisected to tolerance
    assert f"the smallest size that passed is {search.mib(smallest)}" in message
    assert f"KL {0.5 * 3_700_000 / smallest:.4f}" in message
    # every size the message names was written and checked (the budget aside)
    checked = {search.mib(s).split()[0] for s in fake.checked}
    assert set(_mibs(message)) - {search.mib(report["budget_bytes"]).split()[0]} <= checked
    # the --budget it names gives back the very plan that passed
    text = re.search(r"--budget (\S+)", message).group(1)
    assert search.search(table, run.parse_size(text), UP, LOW).total_bytes == smallest
    assert [a["phase"] for a in attempts][:2] == ["budget", "step-up"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["FIT.md", "fit.json", "fit.png"]
    assert report["outcome"] == "refused" and report["threshold"]["passed_bytes"] == smallest
    assert "\n" not in message
    # the embeddings were kept: the message says what they weigh and how to quantize them
    assert message.endswith("are 0.0% of the fp16 size in every plan: --quantize-embeddings quantizes the embeddings too")


def test_the_refusal_has_no_embeddings_hint_when_they_are_quantized(synthetic, tmp_path, monkeypatch):
    table, install = synthetic
    install(3_700_000)
    monkeypatch.setattr(tables, "measure", lambda *a, **k: dataclasses.replace(table, quantize_embeddings=True))
    with pytest.raises(BudgetError) as err:
        _fit(tmp_path, 0.33)
    assert "the smallest size that passed is" in str(err.value) and "--quantize-embeddings" not in str(err.value)


def test_a_budget_under_the_smallest_plan_checks_it_before_naming_it(synthetic, tmp_path):
    _, install = synthetic
    fake = install(1_000_000)  # everything passes
    with pytest.raises(BudgetError) as err:
        _fit(tmp_path, 0.10)
    assert fake.checked == [2_000_000]  # the smallest plan above the minimum floors, checked, nothing else
    assert "below the smallest plan above the minimum floors" in str(err.value)
    assert f"the smallest size that passed is {search.mib(2_000_000)}" in str(err.value)


def test_a_smallest_plan_that_fails_is_not_named_as_passing(synthetic, tmp_path):
    _, install = synthetic
    fake = install(3_700_000)
    with pytest.raises(BudgetError) as err:
        _fit(tmp_path, 0.10)
    assert fake.checked[0] == 2_000_000 and len(fake.checked) > 1
    assert f"{search.mib(2_000_000)}, which fails (KL" in str(err.value)
    assert f"the smallest size that passed is {search.mib(2_000_000)}" not in str(err.value)


def test_nothing_passes_names_the_largest_size_tried(synthetic, tmp_path):
    _, install = synthetic
    fake = install(9_000_000)
    with pytest.raises(BudgetError) as err:
        _fit(tmp_path, 0.33)
    assert fake.checked[-1] == 5_000_000 == max(fake.checked)  # the plan at the operator floors, last
    assert "no size passes the quality boundary" in str(err.value)
    assert f"the largest size tried, {search.mib(5_000_000)}, fails" in str(err.value)


def test_retries_spent_before_any_pass_say_so(synthetic, tmp_path):
    _, install = synthetic
    fake = install(4_900_000)
    with pytest.raises(BudgetError, match="raise --retries") as err:
        _fit(tmp_path, 0.33, retries=1)
    assert len(fake.checked) == 2 and "passed is" not in str(err.value)


def test_the_cli_refusal_is_one_line(synthetic, tmp_path, capsys):
    _, install = synthetic
    install(3_700_000)
    (tmp_path / "src").mkdir()
    rc = main(["fit", str(tmp_path / "src"), str(tmp_path / "out"), "--budget-fraction", "0.33", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "the smallest size that passed is" in err
    assert "Traceback" not in err


def test_the_memory_forecast_is_the_calibrated_line_and_max_ram_refuses_above_it(synthetic, tmp_path):
    table, install = synthetic
    fake = install(3_700_000)
    f = boundaries.forecast(table)
    params, largest = FP16 // 2, 4 * 8  # the synthetic matrices are 4 x 8
    assert f.quantize_bytes == int(boundaries.BARE_PROCESS_BYTES + boundaries.QUANTIZE_BYTES_PER_PARAMETER * params
                                   + boundaries.QUANTIZE_BYTES_PER_WEIGHT * largest)
    assert f.load_bytes == int(boundaries.BARE_PROCESS_BYTES + boundaries.LOAD_BYTES_PER_PARAMETER * params)
    with pytest.raises(XFPError, match=r"is below the predicted peak while quantizing .*raise --max-ram") as err:
        _fit(tmp_path, 0.45, max_ram=f.quantize_bytes - 1)
    assert "\n" not in str(err.value) and fake.checked == []  # refused before anything is written
    assert _fit(tmp_path, 0.45, max_ram=f.quantize_bytes)["outcome"] == "fitted"
