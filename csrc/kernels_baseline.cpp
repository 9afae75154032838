// The kernels for the instruction set the compiler targets by default (SSE2 on x86-64): always present.
#include "kernels_isa.h"

namespace protonorm {
namespace baseline {
#include "kernels.h"
}  // namespace baseline
}  // namespace protonorm

PROTONORM_KERNEL_TABLE(baseline, kBaselineKernels)
