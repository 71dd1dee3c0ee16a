// What the CUDA host files (lowrank_linear_cuda.cpp, circuit_attention_cuda.cpp) share to call the kernels'
// launchers: the ScalarKind of a tensor and the check of a launch's status.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include "lowrank_linear_kernels.h"  // ScalarKind

namespace recursive_kernels {
namespace cuda {

// The launchers' name for t's dtype; the backend serves float32, float16 and bfloat16.
inline cuda_backend::ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda_backend::ScalarKind::kFloat32;
    case at::kHalf:
      return cuda_backend::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cuda_backend::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": the cuda backend supports float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
  return cuda_backend::ScalarKind::kFloat32;  // unreachable
}

// Raises when a launcher reports an error; `op` and `what` name the op and the kernel in the message.
inline void check_launch(cudaError_t status, const char* op, const char* what) {
  TORCH_CHECK(status == cudaSuccess, op, " (cuda backend): ", what, " failed: ", cudaGetErrorString(status));
}

}  // namespace cuda
}  // namespace recursive_kernels
