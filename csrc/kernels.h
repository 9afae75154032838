// The CPU kernels: batch moments, normalize, normalize-and-moments, reward update-and-moments.
//
// This file is included several times, once per instruction set, each inside its own namespace and under a
// `#pragma GCC target(...)`, or for clang a `#pragma clang attribute` giving a target attribute (see
// kernels_*.cpp); it includes nothing itself, so that no library header is compiled under a foreign target. The
// loops are written for the auto-vectorizer: columns are contiguous, so the inner loops run over columns with
// restrict-qualified pointers and plain selects.
//
// Moments. Rows are cut into parts of `rows_per_part` rows (a function of the batch size only, so results do not
// depend on the thread count). Within a part every column is accumulated as float64 sums of deviations from a
// shift, the part's first valid row: with that shift the sums stay of the order of the spread even when the data
// sits at an offset of 1e6, so sum(d^2) - sum(d)^2 / n does not cancel. A row holding NaN/inf is detected (one
// read, the row is then in L1) before it is accumulated, and counted instead. Four valid rows are accumulated
// together so that the float64 accumulators are loaded and stored once per four rows.
//
// Normalize follows the reference's rounding exactly: float32 mean and stddev, one subtraction and one true
// division in the output dtype (on the CPUs measured, a vector division is cheaper than the conversions a
// reciprocal-in-float64 scheme needs), clamps as explicit comparisons (NaN stays NaN), no contraction into FMA.

template <class T>
struct Elem;

// load: the value in its math type. exponent: the raw exponent field; it equals kNonFinite exactly for inf and
// NaN, so "any non-finite in a row" is one running unsigned max (cheaper than compare-and-or per element).
template <>
struct Elem<float> {
  using Math = float;
  using Bits = uint32_t;
  static constexpr Bits kNonFinite = 0x7f800000u;
  static inline float load(float v) { return v; }
  static inline Bits exponent(float v) {
    Bits b;
    std::memcpy(&b, &v, sizeof b);
    return b & kNonFinite;
  }
};

template <>
struct Elem<double> {
  using Math = double;
  using Bits = uint64_t;
  static constexpr Bits kNonFinite = 0x7ff0000000000000ull;
  static inline double load(double v) { return v; }
  static inline Bits exponent(double v) {
    Bits b;
    std::memcpy(&b, &v, sizeof b);
    return b & kNonFinite;
  }
};

template <>
struct Elem<Half> {
  using Math = float;
  using Bits = uint16_t;
  static constexpr Bits kNonFinite = 0x7c00u;
  static inline float load(Half v) { return to_float(v); }
  static inline Bits exponent(Half v) { return static_cast<Bits>(v.bits & kNonFinite); }
};

template <>
struct Elem<BFloat16> {
  using Math = float;
  using Bits = uint16_t;
  static constexpr Bits kNonFinite = 0x7f80u;
  static inline float load(BFloat16 v) { return to_float(v); }
  static inline Bits exponent(BFloat16 v) { return static_cast<Bits>(v.bits & kNonFinite); }
};

template <class T>
inline bool nonfinite(T v) {
  return Elem<T>::exponent(v) == Elem<T>::kNonFinite;
}

// Running max of exponent fields; `largest == kNonFinite` at the end means the row held a NaN or an inf.
template <class T>
inline typename Elem<T>::Bits max_exponent(typename Elem<T>::Bits largest, T v) {
  const typename Elem<T>::Bits e = Elem<T>::exponent(v);
  return e > largest ? e : largest;
}

// s + d * d: one fused instruction where the instruction set has it (the moments need not match any particular
// rounding; normalize never uses this). Every build with a hardware FMA (the x86 AVX2 and AVX-512 builds, the
// baseline build of aarch64) rounds once and so gives the same bits; the x86 baseline build, for CPUs without FMA,
// rounds the square and the sum separately, which can change the last bits of the moments.
inline double add_square(double s, double d) {
#if defined(PROTONORM_KERNELS_FMA) || defined(__FP_FAST_FMA)
  return __builtin_fma(d, d, s);
#else
  return s + d * d;
#endif
}

inline int64_t element_size(int dtype) {
  return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
}

template <class T>
inline T* row_ptr(const Matrix& m, int64_t r) {
  return static_cast<T*>(m.data) + r * m.row_stride;
}

// Asks for the row `bytes` long at `row` to be brought into cache: the row loops read one row (a few KB) at a
// time, and the hardware prefetchers stop at every 4 KB page, so without this each row starts with a stall.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// How many rows ahead to prefetch so as to be about `bytes_ahead` ahead of the row being read (at least one row).
// The moments read 8 KB ahead. The fused kernel's normalizing pass reads 4 KB ahead, the best of 1-16 KB on a Zen 5
// (bench/RESULTS.md): 5-15% faster at 342 features, no change at 1024. The plain normalize does not prefetch: there
// it gained 0-3% streaming and cost up to 10% with the rows in cache.
inline int64_t prefetch_distance(int64_t row_bytes, int64_t bytes_ahead) {
  return row_bytes >= bytes_ahead ? 1 : bytes_ahead / (row_bytes > 0 ? row_bytes : 1);
}
constexpr int64_t kMomentsPrefetchBytes = 8192;
constexpr int64_t kNormalizePrefetchBytes = 4096;

// The caller's floating-point control state (on x86-64 the MXCSR: flush-to-zero, denormals-are-zero, rounding; on
// aarch64 the FPCR: flush-to-zero, which torch.set_flush_denormal sets there, and rounding), put in force on a thread
// of a parallel region for as long as the region runs there. OpenMP workers keep their own state, so without it a
// caller's torch.set_flush_denormal(True) would hold for the rows its own thread takes and not for the others: results
// would depend on the thread count and on which thread claimed which rows.
// (Macros on x86-64: wrapping the intrinsics in functions changes g++'s inlining decisions in the AVX builds.)
#if defined(__x86_64__) && defined(__GNUC__)
#define PROTONORM_FLOAT_CONTROL 1
using FloatControl = unsigned int;
#define PROTONORM_GET_FLOAT_CONTROL() _mm_getcsr()
#define PROTONORM_SET_FLOAT_CONTROL(state) _mm_setcsr(state)
#elif defined(__aarch64__) && defined(__GNUC__)
#define PROTONORM_FLOAT_CONTROL 1
using FloatControl = uint64_t;
inline FloatControl get_fpcr() {
  uint64_t state;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(state));
  return state;
}
inline void set_fpcr(FloatControl state) { __asm__ __volatile__("msr fpcr, %0" : : "r"(state) : "memory"); }
#define PROTONORM_GET_FLOAT_CONTROL() get_fpcr()
#define PROTONORM_SET_FLOAT_CONTROL(state) set_fpcr(state)
#endif

struct CallerFloatState {
#ifdef PROTONORM_FLOAT_CONTROL
  FloatControl state = PROTONORM_GET_FLOAT_CONTROL();
#endif
};

class AdoptFloatState {
 public:
  explicit AdoptFloatState(const CallerFloatState& caller) {
#ifdef PROTONORM_FLOAT_CONTROL
    own_ = PROTONORM_GET_FLOAT_CONTROL();
    wanted_ = caller.state;
    if (own_ != wanted_) PROTONORM_SET_FLOAT_CONTROL(wanted_);
#else
    (void)caller;
#endif
  }
  ~AdoptFloatState() {
#ifdef PROTONORM_FLOAT_CONTROL
    if (own_ != wanted_) PROTONORM_SET_FLOAT_CONTROL(own_);
#endif
  }
  AdoptFloatState(const AdoptFloatState&) = delete;
  AdoptFloatState& operator=(const AdoptFloatState&) = delete;

