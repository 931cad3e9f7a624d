"""Mode V2a on disk: golden bytes of a hand-made matrix, the exact decoding rule, and one crafted bad file
per loader check."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xfp.config import OutlierConfig, QuantConfig
from xfp.errors import FormatError
from xfp.format import io
from xfp.format.reference import PackedV2a, decode, group_values, kept_values
from xfp.format.spec import FILE_METADATA_KEY, tensor_name
from xfp.quantize.autoselect import quantize_matrix

NAME = "model.layers.0.mlp.down_proj.weight"


def f16(values):
    return torch.tensor(values, dtype=torch.float16)


def golden() -> PackedV2a:
    """rows=2, cols=5, bits=2, G=4 (a full group and a ragged one of 1 column), L=2, one outlier, one kept
    column (column 2, int8 with a float16 scale). Scales and offsets are codes into their 256-entry tables;
    unused entries are 0."""
    return PackedV2a(
        rows=2, cols=5, bits=2, group=4,
        codes=torch.tensor([[0xE4, 0x02], [0x1F, 0x01]], dtype=torch.uint8),  # [0,1,2,3,2], [3,3,1,0,1]
        library=f16([[-1.0, -0.5, 0.5, 1.0], [-1.0, 0.0, 0.25, 1.0]]),
        scale=torch.tensor([[1, 3], [0, 2]], dtype=torch.uint8),  # 0.5, 2.0; 0.0, 1.5
        scale_table=f16([0.0, 0.5, 1.5, 2.0] + [0.0] * 252),
        offset=torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8),  # 1.0, -1.0; 3.0, 0.25
        offset_table=f16([0.0, 1.0, -1.0, 3.0, 0.25] + [0.0] * 251),
        ids=torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8),
        outlier_pos=torch.tensor([6], dtype=torch.int32),
        outlier_val=f16([7.0]),
        kept_cols=torch.tensor([2], dtype=torch.int32),
        kept_val=torch.tensor([[-4], [9]], dtype=torch.int8),  # times 0.5: -2.0, 4.5
        kept_scale=f16([0.5]),
    )


GOLDEN_HEX = {  # every stored tensor, little-endian, as written by hand from docs/FORMAT.md (version 3)
    "codes": "e4021f01",
    "library": "00bc00b80038003c" "00bc00000034003c",
    "scale": "0103" "0002",
    "scale_table": "0000" "0038" "003e" "0040" + "0000" * 252,
    "offset": "0102" "0304",
    "offset_table": "0000" "003c" "00bc" "0042" "0034" + "0000" * 251,
    "ids": "00010100",
    "outlier_pos": "06000000",
    "outlier_val": "0047",
    "kept_cols": "02000000",
    "kept_val": "fc" "09",
    "kept_scale": "0038",
    "meta": "03000000" "02000000" "05000000" "02000000" "04000000" "02000000" "01000000",
}


def test_golden_matrix_decodes_by_hand():
    # row 0: group 0 uses codebook 0 at scale 0.5, offset 1; group 1 (col 4) codebook 1 at 2, -1
    # row 1: group 0 has scale 0 (decodes to its offset 3), col 1 is the outlier 7; group 1 codebook 0 at 1.5, 0.25
    # then column 2 is the kept column: -2 and 4.5 whatever its indices, scales and offsets say
    expected = [[0.5, 0.75, -2.0, 1.5, -0.5], [3.0, 7.0, 4.5, 3.0, -0.5]]
    assert decode(golden()).tolist() == expected
    assert decode(golden()).dtype == torch.float16
    assert golden().group_scale.tolist() == [[0.5, 2.0], [0.0, 1.5]]
    assert golden().group_offset.tolist() == [[1.0, -1.0], [3.0, 0.25]]


def test_golden_bytes_are_pinned(tmp_path):
    tensors, metadata = io.flatten(io.XFPFile(matrices={NAME: golden()}))
    assert {k: v.numpy().tobytes().hex() for k, v in tensors.items()} == {
        tensor_name(NAME, part): hex_ for part, hex_ in GOLDEN_HEX.items()}
    assert json.loads(metadata[FILE_METADATA_KEY]) == {"format_version": 3, "matrices": [NAME]}
    path = tmp_path / "g.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: golden()}))
    loaded = io.load(path).matrices[NAME]
    assert isinstance(loaded, PackedV2a) and loaded.layout == golden().layout
    assert torch.equal(decode(loaded), decode(golden()))


def test_library_of_one_stores_an_empty_ids_tensor(tmp_path):
    g = golden()
    one = replace(g, library=g.library[:1].clone(), ids=torch.zeros((2, 0), dtype=torch.uint8))
    path = tmp_path / "one.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: one}))
    loaded = io.load(path).matrices[NAME]
    assert tuple(loaded.ids.shape) == (2, 0) and loaded.layout.nbytes()["ids"] == 0
    assert decode(loaded)[0, 4] == 2.0 * 0.5 - 1.0  # codebook 0, index 2, scale 2, offset -1


def test_no_kept_columns_store_empty_tensors(tmp_path):
    g = golden()
    none = replace(g, kept_cols=torch.zeros(0, dtype=torch.int32), kept_val=torch.zeros((2, 0), dtype=torch.int8),
                   kept_scale=torch.zeros(0, dtype=torch.float16))
    path = tmp_path / "none.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: none}))
    loaded = io.load(path).matrices[NAME]
    assert loaded.layout.kept == 0
    assert sum(loaded.layout.nbytes()[part] for part in ("kept_cols", "kept_val", "kept_scale")) == 0
    assert decode(loaded)[:, 2].tolist() == [1.25, 3.0]  # column 2 decodes from its group again


def test_kept_columns_are_applied_after_the_outliers():
    # readers refuse an outlier in a kept column (below); the decoder's order still decides such a matrix
    g = golden()
    both = replace(g, outlier_pos=torch.tensor([7], dtype=torch.int32))  # row 1, column 2: the kept column
    assert decode(both)[1, 2] == 4.5


# -- the decoding rule ----------------------------------------------------------------------------


def numpy_rule(e: np.ndarray, s: np.ndarray, o: np.ndarray) -> np.ndarray:
    """The rule of docs/FORMAT.md in numpy: float32 multiply, float32 add, then to float16."""
    e32, s32, o32 = e.astype(np.float32), s.astype(np.float32), o.astype(np.float32)
    return (e32 * s32 + o32).astype(np.float16)


def test_decoding_rule_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    n = 200_000
    e = rng.standard_normal(n).astype(np.float16)
    s = np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 2, n)).astype(np.float16)  # incl. subnormals
    o = (rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 2, n)).astype(np.float16)
    got = group_values(torch.from_numpy(e), torch.from_numpy(s), torch.from_numpy(o)).numpy()
    assert got.view(np.uint16).tolist() == numpy_rule(e, s, o).view(np.uint16).tolist()


def test_decoding_rounds_twice_as_specified():
    # e*s + o rounds to float32 first, then to float16; rounding the exact value once would give 0.05319
    e, s, o = (np.array([bits], dtype=np.uint16).view(np.float16) for bits in (0x3577, 0xA047, 0x2B2D))
    got = group_values(*(torch.from_numpy(v) for v in (e, s, o)))
    assert float(got) == 0.05322265625


def test_kept_column_rule_matches_an_independent_implementation():
    # every int8 value the format allows, times float16 scales from subnormal to the largest that cannot overflow
    rng = np.random.default_rng(1)
    q = np.arange(-127, 128, dtype=np.int8)
    s = np.concatenate([[0.0, 2.0**-24, 515.5], np.abs(rng.standard_normal(300) * 10.0 ** rng.uniform(-8, 2, 300))])
    s = s.astype(np.float16)
    got = kept_values(torch.from_numpy(q).unsqueeze(1), torch.from_numpy(s)).numpy()  # [255, len(s)]
    expected = (q.astype(np.float32)[:, None] * s.astype(np.float32)[None, :]).astype(np.float16)
    assert got.dtype == np.float16 and got.view(np.uint16).tolist() == expected.view(np.uint16).tolist()
    assert np.isfinite(got).all()


def test_subnormal_results_are_kept():
    tiny = group_values(f16([1.0]), f16([2.0**-24]), f16([0.0]))
    assert float(tiny) == 2.0**-24


# -- the loader -----------------------------------------------------------------------------------

KEPT = [10, 36]
"""The fixture's kept columns: one in a full group, the last one in the ragged group."""

