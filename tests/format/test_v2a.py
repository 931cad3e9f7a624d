"""Mode V2a on disk: golden bytes of a hand-made matrix, the exact decoding rule, and one crafted bad file
per loader check."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xfp.config import OutlierConfig, QuantConfig
from xfp.errors import FormatError
from xfp.format import io
from xfp.format.reference import PackedV2a, decode, group_values
from xfp.format.spec import FILE_METADATA_KEY, tensor_name
from xfp.quantize.autoselect import quantize_matrix

NAME = "model.layers.0.mlp.down_proj.weight"


def f16(values):
    return torch.tensor(values, dtype=torch.float16)


def golden() -> PackedV2a:
    """rows=2, cols=5, bits=2, G=4 (a full group and a ragged one of 1 column), L=2, one outlier."""
    return PackedV2a(
        rows=2, cols=5, bits=2, group=4,
        codes=torch.tensor([[0xE4, 0x02], [0x1F, 0x01]], dtype=torch.uint8),  # [0,1,2,3,2], [3,3,1,0,1]
        library=f16([[-1.0, -0.5, 0.5, 1.0], [-1.0, 0.0, 0.25, 1.0]]),
        scale=f16([[0.5, 2.0], [0.0, 1.5]]),
        offset=f16([[1.0, -1.0], [3.0, 0.25]]),
        ids=torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8),
        outlier_pos=torch.tensor([6], dtype=torch.int32),
        outlier_val=f16([7.0]),
    )


GOLDEN_HEX = {  # every stored tensor, little-endian, as written by hand from docs/FORMAT.md
    "codes": "e4021f01",
    "library": "00bc00b80038003c" "00bc00000034003c",
    "scale": "0038" "0040" "0000" "003e",
    "offset": "003c" "00bc" "0042" "0034",
    "ids": "00010100",
    "outlier_pos": "06000000",
    "outlier_val": "0047",
    "meta": "03000000" "02000000" "05000000" "02000000" "04000000" "02000000",
}


def test_golden_matrix_decodes_by_hand():
    # row 0: group 0 uses codebook 0 at scale 0.5, offset 1; group 1 (col 4) codebook 1 at 2, -1
    # row 1: group 0 has scale 0 (decodes to its offset 3), col 1 is the outlier 7; group 1 codebook 0 at 1.5, 0.25
    expected = [[0.5, 0.75, 1.25, 1.5, -0.5], [3.0, 7.0, 3.0, 3.0, -0.5]]
    assert decode(golden()).tolist() == expected
    assert decode(golden()).dtype == torch.float16


def test_golden_bytes_are_pinned(tmp_path):
    tensors, metadata = io.flatten(io.XFPFile(matrices={NAME: golden()}))
    assert {k: v.numpy().tobytes().hex() for k, v in tensors.items()} == {
        tensor_name(NAME, part): hex_ for part, hex_ in GOLDEN_HEX.items()}
    assert json.loads(metadata[FILE_METADATA_KEY]) == {"format_version": 2, "matrices": [NAME]}
    path = tmp_path / "g.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: golden()}))
    loaded = io.load(path).matrices[NAME]
    assert isinstance(loaded, PackedV2a) and loaded.layout == golden().layout
    assert torch.equal(decode(loaded), decode(golden()))


def test_library_of_one_stores_an_empty_ids_tensor(tmp_path):
    g = golden()
    one = PackedV2a(2, 5, 2, 4, g.codes, g.library[:1].clone(), g.scale, g.offset,
                    torch.zeros((2, 0), dtype=torch.uint8), g.outlier_pos, g.outlier_val)
    path = tmp_path / "one.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: one}))
    loaded = io.load(path).matrices[NAME]
    assert tuple(loaded.ids.shape) == (2, 0) and loaded.layout.nbytes()["ids"] == 0
    assert decode(loaded)[0, 4] == 2.0 * 0.5 - 1.0  # codebook 0, index 2, scale 2, offset -1


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


def test_subnormal_results_are_kept():
    tiny = group_values(f16([1.0]), f16([2.0**-24]), f16([0.0]))
    assert float(tiny) == 2.0**-24


# -- the loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 37, generator=g)
    w[3, 5], w[7, 1], w[20, 30] = 9.0, -8.0, 7.5
    cfg = QuantConfig(mode="v2a", bits=(3,), group_size=(16,), library_size=4,
                      outliers=OutlierConfig(budgets=(0.02,)))
    r = quantize_matrix(w, 0.9, cfg, NAME)
    assert r.layout.n_outliers >= 3 and r.layout.groups == 3  # 16 + 16 + a ragged 5
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


HOSTILE = [
    ("meta too short", _set("meta", lambda m: m[:4].contiguous()), t("meta"), r"int32 \[6\].*mode 3"),
    ("meta group", _meta(4, 0), t("meta"), "group must be >= 1"),
    ("meta library 0", _meta(5, 0), t("meta"), r"library must be in \[1, 256\]"),
    ("meta library 300", _meta(5, 300), t("meta"), r"library must be in \[1, 256\]"),
    ("meta library mismatch", _meta(5, 5), t("library"), r"float16 \[5, 8\]"),
    ("meta group mismatch", _meta(4, 8), t("scale"), r"float16 \[24, 5\]"),
    ("v2 part in a v2a matrix", lambda ts: ts.update({t("codebook"): torch.zeros(24, 8, dtype=torch.float16)}),
     t("codebook"), "not a part of a mode 3"),
    ("missing library", lambda ts: ts.pop(t("library")), t("library"), "is missing"),
    ("missing ids", lambda ts: ts.pop(t("ids")), t("ids"), "is missing"),
    ("library dtype", _set("library", lambda v: v.float()), t("library"), "must be float16"),
    ("library nan", _set("library", lambda v: v.index_fill(1, torch.tensor([2]), float("nan"))), t("library"),
     "finite"),
    ("scale negative", _set("scale", lambda v: v.index_fill(1, torch.tensor([1]), -0.5)), t("scale"), ">= 0"),
    ("scale inf", _set("scale", lambda v: v.index_fill(1, torch.tensor([0]), float("inf"))), t("scale"), "finite"),
    ("scale shape", _set("scale", lambda v: v[:, :2].contiguous()), t("scale"), r"must be float16 \[24, 3\]"),
    ("offset nan", _set("offset", lambda v: v.index_fill(0, torch.tensor([3]), float("nan"))), t("offset"),
     "finite"),
    ("offset dtype", _set("offset", lambda v: v.to(torch.bfloat16)), t("offset"), "must be float16"),
    ("ids dtype", _set("ids", lambda v: v.to(torch.int16)), t("ids"), "must be uint8"),
    ("ids out of range", _set("ids", lambda v: v.index_fill(0, torch.tensor([5]), 4)), t("ids"), "< 4"),
    ("decoded overflow", lambda ts: (ts[t("scale")].fill_(60000.0), ts[t("offset")].fill_(60000.0)), t("scale"),
     "overflows float16"),
    ("codes padding", _set("codes", lambda c: c.index_fill(1, torch.tensor([c.shape[1] - 1]), 0xFF)), t("codes"),
     "padding"),
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
    g = golden()
    one = PackedV2a(2, 5, 2, 4, g.codes, g.library[:1].clone(), g.scale, g.offset, g.ids, g.outlier_pos,
                    g.outlier_val)  # a [2, 2] ids tensor with L = 1
    with pytest.raises(FormatError, match=r"must be uint8 \[2, 0\], got uint8 \[2, 2\]"):
        io.load(write(tmp_path, one))


def test_version_1_files_are_read_but_hold_mode_v2_only(tmp_path, result):
    with pytest.raises(FormatError, match="needs format version 2"):
        io.load(write(tmp_path, result.packed, version=1))
    v2 = quantize_matrix(torch.randn(8, 16), 0.9, QuantConfig(bits=(3,)), NAME)
    loaded = io.load(write(tmp_path, v2.packed, version=1))
    assert torch.equal(decode(loaded.matrices[NAME]), v2.reconstruction)