 private:
#ifdef PROTONORM_FLOAT_CONTROL
  FloatControl own_ = 0, wanted_ = 0;
#endif
};

// An exception thrown on a thread of a parallel region (std::bad_alloc from a thread's scratch, for a batch of
// enormous width) must not leave it: the runtime would end the process. The first one is kept and rethrown on the
// calling thread once the region is over.
class RegionError {
 public:
  void keep() {
#ifdef _OPENMP
#pragma omp critical(protonorm_region_error)
#endif
    {
      if (!error_) error_ = std::current_exception();
    }
#ifdef _OPENMP
#pragma omp atomic write
#endif
    failed_ = 1;
  }
  bool failed() const {
    int failed;
#ifdef _OPENMP
#pragma omp atomic read
#endif
    failed = failed_;
    return failed != 0;
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  int failed_ = 0;
};

// Calls body(next) once on each of `threads` threads, where next(begin, end) hands out the next unclaimed range
// [begin, end) of [0, n), `grain` items long, and returns false once none is left. A thread that is slowed down
// (the machine is busy, or its core is shared) takes fewer ranges instead of holding up the others; what each item
// computes does not depend on which thread takes it.
//
// A body allocates its scratch before its first call to next. With kAllOrNothing, for a kernel that updates a buffer
// in place (the discounted returns), that first call waits until every thread has got that far: if any thread
// failed to allocate, no range is handed out at all, so the kernel runs whole or not at all. Otherwise each thread
// starts on its ranges at once: a kernel writing only its own outputs does not wait for an OpenMP worker that is
// still waking up (after an idle spell, a few hundred microseconds on the VMs measured: bench/RESULTS.md), and a
// thread's failure stops the others at their next range. Either way the exception is rethrown here.
template <bool kAllOrNothing = false, class Body>
inline void parallel_dynamic(int64_t n, int64_t grain, int threads, const Body& body) {
  if (grain < 1) grain = 1;
#ifdef _OPENMP
  if (threads > 1 && n > grain) {
    int64_t cursor = 0;
    const CallerFloatState caller;
    RegionError error;
#pragma omp parallel num_threads(threads)
    {
      const AdoptFloatState adopt(caller);
      bool waited = false;
      const auto wait_for_all = [&] {
        if (!kAllOrNothing || waited) return;
        waited = true;
#pragma omp barrier
      };
      const auto next = [&](int64_t& begin, int64_t& end) {
        wait_for_all();
        if (error.failed()) return false;
        int64_t claimed;
#pragma omp atomic capture
        {
          claimed = cursor;
          cursor += grain;
        }
        if (claimed >= n) return false;
        begin = claimed;
        end = claimed + grain < n ? claimed + grain : n;
        return true;
      };
      try {
        body(next);
      } catch (...) {
        error.keep();
      }
      wait_for_all();  // (kAllOrNothing) every thread passes the barrier once, whether or not its body got to next
    }
    error.rethrow();
    return;
  }
#endif
  (void)threads;
  bool given = false;
  const auto once = [&](int64_t& begin, int64_t& end) {
    if (given || n <= 0) return false;
    given = true;
    begin = 0;
    end = n;
    return true;
  };
  body(once);
}

// Calls body(begin, end) on [0, n) split into contiguous ranges, one per thread. The body must not allocate (the
// merge, its one user, gets every buffer from its caller); an exception is still rethrown on the calling thread.
template <class Body>
inline void parallel_ranges(int64_t n, int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1 && n > 1) {
    const CallerFloatState caller;
    RegionError error;
#pragma omp parallel num_threads(threads)
    {
      const AdoptFloatState adopt(caller);
      const int64_t t = omp_get_thread_num();
      const int64_t nt = omp_get_num_threads();
      const int64_t begin = n * t / nt;
      const int64_t end = n * (t + 1) / nt;
      try {
        if (begin < end) body(begin, end);
      } catch (...) {
        error.keep();
      }
    }
    error.rethrow();
    return;
  }
#endif
  (void)threads;
  if (n > 0) body(0, n);
}

// ------------------------------------------------------------------------------------------------ moments, rows
// Per-thread accumulators of one part: shift, sum of deviations, sum of squared deviations.
struct RowAccumulator {
  double* shift;
  double* s1;
  double* s2;
  int64_t cols;
  double n;
  double dropped;
  const void* pending[4];
  int num_pending;
};

// The calling thread's accumulators for `cols` columns, in its scratch (start_part resets the counts).
inline RowAccumulator row_accumulator(int64_t cols) {
  double* scratch = scratch_doubles(Scratch::kRowSums, 3 * (cols > 0 ? cols : 1));
  RowAccumulator acc;
  acc.shift = scratch;
  acc.s1 = scratch + cols;
  acc.s2 = scratch + 2 * cols;
  acc.cols = cols;
  return acc;
}

template <class T>
inline void set_shift(const T* __restrict row, double* __restrict shift, double* __restrict s1,
                      double* __restrict s2, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    shift[j] = static_cast<double>(Elem<T>::load(row[j]));
    s1[j] = 0.0;
    s2[j] = 0.0;
  }
}

template <class T>
inline void accumulate1(const T* __restrict r0, const double* __restrict shift, double* __restrict s1,
                        double* __restrict s2, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    const double d0 = static_cast<double>(Elem<T>::load(r0[j])) - shift[j];
    s1[j] += d0;
    s2[j] = add_square(s2[j], d0);
  }
}

// Four rows into the sums at once: one load and store of s1 and s2 per four rows.
template <class T>
inline void accumulate4_columns(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                                const T* __restrict r3, const double* __restrict shift, double* __restrict s1,
                                double* __restrict s2, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    const double sh = shift[j];
    const double d0 = static_cast<double>(Elem<T>::load(r0[j])) - sh;
    const double d1 = static_cast<double>(Elem<T>::load(r1[j])) - sh;
    const double d2 = static_cast<double>(Elem<T>::load(r2[j])) - sh;
    const double d3 = static_cast<double>(Elem<T>::load(r3[j])) - sh;
    s1[j] += (d0 + d1) + (d2 + d3);
    s2[j] = add_square(add_square(add_square(add_square(s2[j], d0), d1), d2), d3);
  }
}

// The generic four-row step; specialized below for float32 and 16-bit rows where the instruction set allows.
template <class T>
inline void accumulate4(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                        const T* __restrict r3, const double* __restrict shift, double* __restrict s1,
                        double* __restrict s2, int64_t cols) {
  accumulate4_columns<T>(r0, r1, r2, r3, shift, s1, s2, cols);
}

