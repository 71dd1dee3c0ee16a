// The element types of the CUDA kernels (float, __half, __nv_bfloat16), shared by every .cu file of the CUDA
// backend: the launchers' choice of one by ScalarKind, and the conversions to and from the float the kernels
// compute in (stores round to nearest).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lowrank_linear_kernels.h"  // ScalarKind

namespace recursive_kernels {
namespace cuda_backend {

// The element type of a ScalarKind, as a value a generic lambda can take.
template <typename T>
struct Element {
  using type = T;
};

// launch(Element<T>{}) for the element type T of `kind` (a launcher templated on T); cudaErrorInvalidValue for
// a kind that names none.
template <typename Launch>
cudaError_t with_element_type(ScalarKind kind, Launch&& launch) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch(Element<float>{});
    case ScalarKind::kFloat16:
      return launch(Element<__half>{});
    case ScalarKind::kBFloat16:
      return launch(Element<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace cuda_backend
}  // namespace recursive_kernels
