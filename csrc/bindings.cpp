// Python bindings of protonorm._C. Tensors arrive as data pointers with shapes, strides (in elements) and dtype
// codes, so the module needs no torch headers and one build serves every torch version; the Python side
// (protonorm/backends/cpp_backend.py) validates them. Every kernel entry point releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "common.h"

namespace py = pybind11;

namespace protonorm {

// A buffer only grows, so that a call frees nothing (see docs/ARCHITECTURE.md). A build for the sanitizers
// (tests/test_sanitizers.py) defines PROTONORM_EXACT_SCRATCH instead, so that every buffer ends where the call's
// request ends and an overrun reaches memory the address sanitizer watches.
template <class T>
static T* scratch(Scratch slot, size_t n) {
  static thread_local std::vector<T> buffers[static_cast<int>(Scratch::kCount)];
  std::vector<T>& buffer = buffers[static_cast<int>(slot)];
#ifdef PROTONORM_EXACT_SCRATCH
  if (buffer.size() != n) std::vector<T>(n).swap(buffer);
#else
  if (buffer.size() < n) buffer.resize(n);
#endif
  return buffer.data();
}

double* scratch_doubles(Scratch slot, size_t n) { return scratch<double>(slot, n); }
uint8_t* scratch_bytes(Scratch slot, size_t n) { return scratch<uint8_t>(slot, n); }

extern const KernelTable kBaselineKernels;
#if defined(__x86_64__) && defined(__GNUC__)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
#endif

namespace {

// Below this many elements per thread, starting a parallel region costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

#if defined(__x86_64__) && defined(__GNUC__)
// F16C from CPUID leaf 1 (ECX bit 29): older clang (14) rejects "f16c" in __builtin_cpu_supports at compile time.
bool cpu_has_f16c() {
  unsigned int eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> tables{&kBaselineKernels};
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  // Everything kernels_avx2.cpp's target pragma lets the compiler use (AVX's OS support is part of "avx").
  const bool avx2 = __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    cpu_has_f16c() && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (avx2) tables.push_back(&kAvx2Kernels);
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    tables.push_back(&kAvx512Kernels);
#endif
  return tables;
}

const KernelTable* g_kernels = nullptr;

const KernelTable& kernels() { return *g_kernels; }

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : supported_tables()) names.emplace_back(t->isa);
  return names;
}

std::string isa_names() {
  std::string text;
  for (const std::string& name : isas()) text += (text.empty() ? "" : ", ") + name;
  return text;
}

void set_isa(const std::string& name) {
  for (const KernelTable* t : supported_tables()) {
    if (name == t->isa) {
      g_kernels = t;
      return;
    }
  }
  throw std::invalid_argument("instruction set '" + name + "' is not one this CPU and build run (" + isa_names() +
                              ")");
}