#ifdef PROTONORM_KERNELS_X86_V3
// Elements with a float32 math type as float32 lanes, exactly: float16 through F16C, bfloat16 by a shift.
inline __m128 load4_f32(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4_f32(const Half* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m128 load4_f32(const BFloat16* p) {
  const __m128i bits = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_castsi128_ps(_mm_slli_epi32(bits, 16));
}
inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_f32(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8_f32(const BFloat16* p) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}

// accumulate4 for float32, float16 and bfloat16 rows, spelled out with 256-bit intrinsics: what g++ makes of the
// generic loop loads each float32 row twice (a 512-bit load split by a shuffle, plus a 256-bit load converted from
// memory), runs all the subtractions on the add pipes, which the conversions and the sums already keep busy, and
// does not vectorize the float16 decoding on AVX2. Here each subtraction is a fused multiply-subtract by one, run
// on the multiply pipes; x * 1 - s rounds once, exactly as x - s, and the loaders are exact, so the sums are
// bitwise those of the generic loop. Measured on a Zen 4 (bench/RESULTS.md): the moments of cached float32 rows
// 6% faster, the fused kernel 10% faster with the rows in cache; float16 rows on AVX2 several times faster.
static volatile double kOpaqueOne = 1.0;

template <class T>
inline void accumulate4_x86(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                            const T* __restrict r3, const double* __restrict shift, double* __restrict s1,
                            double* __restrict s2, int64_t cols) {
  // A 1 the compiler cannot see through (a volatile read), or it folds x * 1 - s back into a subtraction. (Not an
  // empty asm statement with the vector as operand: clang sizes such operands by the file's target, not the
  // function's, and rejects a 256-bit one.)
  __m256d one = _mm256_set1_pd(kOpaqueOne);
  int64_t j = 0;
  for (; j + 4 <= cols; j += 4) {
    const __m256d sh = _mm256_loadu_pd(shift + j);
    const __m256d d0 = _mm256_fmsub_pd(_mm256_cvtps_pd(load4_f32(r0 + j)), one, sh);
    const __m256d d1 = _mm256_fmsub_pd(_mm256_cvtps_pd(load4_f32(r1 + j)), one, sh);
    const __m256d d2 = _mm256_fmsub_pd(_mm256_cvtps_pd(load4_f32(r2 + j)), one, sh);
    const __m256d d3 = _mm256_fmsub_pd(_mm256_cvtps_pd(load4_f32(r3 + j)), one, sh);
    const __m256d sum = _mm256_add_pd(_mm256_add_pd(d0, d1), _mm256_add_pd(d2, d3));
    _mm256_storeu_pd(s1 + j, _mm256_add_pd(_mm256_loadu_pd(s1 + j), sum));
    __m256d squares = _mm256_loadu_pd(s2 + j);
    squares = _mm256_fmadd_pd(d0, d0, squares);
    squares = _mm256_fmadd_pd(d1, d1, squares);
    squares = _mm256_fmadd_pd(d2, d2, squares);
    squares = _mm256_fmadd_pd(d3, d3, squares);
    _mm256_storeu_pd(s2 + j, squares);
  }
  if (j < cols) accumulate4_columns<T>(r0 + j, r1 + j, r2 + j, r3 + j, shift + j, s1 + j, s2 + j, cols - j);
}

#ifdef PROTONORM_KERNELS_AVX512
// The last `m`-masked columns of a row as float32 lanes, the rest zero; a masked load reads nothing past the row.
inline __m256 load8_f32_masked(const float* p, __mmask8 m) { return _mm256_maskz_loadu_ps(m, p); }
inline __m256 load8_f32_masked(const Half* p, __mmask8 m) { return _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, p)); }
inline __m256 load8_f32_masked(const BFloat16* p, __mmask8 m) {
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}

// The step of accumulate4_x86 on eight columns in 512-bit vectors. (The conversions are spelled with an all-ones
// mask, which compiles to the same unmasked instruction: g++ 12 warns about the plain intrinsic's placeholder.)
inline void accumulate4_step(__m256 x0, __m256 x1, __m256 x2, __m256 x3, __m512d one, __m512d sh, __m512d& s1,
                             __m512d& s2) {
  const __m512d d0 = _mm512_fmsub_pd(_mm512_maskz_cvtps_pd(0xff, x0), one, sh);
  const __m512d d1 = _mm512_fmsub_pd(_mm512_maskz_cvtps_pd(0xff, x1), one, sh);
  const __m512d d2 = _mm512_fmsub_pd(_mm512_maskz_cvtps_pd(0xff, x2), one, sh);
  const __m512d d3 = _mm512_fmsub_pd(_mm512_maskz_cvtps_pd(0xff, x3), one, sh);
  s1 = _mm512_add_pd(s1, _mm512_add_pd(_mm512_add_pd(d0, d1), _mm512_add_pd(d2, d3)));
  s2 = _mm512_fmadd_pd(d0, d0, s2);
  s2 = _mm512_fmadd_pd(d1, d1, s2);
  s2 = _mm512_fmadd_pd(d2, d2, s2);
  s2 = _mm512_fmadd_pd(d3, d3, s2);
}

// accumulate4_x86 in 512-bit vectors, the last columns under a mask instead of a scalar loop: the same operations
// per column, so the same bits. Measured on a Zen 5, whose vector units are 512 bits wide (bench/RESULTS.md): a
// standalone loop of the sums took 1.27-1.39 ns per 16 elements against 1.51-1.93 ns in 256-bit vectors.
template <class T>
inline void accumulate4_avx512(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2,
                               const T* __restrict r3, const double* __restrict shift, double* __restrict s1,
                               double* __restrict s2, int64_t cols) {
  __m512d one = _mm512_set1_pd(kOpaqueOne);  // as in accumulate4_x86
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    __m512d sum = _mm512_loadu_pd(s1 + j), squares = _mm512_loadu_pd(s2 + j);
    accumulate4_step(load8_f32(r0 + j), load8_f32(r1 + j), load8_f32(r2 + j), load8_f32(r3 + j), one,
                     _mm512_loadu_pd(shift + j), sum, squares);
    _mm512_storeu_pd(s1 + j, sum);
    _mm512_storeu_pd(s2 + j, squares);
  }
  if (j < cols) {
    const __mmask8 m = static_cast<__mmask8>((1u << (cols - j)) - 1u);
    __m512d sum = _mm512_maskz_loadu_pd(m, s1 + j), squares = _mm512_maskz_loadu_pd(m, s2 + j);
    accumulate4_step(load8_f32_masked(r0 + j, m), load8_f32_masked(r1 + j, m), load8_f32_masked(r2 + j, m),
                     load8_f32_masked(r3 + j, m), one, _mm512_maskz_loadu_pd(m, shift + j), sum, squares);
    _mm512_mask_storeu_pd(s1 + j, m, sum);
    _mm512_mask_storeu_pd(s2 + j, m, squares);
  }
}
#define PROTONORM_ACCUMULATE4_FAST accumulate4_avx512
#else
#define PROTONORM_ACCUMULATE4_FAST accumulate4_x86
#endif

template <>
inline void accumulate4<float>(const float* __restrict r0, const float* __restrict r1, const float* __restrict r2,
                               const float* __restrict r3, const double* __restrict shift, double* __restrict s1,
                               double* __restrict s2, int64_t cols) {
  PROTONORM_ACCUMULATE4_FAST<float>(r0, r1, r2, r3, shift, s1, s2, cols);
}
template <>
inline void accumulate4<Half>(const Half* __restrict r0, const Half* __restrict r1, const Half* __restrict r2,
                              const Half* __restrict r3, const double* __restrict shift, double* __restrict s1,
                              double* __restrict s2, int64_t cols) {
  PROTONORM_ACCUMULATE4_FAST<Half>(r0, r1, r2, r3, shift, s1, s2, cols);
}
template <>
inline void accumulate4<BFloat16>(const BFloat16* __restrict r0, const BFloat16* __restrict r1,
                                  const BFloat16* __restrict r2, const BFloat16* __restrict r3,
                                  const double* __restrict shift, double* __restrict s1, double* __restrict s2,
                                  int64_t cols) {
  PROTONORM_ACCUMULATE4_FAST<BFloat16>(r0, r1, r2, r3, shift, s1, s2, cols);
}
#endif

