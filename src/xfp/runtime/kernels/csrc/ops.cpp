// The fused GEMV as a torch operator, `xfp::fused_linear`, so that a decode step's XFPLinear calls reach the
// kernel without Python (eagerly from XFPLinear.forward, and from the code torch.compile generates).
//
// `fused_linear`'s schema is defined in xfp/runtime/opaque.py (with its fake implementation for tracing); this
// file registers its CPU kernel, and defines the bookkeeping operators `arm`, `disarm` and `armed`.
//
// cpu.py *arms* a module's handle once it has prepared the kernel state for its matrix: `xfp::arm` copies
// the C view of the matrix (V2Matrix / V2aMatrix, whose pointers lead into the state's tensors) and keeps
// references to those tensors, to the module's stored tensors as they were then, their in-place versions,
// and the kernel and instruction-set overrides (`XFP_KERNEL`, `XFP_CPU_ISA`) as they were then.
// `xfp::fused_linear(x, stored, bias, handle)` runs the kernel only if all of that still holds (the same
// stored tensor objects at the same versions, the same overrides) and the input is what the kernel takes
// (float32, contiguous, on the CPU, at most max_m rows, no gradient wanted, a float32 bias of the right
// size); in every other case it calls `xfp::module_forward(x, handle)`, the module's own Python forward,
// which picks the kernel as always and arms again where it may. So the operator computes exactly what the
// Python path computes, bit for bit: the same kernel, the same state, the same bias addition. The eager calls
// take the CPython entry of python.cpp instead, which makes the same checks (armed.h) without the dispatcher.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "armed.h"

extern "C" {
int xfp_v2_gemv(int isa, const xfp::V2Matrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy);
int xfp_v2a_gemv(int isa, const xfp::V2aMatrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy);
}

namespace xfp::armed {
namespace {

const char* const kOverrideNames[kOverrides] = {"XFP_KERNEL", "XFP_CPU_ISA"};

std::mutex table_lock;
std::unordered_map<int64_t, std::shared_ptr<const Armed>> table;

std::optional<std::string> getenv_now(const char* name) {
  const char* value = std::getenv(name);
  return value ? std::optional<std::string>(value) : std::nullopt;
}

void put(int64_t handle, std::shared_ptr<const Armed> a) {
  std::lock_guard<std::mutex> guard(table_lock);
  table[handle] = std::move(a);
}

void drop(int64_t handle) {
  std::shared_ptr<const Armed> gone;  // released after the lock
  std::lock_guard<std::mutex> guard(table_lock);
  auto it = table.find(handle);
  if (it != table.end()) {
    gone = std::move(it->second);
    table.erase(it);
  }
}

}  // namespace

std::shared_ptr<const Armed> find(int64_t handle) {
  std::lock_guard<std::mutex> guard(table_lock);
  auto it = table.find(handle);
  return it == table.end() ? nullptr : it->second;
}

bool takes(const Armed& a, const at::Tensor& x, const at::Tensor* bias) {
  if (x.scalar_type() != at::kFloat || !x.device().is_cpu() || x.dim() < 1 || x.size(-1) != a.cols ||
      !x.is_contiguous() || x.numel() / a.cols > a.max_m || (x.requires_grad() && at::GradMode::is_enabled()))
    return false;
  if (bias && bias->defined() &&
      (bias->scalar_type() != at::kFloat || !bias->device().is_cpu() || bias->dim() != 1 || bias->size(0) != a.rows ||
       (bias->requires_grad() && at::GradMode::is_enabled())))
    return false;
  for (int i = 0; i < kOverrides; ++i)
    if (getenv_now(kOverrideNames[i]) != a.overrides[i]) return false;
  return true;
}

at::Tensor run(const Armed& a, const at::Tensor& x, const at::Tensor* bias) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = a.rows;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t m = x.numel() / a.cols;
  const int rc = a.mode == 1
                     ? xfp_v2a_gemv(int(a.isa), &a.v2a, x.data_ptr<float>(), m, a.cols, y.data_ptr<float>(), a.rows)
                     : xfp_v2_gemv(int(a.isa), &a.v2, x.data_ptr<float>(), m, a.cols, y.data_ptr<float>(), a.rows);
  TORCH_CHECK(rc == 0, "xfp: the armed gemv refused its arguments (", a.rows, "x", a.cols, ")");
  if (bias && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace xfp::armed

namespace {

using xfp::armed::Armed;
using xfp::armed::find;

at::Tensor module_forward(const at::Tensor& x, int64_t handle) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xfp::module_forward", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(x, handle);
}

at::Tensor fused_linear(const at::Tensor& x, at::TensorList stored, const std::optional<at::Tensor>& bias,
                        int64_t handle) {
  const std::shared_ptr<const Armed> a = find(handle);
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  if (!a || !xfp::armed::takes(*a, x, b) || stored.size() != a->stored.size()) return module_forward(x, handle);
  for (size_t i = 0; i < stored.size(); ++i)
    if (!xfp::armed::same_stored(*a, i, stored[i])) return module_forward(x, handle);
  return xfp::armed::run(*a, x, b);
}

void arm(int64_t handle, int64_t mode, int64_t isa, int64_t address, int64_t rows, int64_t cols, int64_t max_m,
         at::TensorList keep, at::TensorList stored) {
  TORCH_CHECK(mode == 0 || mode == 1, "xfp::arm: mode must be 0 (V2) or 1 (V2a)");
  TORCH_CHECK(address != 0 && rows >= 1 && cols >= 1 && max_m >= 1, "xfp::arm: bad matrix");
  auto a = std::make_shared<Armed>();
  a->mode = mode;
  a->isa = isa;
  a->rows = rows;
  a->cols = cols;
  a->max_m = max_m;
  if (mode == 1)
    std::memcpy(&a->v2a, reinterpret_cast<const void*>(address), sizeof(xfp::V2aMatrix));
  else
    std::memcpy(&a->v2, reinterpret_cast<const void*>(address), sizeof(xfp::V2Matrix));
  a->keep.assign(keep.begin(), keep.end());
  for (const at::Tensor& t : stored) {
    TORCH_CHECK(t.defined() && !t.is_inference(), "xfp::arm: stored tensors must be defined, not inference tensors");
    a->stored.push_back(t);
    a->versions.push_back(t._version());
  }
  for (int i = 0; i < xfp::armed::kOverrides; ++i)
    a->overrides[i] = xfp::armed::getenv_now(xfp::armed::kOverrideNames[i]);
  xfp::armed::put(handle, std::move(a));
}

void disarm(int64_t handle) { xfp::armed::drop(handle); }

bool armed(int64_t handle) { return find(handle) != nullptr; }

}  // namespace

TORCH_LIBRARY_IMPL(xfp, CPU, m) { m.impl("fused_linear", TORCH_FN(fused_linear)); }

// Bookkeeping, called eagerly by cpu.py only (never traced).
TORCH_LIBRARY_FRAGMENT(xfp, m) {
  m.def("arm(int handle, int mode, int isa, int address, int rows, int cols, int max_m, Tensor[] keep, "
        "Tensor[] stored) -> ()", &arm);
  m.def("disarm(int handle) -> ()", &disarm);
  m.def("armed(int handle) -> bool", &armed);
}