// An environment variable's value without the white space around it, in lower case ("" where unset), so that
// " AVX2" or "False" mean what they say.
std::string env_setting(const char* name) {
  const char* value = std::getenv(name);
  std::string text = value == nullptr ? "" : value;
  const size_t begin = text.find_first_not_of(" \t\n\r\f\v");
  text = begin == std::string::npos ? "" : text.substr(begin, text.find_last_not_of(" \t\n\r\f\v") + 1 - begin);
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

// The instruction set PROTONORM_CPU_ISA names (unset or empty: the widest this CPU runs). A name the CPU or the
// build cannot run fails the import: the variable pins the kernels (for measurements and tests), which must not
// quietly run others.
void set_isa_from_environment() {
  const std::string wanted = env_setting("PROTONORM_CPU_ISA");
  if (wanted.empty()) return;
  for (const std::string& name : isas()) {
    if (name == wanted) return set_isa(name);
  }
  throw std::invalid_argument("environment variable PROTONORM_CPU_ISA must name an instruction set this CPU and "
                              "build run (" + isa_names() + "), got '" + std::getenv("PROTONORM_CPU_ISA") + "'");
}

// GNU OpenMP keeps each thread's pool of workers across fork(), but the workers themselves do not survive it: in a
// child the thread that forked hangs in its next parallel region (as torch's own ops do there), while threads the
// child starts get pools of their own. So that thread runs the kernels serially in the child; the results are the
// same bits on any number of threads.
#if defined(__unix__) || defined(__APPLE__)
bool g_forked = false;
pthread_t g_forking_thread;

void note_fork_in_child() {
  g_forking_thread = pthread_self();
  g_forked = true;
}

bool on_forking_thread() { return g_forked && pthread_equal(pthread_self(), g_forking_thread); }
#else
bool on_forking_thread() { return false; }
#endif

int threads_for(int requested, int64_t elements) {
  if (requested > 1 && on_forking_thread()) return 1;
  const int64_t useful = elements / kMinElementsPerThread;
  if (useful < 2 || requested < 2) return 1;
  return useful < requested ? static_cast<int>(useful) : requested;
}

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// torch's float -> half and float -> bfloat16 conversions (round to nearest even), for clamp bounds applied to
// 16-bit input.
float round_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint16_t h;
  if (x >= 0x7f800000u)
    h = static_cast<uint16_t>(x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  else if (x >= 0x477ff000u)  // 65520 and above round to inf
    h = 0x7c00u;
  else if (x < 0x38800000u)  // below the smallest normal half: a multiple of 2^-24
    h = static_cast<uint16_t>(std::nearbyint(std::fabs(f) * 16777216.0f));
  else
    h = static_cast<uint16_t>((x - 0x38000000u + 0xfffu + ((x >> 13) & 1u)) >> 13);
  return to_float(Half{static_cast<uint16_t>(h | sign)});
}

float round_to_bfloat16(float f) {
  if (std::isnan(f)) return f;
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  x = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return to_float(BFloat16{static_cast<uint16_t>(x)});
}

Matrix matrix(uintptr_t data, int64_t rows, int64_t cols, int64_t row_stride, int dtype) {
  return Matrix{ptr<void>(data), rows, cols, row_stride, dtype};
}

constexpr int64_t kDoubleBytes = sizeof(double);

int64_t dtype_bytes(int dtype) {
  switch (dtype) {
    case kFloat64:
    case kInt64: return 8;
    case kFloat32:
    case kInt32: return 4;
    case kFloat16:
    case kBFloat16:
    case kInt16: return 2;
    default: return 1;
  }
}

// Refuses a tensor with elements but no memory: torch's ZeroTensor (torch._efficientzerotensor, and what some
// autograd formulas return) has a null data pointer, which the kernels would read or write. Refuses as well one
// that starts between two of its `element_bytes`-byte elements (a view of a byte buffer at an odd offset): the
// kernels access elements through pointers of their type, which would then be misaligned (undefined behaviour,
// and a fault for the aligned non-temporal stores).
void require_data(uintptr_t data, int64_t elements, const char* name, int64_t element_bytes) {
  if (elements <= 0) return;
  if (data == 0)
    throw std::invalid_argument(std::string(name) +
                                ": expected a tensor with memory, got a null data pointer (a ZeroTensor? clone() it)");
  if (data % static_cast<uintptr_t>(element_bytes) != 0) {
    char address[32];
    std::snprintf(address, sizeof address, "%#llx", static_cast<unsigned long long>(data));
    throw std::invalid_argument(std::string(name) + ": expected a tensor aligned to its " +
                                std::to_string(element_bytes) + "-byte elements, got one at address " + address +
                                " (a view of a byte buffer at an offset? clone() it)");
  }
}

void moments(uintptr_t x, int64_t rows, int64_t cols, int64_t x_stride, int x_dtype, uintptr_t mask,
             int64_t mask_stride, uintptr_t parts, int64_t num_parts, int64_t rows_per_part, int threads) {
  require_data(x, rows * cols, "x", dtype_bytes(x_dtype));
  require_data(parts, num_parts, "parts", kDoubleBytes);
  MomentsArgs a{matrix(x, rows, cols, x_stride, x_dtype), ptr<const uint8_t>(mask), mask_stride,
                PartsOut{ptr<double>(parts), num_parts, rows_per_part}, threads_for(threads, rows * cols)};
  kernels().moments(a);
}

// The reference's float32 statistics: mean32 = float32(mean), radicand = float32(var) + float32(eps) in float32
// arithmetic, which is what torch computes for `mean.float()` and `var.float() + eps` (tests compare them bit for
// bit), and std32 = torch's square root of the radicand. torch's float32 sqrt is not always correctly rounded (in
// builds with MKL it is MKL's vmsSqrt), so a C++ root would change the last bit of some outputs: the root is taken by
// `torch_sqrt`, the address of the very function torch calls with the mode torch passes it, which the Python side
// hands in once it has checked that it reproduces torch.sqrt bit for bit; without one (0) the caller takes it.
//
// `radicand` keeps the previous call's radicand and `std32` its square root. When `primed` and every new radicand
// has the same bits as the kept one, std32 is already the answer (the square root is a function of its argument's
// bits). So statistics that did not change since the last call (evaluation, inference) cost no root at all,
// however the statistics were reached or written. Returns what std32 holds now:
enum Float32Stats : int {
  kRootsKept = 0,   // the previous call's roots, still right
  kRootsTaken = 1,  // new roots, taken here by torch_sqrt
  kRootsWanted = 2, // the new radicands: the caller takes torch's root of std32 in place
};
using TorchSqrt = void (*)(int n, const float* in, float* out, long long mode);  // MKL's vmsSqrt (LP64)

int float32_stats(uintptr_t mean, int64_t mean_stride, uintptr_t var, int64_t var_stride, int64_t cols,
                  double epsilon, uintptr_t mean32, uintptr_t std32, uintptr_t radicand, bool primed,
                  uintptr_t torch_sqrt, int64_t torch_sqrt_mode) {
  require_data(mean, cols, "mean", kDoubleBytes);
  require_data(var, cols, "var", kDoubleBytes);
  const double* m = ptr<const double>(mean);
  const double* v = ptr<const double>(var);
  float* m32 = ptr<float>(mean32);
  float* kept = ptr<float>(radicand);
  const float eps = static_cast<float>(epsilon);
  uint32_t changed = primed ? 0u : 1u;
  for (int64_t j = 0; j < cols; ++j) {
    m32[j] = static_cast<float>(m[j * mean_stride]);
    const float r = static_cast<float>(v[j * var_stride]) + eps;
    uint32_t new_bits, old_bits;
    std::memcpy(&new_bits, &r, sizeof r);
    std::memcpy(&old_bits, kept + j, sizeof old_bits);
    changed |= new_bits ^ old_bits;
    kept[j] = r;
  }
  if (changed == 0) return kRootsKept;
  if (torch_sqrt != 0 && cols <= INT32_MAX) {
    reinterpret_cast<TorchSqrt>(torch_sqrt)(static_cast<int>(cols), kept, ptr<float>(std32), torch_sqrt_mode);
    return kRootsTaken;
  }
  std::memcpy(ptr<float>(std32), kept, static_cast<size_t>(cols) * sizeof(float));
  return kRootsWanted;
}

// From how many bytes of input plus output normalize and normalize_moments write their output with non-temporal
// stores (x86 builds): the size of the last-level cache, past which plain stores would push the batch being read,
// and the output's own first rows, out of it anyway; they would also read every output line from memory before
// writing it. Measured on a Zen 5 at 16384x342 and 8192x1024: the fused kernel 10-17% faster, and followed by a read
// of the whole output still 14-17% faster (bench/RESULTS.md). PROTONORM_STREAM_STORES=0 turns it off; unknown cache
// size: off.
constexpr int64_t kNeverStream = INT64_MAX;
int64_t g_stream_threshold = kNeverStream;

// The size of the largest cache level cpu0 sees, from Linux's sysfs ("32768K"), or 0. glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) is no substitute: on an EPYC VM it reported 384 MB, the L3 of every core complex
// together, where one core can use 32 MB.
int64_t last_level_cache_bytes() {
  int64_t best_level = 0, best_bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    long level = 0;
    char unit = 0;
    long long amount = 0;
    std::FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (f == nullptr) break;
    const bool has_level = std::fscanf(f, "%ld", &level) == 1;
    std::fclose(f);
    f = std::fopen((dir + "size").c_str(), "r");
    if (f == nullptr) continue;
    const int fields = std::fscanf(f, "%lld%c", &amount, &unit);
    std::fclose(f);
    if (!has_level || fields < 1 || amount <= 0 || level < best_level) continue;
    const int64_t scale = fields < 2 ? 1 : unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? 1 << 30 : 1;
    best_level = level;
    best_bytes = static_cast<int64_t>(amount) * scale;
  }
  return best_bytes;
}

