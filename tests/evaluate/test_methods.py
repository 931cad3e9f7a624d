"""The method registry and fake quantization of a tiny model."""

from __future__ import annotations

import pytest
import torch

from xfp.classify import TensorClass
from xfp.errors import XFPError
from xfp.evaluate import methods
from xfp.evaluate.baselines import rtn_bytes
from xfp.format.reference import decode
from xfp.sources.base import open_source


@pytest.fixture(scope="module")
def ctx(tiny_llama):
    source = open_source(tiny_llama)
    return methods.MethodContext(source=source, config=source.config())


def test_registry_has_the_baselines_and_an_xfp_sweep():
    for name in ("rtn3-g64", "rtn3-g128", "rtn4-g64", "rtn4-g128", "nf3-g64", "nf4-g64", "hqq3-g64", "hqq4-g64",
                 "xfp-0.99"):
        assert name in methods.REGISTRY and name in methods.DEFAULT_METHODS
    assert sum(methods.REGISTRY[n].family == "xfp" for n in methods.DEFAULT_METHODS) >= 4


def test_names_resolve_and_errors_are_one_line():
    spec = methods.get("xfp-0.985")
    assert spec.family == "xfp" and spec.fn.keywords == {"floor": 0.985}
    assert [s.name for s in methods.parse_methods("rtn3-g64, xfp-0.99")] == ["rtn3-g64", "xfp-0.99"]
    assert [s.name for s in methods.parse_methods(None)] == methods.DEFAULT_METHODS
    library = methods.get("xfp-0.97-L32")
    assert library.family == "xfp-library" and library.fn.keywords == {"floor": 0.97, "library_size": 32}
    for bad in ("rtn5-g64", "xfp-high", "", "rtn3-g64,rtn3-g64", "xfp-0.97-L0", "xfp-0.97-L257", "xfp-0.97-L"):
        with pytest.raises(XFPError):
            methods.parse_methods(bad)
    with pytest.raises(ValueError):
        methods.register("rtn3-g64", methods.REGISTRY["rtn3-g64"].fn, family="rtn", about="again")
    with pytest.raises(ValueError):
        methods.register("a,b", lambda n, w, c: (w, 1), family="x", about="comma")


def test_fake_quantize_covers_strict_tensors_and_counts_bytes(ctx):
    names = methods.quantized_names(ctx.source, ctx.config)
    assert len(names) == 2 * 7 and all(ctx.tensor_class(n) is TensorClass.STRICT for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    fq = methods.fake_quantize(methods.get("rtn4-g64"), ctx, names, progress=False)
    assert set(fq.w_hat) == set(names)
    expected = sum(rtn_bytes(*ctx.source.tensor_shape(n), 4, 64) for n in names)
    assert fq.stored_bytes == expected and fq.weights == sum(ctx.source.load(n).numel() for n in names)
    assert fq.honest_bits == pytest.approx(4.5)  # 64- and 128-wide rows: 4 + 32/64


def test_xfp_method_is_the_decoded_matrix(ctx):
    from xfp.config import QuantConfig
    from xfp.quantize.autoselect import quantize_matrix

    name = "model.layers.0.mlp.up_proj.weight"
    w = ctx.source.load(name)
    w_hat, stored = methods.get("xfp-0.99").fn(name, w, ctx)
    result = quantize_matrix(w, 0.99, QuantConfig(floor_strict=0.99, floor_lazy=0.99), name)
    assert torch.equal(w_hat, decode(result.packed)) and stored == result.layout.total_bytes
    fq = methods.fake_quantize(methods.get("xfp-0.99"), ctx, [name], progress=False)
    assert fq.w_hat[name].dtype == torch.float16  # kept compact: float16 is exact for XFP


def test_a_new_method_is_one_function_and_one_line(ctx):
    def halve(name, w, c):
        assert c.input_scale(name) is not None or "o_proj" in name or "down_proj" in name
        return w / 2, w.numel()

    methods.register("test-halve", halve, family="test", about="halves", default=False)
    try:
        assert "test-halve" not in methods.DEFAULT_METHODS
        names = methods.quantized_names(ctx.source, ctx.config)
        fq = methods.fake_quantize(methods.get("test-halve"), ctx, names, progress=False)
        assert fq.honest_bits == 8.0
        assert torch.equal(fq.w_hat[names[0]].float(), ctx.source.load(names[0]) / 2)
    finally:
        del methods.REGISTRY["test-halve"]


def test_bad_method_output_is_refused(ctx):
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = {
        "shape": lambda n, w, c: (w[:, :3], 10),
        "nan": lambda n, w, c: (w * float("nan"), 10),
        "bytes": lambda n, w, c: (w, 0),
        "tuple": lambda n, w, c: w,
    }
    for label, fn in bad.items():
        spec = methods.MethodSpec(f"bad-{label}", fn, "test", "")
        with pytest.raises(XFPError, match=f"bad-{label}.*{name}"):
            methods.fake_quantize(spec, ctx, [name], progress=False)


def test_input_scale_is_the_norm_before_the_projection(ctx):
    q = ctx.input_scale("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(q, ctx.source.load("model.layers.1.input_layernorm.weight"))
    up = ctx.input_scale("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(up, ctx.source.load("model.layers.0.post_attention_layernorm.weight"))
    assert ctx.input_scale("model.layers.0.mlp.down_proj.weight") is None
    assert ctx.input_scale("model.layers.0.self_attn.o_proj.weight") is None
