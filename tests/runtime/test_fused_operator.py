"""The C++ shortcuts of an armed XFPLinear: `cpu.fast_linear` (csrc/python.cpp, eager calls) and the operator
`xfp::fused_linear` (csrc/ops.cpp, compiled graphs and whatever fast_linear declines). Both must compute exactly
what the Python path computes and decline whenever anything they were armed with changed."""

from __future__ import annotations

import gc

import pytest
import torch

from runtime.test_linear import random_packed
from runtime.test_linear_v2a import v2a_packed
from xfp.format.reference import PackedV2a
from xfp.runtime import XFPLinear, dispatch
from xfp.runtime.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="the CPU kernels do not build here")


def armed(module: XFPLinear) -> bool:
    return bool(torch.ops.xfp.armed(module._opaque_handle))


def make(mode: str, bias: bool = True, seed: int = 0) -> XFPLinear:
    g = torch.Generator().manual_seed(seed + 10)
    packed = v2a_packed(seed=seed) if mode == "v2a" else random_packed(24, 100, 3, 7, seed=seed)
    return XFPLinear.from_packed(packed, torch.randn(24, generator=g) if bias else None)


def python_path(module: XFPLinear, x: torch.Tensor) -> torch.Tensor:
    """What the module computes without the C++ shortcut: a fresh module over the same stored tensors."""
    fresh = XFPLinear.from_packed(module.packed(), module.bias)
    return fresh.run(x)


@pytest.fixture(autouse=True)
def fused_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")


@pytest.fixture(params=["fast_linear", "operator"])
def entry(request, monkeypatch):
    """Which shortcut serves eager calls: fast_linear, or (fast_linear declining everything) the operator."""
    cpu.library()
    if request.param == "operator":
        monkeypatch.setattr(cpu, "fast_linear", lambda *args: None)
    return request.param


