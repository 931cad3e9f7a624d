"""`from_pretrained` on XFP folders, hostile folders, and quantize-on-load (stub and real pipeline)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.quantizers import auto as hf_auto

from xfp.config import FORMAT_VERSION, QuantConfig
from xfp.errors import FormatError, XFPError
from xfp.format.reference import decode
from xfp.format.spec import FILE_METADATA_KEY, tensor_name
from xfp.integrations.transformers import XFPConfig, XFPHfQuantizer, cache_key, register
from xfp.runtime import XFPLinear
from helpers import fake_quantized
from helpers import logits as model_logits

IDS = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 120, 77]])


def reference_model(src: Path, matrices) -> LlamaForCausalLM:
    """The source model with each quantized weight replaced by its exact decode, as fp32."""
    return fake_quantized(src, matrices)


def logits(model, ids=IDS) -> torch.Tensor:
    return model_logits(model, ids)


# -- registration and config ----------------------------------------------------------------------


def test_xfp_is_registered_with_transformers():
    assert hf_auto.AUTO_QUANTIZER_MAPPING["xfp"] is XFPHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["xfp"] is XFPConfig
    register()  # idempotent
    assert hf_auto.AUTO_QUANTIZER_MAPPING["xfp"] is XFPHfQuantizer


def test_config_round_trips_through_a_dict():
    cfg = XFPConfig(floor_strict=0.995, bits=[3, 4], matrices={"a.weight": {"bits": 3, "outliers": 2}})
    d = cfg.to_dict()
    assert d["quant_method"] == "xfp" and d["format_version"] == FORMAT_VERSION
    assert d["bits"] == [3, 4] and d["outliers"] == QuantConfig().to_dict()["outliers"]
    again = hf_auto.AutoQuantizationConfig.from_dict(json.loads(json.dumps(d)))
    assert isinstance(again, XFPConfig)
    assert again.quant_config() == cfg.quant_config() == QuantConfig(floor_strict=0.995, bits=(3, 4))
    assert again.matrices == cfg.matrices


@pytest.mark.parametrize("kwargs, error", [
    ({"floor_strict": 2.0}, ValueError),
    ({"bits": [7]}, ValueError),
    ({"no_such_field": 1}, ValueError),
    ({"quant_method": "gptq"}, ValueError),
    ({"format_version": 99}, FormatError),
])
def test_config_refuses_bad_fields(kwargs, error):
    with pytest.raises(error):
        XFPConfig(**kwargs)


# -- loading an XFP folder ------------------------------------------------------------------------


def test_loads_with_no_missing_or_unexpected_keys(tiny_xfp, capfd):
    model, info = AutoModelForCausalLM.from_pretrained(tiny_xfp.path, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert "LOAD REPORT" not in capfd.readouterr().err
    replaced = {n for n, m in model.named_modules() if isinstance(m, XFPLinear)}
    assert {f"{n}.weight" for n in replaced} == set(tiny_xfp.matrices)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.is_quantized and isinstance(model.config.quantization_config, XFPConfig)
    for name, packed in tiny_xfp.matrices.items():  # the buffers hold the file's tensors, bit for bit
        got = model.get_submodule(name.removesuffix(".weight")).packed()
        for part in ("codes", "codebook", "outlier_pos", "outlier_val"):
            assert torch.equal(getattr(got, part), getattr(packed, part)), (name, part)


def test_logits_equal_the_decoded_reference(tiny_llama, tiny_xfp):
    # fp32 activations: XFPLinear runs F.linear(x, decode(packed).float()), exactly what nn.Linear runs
    # with that weight, so the logits are bit-identical (rtol=0, atol=0).
    model = AutoModelForCausalLM.from_pretrained(tiny_xfp.path)
    ref = reference_model(tiny_llama, tiny_xfp.matrices)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_generate_matches_the_reference(tiny_llama, tiny_xfp):
    model = AutoModelForCausalLM.from_pretrained(tiny_xfp.path)
    ref = reference_model(tiny_llama, tiny_xfp.matrices)
    out = model.generate(IDS, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 8)
    assert torch.equal(out, ref.generate(IDS, max_new_tokens=8, do_sample=False))


def test_bf16_load_keeps_the_stored_parts_float16(tiny_llama, tiny_xfp):
    model = AutoModelForCausalLM.from_pretrained(tiny_xfp.path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.xfp_codebook.dtype == torch.float16
    assert torch.equal(q.xfp_codebook, tiny_xfp.matrices["model.layers.0.self_attn.q_proj.weight"].codebook)
    got = logits(model)
    assert got.dtype == torch.bfloat16
    ref = logits(reference_model(tiny_llama, tiny_xfp.matrices))
    # bf16 activations through 2 layers: judged by cosine, not bits
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0) > 0.999


def test_save_pretrained_is_refused(tiny_xfp, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_xfp.path)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "again")


# -- hostile folders ------------------------------------------------------------------------------


def _with_outliers(matrices) -> str:
    return next(n for n, p in matrices.items() if p.outlier_pos.numel() >= 2)


def copy_and_corrupt(folder: Path, dst: Path, tensors=None, metadata=None, config=None) -> Path:
    shutil.copytree(folder, dst)
    path = dst / "model.safetensors"
    if tensors or metadata:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        data = {k: v.clone() for k, v in load_file(str(path)).items()}
        if tensors:
            tensors(data)
        if metadata:
            metadata(meta)
        save_file(data, str(path), metadata=meta)
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


Q = "model.layers.0.self_attn.q_proj.weight"


def _swap_first_outliers(matrices):
    name = _with_outliers(matrices)

    def mutate(t):
        pos = t[tensor_name(name, "outlier_pos")]
        pos[0], pos[1] = pos[1].clone(), pos[0].clone()
    return mutate


def _bump_bits(c):
    entry = c["quantization_config"]["matrices"][Q]
    entry["bits"] = 8 if entry["bits"] != 8 else 6


def _replace_part(tensors, part, change):
    key = tensor_name(Q, part)
    tensors[key] = change(tensors[key])


def _edit_metadata(meta, change):
    info = json.loads(meta[FILE_METADATA_KEY])
    change(info)
    meta[FILE_METADATA_KEY] = json.dumps(info)


def _drop_listed(meta):
    _edit_metadata(meta, lambda info: info.__setitem__("matrices", [n for n in info["matrices"] if n != Q]))


CORRUPTIONS = {
    # content, caught by validate_matrix after loading
    "codebook NaN": (dict(tensors=lambda t: t[tensor_name(Q, "codebook")].__setitem__((0, 0), float("nan"))),
                     "xfp_codebook", "finite"),
    "outliers out of order": (None, "xfp_outlier_pos", "strictly increasing"),
    "meta mode": (dict(tensors=lambda t: t[tensor_name(Q, "meta")].__setitem__(0, 3)), "xfp_meta", "mode"),
    "kept tensor NaN": (dict(tensors=lambda t: t["model.norm.weight"].__setitem__(0, float("inf"))),
                        "model.norm.weight", "finite"),
    # headers, caught before any weight is read
    "codes shape": (dict(tensors=lambda t: _replace_part(t, "codes", lambda v: v[:, :-1].clone())),
                    "xfp_codes", "must be uint8"),
    "codebook dtype": (dict(tensors=lambda t: _replace_part(t, "codebook", lambda v: v.float())),
                       "xfp_codebook", "got float32"),
    "missing part": (dict(tensors=lambda t: t.pop(tensor_name(Q, "outlier_val"))), "xfp_outlier_val", "missing"),
    "stray part": (dict(tensors=lambda t: t.__setitem__("model.norm.xfp_codes", torch.zeros(2, dtype=torch.uint8))),
                   "model.norm.xfp_codes", "does not list"),
    "file version": (dict(metadata=lambda m: _edit_metadata(m, lambda i: i.__setitem__("format_version", 99))),
                     "model.safetensors",
                     "format version"),
    "file list": (dict(metadata=_drop_listed), "xfp_", "does not list"),
    "config bits": (dict(config=_bump_bits), "q_proj.xfp_", "quantization_config.matrices"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_folder_raises_one_line_format_error(case, tiny_xfp, tmp_path):
    how, tensor, words = CORRUPTIONS[case]
    how = how or dict(tensors=_swap_first_outliers(tiny_xfp.matrices))
    folder = copy_and_corrupt(tiny_xfp.path, tmp_path / "bad", **how)
    with pytest.raises(FormatError) as exc:
        AutoModelForCausalLM.from_pretrained(folder)
    message = str(exc.value)
    assert "\n" not in message
    assert str(folder) in message and tensor in message and words in message, message


def test_quantized_norm_is_refused_by_name(tiny_xfp, tmp_path):
    def add(c):
        c["quantization_config"]["matrices"]["model.norm.weight"] = {"bits": 4, "outliers": 0}
    folder = copy_and_corrupt(tiny_xfp.path, tmp_path / "norm", config=add)
    with pytest.raises(XFPError, match="model.norm.*LlamaRMSNorm.*nn.Linear and torch.nn.Embedding layers only"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_quantized_embedding_without_its_tensors_is_a_format_error(tiny_xfp, tmp_path):
    # embeddings and tied lm_heads load (tests/integrations/test_transformers_embeddings.py); a config entry
    # with no stored tensors is a broken folder
    def add(c):
        c["quantization_config"]["matrices"]["model.embed_tokens.weight"] = {"bits": 4, "outliers": 0}
    folder = copy_and_corrupt(tiny_xfp.path, tmp_path / "emb", config=add)
    with pytest.raises(FormatError, match="model.embed_tokens.xfp_.*missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(folder)


# -- quantize-on-load -----------------------------------------------------------------------------


@pytest.fixture
def stub_pipeline(monkeypatch, tmp_path, tiny_builders):
    """xfp.pipeline / xfp.sources stand-ins: the hand-written folder builder and a fixed fingerprint."""
    _, write_xfp_folder = tiny_builders
    calls = []

    def quantize_model(src, out, config, *, resume=False, force=False, workers=1, quantize_embeddings=False,
                       progress=True):
        calls.append((Path(src), Path(out), config, resume))
        write_xfp_folder(Path(src), Path(out), config)
        return {}

    class Source:
        def __init__(self, path):
            self.path = path

        def fingerprint(self):
            return f"stub:{Path(self.path).name}"

    pipeline = types.ModuleType("xfp.pipeline")
    pipeline.quantize_model = quantize_model
    sources = types.ModuleType("xfp.sources")
    sources.open_source = Source
    sources.cache_dir = lambda: tmp_path / "cache"
    monkeypatch.setitem(sys.modules, "xfp.pipeline", pipeline)
    monkeypatch.setitem(sys.modules, "xfp.sources", sources)
    return calls


def test_quantize_on_load_fills_a_cache_and_reuses_it(tiny_llama, tmp_path, stub_pipeline):
    config = QuantConfig(bits=(3, 4))
    asked = XFPConfig(bits=[3, 4])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=asked)
    assert len(stub_pipeline) == 1 and asked.matrices == {}  # the caller's config is not modified
    src, out, used, resume = stub_pipeline[0]
    assert src == tiny_llama and used == config and not resume
    key = cache_key(f"stub:{tiny_llama.name}", config, False)
    final = tmp_path / "cache" / "quantized" / key
    assert out == final.with_name(f"{key}.partial") and (final / "config.json").is_file() and not out.exists()
    assert model.hf_quantizer.quantized_on_load and model.hf_quantizer.pre_quantized
    assert len(model.config.quantization_config.matrices) == 14
    assert isinstance(model.model.layers[1].mlp.down_proj, XFPLinear)

    direct = AutoModelForCausalLM.from_pretrained(final)
    torch.testing.assert_close(logits(model), logits(direct), rtol=0, atol=0)

    again = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=XFPConfig(bits=[3, 4]))
    assert len(stub_pipeline) == 1  # nothing fitted the second time
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)

    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=XFPConfig(bits=[4]))
    assert len(stub_pipeline) == 2  # another config, another cache entry


def test_quantize_on_load_resumes_an_interrupted_run(tiny_llama, tmp_path, stub_pipeline):
    key = cache_key(f"stub:{tiny_llama.name}", QuantConfig(), False)
    partial = tmp_path / "cache" / "quantized" / f"{key}.partial"
    partial.mkdir(parents=True)
    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=XFPConfig())
    assert stub_pipeline[0][3] is True  # resume=True


def test_quantize_on_load_with_the_real_pipeline(tiny_llama, tmp_path, monkeypatch):
    pipeline = pytest.importorskip("xfp.pipeline", reason="pipeline not yet available")
    if not hasattr(pipeline, "quantize_model"):
        pytest.skip("pipeline not yet available")
    monkeypatch.setenv("XFP_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=XFPConfig(floor_strict=0.99))
    assert isinstance(model.model.layers[0].self_attn.q_proj, XFPLinear)
    src = LlamaForCausalLM.from_pretrained(tiny_llama)
    cos = torch.nn.functional.cosine_similarity(logits(model).flatten(), logits(src).flatten(), dim=0)
    assert cos > 0.99
    assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, IDS.shape[1] + 4)

    def refuse(*args, **kwargs):
        raise AssertionError("a second load must not quantize again")
    monkeypatch.setattr(pipeline, "quantize_model", refuse)
    again = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=XFPConfig(floor_strict=0.99))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_import_xfp_registers_the_quantizer():
    import subprocess

    code = ("import xfp, transformers.quantizers.auto as a; "
            "assert a.AUTO_QUANTIZER_MAPPING['xfp'].__name__ == 'XFPHfQuantizer'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
