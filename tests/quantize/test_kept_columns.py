"""Kept columns (mode V2a): whole input columns stored apart (int8 with a float16 scale per column), put back
last, never holding an outlier, taking no part in the groups; the stored matrix decodes to the judged
reconstruction bit for bit."""

import pytest
import torch

from xfp.config import OutlierConfig, QuantConfig
from xfp.errors import XFPError
from xfp.format import io
from xfp.format.pack import unpack
from xfp.format.reference import decode, kept_values
from xfp.quantize import outliers
from xfp.quantize.autoselect import quantize_matrix
from xfp.quantize.library import KEPT_SCALE_MAX, code_kept
from xfp.quantize.stats import all_statistics, row_cosines

NAME = "model.layers.0.mlp.down_proj.weight"
ROWS, COLS = 48, 150  # G = 64: groups of 64, 64 and a ragged 22
KEPT = [7, 149]  # a column of a full group and the last column (ragged group)


def planted() -> torch.Tensor:
    """Small weights, two hot columns (the largest deviations of the matrix) and two weight outliers elsewhere."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g) * 0.02
    w[:, 7] *= 100
    w[5, 7] = 30.0
    w[:, 149] *= 40
    w[3, 20], w[40, 100] = 8.0, -7.0  # beyond 4 sigma of the whole matrix, hot columns included
    return w


def v2a(library_size: int = 1, budgets: tuple[float, ...] = (0.0,)) -> QuantConfig:
    """One candidate only (3 bits, G = 64, one budget), so what the floor accepts cannot change the choice."""
    return QuantConfig(mode="v2a", bits=(3,), escalation_bits=(), group_size=(64,), library_size=library_size,
                       outliers=OutlierConfig(budgets=budgets))


@pytest.mark.parametrize("library_size", [1, 4])
@pytest.mark.parametrize("budget", [0.0, 0.01])
def test_kept_columns_round_trip_exactly(tmp_path, library_size, budget):
    w = planted()
    r = quantize_matrix(w, 0.0, v2a(library_size, (budget,)), NAME, kept_cols=torch.tensor(KEPT))
    packed = r.packed
    assert packed.kept_cols.dtype == torch.int32 and packed.kept_cols.tolist() == KEPT
    assert r.layout.kept == 2 and packed.layout.meta()[6] == 2 and r.summary()["kept"] == 2
    assert (r.layout.n_outliers >= 2) == (budget > 0)
    decoded = decode(packed)
    torch.testing.assert_close(decoded, r.reconstruction, rtol=0, atol=0)
    q, scale = code_kept(w[:, KEPT])
    assert torch.equal(packed.kept_val, q) and torch.equal(packed.kept_scale, scale)
    assert torch.equal(decoded[:, KEPT], kept_values(q, scale))
    assert r.stats == all_statistics(row_cosines(w, decoded))
    path = tmp_path / "m.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: packed}))
    torch.testing.assert_close(decode(io.load(path).matrices[NAME]), r.reconstruction, rtol=0, atol=0)


def test_outliers_never_fall_in_kept_columns():
    w = planted()
    kept = torch.tensor(KEPT)
    candidates, _ = outliers.sigma_candidates(w, OutlierConfig().k)
    in_kept = torch.isin(candidates % COLS, kept)
    assert int(in_kept.sum()) >= 5 and int((~in_kept).sum()) >= 2  # the hot columns hold the largest deviations
    r = quantize_matrix(w, 0.0, v2a(budgets=(0.01,)), NAME, kept_cols=kept)
    pos = r.packed.outlier_pos.long()
    assert pos.numel() >= 2 and not torch.isin(pos % COLS, kept).any()
    assert {3 * COLS + 20, 40 * COLS + 100} <= set(pos.tolist())
    # the selection itself: under any cap, no position in a kept column
    for budget in (0.001, 0.01, 0.5):
        assert not torch.isin(outliers.select(w, OutlierConfig(), budget, kept) % COLS, kept).any()


def test_kept_columns_take_no_part_in_the_groups():
    w = planted()
    other = w.clone()
    other[:, KEPT] = torch.linspace(-100.0, 100.0, ROWS).unsqueeze(1)  # anything: the groups must not see it
    a = quantize_matrix(w, 0.0, v2a(4), NAME, kept_cols=torch.tensor(KEPT)).packed
    b = quantize_matrix(other, 0.0, v2a(4), NAME, kept_cols=torch.tensor(KEPT)).packed
    for part in ("library", "scale", "scale_table", "offset", "offset_table", "ids", "kept_cols"):
        assert torch.equal(getattr(a, part), getattr(b, part)), part
    coded = [c for c in range(COLS) if c not in KEPT]
    assert torch.equal(unpack(a.codes, 3, COLS)[:, coded], unpack(b.codes, 3, COLS)[:, coded])
    assert torch.equal(decode(b)[:, KEPT], kept_values(*code_kept(other[:, KEPT])))
    assert torch.equal(decode(a)[:, coded], decode(b)[:, coded])


def test_a_group_made_only_of_kept_columns_decodes_exactly():
    w = planted()[:, :10]
    r = quantize_matrix(w, 0.0, QuantConfig(mode="v2a", bits=(2,), escalation_bits=(), group_size=(4,),
                                            outliers=OutlierConfig(budgets=(0.0,))), NAME,
                        kept_cols=torch.tensor([4, 5, 6, 7]))
    assert torch.all(r.packed.group_scale[:, 1] == 0) and torch.all(r.packed.group_offset[:, 1] == 0)
    assert torch.equal(decode(r.packed), r.reconstruction)
    assert torch.equal(r.reconstruction[:, 4:8], kept_values(*code_kept(w[:, 4:8])))


def test_kept_columns_are_coded_per_column_in_int8():
    w = planted()
    columns = torch.cat([w[:, KEPT], torch.zeros(ROWS, 1), torch.full((ROWS, 1), -3.0)], 1)
    q, scale = code_kept(columns)
    assert q.dtype == torch.int8 and tuple(q.shape) == (ROWS, 4) and scale.dtype == torch.float16
    assert int(q.min()) >= -127 and torch.equal(q.abs().amax(0), torch.tensor([127, 127, 0, 127], dtype=torch.int8))
    assert torch.equal(scale[[0, 1, 3]], (columns[:, [0, 1, 3]].abs().amax(0) / 127).half()) and scale[2] == 1.0
    decoded = kept_values(q, scale).float()
    # int8 rounding (half a scale step), then one float16 rounding (relative 2^-11)
    bound = scale.float() / 2 + decoded.abs() * 2.0**-11
    assert torch.all((decoded - columns).abs() <= bound)


def test_kept_columns_near_the_float16_limit_decode_finite(tmp_path):
    w = planted()
    w[0, 7], w[1, 149] = 65504.0, -65504.0  # absmax / 127 rounds up to 516, and 127 * 516 overflows float16
    r = quantize_matrix(w, 0.0, v2a(), NAME, kept_cols=torch.tensor(KEPT))
    assert torch.all(r.packed.kept_scale == KEPT_SCALE_MAX) and torch.isfinite(r.reconstruction).all()
    assert r.reconstruction[0, 7] == 65472.0 and r.reconstruction[1, 149] == -65472.0  # 127 * 515.5, as float16
    path = tmp_path / "m.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: r.packed}))
    torch.testing.assert_close(decode(io.load(path).matrices[NAME]), r.reconstruction, rtol=0, atol=0)


def test_kept_columns_are_sorted_and_deduplicated_and_none_means_empty():
    w = planted()
    a = quantize_matrix(w, 0.0, v2a(), NAME, kept_cols=torch.tensor([149, 7, 7])).packed
    b = quantize_matrix(w, 0.0, v2a(), NAME, kept_cols=torch.tensor(KEPT)).packed
    for part, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[part]), part
    none = quantize_matrix(w, 0.0, v2a(), NAME).packed
    empty = quantize_matrix(w, 0.0, v2a(), NAME, kept_cols=torch.zeros(0, dtype=torch.int64)).packed
    assert none.layout.kept == empty.layout.kept == 0
    assert tuple(none.kept_val.shape) == (ROWS, 0) and none.kept_cols.dtype == torch.int32
    assert tuple(none.kept_scale.shape) == (0,)


@pytest.mark.parametrize("kept, config, message", [
    ([3], QuantConfig(mode="v2"), "kept columns need mode v2a"),
    ([COLS], v2a(), r"kept columns must lie in \[0, 150\)"),
    ([-1, 3], v2a(), r"kept columns must lie in \[0, 150\)"),
])
def test_bad_kept_columns_are_refused_with_the_tensor_name(kept, config, message):
    with pytest.raises(XFPError, match=message) as info:
        quantize_matrix(planted(), 0.99, config, NAME, kept_cols=torch.tensor(kept))
    assert NAME in str(info.value)
