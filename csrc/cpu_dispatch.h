// Run-time ISA dispatch shared by the CPU kernels. The extension is built without -march flags; on x86
// the hot loops are compiled more than once (functions marked RK_AVX2 or RK_AVX512, and the baseline
// ISA) and cpu_has_avx2() / cpu_isa() pick one at run time. RK_INLINE bodies inline into any of them and
// take its ISA; run_on_isa<Pass>(isa, args...) instantiates Pass::run for each ISA and calls the one asked.
#pragma once

#if defined(__GNUC__)
#define RK_INLINE inline __attribute__((always_inline))
#else
#define RK_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RK_HAVE_AVX2 1
#define RK_AVX2 __attribute__((target("avx2,fma")))
#define RK_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
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

enum class Isa { baseline, avx2, avx512 };

// The widest ISA the CPU offers (and the build can target).
inline Isa cpu_isa() {
#if RK_HAVE_AVX2
  static const Isa value = [] {
    if (!cpu_has_avx2()) return Isa::baseline;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::avx512 : Isa::avx2;
  }();
  return value;
#else
  return Isa::baseline;
#endif
}

template <typename Pass, typename... Args>
void run_baseline(const Args&... args) { Pass::run(args...); }
#if RK_HAVE_AVX2
template <typename Pass, typename... Args>
RK_AVX2 void run_avx2(const Args&... args) { Pass::run(args...); }
template <typename Pass, typename... Args>
RK_AVX512 void run_avx512(const Args&... args) { Pass::run(args...); }
#endif

// Pass::run(args...) compiled for `isa` (Pass::run must be RK_INLINE so that it takes that ISA).
template <typename Pass, typename... Args>
void run_on_isa(Isa isa, const Args&... args) {
#if RK_HAVE_AVX2
  if (isa == Isa::avx512) return run_avx512<Pass>(args...);
  if (isa == Isa::avx2) return run_avx2<Pass>(args...);
#endif
  (void)isa;
  run_baseline<Pass>(args...);
}

}  // namespace cpu
}  // namespace recursive_kernels