// An on/off environment variable, as protonorm/output_cache.py's env_switch reads one: unset, empty, 1, true, yes
// or on is on; 0, false, no or off is off (any case, white space around); anything else raises, naming it.
bool env_switch(const char* name) {
  const std::string setting = env_setting(name);
  if (setting.empty() || setting == "1" || setting == "true" || setting == "yes" || setting == "on") return true;
  if (setting == "0" || setting == "false" || setting == "no" || setting == "off") return false;
  throw std::invalid_argument(std::string("environment variable ") + name +
                              " must be 1, true, yes, on (the default) or 0, false, no, off, got '" +
                              std::getenv(name) + "'");
}

int64_t default_stream_threshold() {
  if (!env_switch("PROTONORM_STREAM_STORES")) return kNeverStream;
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 ? cache : kNeverStream;
}

bool stream_output(int64_t rows, int64_t cols, int x_dtype, int out_dtype) {
  const double bytes =
      static_cast<double>(rows) * static_cast<double>(cols) * (dtype_bytes(x_dtype) + dtype_bytes(out_dtype));
  return bytes >= static_cast<double>(g_stream_threshold);
}

// mean32 / std32: contiguous float32 [cols], the reference's mean.float() and torch.sqrt(var.float() + eps) (see
// float32_stats): the output must match the reference bit for bit.
void normalize(uintptr_t x, int64_t rows, int64_t cols, int64_t x_stride, int x_dtype, uintptr_t out,
               int64_t out_stride, uintptr_t mean32, uintptr_t std32, bool has_clamp, double clamp_value,
               bool un_norm, bool center, int threads) {
  const int out_dtype = x_dtype == kFloat64 ? kFloat64 : kFloat32;
  require_data(x, rows * cols, "x", dtype_bytes(x_dtype));
  require_data(out, rows * cols, "out", dtype_bytes(out_dtype));
  double bound = clamp_value;
  if (un_norm && x_dtype == kFloat16) bound = round_to_half(static_cast<float>(clamp_value));
  if (un_norm && x_dtype == kBFloat16) bound = round_to_bfloat16(static_cast<float>(clamp_value));
  NormalizeArgs a{matrix(x, rows, cols, x_stride, x_dtype), matrix(out, rows, cols, out_stride, out_dtype),
                  NormalizeParams{ptr<const float>(mean32), ptr<const float>(std32), center, un_norm, has_clamp, bound},
                  threads_for(threads, rows * cols), stream_output(rows, cols, x_dtype, out_dtype)};
  kernels().normalize(a);
}

