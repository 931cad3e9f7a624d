"""The container: exact round trip, and one crafted bad file per loader check."""

import json

import pytest
import torch
from safetensors.torch import save_file

from xfp.config import OutlierConfig, QuantConfig
from xfp.errors import FormatError
from xfp.format import io
from xfp.format.reference import decode
from xfp.format.spec import FILE_METADATA_KEY, tensor_name
from xfp.quantize.autoselect import quantize_matrix

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def result():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 37, generator=g)
    w[3, 5], w[7, 1], w[20, 30] = 9.0, -8.0, 7.5
    cfg = QuantConfig(mode="v2", bits=(3,), outliers=OutlierConfig(budgets=(0.02,)))  # mode V2 (test_v2a.py: V2a)
    r = quantize_matrix(w, 0.99, cfg, NAME)
    assert r.layout.mode == "v2"
    assert r.layout.n_outliers >= 3
    return r


def write(tmp_path, result, mutate=None, meta_mutate=None):
    content = io.XFPFile(matrices={NAME: result.packed}, dense={"model.norm.weight": torch.ones(37)})
    tensors, metadata = io.flatten(content)
    tensors = {k: v.clone() for k, v in tensors.items()}
    if mutate:
        mutate(tensors)
    if meta_mutate:
        meta_mutate(metadata)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_round_trip_is_exact(tmp_path, result):
    path = tmp_path / "m.safetensors"
    io.save(path, io.XFPFile(matrices={NAME: result.packed}, dense={"model.norm.weight": torch.ones(37)}))
    loaded = io.load(path)
    assert list(loaded.matrices) == [NAME]
    torch.testing.assert_close(decode(loaded.matrices[NAME]), result.reconstruction, rtol=0, atol=0)
    assert torch.equal(loaded.dense["model.norm.weight"], torch.ones(37))
    assert not list(tmp_path.glob("*.tmp"))


def test_stored_sizes_equal_the_layout_table(tmp_path, result):
    loaded = io.load(write(tmp_path, result))
    stored = sum(t.numel() * t.element_size() for t in loaded.matrices[NAME].tensors().values())
    assert stored == result.layout.total_bytes


def t(part):
    return tensor_name(NAME, part)


def _set(part, value):
    def mutate(ts):
        ts[t(part)] = value(ts[t(part)])
    return mutate


def _drop(part):
    def mutate(ts):
        del ts[t(part)]
    return mutate


def _outlier_pos(fn):
    return _set("outlier_pos", lambda p: fn(p.clone()))


def _meta(md, **changes):
    info = json.loads(md[FILE_METADATA_KEY])
    info.update(changes)
    md[FILE_METADATA_KEY] = json.dumps(info)


HOSTILE = [
    ("missing part", _drop("codebook"), None, t("codebook"), "is missing"),
    ("meta dtype", _set("meta", lambda m: m.to(torch.int64)), None, t("meta"), "int32"),
    ("meta float nan", _set("meta", lambda m: torch.full(m.shape, float("nan"))), None, t("meta"), "int32"),
    ("meta mode", _set("meta", lambda m: torch.tensor([9, *m[1:].tolist()], dtype=torch.int32)), None, t("meta"), "mode"),
    ("meta bits", _set("meta", lambda m: torch.tensor([*m[:3].tolist(), 7], dtype=torch.int32)), None, t("meta"), "bits"),
    ("meta rows", _set("meta", lambda m: torch.tensor([2, 0, 37, 3], dtype=torch.int32)), None, t("meta"), "rows"),
    ("codes shape", _set("codes", lambda c: c[:, :-1].contiguous()), None, t("codes"), "must be uint8"),
    ("codes dtype", _set("codes", lambda c: c.to(torch.int16)), None, t("codes"), "must be uint8"),
    ("codebook dtype", _set("codebook", lambda c: c.float()), None, t("codebook"), "float16"),
    ("codebook shape", _set("codebook", lambda c: c[:, :4].contiguous()), None, t("codebook"), "float16"),
    ("codebook nan", _set("codebook", lambda c: c.index_fill(1, torch.tensor([0]), float("nan"))), None,
     t("codebook"), "finite"),
    ("padding bits", _set("codes", lambda c: c.index_fill(1, torch.tensor([c.shape[1] - 1]), 0xFF)), None,
     t("codes"), "padding"),
    ("pos dtype", _set("outlier_pos", lambda p: p.to(torch.int64)), None, t("outlier_pos"), "int32"),
    ("pos 2-D", _set("outlier_pos", lambda p: p.reshape(1, -1)), None, t("outlier_pos"), "1-D"),
    ("pos out of range", _outlier_pos(lambda p: p.fill_(24 * 37)), None, t("outlier_pos"), r"\[0, 888\)"),
    ("pos negative", _outlier_pos(lambda p: p.fill_(-1)), None, t("outlier_pos"), r"\[0, 888\)"),
    ("pos repeated", _outlier_pos(lambda p: p.fill_(5)), None, t("outlier_pos"), "strictly increasing"),
    ("val count", _set("outlier_val", lambda v: v[:-1].contiguous()), None, t("outlier_val"), "float16"),
    ("val inf", _set("outlier_val", lambda v: v.fill_(float("inf"))), None, t("outlier_val"), "finite"),
    ("stray part", lambda ts: ts.update({"model.layers.9.k_proj.xfp_codes": torch.zeros(1, dtype=torch.uint8)}),
     None, "model.layers.9.k_proj.xfp_codes", "not listed"),
    ("dense nan", lambda ts: ts.update({"model.norm.weight": torch.full((37,), float("nan"))}), None,
     "model.norm.weight", "finite"),
    ("no metadata", None, lambda md: md.pop(FILE_METADATA_KEY), None, "missing"),
    ("metadata not json", None, lambda md: md.update({FILE_METADATA_KEY: "{"}), None, "JSON object"),
    ("future version", None, lambda md: _meta(md, format_version=99), None, "version 99"),
    ("version as text", None, lambda md: _meta(md, format_version="1"), None, "version '1'"),
    ("bad matrix list", None, lambda md: _meta(md, matrices="{"), None, "JSON list"),
]


@pytest.mark.parametrize("label, mutate, meta_mutate, tensor, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file_is_refused_with_one_line(tmp_path, result, label, mutate, meta_mutate, tensor, message):
    path = write(tmp_path, result, mutate, meta_mutate)
    with pytest.raises(FormatError, match=message) as info:
        io.load(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text
    if tensor:
        assert f"'{tensor}'" in text


def test_truncated_file(tmp_path, result):
    path = write(tmp_path, result)
    data = path.read_bytes()
    for cut in (4, 20, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="safetensors") as info:
            io.load(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        io.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match="safetensors"):
        io.load(junk)


def test_failed_write_leaves_nothing(tmp_path, result, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(io, "_st_save", boom)
    with pytest.raises(OSError):
        io.save(tmp_path / "x.safetensors", io.XFPFile(matrices={NAME: result.packed}))
    assert list(tmp_path.iterdir()) == []