template <class T>
inline void start_part(RowAccumulator& acc) {
  acc.n = 0.0;
  acc.dropped = 0.0;
  acc.num_pending = 0;
}

// A row that passed the finiteness test enters the part's sums.
template <class T>
inline void add_valid_row(RowAccumulator& acc, const T* row) {
  if (acc.n == 0.0) {
    set_shift<T>(row, acc.shift, acc.s1, acc.s2, acc.cols);
  } else {
    acc.pending[acc.num_pending++] = row;
    if (acc.num_pending == 4) {
      accumulate4<T>(static_cast<const T*>(acc.pending[0]), static_cast<const T*>(acc.pending[1]),
                     static_cast<const T*>(acc.pending[2]), static_cast<const T*>(acc.pending[3]), acc.shift,
                     acc.s1, acc.s2, acc.cols);
      acc.num_pending = 0;
    }
  }
  acc.n += 1.0;
}

// A part's m2 from its sums of shifted values, s2 - s1^2 / n: at least 0 (rounding can leave a constant column a
// hair below it), and inf where the squares overflowed float64 (inf - inf would be NaN; the reference's m2 is inf).
inline double shifted_m2(double s2, double s1_times_centered) {
  const double m = s2 - s1_times_centered;
  return m < 0.0 ? 0.0 : (m == m ? m : s2);
}

// Writes the part [n, dropped, mean(cols), m2(cols)].
template <class T>
inline void finish_part(RowAccumulator& acc, double* __restrict part) {
  for (int i = 0; i < acc.num_pending; ++i)
    accumulate1<T>(static_cast<const T*>(acc.pending[i]), acc.shift, acc.s1, acc.s2, acc.cols);
  acc.num_pending = 0;
  const int64_t cols = acc.cols;
  part[0] = acc.n;
  part[1] = acc.dropped;
  double* __restrict mean = part + 2;
  double* __restrict m2 = part + 2 + cols;
  if (acc.n == 0.0) {
    for (int64_t j = 0; j < cols; ++j) mean[j] = 0.0;
    for (int64_t j = 0; j < cols; ++j) m2[j] = 0.0;
    return;
  }
  const double n = acc.n;
  const double* __restrict shift = acc.shift;
  const double* __restrict s1 = acc.s1;
  const double* __restrict s2 = acc.s2;
  for (int64_t j = 0; j < cols; ++j) {
    const double centered = s1[j] / n;
    mean[j] = shift[j] + centered;
    m2[j] = shifted_m2(s2[j], s1[j] * centered);
  }
}

// Runs `row_step(acc, r)` over the rows of every part, threads splitting the parts; row_step must end each row
// with add_valid_row, a dropped count, or nothing (ignored row). kAllOrNothing as in parallel_dynamic, for a row_step
// that writes in place.
template <class T, bool kAllOrNothing = false, class RowStep>
inline void moments_by_rows(int64_t rows, int64_t cols, const PartsOut& parts, int threads, const Matrix& source,
                            const RowStep& row_step) {
  const int64_t width = 2 + 2 * cols;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = prefetch_distance(row_bytes, kMomentsPrefetchBytes);
  const int64_t source_bytes = cols * element_size(source.dtype);
  parallel_dynamic<kAllOrNothing>(parts.num_parts, 1, threads, [&](const auto& next) {
    RowAccumulator acc = row_accumulator(cols);
    int64_t p_begin, p_end;
    while (next(p_begin, p_end)) {
      const int64_t last_row = p_end * parts.rows_per_part < rows ? p_end * parts.rows_per_part : rows;
      for (int64_t p = p_begin; p < p_end; ++p) {
        start_part<T>(acc);
        const int64_t r_begin = p * parts.rows_per_part;
        const int64_t r_end = r_begin + parts.rows_per_part < rows ? r_begin + parts.rows_per_part : rows;
        for (int64_t r = r_begin; r < r_end; ++r) {
          if (r + ahead < last_row)
            prefetch_row(static_cast<const char*>(source.data) +
                             (r + ahead) * source.row_stride * element_size(source.dtype),
                         source_bytes);
          row_step(acc, r);
        }
        finish_part<T>(acc, parts.data + p * width);
      }
    }
  });
}

// --------------------------------------------------------------------------------------- moments, one column
// With a single feature the row loop would do one element of work per row; instead a first, op-specific loop
// writes each row's value and status (0 ignored, 1 dropped, 2 valid) to a buffer, and this reduction runs
// across rows in fixed lanes. (finish_column_part counts valid rows as status / 2 and dropped ones as status % 2.)
enum : uint8_t { kIgnored = 0, kDropped = 1, kValid = 2 };

inline void finish_column_part(double* __restrict values, const uint8_t* __restrict status, int64_t count,
                               double* __restrict part) {
  double shift = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    if (status[i] == kValid) {
      shift = values[i];
      break;
    }
  }
  // Counts, and every row that is not valid set to the shift (so that it adds exactly zero below): the lane loop
  // then runs on doubles alone. The counts use status / 2 (valid) and status % 2 (dropped), summed in 32 bits per
  // chunk, which vectorizes without widening every byte to 64 bits.
  int64_t n = 0, dropped = 0;
  for (int64_t begin = 0; begin < count; begin += (int64_t{1} << 30)) {
    const int64_t end = count - begin > (int64_t{1} << 30) ? begin + (int64_t{1} << 30) : count;
    uint32_t chunk_valid = 0, chunk_dropped = 0;
    for (int64_t i = begin; i < end; ++i) {
      chunk_valid += status[i] >> 1;
      chunk_dropped += status[i] & 1u;
    }
    n += chunk_valid;
    dropped += chunk_dropped;
  }
  for (int64_t i = 0; i < count; ++i) values[i] = status[i] == kValid ? values[i] : shift;
  // 32 lanes: four independent chains per vector lane, so the adds do not wait on each other's latency.
  constexpr int kLanes = 32;
  double lane1[kLanes], lane2[kLanes];
  for (int l = 0; l < kLanes; ++l) lane1[l] = lane2[l] = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double d = values[i + l] - shift;
      lane1[l] += d;
      lane2[l] = add_square(lane2[l], d);
    }
  }
  for (int l = 0; l < kLanes && i < count; ++i, ++l) {  // fewer than kLanes rows are left
    const double d = values[i] - shift;
    lane1[l] += d;
    lane2[l] = add_square(lane2[l], d);
  }
  double s1 = 0.0, s2 = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s1 += lane1[l];
    s2 += lane2[l];
  }
  part[0] = static_cast<double>(n);
  part[1] = static_cast<double>(dropped);
  if (n == 0) {
    part[2] = 0.0;
    part[3] = 0.0;
    return;
  }
  const double centered = s1 / static_cast<double>(n);
  part[2] = shift + centered;
  part[3] = shifted_m2(s2, s1 * centered);
}

// Runs `fill(r_begin, r_end, values, status)` for each part, then reduces it. kAllOrNothing as in parallel_dynamic,
// for a fill that writes in place.
template <bool kAllOrNothing = false, class Fill>
inline void moments_by_column(int64_t rows, const PartsOut& parts, int threads, const Fill& fill) {
  parallel_dynamic<kAllOrNothing>(parts.num_parts, 1, threads, [&](const auto& next) {
    // The longest part there is: a small batch in one big part must not allocate (and fault in) a buffer sized
    // for the part's nominal length.
    const int64_t longest = parts.rows_per_part < rows ? parts.rows_per_part : rows;
    const int64_t capacity = longest > 0 ? longest : 1;
    double* values = scratch_doubles(Scratch::kColumnValues, capacity);
    uint8_t* status = scratch_bytes(Scratch::kColumnStatus, capacity);
    int64_t p_begin, p_end;
    while (next(p_begin, p_end)) {
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t r_begin = p * parts.rows_per_part;
        const int64_t r_end = r_begin + parts.rows_per_part < rows ? r_begin + parts.rows_per_part : rows;
        const int64_t count = r_end > r_begin ? r_end - r_begin : 0;
        if (count > 0) fill(r_begin, r_end, values, status);
        finish_column_part(values, status, count, parts.data + p * 4);
      }
    }
  });
}