@pytest.mark.parametrize("mode", ["v2", "v2a"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 100), (1, 1, 100), (3, 100), (2, 4, 100)])
def test_armed_calls_equal_the_python_path_bit_for_bit(mode, bias, shape, entry):
    module = make(mode, bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = module(x)  # the Python path, which arms
        assert armed(module) and module._armed
        again = module(x)  # through xfp::fused_linear
    assert torch.equal(first, again) and torch.equal(again, python_path(module, x))
    assert again.shape == (*shape[:-1], 24)


def edits():
    def in_place(module):
        with torch.no_grad():
            module.xfp_outlier_val.mul_(2)

    def replaced(module):
        module.xfp_codes = module.xfp_codes.flip(0).contiguous()

    def reloaded(module):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        state["xfp_outlier_val"] = state["xfp_outlier_val"] + 1
        module.load_state_dict(state)

    return {"in_place": in_place, "replaced": replaced, "reloaded": reloaded}


@pytest.mark.parametrize("mode", ["v2", "v2a"])
@pytest.mark.parametrize("edit", list(edits()))
def test_a_changed_matrix_is_never_served_from_the_stale_state(mode, edit, entry):
    module = make(mode)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = module(x)
        module(x)
        edits()[edit](module)
        after = module(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, python_path(module, x))
    assert armed(module)  # armed again for the new tensors
    with torch.no_grad():
        assert torch.equal(module(x), after)


def test_overrides_changed_after_arming_apply(monkeypatch, entry):
    module = make("v2a")
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        module(x)
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        got = module(x)
    assert torch.equal(got, dispatch.reference_linear(x, module.packed(), module.bias))


@pytest.mark.parametrize("case", ["more_rows", "bfloat16", "strided", "gradient"])
def test_inputs_the_kernel_does_not_take_go_the_python_way(case):
    module = make("v2")
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        module(x)
    x = {"more_rows": torch.randn(cpu.FUSED_MAX_M + 1, 100), "bfloat16": x.bfloat16(),
         "strided": torch.randn(100, 2)[:, 0].unsqueeze(0), "gradient": x.clone().requires_grad_(True)}[case]
    if case == "gradient":
        module(x).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        return
    with torch.no_grad():
        got = module(x)
    assert torch.equal(got, python_path(module, x))


def test_a_bias_replaced_or_cast_is_read_as_it_is_now(entry):
    module = make("v2a")
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        module(x)
        module.bias.add_(1)
        assert torch.equal(module(x), python_path(module, x))
        module.bias = torch.nn.Parameter(torch.zeros(24), requires_grad=False)
        assert torch.equal(module(x), python_path(module, x))


def test_deleting_or_moving_the_module_releases_what_was_armed():
    module = make("v2a")
    x = torch.randn(1, 100)
    with torch.no_grad():
        module(x)
    handle = module._opaque_handle
    assert torch.ops.xfp.armed(handle)
    module.float()  # any _apply: the shortcut would hold the tensors it replaces
    assert not torch.ops.xfp.armed(handle) and not module._armed
    with torch.no_grad():
        module(x)
    assert torch.ops.xfp.armed(handle)
    del module
    gc.collect()
    assert not torch.ops.xfp.armed(handle)


def test_a_tied_module_is_armed_over_its_source_tensors(entry):
    packed = v2a_packed()
    assert isinstance(packed, PackedV2a)
    owner = XFPLinear.from_packed(packed)
    tied = XFPLinear.tied(owner)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        tied(x)
        assert armed(tied)
        assert torch.equal(tied(x), owner(x))
        owner.xfp_offset_table.mul_(0.5)
        assert torch.equal(tied(x), python_path(owner, x))


def test_a_compiled_graph_calls_the_fused_operator_once_armed():
    module = make("v2a")
    x = torch.randn(1, 1, 100, generator=torch.Generator().manual_seed(7))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            module(x)
            compiled = torch.compile(module, backend=backend, fullgraph=True)
            got = compiled(x)
        targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert any("fused_linear" in str(t) for t in targets), targets
        assert torch.equal(got, python_path(module, x))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("edit", list(edits()))
def test_without_their_guards_changed_stored_tensors_are_still_caught(edit):
    """`compile_decode_steps` drops torch.compile's guards on stored tensors (`without_stored_tensor_guards`):
    the compiled graph then passes whatever the module holds now, and the operator's own checks decide."""
    from xfp.runtime.opaque import without_stored_tensor_guards

    module = make("v2a")
    x = torch.randn(1, 1, 100, generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            module(x)
            compiled = torch.compile(module, backend="aot_eager",
                                     options={"guard_filter_fn": without_stored_tensor_guards})
            before = compiled(x)
            edits()[edit](module)
            after = compiled(x)
        assert not torch.equal(after, before)
        assert torch.equal(after, python_path(module, x))
    finally:
        torch._dynamo.reset()


def test_a_module_that_has_run_pickles_and_copies_without_its_kernel_state():
    import copy
    import io
    import pickle

    module = make("v2a")
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = module(x)
        module(x)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert not twin._armed and twin._fast is None and twin._opaque_handle != module._opaque_handle
        with torch.no_grad():
            assert torch.equal(twin(x), want) and torch.equal(twin(x), want)
        assert armed(twin)


class _Subclass(torch.Tensor):
    pass


def test_fast_linear_serves_exactly_the_armed_matrix_and_declines_anything_else():
    module = make("v2a")
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = module(x)

        def call(x=x, stored=None, bias=module.bias, handle=module._opaque_handle):
            return cpu.fast_linear(x, module.stored if stored is None else stored, bias, handle)

        got = call()
        batched = []  # what fast_linear gives for a functorch-batched x (returned by vmap only as a tensor)
        torch.func.vmap(lambda row: batched.append(call(x=row)) or row)(x.unsqueeze(0))
        assert got is not None and torch.equal(got, want) and got.shape == (1, 24)
        declined = {
            "another handle": call(handle=module._opaque_handle + 10**6),
            "bfloat16 x": call(x=x.bfloat16()),
            "strided x": call(x=torch.randn(100, 2)[:, 0].unsqueeze(0)),
            "more rows than the kernel takes": call(x=torch.randn(cpu.FUSED_MAX_M + 1, 100)),
            "a tensor subclass": call(x=x.as_subclass(_Subclass)),
            "a bfloat16 bias": call(bias=module.bias.bfloat16()),
            "a bias of another size": call(bias=torch.zeros(23)),
            "a stored tensor missing": call(stored={k: v for k, v in module.stored.items() if k != "xfp_codes"}),
            "a stored tensor copied": call(stored={k: v.clone() for k, v in module.stored.items()}),
            "a stored value not a tensor": call(stored=dict(module.stored, xfp_codes=None)),
            "batched by vmap": batched[0],
        }
        module.xfp_outlier_val.mul_(2)  # in place: a new version
        declined["an edited stored tensor"] = call()
    assert {case: out for case, out in declined.items() if out is not None} == {}


def test_fast_linear_leaves_calls_under_torch_function_and_dispatch_modes_to_the_dispatcher():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class Quiet(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    module = make("v2a")
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = module(x)
        with Quiet():
            assert cpu.fast_linear(x, module.stored, module.bias, module._opaque_handle) is None
            assert torch.equal(module(x), want)
        with Seen() as seen:
            assert cpu.fast_linear(x, module.stored, module.bias, module._opaque_handle) is None
            assert torch.equal(module(x), want)
    assert any("fused_linear" in op for op in seen.ops), seen.ops


@pytest.mark.parametrize("args", [(), (torch.zeros(1, 100), [], None, 1), (torch.zeros(1, 100), {}, None, "1")])
def test_fast_linear_rejects_malformed_calls(args):
    cpu.library()
    with pytest.raises(TypeError, match="fast_linear"):
        cpu.fast_linear(*args)
