"""The pipeline: folder layout, report, resume with identical bytes, refusals, failing writes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from xfp.config import QuantConfig
from xfp.errors import XFPError
from xfp.format import io
from xfp.format.folder import iter_shards, read_config
from xfp.format.reference import decode, kept_values
from xfp.pipeline import quantize_model
from xfp.pipeline.run import WORKDIR, out_is_complete
from xfp.quantize.library import code_kept
from xfp.sources.base import open_source

from helpers import make_tiny_llama


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_output_folder_is_complete_and_honest(tiny_llama, tmp_path):
    out = tmp_path / "out"
    report = quantize_model(tiny_llama, out, QuantConfig(), progress=False)
    assert out_is_complete(out)
    for f in ("config.json", "model.safetensors", "report.json", "REPORT.md", "bits_per_layer.png",
              "cosine_by_class.png", "size_breakdown.png", "generation_config.json"):
        assert (out / f).is_file(), f
    config = read_config(out)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "xfp" and qc["floor_strict"] == 0.99
    source = open_source(tiny_llama)
    names = source.tensor_names()
    assert [s["name"] for s in report["tensors"]] == names  # a decision for every tensor
    kinds_of = {s["name"]: s["class"] for s in report["tensors"]}
    stored_bytes = 0
    for _, content in iter_shards(out):
        for name, packed in content.matrices.items():
            assert qc["matrices"][name] == {"class": kinds_of[name], **packed.layout.entry()}
            stored_bytes += packed.layout.total_bytes
            w = source.load(name)
            cos = torch.nn.functional.cosine_similarity(w, decode(packed).float(), dim=1)
            assert torch.quantile(cos.double(), 0.01, interpolation="lower") >= 0.99 - 1e-6
        for name, t in content.dense.items():
            assert torch.equal(t.float(), source.load(name))
    assert stored_bytes == report["totals"]["quantized_bytes"]
    kinds = {s["name"]: s["class"] for s in report["tensors"]}
    assert kinds["model.embed_tokens.weight"] == "keep" and kinds["model.layers.0.mlp.up_proj.weight"] == "strict"


def test_resume_after_stop_gives_identical_bytes(tiny_llama, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    quantize_model(tiny_llama, full, QuantConfig(), progress=False)
    with pytest.raises(XFPError, match="--resume"):
        quantize_model(tiny_llama, part, QuantConfig(), progress=False, stop_after=7)
    assert not out_is_complete(part) and not (part / "config.json").exists()
    with pytest.raises(XFPError, match="not empty"):
        quantize_model(tiny_llama, part, QuantConfig(), progress=False)
    with pytest.raises(XFPError, match="different config"):
        quantize_model(tiny_llama, part, QuantConfig(floor_strict=0.98), progress=False, resume=True)
    quantize_model(tiny_llama, part, QuantConfig(), progress=False, resume=True)
    assert digest(part) == digest(full) and digest(full)


def test_killed_process_resumes_to_identical_bytes(tmp_path):
    src = make_tiny_llama(tmp_path / "src", layers=6, hidden=384, intermediate=1024, seed=1)
    full, part = tmp_path / "full", tmp_path / "part"
    def cmd(out, *flags):
        return [sys.executable, "-m", "xfp.cli", "quantize", str(src), str(out), "--no-progress", *flags]

    proc = subprocess.Popen(cmd(part), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((part / WORKDIR).glob("*.json"))) < 4:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out_is_complete(part)
    subprocess.run(cmd(part, "--resume"), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cmd(full), check=True, stdout=subprocess.DEVNULL)
    assert digest(part) == digest(full)


def test_sharding_and_index(tiny_llama, tmp_path):
    out = tmp_path / "out"
    quantize_model(tiny_llama, out, QuantConfig(), progress=False, shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    for shard in shards:
        content = io.load(out / shard)
        keys = set(io.flatten(content)[0])
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}


def test_refusals(tiny_llama, tmp_path):
    with pytest.raises(XFPError, match="inside the source"):
        quantize_model(tiny_llama, tiny_llama / "out", QuantConfig(), progress=False)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(XFPError, match="not empty"):
        quantize_model(tiny_llama, other, QuantConfig(), progress=False)
    with pytest.raises(XFPError, match="refusing to delete"):
        quantize_model(tiny_llama, other, QuantConfig(), progress=False, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_failing_writer_leaves_nothing_complete_then_resumes(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = io._st_save

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "_st_save", flaky)
    with pytest.raises(OSError, match="No space left"):
        quantize_model(tiny_llama, out, QuantConfig(), progress=False)
    assert not (out / "config.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(io, "_st_save", real)
    quantize_model(tiny_llama, out, QuantConfig(), progress=False, resume=True)
    assert out_is_complete(out)


def test_source_is_never_modified(tiny_llama, tmp_path):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_llama.iterdir()}
    quantize_model(tiny_llama, tmp_path / "o", QuantConfig(), progress=False)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_llama.iterdir()}
    assert before == after


def test_hot_columns_are_kept_whole(tmp_path):
    """A residual dimension written massively by every o_proj and down_proj is kept apart (int8, a scale per
    column) by every matrix reading the residual stream; each writer keeps its own extreme input column."""
    src = make_tiny_llama(tmp_path / "src", seed=2)
    weights = load_file(str(src / "model.safetensors"))
    for i in range(2):
        weights[f"model.layers.{i}.self_attn.o_proj.weight"][7, 3] = 1.0  # 50x the init std
        weights[f"model.layers.{i}.mlp.down_proj.weight"][7, 50] = -1.0
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    quantize_model(src, out, QuantConfig(), progress=False)
    matrices = read_config(out)["quantization_config"]["matrices"]
    kept = {}
    for _, content in iter_shards(out):
        for name, packed in content.matrices.items():
            kept[name] = packed.kept_cols.tolist()
            assert matrices[name]["kept"] == len(kept[name])
            assert torch.equal(decode(packed)[:, packed.kept_cols.long()],
                               kept_values(*code_kept(weights[name][:, kept[name]])))
    expected = {"o_proj": [3], "down_proj": [50], "q_proj": [7], "k_proj": [7], "v_proj": [7], "gate_proj": [7],
                "up_proj": [7]}
    assert len(kept) == 14
    for name, cols in kept.items():
        assert cols == expected[name.split(".")[-2]], name