OUTLIER = 3 * 37 + 5
"""A planted outlier (row 3, column 5) that the fixture stores."""


@pytest.fixture(scope="module")
def result():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 37, generator=g)
    w[3, 5], w[7, 1], w[20, 30] = 9.0, -8.0, 7.5
    cfg = QuantConfig(mode="v2a", bits=(3,), group_size=(16,), library_size=4,
                      outliers=OutlierConfig(budgets=(0.02,)))
    r = quantize_matrix(w, 0.9, cfg, NAME, kept_cols=torch.tensor(KEPT))
    assert r.layout.n_outliers >= 3 and r.layout.groups == 3  # 16 + 16 + a ragged 5
    assert r.packed.kept_cols.tolist() == KEPT and OUTLIER in r.packed.outlier_pos.tolist()
    return r


def write(tmp_path, packed, mutate=None, version=None):
    tensors, metadata = io.flatten(io.XFPFile(matrices={NAME: packed}))
    tensors = {k: v.clone() for k, v in tensors.items()}
    if mutate:
        mutate(tensors)
    if version is not None:
        info = json.loads(metadata[FILE_METADATA_KEY])
        info["format_version"] = version
        metadata[FILE_METADATA_KEY] = json.dumps(info)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_round_trip_is_exact(tmp_path, result):
    loaded = io.load(write(tmp_path, result.packed)).matrices[NAME]
    torch.testing.assert_close(decode(loaded), result.reconstruction, rtol=0, atol=0)
    assert sum(t.numel() * t.element_size() for t in loaded.tensors().values()) == result.layout.total_bytes
    assert loaded.kept_cols.tolist() == KEPT


