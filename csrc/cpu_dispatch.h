// Run-time ISA dispatch shared by the CPU kernels. The extension is built without -march flags; on x86
// the hot loops are compiled twice, for AVX2+FMA (functions marked RK_AVX2) and for the baseline ISA,
// and cpu_has_avx2() picks one at run time. RK_INLINE bodies inline into either and take its ISA.
#pragma once

#if defined(__GNUC__)
#define RK_INLINE inline __attribute__((always_inline))
#else
#define RK_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RK_HAVE_AVX2 1
#define RK_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#else
#define RK_HAVE_AVX2 0
#endif

namespace recursive_kernels {
namespace cpu {

inline bool cpu_has_avx2() {
#if RK_HAVE_AVX2
  static const bool value = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return value;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace recursive_kernels
