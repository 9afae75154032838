// The kernels for x86-64 CPUs with AVX2, FMA and F16C (x86-64-v3), chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#include "kernels_isa.h"

#define PROTONORM_KERNELS_FMA 1
#define PROTONORM_KERNELS_X86_V3 1  // AVX2 + FMA intrinsics (g++ does not define __AVX2__ under the pragma)

#ifdef __clang__  // clang ignores GCC's target pragma
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2")
#endif
namespace protonorm {
namespace avx2 {
#include "kernels.h"
}  // namespace avx2
}  // namespace protonorm
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

PROTONORM_KERNEL_TABLE(avx2, kAvx2Kernels)
#endif
