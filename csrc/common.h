// Types shared by every translation unit of protonorm._C: dtype codes, the argument records the bindings fill
// from Python (data pointers, shapes and strides in elements, no torch types), and the fp16 / bf16 decoding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace protonorm {

// Must match _DTYPE_CODES in protonorm/backends/cpp_backend.py.
enum DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kBool = 4,
  kUInt8 = 5,
  kInt8 = 6,
  kInt16 = 7,
  kInt32 = 8,
  kInt64 = 9,
};

// A [rows, cols] matrix whose columns are contiguous (column stride 1, or a single column) and whose rows are
// `row_stride` elements apart.
struct Matrix {
  void* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int dtype;
};

// Destination of batch moments: `num_parts` rows of `2 + 2 * cols` doubles, part p covering the input rows
// [p * rows_per_part, min((p + 1) * rows_per_part, rows)).
struct PartsOut {
  double* data;
  int64_t num_parts;
  int64_t rows_per_part;
};

// Per-column normalization constants as the reference computes them (float32 mean, float32 stddev); the clamp
// bound already rounded to the dtype it applies to.
struct NormalizeParams {
  const float* mean;
  const float* stddev;
  bool center;
  bool un_norm;
  bool clamp;
  double clamp_value;
};

struct MomentsArgs {
  Matrix x;
  const uint8_t* mask;  // bool per row, or null
  int64_t mask_stride;
  PartsOut parts;
  int threads;
};

struct NormalizeArgs {
  Matrix x;
  Matrix out;  // float32, or float64 for float64 input
  NormalizeParams params;
  int threads;
  bool stream;  // write the output with non-temporal stores where the kernels have them
};

struct NormalizeMomentsArgs {
  Matrix x;
  Matrix out;
  NormalizeParams params;  // center, no un_norm
  PartsOut parts;
  int threads;
  int64_t block_bytes;  // input rows normalized before they enter the moments: a share of the L2 cache
  bool stream;          // as in NormalizeArgs
};

struct RewardArgs {
  Matrix reward;
  const uint8_t* reset;  // 1 where the environment terminated, one byte per row, contiguous
  Matrix discounted;     // float32 or float64, updated in place
  double gamma;
  PartsOut parts;
  int threads;
};

// Reduce parts (rows `parts_stride` doubles apart) in the reference's pairwise tree order, then either write the
// single combined part to `combined` or, when that is null, fold it into the running statistics in place.
struct MergeArgs {
  const double* parts;
  int64_t num_parts;
  int64_t cols;
  int64_t parts_stride;
  double* scratch;  // (num_parts + 1) / 2 * 2 * cols doubles
  double* counts;   // 2 * num_parts + 64 doubles: the tree's node counts, filled by the merge before its region
  double* combined;
  double* mean;
  int64_t mean_stride;
  double* var;
  int64_t var_stride;
  int64_t* count;
  int64_t* dropped;
  bool ema;
  double ema_decay;
  int threads;
};

// One set of kernels, compiled once per instruction set (see kernels.h).
struct KernelTable {
  const char* isa;
  void (*moments)(const MomentsArgs&);
  void (*normalize)(const NormalizeArgs&);
  void (*normalize_moments)(const NormalizeMomentsArgs&);
  void (*reward_moments)(const RewardArgs&);
  void (*merge)(const MergeArgs&);
};

// ------------------------------------------------------------------------------------------------- scratch
// Per-thread buffers that only grow, one per purpose, so that a kernel call allocates and frees nothing on the
// heap once its thread has seen the largest shape. A free inside the call can be the one that makes glibc trim its
// heap, which then unmaps there, for milliseconds, memory that other code (torch's temporaries) freed earlier:
// measured as calls 2-4x slower in bench/RESULTS.md. The buffers live as long as their thread (torch's OpenMP
// workers and the callers' threads) and follow the largest shape it has seen: the merge tree, the largest, takes up
// to 512 bytes per feature (0.5 MB at 1024 features), the others 24 bytes per feature or a part's rows.
enum class Scratch {
  kRowSums,
  kColumnValues,
  kColumnStatus,
  kBadRows,
  kMergeTree,
  kRewardParts,
  kResetFlags,
  kCount
};

// At least n elements of the calling thread's buffer for `slot` (defined in bindings.cpp, which is compiled for the
// baseline instruction set: an inline definition here would be instantiated, and possibly kept by the linker, from a
// translation unit compiled for AVX-512).
double* scratch_doubles(Scratch slot, size_t n);
uint8_t* scratch_bytes(Scratch slot, size_t n);

// ---------------------------------------------------------------------------------------------- 16-bit floats
// Storage types that keep the raw bits; decoding is written with selects so that loops over them vectorize.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(Half h) {
  const uint32_t magnitude = h.bits & 0x7fffu;
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  // Re-bias the exponent from 15 to 127; inf/NaN get the all-ones exponent instead.
  uint32_t u = (magnitude << 13) + 0x38000000u;
  u = magnitude >= 0x7c00u ? u + 0x38000000u : u;
  // Subnormals (and zero): magnitude * 2^-24, obtained exactly as (2^-14 * (1 + m / 1024)) - 2^-14.
  const float subnormal = bits_to_float(u + 0x00800000u) - bits_to_float(0x38800000u);
  const float value = magnitude < 0x400u ? subnormal : bits_to_float(u);
  uint32_t out;
  std::memcpy(&out, &value, sizeof out);
  return bits_to_float(out | sign);
}

inline float to_float(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }

}  // namespace protonorm