template <class T>
inline bool row_nonfinite(const T* __restrict row, int64_t cols) {
  typename Elem<T>::Bits largest = 0;
  for (int64_t j = 0; j < cols; ++j) largest = max_exponent(largest, row[j]);
  return largest == Elem<T>::kNonFinite;
}

template <class T>
void moments_typed(const MomentsArgs& a) {
  const Matrix& x = a.x;
  const uint8_t* mask = a.mask;
  const int64_t mask_stride = a.mask_stride;
  if (x.cols == 1) {
    const T* base = static_cast<const T*>(x.data);
    const int64_t stride = x.row_stride;
    moments_by_column(x.rows, a.parts, a.threads,
                      [&](int64_t r_begin, int64_t r_end, double* __restrict values, uint8_t* __restrict status) {
                        for (int64_t r = r_begin; r < r_end; ++r) {
                          const T v = base[r * stride];
                          const bool considered = mask == nullptr || mask[r * mask_stride] != 0;
                          values[r - r_begin] = static_cast<double>(Elem<T>::load(v));
                          status[r - r_begin] = !considered ? kIgnored : nonfinite<T>(v) ? kDropped : kValid;
                        }
                      });
    return;
  }
  moments_by_rows<T>(x.rows, x.cols, a.parts, a.threads, x, [&](RowAccumulator& acc, int64_t r) {
    if (mask != nullptr && mask[r * mask_stride] == 0) return;
    const T* row = row_ptr<const T>(x, r);
    if (row_nonfinite<T>(row, x.cols)) {
      acc.dropped += 1.0;
      return;
    }
    add_valid_row<T>(acc, row);
  });
}

void moments(const MomentsArgs& a) {
  switch (a.x.dtype) {
    case kFloat32: return moments_typed<float>(a);
    case kFloat64: return moments_typed<double>(a);
    case kFloat16: return moments_typed<Half>(a);
    case kBFloat16: return moments_typed<BFloat16>(a);
    default: return;  // validated by the caller
  }
}

// ----------------------------------------------------------------------------------------------- normalize
// Output math type: float32 for 16- and 32-bit input, float64 for float64 input (promote_types(x, float32)).
template <class T>
struct OutOf {
  using type = float;
};
template <>
struct OutOf<double> {
  using type = double;
};

// The generic loop of normalize_row below.
template <class T, bool kCenter, bool kClamp, bool kCheck>
inline bool normalize_columns(const T* __restrict x, typename OutOf<T>::type* __restrict y,
                              const float* __restrict mean, const float* __restrict stddev,
                              typename OutOf<T>::type hi, int64_t cols) {
  using M = typename OutOf<T>::type;
  const M lo = -hi;
  typename Elem<T>::Bits largest = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const T raw = x[j];
    const M v = static_cast<M>(Elem<T>::load(raw));
    const M centered = kCenter ? v - static_cast<M>(mean[j]) : v;
    M out = centered / static_cast<M>(stddev[j]);
    if (kClamp) {
      out = out < lo ? lo : out;
      out = out > hi ? hi : out;
    }
    y[j] = out;
    if (kCheck) largest = max_exponent(largest, raw);
  }
  return largest == Elem<T>::kNonFinite;
}

#ifdef PROTONORM_KERNELS_X86_V3
// normalize_columns for float32, float16 and bfloat16 rows in 256-bit vectors, whatever width the rest of the file
// prefers: on the Zen 4 this was measured on, 512-bit divisions make the AVX-512 build's float32 normalize 10-15%
// slower than 256-bit ones with the rows in cache (on a Zen 5, 4-13% slower in the fused kernel), and g++ does not
// vectorize the float16 decoding on AVX2. The same operations in the same order as the generic loop, so the same
// bits: max(lo, v) and min(hi, v) return v unless the bound is strictly beyond it, NaN included, exactly as the
// generic selects; a NaN/inf element has the all-ones float32 exponent after its exact widening, as before it.
//
// kStream writes the row's whole 64-byte lines with non-temporal stores, which go to memory without first reading
// each line into the cache; the caller ends its thread's work with stream_fence().
//
// A load whose address matches a pending earlier store in its low 12 bits waits for that store (4K aliasing). An
// output allocated by torch often starts 64 or 128 bytes after its float32 input modulo 4 KB (both mmap'd blocks
// with the same header): loaded in step with the stores, nearly every load would then follow the store it aliases
// with. For such outputs the main loops load each 16 columns two steps before they store them. Measured on a Zen 3
// with the caches emptied before each call (bench/RESULTS.md), 64 bytes apart: normalize 8-13% faster, the fused
// kernel 2-6%. Where nothing aliases, loading ahead gained nothing and cost the fused kernel 2-3% (from run to
// run within the noise of this VM), so there the loops load in step as before.
template <class T, bool kCenter, bool kClamp, bool kCheck, bool kStream>
inline bool normalize_columns_x86(const T* __restrict x, float* __restrict y, const float* __restrict mean,
                                  const float* __restrict stddev, float hi, int64_t cols) {
  const __m256 upper = _mm256_set1_ps(hi);
  const __m256 lower = _mm256_set1_ps(-hi);
  const __m256i exponent = _mm256_set1_epi32(static_cast<int>(Elem<float>::kNonFinite));
  __m256i largest = _mm256_setzero_si256();
  const auto compute = [&](int64_t j, __m256 v) PROTONORM_ALWAYS_INLINE {
    const __m256 centered = kCenter ? _mm256_sub_ps(v, _mm256_loadu_ps(mean + j)) : v;
    __m256 out = _mm256_div_ps(centered, _mm256_loadu_ps(stddev + j));
    if (kClamp) out = _mm256_min_ps(upper, _mm256_max_ps(lower, out));
    if (kCheck) largest = _mm256_max_epu32(largest, _mm256_and_si256(_mm256_castps_si256(v), exponent));
    return out;
  };
  int64_t j = 0;
#ifdef PROTONORM_KERNELS_AVX512
  // Up to eight columns under a mask. Masked lanes are neither computed, so they raise no floating-point flags, nor
  // stored.
  const auto masked = [&](int64_t j, int64_t count) PROTONORM_ALWAYS_INLINE {
    const __mmask8 m = static_cast<__mmask8>((1u << count) - 1u);
    const __m256 v = load8_f32_masked(x + j, m);
    const __m256 centered = kCenter ? _mm256_maskz_sub_ps(m, v, _mm256_maskz_loadu_ps(m, mean + j)) : v;
    __m256 out = _mm256_maskz_div_ps(m, centered, _mm256_maskz_loadu_ps(m, stddev + j));
    if (kClamp) out = _mm256_min_ps(upper, _mm256_max_ps(lower, out));
    _mm256_mask_storeu_ps(y + j, m, out);
    if (kCheck) largest = _mm256_max_epu32(largest, _mm256_and_si256(_mm256_castps_si256(v), exponent));
  };
#endif
  // Columns from j in steps of 16 while 32 or more are left, each step's `store(k, v)` after the loads of the next
  // two steps; only for float32 rows whose output starts 1-256 bytes after them modulo 4 KB (see above).
  const uintptr_t lead = (reinterpret_cast<uintptr_t>(y) - reinterpret_cast<uintptr_t>(x)) & 4095;
  const bool aliasing = sizeof(T) == sizeof(float) && lead > 0 && lead <= 256;
  const auto sweep = [&](const auto& store) PROTONORM_ALWAYS_INLINE {
    if (!aliasing || j + 32 > cols) return;
    __m256 a0 = load8_f32(x + j), a1 = load8_f32(x + j + 8);
    __m256 b0 = load8_f32(x + j + 16), b1 = load8_f32(x + j + 24);
    for (; j + 48 <= cols; j += 16) {
      const __m256 c0 = load8_f32(x + j + 32), c1 = load8_f32(x + j + 40);
      store(j, a0);
      store(j + 8, a1);
      a0 = b0;
      a1 = b1;
      b0 = c0;
      b1 = c1;
    }
    store(j, a0);
    store(j + 8, a1);
    store(j + 16, b0);
    store(j + 24, b1);
    j += 32;  // fewer than 16 columns are left
  };
  bool nonfinite = false;
  if (kStream) {
    // Plain stores up to the first 64-byte boundary, then whole lines as two non-temporal halves each; a line that
    // a row shares with the next is left to plain stores, so no line gets both kinds.
    const uintptr_t address = reinterpret_cast<uintptr_t>(y);
    const int64_t head = static_cast<int64_t>((64 - (address & 63)) & 63) / 4;
    if (address % 4 == 0 && head + 16 <= cols) {  // the bindings refuse misaligned outputs; a guard all the same
#ifdef PROTONORM_KERNELS_AVX512
      for (; j < head; j += 8) masked(j, head - j < 8 ? head - j : 8);
#else
      if (head > 0) nonfinite = normalize_columns<T, kCenter, kClamp, kCheck>(x, y, mean, stddev, hi, head);
#endif
      j = head;
      sweep([&](int64_t k, __m256 v) PROTONORM_ALWAYS_INLINE { _mm256_stream_ps(y + k, compute(k, v)); });
      for (; j + 16 <= cols; j += 16) {
        _mm256_stream_ps(y + j, compute(j, load8_f32(x + j)));
        _mm256_stream_ps(y + j + 8, compute(j + 8, load8_f32(x + j + 8)));
      }
    }
  }
  sweep([&](int64_t k, __m256 v) PROTONORM_ALWAYS_INLINE { _mm256_storeu_ps(y + k, compute(k, v)); });
  for (; j + 8 <= cols; j += 8) _mm256_storeu_ps(y + j, compute(j, load8_f32(x + j)));
#ifdef PROTONORM_KERNELS_AVX512
  // The last columns under a mask instead of a scalar loop (a sixth of the time at 342 features otherwise).
  if (j < cols) {
    masked(j, cols - j);
    j = cols;
  }
#endif
  if (kCheck) nonfinite |= _mm256_movemask_epi8(_mm256_cmpeq_epi32(largest, exponent)) != 0;
  if (j < cols)
    nonfinite |= normalize_columns<T, kCenter, kClamp, kCheck>(x + j, y + j, mean + j, stddev + j, hi, cols - j);
  return nonfinite;
}
#endif