// How much input normalize_moments normalizes before those rows enter the moments: an eighth of the L2 cache
// (input, output and the moment sums share it), within [32 KB, 128 KB].
int64_t normalize_block_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    const int64_t share = l2 > 0 ? l2 / 8 : 64 * 1024;
    return share < 32 * 1024 ? 32 * 1024 : share > 128 * 1024 ? 128 * 1024 : share;
  }();
  return bytes;
}

void normalize_moments(uintptr_t x, int64_t rows, int64_t cols, int64_t x_stride, int x_dtype, uintptr_t out,
                       int64_t out_stride, uintptr_t mean32, uintptr_t std32, bool has_clamp, double clamp_value,
                       uintptr_t parts, int64_t num_parts, int64_t rows_per_part, int threads) {
  const int out_dtype = x_dtype == kFloat64 ? kFloat64 : kFloat32;
  require_data(x, rows * cols, "x", dtype_bytes(x_dtype));
  require_data(out, rows * cols, "out", dtype_bytes(out_dtype));
  require_data(parts, num_parts, "parts", kDoubleBytes);
  NormalizeMomentsArgs a{matrix(x, rows, cols, x_stride, x_dtype), matrix(out, rows, cols, out_stride, out_dtype),
                         NormalizeParams{ptr<const float>(mean32), ptr<const float>(std32), true, false, has_clamp,
                                         clamp_value},
                         PartsOut{ptr<double>(parts), num_parts, rows_per_part}, threads_for(threads, rows * cols),
                         normalize_block_bytes(), stream_output(rows, cols, x_dtype, out_dtype)};
  kernels().normalize_moments(a);
}

void require_stats(uintptr_t mean, uintptr_t var, int64_t cols, uintptr_t count, uintptr_t dropped) {
  require_data(mean, cols, "mean", kDoubleBytes);
  require_data(var, cols, "var", kDoubleBytes);
  require_data(count, 1, "count", sizeof(int64_t));
  require_data(dropped, 1, "dropped", sizeof(int64_t));
}