def t(part):
    return tensor_name(NAME, part)


def _set(part, fn):
    def mutate(ts):
        ts[t(part)] = fn(ts[t(part)])
    return mutate


def _meta(index, value):
    def change(m):
        m = m.clone()
        m[index] = value
        return m
    return _set("meta", change)


def _fill(part, index, value, dim=0):
    """Set entry `index` of `part` along `dim` to `value`."""
    return _set(part, lambda v: v.index_fill(dim, torch.tensor([index]), value))


def _kept(columns):
    return _set("kept_cols", lambda v: torch.tensor(columns, dtype=torch.int32))


HOSTILE = [
    # meta
    ("meta float", _set("meta", lambda m: m.float()), t("meta"), r"1-D int32 tensor.*got float32 \[7\]"),
    ("meta float nan", _set("meta", lambda m: torch.full(m.shape, float("nan"))), t("meta"), "got float32"),
    ("meta too short", _set("meta", lambda m: m[:4].contiguous()), t("meta"), r"int32 \[7\].*mode 3"),
    ("meta of version 2", _set("meta", lambda m: m[:6].contiguous()), t("meta"), r"int32 \[7\].*got 6 entries"),
    ("meta group", _meta(4, 0), t("meta"), "group must be >= 1"),
    ("meta library 0", _meta(5, 0), t("meta"), r"library must be in \[1, 256\]"),
    ("meta library 300", _meta(5, 300), t("meta"), r"library must be in \[1, 256\]"),
    ("meta kept > cols", _meta(6, 38), t("meta"), r"kept columns must be in \[0, 37\], got 38"),
    ("meta kept negative", _meta(6, -1), t("meta"), r"kept columns must be in \[0, 37\], got -1"),
    ("meta library mismatch", _meta(5, 5), t("library"), r"float16 \[5, 8\]"),
    ("meta group mismatch", _meta(4, 8), t("scale"), r"uint8 \[24, 5\]"),
    ("meta kept mismatch", _meta(6, 3), t("kept_cols"), r"must be int32 \[3\], got int32 \[2\]"),
    # parts present
    ("v2 part in a v2a matrix", lambda ts: ts.update({t("codebook"): torch.zeros(24, 8, dtype=torch.float16)}),
     t("codebook"), "not a part of a mode 3"),
    ("missing library", lambda ts: ts.pop(t("library")), t("library"), "is missing"),
    ("missing ids", lambda ts: ts.pop(t("ids")), t("ids"), "is missing"),
    ("missing scale_table", lambda ts: ts.pop(t("scale_table")), t("scale_table"), "is missing"),
    ("missing offset_table", lambda ts: ts.pop(t("offset_table")), t("offset_table"), "is missing"),
    ("missing kept_cols", lambda ts: ts.pop(t("kept_cols")), t("kept_cols"), "is missing"),
    ("missing kept_val", lambda ts: ts.pop(t("kept_val")), t("kept_val"), "is missing"),
    ("missing kept_scale", lambda ts: ts.pop(t("kept_scale")), t("kept_scale"), "is missing"),
    # library, codes, ids
    ("library dtype", _set("library", lambda v: v.float()), t("library"), "must be float16"),
    ("library nan", _fill("library", 2, float("nan"), dim=1), t("library"), "finite"),
    ("ids dtype", _set("ids", lambda v: v.to(torch.int16)), t("ids"), "must be uint8"),
    ("ids out of range", _fill("ids", 5, 4), t("ids"), "< 4"),
    ("codes padding", _set("codes", lambda c: c.index_fill(1, torch.tensor([c.shape[1] - 1]), 0xFF)), t("codes"),
     "padding"),
    # scale and offset codes
    ("scale dtype", _set("scale", lambda v: v.half()), t("scale"), r"must be uint8 \[24, 3\], got float16 \[24, 3\]"),
    ("scale shape", _set("scale", lambda v: v[:, :2].contiguous()), t("scale"), r"must be uint8 \[24, 3\]"),
    ("offset dtype", _set("offset", lambda v: v.to(torch.int8)), t("offset"), r"must be uint8 \[24, 3\], got int8"),
    ("offset shape", _set("offset", lambda v: v.t().contiguous()), t("offset"),
     r"must be uint8 \[24, 3\], got uint8 \[3, 24\]"),
    # scale and offset tables
    ("scale_table nan", _fill("scale_table", 7, float("nan")), t("scale_table"), "finite"),
    ("scale_table inf", _fill("scale_table", 255, float("inf")), t("scale_table"), "finite"),
    ("scale_table negative", _fill("scale_table", 3, -0.5), t("scale_table"), "scales must be >= 0"),
    ("scale_table dtype", _set("scale_table", lambda v: v.float()), t("scale_table"),
     r"must be float16 \[256\], got float32 \[256\]"),
    ("scale_table shape", _set("scale_table", lambda v: v[:255].contiguous()), t("scale_table"),
     r"must be float16 \[256\], got float16 \[255\]"),
    ("offset_table inf", _fill("offset_table", 0, float("-inf")), t("offset_table"), "finite"),
    ("offset_table nan", _fill("offset_table", 128, float("nan")), t("offset_table"), "finite"),
    ("offset_table dtype", _set("offset_table", lambda v: v.to(torch.bfloat16)), t("offset_table"),
     r"must be float16 \[256\], got bfloat16"),
    ("offset_table shape", _set("offset_table", lambda v: v.reshape(16, 16).contiguous()), t("offset_table"),
     r"must be float16 \[256\], got float16 \[16, 16\]"),
    ("decoded overflow", lambda ts: (ts[t("scale_table")].fill_(60000.0), ts[t("offset_table")].fill_(60000.0)),
     t("scale"), "overflows float16"),
    # kept columns
    ("kept_cols out of range", _kept([10, 37]), t("kept_cols"), r"columns must lie in \[0, 37\)"),
    ("kept_cols negative", _kept([-1, 10]), t("kept_cols"), r"columns must lie in \[0, 37\)"),
    ("kept_cols decreasing", _kept([36, 10]), t("kept_cols"), "strictly increasing"),
    ("kept_cols repeated", _kept([10, 10]), t("kept_cols"), "strictly increasing"),
    ("kept column holds an outlier", _kept([5, 36]), t("outlier_pos"), "an outlier lies in a kept column"),
    ("kept_cols dtype", _set("kept_cols", lambda v: v.long()), t("kept_cols"), r"must be int32 \[2\], got int64"),
    ("kept_cols shape", _set("kept_cols", lambda v: v.reshape(1, 2)), t("kept_cols"),
     r"must be int32 \[2\], got int32 \[1, 2\]"),
    ("kept_val -128", _fill("kept_val", 1, -128, dim=1), t("kept_val"), r"values must be in \[-127, 127\]"),
    ("kept_val dtype", _set("kept_val", lambda v: v.half()), t("kept_val"), r"must be int8 \[24, 2\], got float16"),
    ("kept_val unsigned", _set("kept_val", lambda v: v.to(torch.uint8)), t("kept_val"),
     r"must be int8 \[24, 2\], got uint8"),
    ("kept_val shape", _set("kept_val", lambda v: v.t().contiguous()), t("kept_val"),
     r"must be int8 \[24, 2\], got int8 \[2, 24\]"),
    ("kept_scale nan", _fill("kept_scale", 0, float("nan")), t("kept_scale"), "finite"),
    ("kept_scale inf", _fill("kept_scale", 1, float("inf")), t("kept_scale"), "finite"),
    ("kept_scale negative", _fill("kept_scale", 1, -0.25), t("kept_scale"), "scales must be >= 0"),
    ("kept_scale dtype", _set("kept_scale", lambda v: v.float()), t("kept_scale"),
     r"must be float16 \[2\], got float32 \[2\]"),
    ("kept_scale shape", _set("kept_scale", lambda v: v[:1].contiguous()), t("kept_scale"),
     r"must be float16 \[2\], got float16 \[1\]"),
    ("kept decoded overflow", _fill("kept_scale", 0, 60000.0), t("kept_scale"), "overflows float16"),
    # outliers
    ("outliers repeated", _set("outlier_pos", lambda p: p.clone().fill_(5)), t("outlier_pos"), "strictly increasing"),
    ("outlier inf", _set("outlier_val", lambda v: v.clone().fill_(float("-inf"))), t("outlier_val"), "finite"),
]