// Makes a thread's non-temporal stores visible before it leaves the kernel.
inline void stream_fence() {
#ifdef PROTONORM_KERNELS_X86_V3
  _mm_sfence();
#endif
}

// One row of `clamp((x - mean) / std)` (or the scale-only `x / std`) into y; returns whether x held a NaN/inf when
// kCheck (for the fused moments), which costs one compare per element. kStream asks for non-temporal stores where
// the instruction set has them (see normalize_columns_x86).
template <class T, bool kCenter, bool kClamp, bool kCheck, bool kStream = false>
inline bool normalize_row(const T* __restrict x, typename OutOf<T>::type* __restrict y, const float* __restrict mean,
                          const float* __restrict stddev, typename OutOf<T>::type hi, int64_t cols) {
#ifdef PROTONORM_KERNELS_X86_V3
  if constexpr (std::is_same<typename OutOf<T>::type, float>::value)
    return normalize_columns_x86<T, kCenter, kClamp, kCheck, kStream>(x, y, mean, stddev, hi, cols);
#endif
  return normalize_columns<T, kCenter, kClamp, kCheck>(x, y, mean, stddev, hi, cols);
}

// One row of un_norm: clamp x (bounds rounded to x's dtype, as torch.clamp on x does), then `x * std + mean`
// (two roundings, as the reference's separate multiply and add).
template <class T, bool kCenter, bool kClamp>
inline void unnormalize_row(const T* __restrict x, typename OutOf<T>::type* __restrict y,
                            const float* __restrict mean, const float* __restrict stddev,
                            typename OutOf<T>::type hi, int64_t cols) {
  using M = typename OutOf<T>::type;
  const M lo = -hi;
  for (int64_t j = 0; j < cols; ++j) {
    M v = static_cast<M>(Elem<T>::load(x[j]));
    if (kClamp) {
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
    }
    const M scaled = v * static_cast<M>(stddev[j]);
    y[j] = kCenter ? scaled + static_cast<M>(mean[j]) : scaled;
  }
}

template <class T, bool kUnNorm, bool kCenter, bool kClamp, bool kStream = false>
void normalize_rows(const NormalizeArgs& a) {
  using M = typename OutOf<T>::type;
  const Matrix& x = a.x;
  const Matrix& out = a.out;
  const NormalizeParams& p = a.params;
  const M hi = static_cast<M>(p.clamp_value);
  const int64_t grain = x.cols > 0 && x.cols < (int64_t{1} << 15) ? (int64_t{1} << 15) / x.cols : 1;
  parallel_dynamic(x.rows, grain, a.threads, [&](const auto& next) {
    int64_t r_begin, r_end;
    while (next(r_begin, r_end)) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const T* xr = row_ptr<const T>(x, r);
        M* yr = row_ptr<M>(out, r);
        if (kUnNorm)
          unnormalize_row<T, kCenter, kClamp>(xr, yr, p.mean, p.stddev, hi, x.cols);
        else
          normalize_row<T, kCenter, kClamp, false, kStream>(xr, yr, p.mean, p.stddev, hi, x.cols);
      }
    }
    if (kStream) stream_fence();
  });
}

template <class T>
void normalize_typed(const NormalizeArgs& a) {
  const NormalizeParams& p = a.params;
  const int variant = (p.un_norm ? 4 : 0) | (p.center ? 2 : 0) | (p.clamp ? 1 : 0);
  if (a.stream && !p.un_norm) {
    switch (variant) {
      case 0: return normalize_rows<T, false, false, false, true>(a);
      case 1: return normalize_rows<T, false, false, true, true>(a);
      case 2: return normalize_rows<T, false, true, false, true>(a);
      default: return normalize_rows<T, false, true, true, true>(a);
    }
  }
  switch (variant) {
    case 0: return normalize_rows<T, false, false, false>(a);
    case 1: return normalize_rows<T, false, false, true>(a);
    case 2: return normalize_rows<T, false, true, false>(a);
    case 3: return normalize_rows<T, false, true, true>(a);
    case 4: return normalize_rows<T, true, false, false>(a);
    case 5: return normalize_rows<T, true, false, true>(a);
    case 6: return normalize_rows<T, true, true, false>(a);
    default: return normalize_rows<T, true, true, true>(a);
  }
}

