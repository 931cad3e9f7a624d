// `fast_linear(x, stored, bias, handle)`: the eager C++ shortcut of an armed XFPLinear, a CPython function
// (METH_FASTCALL) that XFPLinear.forward calls directly.
//
// It runs the armed kernel exactly where `xfp::fused_linear` (ops.cpp) would, by the same checks (armed.h):
// the stored tensors (`stored`: the module's buffer dict, its values in order) are the very tensors at the very
// versions armed, the overrides are unchanged, the input and bias are what the kernel takes. Where anything
// differs it returns None and the caller takes the Python path. What it leaves out is the operator's way in:
// parsing the arguments against the schema, boxing the 13 tensors of a V2a matrix into a list, the
// dispatcher; about 4 us of a ~5 us call (scratch measurement, docs/PERFORMANCE.md). Hence also what it does
// not serve, returning None for the dispatcher to handle: tensor subclasses and active torch function or
// dispatch modes (which must see the call), and compiled graphs (XFPLinear.forward uses the operator there).
//
// cpu.py fetches the function object once through `xfp_fast_linear_function` (ctypes.PyDLL: with the GIL).
// The kernel runs with the GIL released, as torch's operators do.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>

#include "armed.h"

namespace {

// A borrowed tensor if `obj` is a plain dense CPU torch.Tensor or nn.Parameter, else nullptr: no subclass, and
// none of the dispatch keys the dispatcher must see (functorch's batched or grad wrappers, functionalization,
// sparse or quantized layouts, conjugate or negative views...).
const at::Tensor* plain_tensor(PyObject* obj) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.defined() && plain.isSupersetOf(t.key_set()) && t.key_set().has(c10::DispatchKey::CPU) ? &t : nullptr;
}

struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

PyObject* fast_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyDict_Check(args[1]) || !PyLong_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "fast_linear(x: Tensor, stored: dict, bias: Tensor | None, handle: int)");
    return nullptr;
  }
  const int64_t handle = PyLong_AsLongLong(args[3]);
  if (handle == -1 && PyErr_Occurred()) return nullptr;
  try {
    const at::Tensor* x = plain_tensor(args[0]);
    const at::Tensor* bias = args[2] == Py_None ? nullptr : plain_tensor(args[2]);
    if (!x || (args[2] != Py_None && !bias) || c10::impl::dispatch_mode_enabled() ||
        at::impl::torch_function_mode_enabled())
      Py_RETURN_NONE;
    const std::shared_ptr<const xfp::armed::Armed> a = xfp::armed::find(handle);
    if (!a || !xfp::armed::takes(*a, *x, bias) || size_t(PyDict_GET_SIZE(args[1])) != a->stored.size())
      Py_RETURN_NONE;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    for (size_t i = 0; PyDict_Next(args[1], &pos, &key, &value); ++i) {
      const at::Tensor* t = THPVariable_Check(value) ? &THPVariable_Unpack(value) : nullptr;
      if (!t || !xfp::armed::same_stored(*a, i, *t)) Py_RETURN_NONE;
    }
    at::Tensor y;
    {
      ReleasedGil released;
      y = xfp::armed::run(*a, *x, bias);
    }
    return THPVariable_Wrap(std::move(y));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef fast_linear_def = {"fast_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_linear)),
                               METH_FASTCALL,
                               "fast_linear(x, stored, bias, handle) -> Tensor | None: an armed XFPLinear's kernel "
                               "(xfp/runtime/kernels/csrc/python.cpp)"};

}  // namespace

// A new reference to the function object (call with the GIL held).
extern "C" PyObject* xfp_fast_linear_function() { return PyCFunction_New(&fast_linear_def, nullptr); }