// The merge tree's scratch and node counts (MergeArgs::scratch and ::counts), in this thread's buffer.
struct MergeScratch {
  double* tree;
  double* counts;
};
MergeScratch merge_scratch(int64_t num_parts, int64_t cols) {
  const int64_t tree = num_parts > 1 ? (num_parts + 1) / 2 * 2 * cols : 0;
  // The counts: num_parts, then half of that rounded up, and so on down to 1; each rounding adds at most one, and
  // there are fewer than 64 levels.
  double* base = scratch_doubles(Scratch::kMergeTree, static_cast<size_t>(tree + 2 * num_parts + 64));
  return {base, base + tree};
}

// terminated (any dtype, strided) -> one byte per row, 1 = restart, in this thread's scratch.
const uint8_t* reset_flags(uintptr_t data, int64_t rows, int64_t stride, int dtype) {
  require_data(data, rows, "terminated", dtype_bytes(dtype));
  uint8_t* reset = scratch_bytes(Scratch::kResetFlags, rows > 0 ? rows : 1);
  auto fill = [&](auto* p, auto nonzero) {
    uint8_t* __restrict out = reset;
    if (stride == 1) {  // the usual case, as a loop that vectorizes
      for (int64_t r = 0; r < rows; ++r) out[r] = nonzero(p[r]) ? 1 : 0;
      return;
    }
    for (int64_t r = 0; r < rows; ++r) out[r] = nonzero(p[r * stride]) ? 1 : 0;
  };
  auto plain = [](auto v) { return v != 0; };
  auto half_bits = [](uint16_t v) { return (v & 0x7fffu) != 0; };  // NaN counts as nonzero, as `!= 0` in torch
  switch (dtype) {
    case kBool:
    case kUInt8: fill(ptr<const uint8_t>(data), plain); break;
    case kInt8: fill(ptr<const int8_t>(data), plain); break;
    case kInt16: fill(ptr<const int16_t>(data), plain); break;
    case kInt32: fill(ptr<const int32_t>(data), plain); break;
    case kInt64: fill(ptr<const int64_t>(data), plain); break;
    case kFloat16:
    case kBFloat16: fill(ptr<const uint16_t>(data), half_bits); break;
    case kFloat32: fill(ptr<const float>(data), plain); break;
    case kFloat64: fill(ptr<const double>(data), plain); break;
    default: throw std::invalid_argument("unsupported dtype code for terminated");
  }
  return reset;
}

void reward_moments(uintptr_t reward, int64_t rows, int64_t cols, int64_t reward_stride, int reward_dtype,
                    uintptr_t terminated, int64_t terminated_stride, int terminated_dtype, uintptr_t discounted,
                    int64_t discounted_stride, int discounted_dtype, double gamma, uintptr_t parts,
                    int64_t num_parts, int64_t rows_per_part, int threads) {
  require_data(reward, rows * cols, "reward", dtype_bytes(reward_dtype));
  require_data(discounted, rows * cols, "discounted", dtype_bytes(discounted_dtype));
  require_data(parts, num_parts, "parts", kDoubleBytes);
  const uint8_t* reset = reset_flags(terminated, rows, terminated_stride, terminated_dtype);
  RewardArgs a{matrix(reward, rows, cols, reward_stride, reward_dtype), reset,
               matrix(discounted, rows, cols, discounted_stride, discounted_dtype), gamma,
               PartsOut{ptr<double>(parts), num_parts, rows_per_part}, threads_for(threads, rows * cols)};
  kernels().reward_moments(a);
}

// reward_moments, then merge of its parts into the running statistics, in one call: the per-environment-step
// record of a single process, where the parts need not be seen by anyone else.
void reward_record(uintptr_t reward, int64_t rows, int64_t cols, int64_t reward_stride, int reward_dtype,
                   uintptr_t terminated, int64_t terminated_stride, int terminated_dtype, uintptr_t discounted,
                   int64_t discounted_stride, int discounted_dtype, double gamma, int64_t num_parts,
                   int64_t rows_per_part, uintptr_t mean, int64_t mean_stride, uintptr_t var, int64_t var_stride,
                   uintptr_t count, uintptr_t dropped, bool has_ema, double ema_decay, int threads) {
  require_data(reward, rows * cols, "reward", dtype_bytes(reward_dtype));
  require_data(discounted, rows * cols, "discounted", dtype_bytes(discounted_dtype));
  require_stats(mean, var, cols, count, dropped);
  const int64_t width = 2 + 2 * cols;
  // Every buffer is allocated before the discounted returns are updated in place, so that running out of memory
  // leaves them, and the statistics, as they were.
  double* parts = scratch_doubles(Scratch::kRewardParts, static_cast<size_t>(num_parts * width));
  const MergeScratch merge_buffers = merge_scratch(num_parts, cols);
  const uint8_t* reset = reset_flags(terminated, rows, terminated_stride, terminated_dtype);
  RewardArgs r{matrix(reward, rows, cols, reward_stride, reward_dtype), reset,
               matrix(discounted, rows, cols, discounted_stride, discounted_dtype), gamma,
               PartsOut{parts, num_parts, rows_per_part}, threads_for(threads, rows * cols)};
  kernels().reward_moments(r);
  MergeArgs m{parts, num_parts, cols, width, merge_buffers.tree, merge_buffers.counts, nullptr, ptr<double>(mean),
              mean_stride, ptr<double>(var), var_stride, ptr<int64_t>(count), ptr<int64_t>(dropped), has_ema, ema_decay,
              threads_for(threads, num_parts * cols)};
  kernels().merge(m);
}