void normalize(const NormalizeArgs& a) {
  switch (a.x.dtype) {
    case kFloat32: return normalize_typed<float>(a);
    case kFloat64: return normalize_typed<double>(a);
    case kFloat16: return normalize_typed<Half>(a);
    case kBFloat16: return normalize_typed<BFloat16>(a);
    default: return;
  }
}

// ------------------------------------------------------------------------------------- normalize + moments
// Rows are taken in blocks of about `block_bytes` of input (sized to the L2 cache by the caller). Each block is
// first normalized row by row, which streams the input and the output sequentially and notes which rows hold a
// NaN/inf; the same rows then enter the moments from cache, exactly as moments_by_rows feeds them, so the parts
// are bit-for-bit those of a separate `moments` call. Measured on the CPUs this was written on: sweeping four rows
// at once (one read for both uses) is faster only while everything fits in cache; once the batch streams from
// memory, its four interleaved write streams make it up to 1.6x slower than this two-pass block at a few hundred
// columns, and no faster at a thousand.
template <class T, bool kClamp, bool kStream>
void normalize_moments_typed(const NormalizeMomentsArgs& a) {
  using M = typename OutOf<T>::type;
  const Matrix& x = a.x;
  const Matrix& out = a.out;
  const NormalizeParams& p = a.params;
  const M hi = static_cast<M>(p.clamp_value);
  if (x.cols == 1) {
    const T* base = static_cast<const T*>(x.data);
    M* obase = static_cast<M*>(out.data);
    const int64_t stride = x.row_stride;
    const int64_t ostride = out.row_stride;
    const M mean = static_cast<M>(p.mean[0]);
    const M sd = static_cast<M>(p.stddev[0]);
    const M lo = -hi;
    moments_by_column(x.rows, a.parts, a.threads,
                      [&](int64_t r_begin, int64_t r_end, double* __restrict values, uint8_t* __restrict status) {
                        for (int64_t r = r_begin; r < r_end; ++r) {
                          const T raw = base[r * stride];
                          const M v = static_cast<M>(Elem<T>::load(raw));
                          M y = (v - mean) / sd;
                          if (kClamp) {
                            y = y < lo ? lo : y;
                            y = y > hi ? hi : y;
                          }
                          obase[r * ostride] = y;
                          values[r - r_begin] = static_cast<double>(v);
                          status[r - r_begin] = nonfinite<T>(raw) ? kDropped : kValid;
                        }
                      });
    return;
  }
  const int64_t cols = x.cols;
  const int64_t rows = x.rows;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  const int64_t fit = a.block_bytes / (row_bytes > 0 ? row_bytes : 1);
  const int64_t block = fit < 4 ? 4 : fit;
  const int64_t ahead = prefetch_distance(row_bytes, kNormalizePrefetchBytes);
  const int64_t width = 2 + 2 * cols;
  const PartsOut& parts = a.parts;
  parallel_dynamic(parts.num_parts, 1, a.threads, [&](const auto& next) {
    uint8_t* bad = scratch_bytes(Scratch::kBadRows, block);
    RowAccumulator acc = row_accumulator(cols);
    int64_t p_begin, p_end;
    while (next(p_begin, p_end)) {
      for (int64_t q = p_begin; q < p_end; ++q) {
        start_part<T>(acc);
        const int64_t r_begin = q * parts.rows_per_part;
        const int64_t r_end = r_begin + parts.rows_per_part < rows ? r_begin + parts.rows_per_part : rows;
        for (int64_t b = r_begin; b < r_end; b += block) {
          const int64_t b_end = b + block < r_end ? b + block : r_end;
          for (int64_t r = b; r < b_end; ++r) {
            if (r + ahead < r_end) prefetch_row(row_ptr<const T>(x, r + ahead), row_bytes);
            bad[r - b] = normalize_row<T, true, kClamp, true, kStream>(row_ptr<const T>(x, r), row_ptr<M>(out, r),
                                                                        p.mean, p.stddev, hi, cols);
          }
          for (int64_t r = b; r < b_end; ++r) {
            if (bad[r - b])
              acc.dropped += 1.0;
            else
              add_valid_row<T>(acc, row_ptr<const T>(x, r));
          }
        }
        finish_part<T>(acc, parts.data + q * width);
      }
    }
    if (kStream) stream_fence();
  });
}

template <class T>
void normalize_moments_variant(const NormalizeMomentsArgs& a) {
  const int variant = (a.params.clamp ? 2 : 0) | (a.stream ? 1 : 0);
  switch (variant) {
    case 0: return normalize_moments_typed<T, false, false>(a);
    case 1: return normalize_moments_typed<T, false, true>(a);
    case 2: return normalize_moments_typed<T, true, false>(a);
    default: return normalize_moments_typed<T, true, true>(a);
  }
}

void normalize_moments(const NormalizeMomentsArgs& a) {
  switch (a.x.dtype) {
    case kFloat32: return normalize_moments_variant<float>(a);
    case kFloat64: return normalize_moments_variant<double>(a);
    case kFloat16: return normalize_moments_variant<Half>(a);
    case kBFloat16: return normalize_moments_variant<BFloat16>(a);
    default: return;
  }
}

// ------------------------------------------------------------------------------------------ reward + moments
// discounted = (reset ? 0 : discounted * gamma) + reward, in the dtypes the reference computes in: the product in
// the discounted dtype (gamma rounded to it), the sum in promote_types(discounted, reward), stored back rounded.
template <class D, class R>
struct RewardMath {
  using type = float;
};
template <class R>
struct RewardMath<double, R> {
  using type = double;
};
template <>
struct RewardMath<float, double> {
  using type = double;
};

template <class D, class R>
inline D discounted_step(D previous, R reward, bool reset, D gamma) {
  using P = typename RewardMath<D, R>::type;
  D carried = previous * gamma;
  carried = reset ? D(0) : carried;
  return static_cast<D>(static_cast<P>(carried) + static_cast<P>(Elem<R>::load(reward)));
}

template <class D, class R>
void reward_moments_typed(const RewardArgs& a) {
  const Matrix& rew = a.reward;
  const Matrix& disc = a.discounted;
  const uint8_t* reset = a.reset;
  const D gamma = static_cast<D>(a.gamma);
  if (disc.cols == 1) {
    const R* rbase = static_cast<const R*>(rew.data);
    D* dbase = static_cast<D*>(disc.data);
    const int64_t rstride = rew.row_stride;
    const int64_t dstride = disc.row_stride;
    moments_by_column<true>(disc.rows, a.parts, a.threads,
                      [&](int64_t r_begin, int64_t r_end, double* __restrict values, uint8_t* __restrict status) {
                        if (rstride == 1 && dstride == 1) {  // the usual [num_envs] vectors: a loop that vectorizes
                          const R* __restrict x = rbase + r_begin;
                          D* __restrict d = dbase + r_begin;
                          const uint8_t* __restrict restart = reset + r_begin;
                          for (int64_t i = 0; i < r_end - r_begin; ++i) {
                            const D v = discounted_step<D, R>(d[i], x[i], restart[i] != 0, gamma);
                            d[i] = v;
                            values[i] = static_cast<double>(v);
                            status[i] = nonfinite<D>(v) ? kDropped : kValid;
                          }
                          return;
                        }
                        for (int64_t r = r_begin; r < r_end; ++r) {
                          const D v = discounted_step<D, R>(dbase[r * dstride], rbase[r * rstride], reset[r] != 0,
                                                            gamma);
                          dbase[r * dstride] = v;
                          values[r - r_begin] = static_cast<double>(v);
                          status[r - r_begin] = nonfinite<D>(v) ? kDropped : kValid;
                        }
                      });
    return;
  }
  const int64_t cols = disc.cols;
  moments_by_rows<D, true>(disc.rows, cols, a.parts, a.threads, disc, [&](RowAccumulator& acc, int64_t r) {
    D* __restrict d = row_ptr<D>(disc, r);
    const R* __restrict x = row_ptr<const R>(rew, r);
    const bool restart = reset[r] != 0;
    typename Elem<D>::Bits largest = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const D v = discounted_step<D, R>(d[j], x[j], restart, gamma);
      d[j] = v;
      largest = max_exponent(largest, v);
    }
    if (largest == Elem<D>::kNonFinite) {
      acc.dropped += 1.0;
      return;
    }
    add_valid_row<D>(acc, d);
  });
}

