"""Auto-select: floors hold, the cheapest passing candidate wins, misses are marked, bad input refused."""

import pytest
import torch

from xfp.config import FORMAT_VERSION, OutlierConfig, QuantConfig
from xfp.errors import XFPError
from xfp.format.reference import decode
from xfp.quantize.autoselect import quantize_matrix
from xfp.quantize.stats import all_statistics, row_cosines


V2 = dict(mode="v2")
"""The tests above the mode v2a section are for mode v2 (no longer the default)."""


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    spikes = torch.rand(rows, cols, generator=g) < 0.003
    return torch.where(spikes, w * 10, w)


@pytest.mark.parametrize("statistic", ["min", "p1", "p5", "median", "mean"])
@pytest.mark.parametrize("floor", [0.95, 0.99, 0.995])
def test_floor_holds_on_decoded_matrix(statistic, floor):
    w = heavy_tailed(96, 200)
    r = quantize_matrix(w, floor, QuantConfig(statistic=statistic, **V2), "m")
    assert r.meets_floor
    stats = all_statistics(row_cosines(w, decode(r.packed)))
    assert stats[statistic] >= floor
    assert stats == r.stats


def test_decode_equals_in_memory_reconstruction_bit_for_bit():
    w = heavy_tailed(64, 130, seed=3)
    r = quantize_matrix(w, 0.99, QuantConfig(**V2), "m")
    torch.testing.assert_close(decode(r.packed), r.reconstruction, rtol=0, atol=0)


def test_cheapest_passing_candidate_is_chosen():
    w = heavy_tailed(64, 256, seed=4)
    cfg = QuantConfig(**V2)
    r = quantize_matrix(w, 0.99, cfg, "m")
    chosen_bytes = r.layout.total_bytes
    # every cheaper candidate that was screened failed the floor
    assert all(t["screened"] < 0.99 for t in r.tried if t["bytes"] < chosen_bytes)
    assert [t["bytes"] for t in r.tried] == sorted(t["bytes"] for t in r.tried)


def test_lower_floor_never_costs_more():
    w = heavy_tailed(64, 256, seed=5)
    sizes = [quantize_matrix(w, f, QuantConfig(**V2), "m").layout.total_bytes for f in (0.9, 0.97, 0.99, 0.998)]
    assert sizes == sorted(sizes)


def test_escalates_beyond_four_bits():
    w = heavy_tailed(32, 256, seed=6)
    r = quantize_matrix(w, 0.9995, QuantConfig(**V2), "m")
    assert r.layout.bits > 4 and r.meets_floor


def test_unreachable_floor_is_marked_not_hidden():
    w = heavy_tailed(32, 256, seed=7)
    cfg = QuantConfig(floor_strict=1.0, bits=(2,), escalation_bits=(), outliers=OutlierConfig(budgets=(0.0,)),
                      **V2)
    r = quantize_matrix(w, 1.0, cfg, "m")
    assert not r.meets_floor
    assert r.stats["p1"] < 1.0


def test_outliers_are_put_back_exactly():
    w = heavy_tailed(32, 256, seed=8)
    r = quantize_matrix(w, 0.99, QuantConfig(outliers=OutlierConfig(budgets=(0.02,)), **V2), "m")
    assert r.layout.n_outliers > 0
    pos = r.packed.outlier_pos.long()
    assert torch.equal(decode(r.packed).view(-1)[pos], w.view(-1)[pos].half())
    assert r.layout.n_outliers <= int(0.02 * w.numel())


def test_zero_constant_and_tiny_matrices():
    w = torch.zeros(4, 3)
    w[1] = 0.25
    w[2, :2] = torch.tensor([1.0, -1.0])
    r = quantize_matrix(w, 0.999, QuantConfig(**V2), "m")
    assert r.meets_floor and r.stats["min"] == 1.0
    assert torch.equal(decode(r.packed).float(), w)
    assert quantize_matrix(torch.ones(1, 1), 0.99, QuantConfig(**V2), "m").meets_floor


def test_input_not_modified_and_deterministic():
    w = heavy_tailed(48, 100, seed=9).to(torch.bfloat16)
    before = w.clone()
    a = quantize_matrix(w, 0.99, QuantConfig(**V2), "m")
    b = quantize_matrix(w, 0.99, QuantConfig(**V2), "m")
    assert torch.equal(w, before)
    assert torch.equal(a.packed.codes, b.packed.codes) and torch.equal(a.packed.codebook, b.packed.codebook)