void merge(uintptr_t parts, int64_t num_parts, int64_t cols, int64_t parts_stride, uintptr_t mean,
           int64_t mean_stride, uintptr_t var, int64_t var_stride, uintptr_t count, uintptr_t dropped,
           bool has_ema, double ema_decay, int threads) {
  require_data(parts, num_parts, "parts", kDoubleBytes);
  require_stats(mean, var, cols, count, dropped);
  const MergeScratch buffers = merge_scratch(num_parts, cols);
  MergeArgs a{ptr<const double>(parts), num_parts, cols, parts_stride, buffers.tree, buffers.counts, nullptr,
              ptr<double>(mean), mean_stride, ptr<double>(var), var_stride, ptr<int64_t>(count),
              ptr<int64_t>(dropped), has_ema, ema_decay, threads_for(threads, num_parts * cols)};
  kernels().merge(a);
}

void combine(uintptr_t parts, int64_t num_parts, int64_t cols, int64_t parts_stride, uintptr_t out, int threads) {
  require_data(parts, num_parts, "parts", kDoubleBytes);
  const MergeScratch buffers = merge_scratch(num_parts, cols);
  MergeArgs a{ptr<const double>(parts), num_parts, cols, parts_stride, buffers.tree, buffers.counts,
              ptr<double>(out), nullptr, 0, nullptr, 0, nullptr, nullptr, false, 0.0,
              threads_for(threads, num_parts * cols)};
  kernels().merge(a);
}

}  // namespace
}  // namespace protonorm

PYBIND11_MODULE(_C, m) {
  // Raised whenever a binding's arguments or meaning change: the Python side (protonorm/backends/cpp_backend.py)
  // refuses an extension built from other sources, such as a stale in-place build, instead of failing mid-call.
  m.attr("INTERFACE_VERSION") = 4;
  using namespace protonorm;
  m.doc() = "protonorm CPU kernels (no torch headers: pointers, shapes, strides in elements, dtype codes).";
  g_stream_threshold = default_stream_threshold();
#if defined(__unix__) || defined(__APPLE__)
  pthread_atfork(nullptr, nullptr, &note_fork_in_child);
#endif
  const std::vector<const KernelTable*> tables = supported_tables();
  g_kernels = tables.back();
  set_isa_from_environment();
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("moments", &moments, nogil);
  m.def("normalize", &normalize, nogil);
  m.def("normalize_moments", &normalize_moments, nogil);
  m.def("reward_moments", &reward_moments, nogil);
  m.def("reward_record", &reward_record, nogil);
  m.def("merge", &merge, nogil);
  m.def("float32_stats", &float32_stats, nogil);
  m.def("combine", &combine, nogil);
  m.def("isa", []() { return std::string(kernels().isa); }, "The instruction set the kernels run with.");
  m.def("isas", &isas, "Instruction sets this CPU can run, baseline first.");
  m.def("set_isa", &set_isa, "Run the kernels built for the named instruction set (one of isas()).");
  m.def(
      "set_stream_threshold",
      [](int64_t bytes) {
        const int64_t previous = g_stream_threshold;
        g_stream_threshold = bytes < 0 ? default_stream_threshold() : bytes;
        return previous;
      },
      "Bytes of input plus output from which normalizing writes non-temporal stores (negative: the default); "
      "returns the previous value. For tests and measurements: results are the same bits either way.");
  m.def("stream_threshold", []() { return g_stream_threshold; });
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
