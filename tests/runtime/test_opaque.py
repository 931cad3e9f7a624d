"""XFP modules under torch.compile (xfp.runtime.opaque): each call traces as one `xfp::module_forward`
operator whose implementation is the module's eager forward, so compiled outputs equal eager ones exactly.

Dynamo traces with fake tensors (the operator's fake implementation gives shapes and dtypes); the
`aot_eager` backend runs the traced graph without generating code, which keeps these tests fast. The
inductor path over a whole model is tested in tests/integrations/test_transformers_compile.py.
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

from runtime.test_linear import random_packed
from runtime.test_linear_v2a import v2a_packed
from xfp.runtime import XFPLinear, dispatch, opaque
from xfp.runtime.embedding import XFPEmbedding
from xfp.runtime.half import HalfLinear

OPERATOR = torch.ops.xfp.module_forward.default


def recorded(module):
    """(compiled module that must trace as one graph, the list of traced FX graphs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(module, backend=backend, fullgraph=True), graphs


def operator_calls(graph) -> int:
    return sum(node.target in (OPERATOR, torch.ops.xfp.module_forward) for node in graph.graph.nodes)


def modules():
    g = torch.Generator().manual_seed(3)
    return {
        "v2": (XFPLinear.from_packed(random_packed(40, 70, 3, 5), torch.randn(40, generator=g)),
               torch.randn(2, 3, 70, generator=g)),
        "v2a": (XFPLinear.from_packed(v2a_packed()), torch.randn(1, 1, 100, generator=g)),
        "half": (HalfLinear(torch.randn(30, 24, generator=g).half()), torch.randn(5, 24, generator=g)),
        "embedding": (XFPEmbedding.from_packed(v2a_packed()), torch.tensor([[3, 0, 23, 3]])),
    }


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["v2", "v2a", "half", "embedding"])
def test_a_module_traces_as_one_operator_and_computes_what_eager_does(name):
    module, x = modules()[name]
    compiled, graphs = recorded(module)
    with torch.no_grad():
        got, want = compiled(x), module(x)
    assert len(graphs) == 1 and operator_calls(graphs[0]) == 1
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aot_eager_graph_of_a_small_block_matches_eager(dtype):
    g = torch.Generator().manual_seed(4)
    up = XFPLinear.from_packed(v2a_packed(rows=24, cols=100))
    down = XFPLinear.from_packed(random_packed(100, 24, 4, 3), None)
    block = torch.nn.Sequential(up, torch.nn.SiLU(), down).to(dtype)
    x = torch.randn(2, 100, generator=g).to(dtype)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), block(x))


def test_the_kernel_override_still_applies_inside_a_compiled_graph(monkeypatch):
    """Both operators read XFP_KERNEL on every call: nothing is baked in. Traced before the module's first
    eager call, the graph holds `xfp::module_forward`; after it, `xfp::fused_linear` (test_fused_operator.py)."""
    module, x = modules()["v2a"]
    compiled, graphs = recorded(module)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    with torch.no_grad():
        fused, eager_fused = compiled(x), module(x)
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        reference = compiled(x)
    assert 1 <= len(graphs) <= 2  # the first call arms the module: traced again with the C++ shortcut
    exact = dispatch.reference_linear(x, module.packed(), None)
    assert torch.equal(reference, exact)
    assert torch.equal(fused, eager_fused)
    assert not torch.equal(fused, exact)  # the fused kernel computes in another order: the switch did happen


def test_an_input_requiring_a_gradient_is_traced_through_the_differentiable_path():
    module, x = modules()["v2"]
    x = x.clone().requires_grad_(True)
    compiled = torch.compile(module, backend="aot_eager")
    compiled(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    module(x).square().sum().backward()
    assert torch.allclose(got, x.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_a_copy_is_another_module_with_its_own_handle(duplicate):
    module, x = modules()["v2a"]
    twin = duplicate(module)
    assert twin._opaque_handle != module._opaque_handle
    assert opaque.module_of(twin._opaque_handle) is twin
    handle = module._opaque_handle
    del module
    gc.collect()
    with pytest.raises(RuntimeError, match=f"module {handle} no longer exists"):
        OPERATOR(x, handle)
    compiled, graphs = recorded(twin)
    with torch.no_grad():
        assert torch.equal(compiled(x), twin(x))


def test_one_compiled_function_over_two_same_shaped_modules_calls_each_its_own():
    """The operator names its module by handle, a constant of the traced graph: torch.compile's guards must
    retrace for another module of the same shape rather than reuse a graph that would call the first."""
    first = XFPLinear.from_packed(v2a_packed(seed=0))
    second = XFPLinear.from_packed(v2a_packed(seed=5))
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(lambda module, x: module(x) * 2, backend="aot_eager")
    with torch.no_grad():
        assert not torch.equal(first(x), second(x))
        for module in (first, second, first):
            assert torch.equal(compiled(module, x), module(x) * 2)