template <class D>
void reward_moments_disc(const RewardArgs& a) {
  switch (a.reward.dtype) {
    case kFloat32: return reward_moments_typed<D, float>(a);
    case kFloat64: return reward_moments_typed<D, double>(a);
    case kFloat16: return reward_moments_typed<D, Half>(a);
    case kBFloat16: return reward_moments_typed<D, BFloat16>(a);
    default: return;
  }
}

void reward_moments(const RewardArgs& a) {
  if (a.discounted.dtype == kFloat64)
    reward_moments_disc<double>(a);
  else
    reward_moments_disc<float>(a);
}

// ------------------------------------------------------------------------------------------------ merge
// delta^2 * weight, and exactly 0 for a zero weight (an empty side, which is neutral) also where delta^2 overflows
// and inf * 0 would be NaN: the reference's chan_merge.
inline double cross_term(double delta, double weight) { return weight > 0.0 ? delta * delta * weight : 0.0; }

// The reference's chan_merge for one pair of parts over a range of columns, with its operation order:
// mean = mean_a + delta * (n_b / n), m2 = (m2_a + m2_b) + delta^2 * (n_a * n_b / n). `out` may alias `a`.
inline void chan_merge_columns(const double* mean_a, const double* m2_a, const double* mean_b, const double* m2_b,
                               double* mean_out, double* m2_out, double weight_mean, double weight_m2,
                               int64_t c_begin, int64_t c_end) {
  for (int64_t j = c_begin; j < c_end; ++j) {
    const double delta = mean_b[j] - mean_a[j];
    const double m2 = m2_a[j] + m2_b[j];
    mean_out[j] = mean_a[j] + delta * weight_mean;
    m2_out[j] = m2 + cross_term(delta, weight_m2);
  }
}

inline double safe_count(double n) { return n > 0.0 ? n : 1.0; }

void merge(const MergeArgs& a) {
  const int64_t k = a.num_parts;
  const int64_t cols = a.cols;
  const int64_t stride = a.parts_stride;
  const double* parts = a.parts;
  double dropped_b = 0.0;
  for (int64_t p = 0; p < k; ++p) dropped_b += parts[p * stride + 1];
  // Where the combined mean / m2 end up: the only part itself, or slot 0 of the scratch.
  const double* mean_b = parts + 2;
  const double* m2_b = parts + 2 + cols;
  if (k > 1) {
    mean_b = a.scratch;
    m2_b = a.scratch + cols;
  }
  // The counts of the tree's nodes, level after level (k, then (k + 1) / 2, ... down to 1: under 2k + 64 in all),
  // computed here once; the parallel region below only reads them and allocates nothing, so nothing can stop it
  // half way through the statistics.
  double* counts = a.counts;
  for (int64_t p = 0; p < k; ++p) counts[p] = parts[p * stride];
  int64_t root = 0;
  for (int64_t level = 0, len = k; len > 1; level += len, len = (len + 1) / 2) {
    double* next = counts + level + len;
    for (int64_t i = 0; i + 1 < len; i += 2) next[i / 2] = counts[level + i] + counts[level + i + 1];
    if (len % 2) next[(len - 1) / 2] = counts[level + len - 1];
    root = level + len;
  }
  const double n_b = k > 0 ? counts[root] : 0.0;
  const int64_t n_current = a.count != nullptr ? *a.count : 0;
  parallel_ranges(cols, a.threads, [&](int64_t c_begin, int64_t c_end) {
    double* scratch = a.scratch;
    const double* ns = counts;
    int64_t len = k;
    bool first_level = true;
    while (len > 1) {
      for (int64_t i = 0; i + 1 < len; i += 2) {
        const double na = ns[i], nb = ns[i + 1];
        const double n = ns[len + i / 2];
        const double weight_mean = nb / safe_count(n);
        const double weight_m2 = na * nb / safe_count(n);
        const double* src_a = first_level ? parts + i * stride + 2 : scratch + i * 2 * cols;
        const double* src_b = first_level ? parts + (i + 1) * stride + 2 : scratch + (i + 1) * 2 * cols;
        double* dst = scratch + (i / 2) * 2 * cols;
        chan_merge_columns(src_a, src_a + cols, src_b, src_b + cols, dst, dst + cols, weight_mean, weight_m2,
                           c_begin, c_end);
      }
      if (len % 2) {
        const int64_t last = len - 1;
        const double* src = first_level ? parts + last * stride + 2 : scratch + last * 2 * cols;
        double* dst = scratch + (last / 2) * 2 * cols;
        for (int64_t j = c_begin; j < c_end; ++j) {
          dst[j] = src[j];
          dst[cols + j] = src[cols + j];
        }
      }
      ns += len;
      len = (len + 1) / 2;
      first_level = false;
    }
    if (a.combined != nullptr) {
      for (int64_t j = c_begin; j < c_end; ++j) {
        a.combined[2 + j] = mean_b[j];
        a.combined[2 + cols + j] = m2_b[j];
      }
      return;
    }
    if (!(n_b > 0.0)) return;  // no valid row: the statistics stay bit-for-bit as they were
    double* mean = a.mean;
    double* var = a.var;
    const int64_t ms = a.mean_stride, vs = a.var_stride;
    if (a.ema) {
      const double d = a.ema_decay;
      const double rest = 1.0 - d;
      const double batch_n = n_b < 1.0 ? 1.0 : n_b;
      for (int64_t j = c_begin; j < c_end; ++j) {
        const double batch_var = m2_b[j] / batch_n;
        mean[j * ms] = d * mean[j * ms] + rest * mean_b[j];
        var[j * vs] = d * var[j * vs] + rest * batch_var;
      }
      return;
    }
    const double n_a = static_cast<double>(n_current);
    const double n = n_a + n_b;
    const double weight_mean = n_b / safe_count(n);
    const double weight_m2 = n_a * n_b / safe_count(n);
    const double divisor = safe_count(n);
    for (int64_t j = c_begin; j < c_end; ++j) {
      const double m = mean[j * ms];
      const double delta = mean_b[j] - m;
      const double m2 = var[j * vs] * n_a + m2_b[j];
      const double new_m2 = m2 + cross_term(delta, weight_m2);
      const double new_var = new_m2 / divisor;
      mean[j * ms] = m + delta * weight_mean;
      var[j * vs] = new_var < 0.0 ? 0.0 : new_var;  // NaN stays NaN, as torch.clamp(min=0)
    }
  });
  if (a.combined != nullptr) {
    a.combined[0] = n_b;
    a.combined[1] = dropped_b;
    return;
  }
  if (!a.ema) *a.count += static_cast<int64_t>(n_b);
  *a.dropped += static_cast<int64_t>(dropped_b);
}
