"""The measurement table on a tiny random Llama: its candidates are auto-select's, it is cached, and a plan
written through the pipeline stores exactly the planned candidates."""

from __future__ import annotations

import json

import pytest
import torch

from xfp.config import QuantConfig
from xfp.fit import output, search, table
from xfp.fit.search import Floors
from xfp.quantize import autoselect


@pytest.fixture(scope="module")
def measured(tiny_llama, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fit-cache")
    return table.measure(tiny_llama, QuantConfig(), cache_dir=cache, progress=False), cache


def test_last_candidate_is_autoselects_choice():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.linspace(0.5, 2.0, 96)
    config = QuantConfig()
    rows = autoselect.measure_candidates(w, config, 0.99, "w")
    chosen = autoselect.quantize_matrix(w, 0.99, config, "w")
    last = rows[-1]
    entry = chosen.summary()
    assert (last["bits"], last["group"], last["outliers"], last["bytes"]) == (
        entry["bits"], entry["group"], entry["outliers"], entry["bytes"])
    assert [r["bytes"] for r in rows] == [t["bytes"] for t in chosen.tried]
    assert [r["stats"]["p1"] for r in rows] == [t["screened"] for t in chosen.tried]
    assert last["stats"]["p1"] == pytest.approx(chosen.stats["p1"], abs=1e-12)
    residual = ((w.double() - chosen.reconstruction.double()) ** 2).sum() / (w.double() ** 2).sum()
    assert last["error"] == pytest.approx(float(residual), rel=1e-6)


def test_table_covers_every_quantized_matrix(measured, tiny_llama):
    t, _ = measured
    assert len(t.matrices) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert t.fp16_bytes == 2 * sum(p.numel() for p in _params(tiny_llama))
    for m in t.matrices:
        stats = [c.stats["p1"] for c in m.candidates]
        assert m.exhausted or stats[-1] >= 0.99
        assert all(s < 0.99 for s in stats[:-1])


def _params(folder):
    from safetensors.torch import load_file

    return list(load_file(folder / "model.safetensors").values())


def test_cache_is_reused_and_extended(measured, tiny_llama, monkeypatch):
    t, cache = measured
    calls = []
    real = autoselect.measure_candidates
    monkeypatch.setattr(autoselect, "measure_candidates", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = table.measure(tiny_llama, QuantConfig(), cache_dir=cache, progress=False)
    assert calls == [] and again.to_dict() == t.to_dict()
    lower = table.measure(tiny_llama, QuantConfig(floor_strict=0.95, floor_lazy=0.9), cache_dir=cache, progress=False)
    assert calls == [] and len(lower.matrices) == 14  # measured to 0.99 already covers 0.95
    files = list(next(cache.iterdir()).glob("*.json"))
    assert len(files) == 14 and all(json.loads(f.read_text())["measured_to"] == 0.99 for f in files)
    higher = table.measure(tiny_llama, QuantConfig(floor_strict=0.995), cache_dir=cache, progress=False)
    assert len(calls) == sum(not m.exhausted for m in t.matrices)
    assert all(m.measured_to == 0.995 or m.exhausted for m in higher.matrices)


def test_written_plan_stores_the_planned_candidates(measured, tiny_llama, tmp_path):
    t, _ = measured
    up, low = Floors(0.99, 0.97), Floors(0.9, 0.9)
    budget = (search.at_floors(t, up).total_bytes + search.minimum_bytes(t, up, low)) // 2
    plan = search.allocate(t, budget, up, low)
    rep = output.write_plan(tiny_llama, tmp_path / "out", t, plan)
    got = {s["name"]: s for s in rep["tensors"] if "bits" in s}
    for m, i in zip(t.matrices, plan.choice):
        c, s = m.candidates[i], got[m.name]
        assert (s["bits"], s["group"], s["outliers"], s["bytes"]) == (c.bits, c.group, c.outliers, c.bytes)
        assert s["cosine"]["p1"] == pytest.approx(c.stats["p1"], abs=1e-12)
        assert s["meets_floor"]
    assert rep["totals"]["output_bytes"] <= plan.total_bytes <= budget