@pytest.mark.parametrize("label, mutate, tensor, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_v2a_file_is_refused_with_one_line(tmp_path, result, label, mutate, tensor, message):
    path = write(tmp_path, result.packed, mutate)
    with pytest.raises(FormatError, match=message) as info:
        io.load(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and f"'{tensor}'" in text


def test_ids_must_be_empty_when_the_library_has_one_codebook(tmp_path):
    one = replace(golden(), library=golden().library[:1].clone())  # a [2, 2] ids tensor with L = 1
    with pytest.raises(FormatError, match=r"must be uint8 \[2, 0\], got uint8 \[2, 2\]"):
        io.load(write(tmp_path, one))


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_are_read_for_mode_v2_only(tmp_path, result, version):
    # version 2 stored V2a scales and offsets as float16 and had no kept columns: its V2a matrices cannot be read
    path = write(tmp_path, result.packed, version=version)
    with pytest.raises(FormatError, match=f"mode v2a needs format version 3.*the file says {version}") as info:
        io.load(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and f"'{t('meta')}'" in text
    v2 = quantize_matrix(torch.randn(8, 16), 0.9, QuantConfig(mode="v2", bits=(3,)), NAME)
    loaded = io.load(write(tmp_path, v2.packed, version=version))
    assert torch.equal(decode(loaded.matrices[NAME]), v2.reconstruction)