@pytest.mark.parametrize(
    "w, message",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.int32), "floating-point"),
        (torch.ones(4), "2-D"),
        (torch.ones(0, 4), "empty"),
        (torch.tensor([[1e6, 1.0]]), "fp16 range"),
    ],
)
def test_bad_weights_are_refused_with_the_tensor_name(w, message):
    with pytest.raises(XFPError, match=message) as info:
        quantize_matrix(w, 0.99, QuantConfig(**V2), "layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight" in str(info.value)


def test_config_validation():
    with pytest.raises(ValueError, match="floor_lazy"):
        QuantConfig(floor_strict=0.9, floor_lazy=0.95)
    with pytest.raises(ValueError, match="statistic"):
        QuantConfig(statistic="p50")
    with pytest.raises(ValueError, match="unsupported bit widths"):
        QuantConfig(bits=(7,))
    cfg = QuantConfig(statistic="median", bits=(3, 4))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


# -- mode v2a ---------------------------------------------------------------------------------------

V2A = dict(mode="v2a", group_size=(64, 128))


@pytest.mark.parametrize("library_size", [1, 8])
@pytest.mark.parametrize("statistic, floor", [("min", 0.95), ("p1", 0.99), ("mean", 0.995)])
def test_v2a_floor_holds_on_decoded_matrix(statistic, floor, library_size):
    w = heavy_tailed(96, 200)
    r = quantize_matrix(w, floor, QuantConfig(statistic=statistic, library_size=library_size, **V2A), "m")
    assert r.meets_floor and r.layout.mode == "v2a" and r.layout.library == library_size
    decoded = decode(r.packed)
    torch.testing.assert_close(decoded, r.reconstruction, rtol=0, atol=0)
    stats = all_statistics(row_cosines(w, decoded))
    assert stats[statistic] >= floor and stats == r.stats


def test_v2a_cheapest_passing_candidate_is_chosen():
    w = heavy_tailed(64, 256, seed=4)
    r = quantize_matrix(w, 0.99, QuantConfig(**V2A), "m")
    assert [t["bytes"] for t in r.tried] == sorted(t["bytes"] for t in r.tried)
    assert {(t["bits"], t["group"]) for t in r.tried} >= {(2, 64), (2, 128)}
    assert all(t["screened"] < 0.99 for t in r.tried[:-1]) and r.tried[-1]["screened"] >= 0.99
    assert r.tried[-1]["bytes"] == r.layout.total_bytes and r.tried[-1]["group"] == r.layout.group


def test_v2a_unreachable_floor_is_marked_not_hidden():
    w = heavy_tailed(32, 256, seed=7)
    cfg = QuantConfig(bits=(2,), escalation_bits=(), outliers=OutlierConfig(budgets=(0.0,)), **V2A)
    r = quantize_matrix(w, 1.0, cfg, "m")
    assert not r.meets_floor and len(r.tried) == 2
    assert r.stats["p1"] == pytest.approx(max(t["screened"] for t in r.tried), abs=1e-12)
    torch.testing.assert_close(decode(r.packed), r.reconstruction, rtol=0, atol=0)


def test_v2a_zero_constant_and_tiny_matrices():
    w = torch.zeros(4, 3)
    w[1] = 0.25
    w[2, :2] = torch.tensor([1.0, -1.0])
    r = quantize_matrix(w, 0.999, QuantConfig(**V2A), "m")
    assert r.meets_floor and r.stats["min"] == 1.0
    assert torch.equal(decode(r.packed).float(), w)
    assert quantize_matrix(torch.ones(1, 1), 0.99, QuantConfig(**V2A), "m").meets_floor


def test_v2a_input_not_modified_and_deterministic():
    w = heavy_tailed(48, 100, seed=9).to(torch.bfloat16)
    before = w.clone()
    a = quantize_matrix(w, 0.99, QuantConfig(library_size=4, **V2A), "m")
    b = quantize_matrix(w, 0.99, QuantConfig(library_size=4, **V2A), "m")
    assert torch.equal(w, before)
    for part, t in a.packed.tensors().items():
        assert torch.equal(t, b.packed.tensors()[part]), part


def test_summary_holds_what_sizes_the_buffers():
    w = heavy_tailed(16, 100, seed=10)
    v2 = quantize_matrix(w, 0.99, QuantConfig(mode="v2"), "m").summary()
    assert v2["mode"] == "v2" and "group" not in v2 and "library" not in v2 and "kept" not in v2
    v2a = quantize_matrix(w, 0.99, QuantConfig(library_size=2, **V2A), "m")
    s = v2a.summary()
    assert {k: s[k] for k in ("mode", "bits", "outliers", "group", "library", "kept")} == v2a.layout.entry()
    assert s["library"] == 2 and s["kept"] == 0 and s["group"] in (64, 128) and s["bytes"] == v2a.layout.total_bytes


def test_v2a_config_validation():
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="v3")
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=())
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=(0,))
    with pytest.raises(ValueError, match="repeat"):
        QuantConfig(group_size=(64, 64))
    with pytest.raises(ValueError, match="library_size"):
        QuantConfig(library_size=257)
    cfg = QuantConfig(mode="v2a", group_size=(32, 128), library_size=32)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["format_version"] == FORMAT_VERSION == 3 and cfg.to_dict()["group_size"] == [32, 128]
    for bad in (-1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="keep_columns"):
            QuantConfig(keep_columns=bad)
    assert QuantConfig.from_dict(QuantConfig(keep_columns=0).to_dict()).keep_columns == 0


def test_defaults_are_v2a_with_hot_columns_and_few_outliers():
    cfg = QuantConfig()
    assert cfg.mode == "v2a" and cfg.keep_columns == 5.0 and cfg.outliers.budgets == (0.0, 0.003)
