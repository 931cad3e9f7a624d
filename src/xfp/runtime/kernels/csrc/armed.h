// What `xfp::arm` keeps for a module (csrc/ops.cpp), and the checks and the call every C++ shortcut of an armed
// XFPLinear shares: the torch operator `xfp::fused_linear` (ops.cpp) and the CPython entry `fast_linear`
// (python.cpp). Both run the kernel only when everything below holds, so they compute what the Python path does.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "v2.h"

namespace xfp::armed {

constexpr int kOverrides = 2;  // XFP_KERNEL, XFP_CPU_ISA

struct Armed {
  int64_t mode = 0;  // 0: V2, 1: V2a
  int64_t isa = 0;
  int64_t rows = 0, cols = 0, max_m = 0;
  V2Matrix v2{};
  V2aMatrix v2a{};
  std::vector<at::Tensor> keep;    // the tensors the C view points into
  std::vector<at::Tensor> stored;  // the module's stored tensors when armed
  std::vector<int64_t> versions;   // their in-place versions then
  std::optional<std::string> overrides[kOverrides];
};

// What is armed for `handle`, or nullptr.
std::shared_ptr<const Armed> find(int64_t handle);

// Whether the kernel takes this input and bias (nullptr: none) as armed, the overrides being unchanged:
// float32, contiguous, on the CPU, at most max_m rows, no gradient wanted, a float32 bias of the right size.
bool takes(const Armed& a, const at::Tensor& x, const at::Tensor* bias);

// Whether `t` is stored tensor `i` as armed: the same tensor object at the same in-place version.
inline bool same_stored(const Armed& a, size_t i, const at::Tensor& t) {
  return i < a.stored.size() && t.defined() && t.unsafeGetTensorImpl() == a.stored[i].unsafeGetTensorImpl() &&
         !t.is_inference() && t._version() == a.versions[i];
}

// x @ W_hat.T (+ bias) by the armed kernel; call only where `takes` and `same_stored` hold.
at::Tensor run(const Armed& a, const at::Tensor& x, const at::Tensor* bias);

}  // namespace xfp::armed
