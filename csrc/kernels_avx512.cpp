// The kernels for x86-64 CPUs with AVX-512 (F, BW, DQ, VL), chosen at run time; 512-bit vectors preferred.
#if defined(__x86_64__) && defined(__GNUC__)
#include "kernels_isa.h"

#define PROTONORM_KERNELS_FMA 1
#define PROTONORM_KERNELS_X86_V3 1  // AVX2 + FMA intrinsics (g++ does not define __AVX2__ under the pragma)
#define PROTONORM_KERNELS_AVX512 1  // AVX-512 F/BW/DQ/VL intrinsics

#ifdef __clang__  // clang ignores GCC's target pragma
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512dq,avx512vl"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
#endif
namespace protonorm {
namespace avx512 {
#include "kernels.h"
}  // namespace avx512
}  // namespace protonorm
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

PROTONORM_KERNEL_TABLE(avx512, kAvx512Kernels)
#endif
