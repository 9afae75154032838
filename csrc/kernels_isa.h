// Shared scaffolding of kernels_*.cpp, each of which compiles kernels.h for one instruction set:
//
//   #include "kernels_isa.h"          library headers first, so only protonorm's code gets the target below
//   #pragma GCC target("...")         (GCC does not macro-expand this pragma's argument, so it is spelled out)
//                                     (clang: #pragma clang attribute push(__attribute__((target("..."))), ...))
//   namespace protonorm { namespace <isa> {
//   #include "kernels.h"
//   } }
//   PROTONORM_KERNEL_TABLE(<isa>, <table name>)
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

#include <exception>  // std::exception_ptr, for exceptions out of kernels.h's parallel regions
#include <type_traits>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // for the x86-64-v3 specializations and the MXCSR access in kernels.h
#endif

// For the lambdas inside the row loops: g++ calls some of them out of line once their function has grown past its
// inlining limits, a call for every eight columns.
#if defined(__GNUC__)
#define PROTONORM_ALWAYS_INLINE __attribute__((always_inline))
#else
#define PROTONORM_ALWAYS_INLINE
#endif

#define PROTONORM_KERNEL_TABLE(isa, table)                                                                  \
  namespace protonorm {                                                                                    \
  extern const KernelTable table;                                                                          \
  const KernelTable table = {#isa, isa::moments, isa::normalize, isa::normalize_moments, isa::reward_moments, \
                             isa::merge};                                                                  \
  }
