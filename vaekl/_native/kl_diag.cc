// Per-row KL(N(mean, diag e^log_var) || N(0, I)) for float32 [rows, dim] arrays, one pass.
//
// XLA:CPU does not fuse this reduction into one vectorised loop (see BENCHMARKS.md);
// this kernel reads each input once and splits rows over XLA's intra-op threads.
// Per element it computes mean^2 + (e^x - 1 - x), x = log_var, from a vectorisable
// exp whose range reduction keeps e^x - 1 - x free of cancellation near 0.
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ln 2 split Cody-Waite style: k * kLn2Hi is exact for the k that occur here.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kLog2e = 1.44269504088896341f;
// Below kLow, e^x is below float32's resolution of -1 - x; above kBig, 1 + x is below
// e^x's; above kHigh (> log FLT_MAX = 88.72), e^x overflows.
constexpr float kLow = -87.0f, kBig = 88.0f, kHigh = 88.75f;

// e^x - 1 - x from exp's own range reduction, x = k ln2 + r with |r| <= ln2/2:
//   e^x - 1 - x = (2^k - 1 - k ln2) + (2^k - 1) r + 2^k r^2 Q(r),
// Q(r) = (e^r - 1 - r)/r^2 by its Taylor series to r^5 (truncation below 8e-8).
// For |x| < ln2/2, k = 0 and this is r^2 Q(r) with r = x exactly: no cancellation
// near 0 and exactly 0 at 0; elsewhere the three terms lose at most ~5x in rounding.
// Above kBig (k up to 128, where 2^k alone overflows) it is e^r 2^k, formed without
// overflowing before the result does; below kLow, -1 - x (x is clamped to kLow and
// the result shifted by the difference). NaN propagates.
#ifdef __AVX512F__
// On 16 lanes with AVX-512's own rounding (vrndscaleps) and 2^k scaling (vscalefps,
// which forms e^r 2^k without an overflowing 2^k): 1.5x faster than the compiler's
// vectorisation of the scalar form below (measured on Zen 4).
struct Parts {
  __m512 k, r, q, r2, value;  // value: e^x - 1 - x, valid for |x| <= -kLow = 87.
};

inline Parts Core16(__m512 x) {
  Parts p;
  p.k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  p.r = _mm512_fnmadd_ps(p.k, _mm512_set1_ps(kLn2Hi), x);
  p.r = _mm512_fnmadd_ps(p.k, _mm512_set1_ps(kLn2Lo), p.r);
  p.q = _mm512_set1_ps(1.0f / 5040.0f);
  p.q = _mm512_fmadd_ps(p.q, p.r, _mm512_set1_ps(1.0f / 720.0f));
  p.q = _mm512_fmadd_ps(p.q, p.r, _mm512_set1_ps(1.0f / 120.0f));
  p.q = _mm512_fmadd_ps(p.q, p.r, _mm512_set1_ps(1.0f / 24.0f));
  p.q = _mm512_fmadd_ps(p.q, p.r, _mm512_set1_ps(1.0f / 6.0f));
  p.q = _mm512_fmadd_ps(p.q, p.r, _mm512_set1_ps(0.5f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 two_k = _mm512_scalef_ps(one, p.k);
  const __m512 t = _mm512_sub_ps(two_k, one);
  __m512 c = _mm512_fnmadd_ps(p.k, _mm512_set1_ps(kLn2Hi), t);
  c = _mm512_fnmadd_ps(p.k, _mm512_set1_ps(kLn2Lo), c);
  p.r2 = _mm512_mul_ps(p.r, p.r);
  p.value = _mm512_fmadd_ps(_mm512_mul_ps(two_k, p.r2), p.q, _mm512_fmadd_ps(t, p.r, c));
  return p;
}

// Any x, NaN and +-inf included.
inline __m512 Expm1mx16(__m512 x) {
  // max/min return their second operand when either is NaN: a NaN x stays NaN.
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(kHigh), _mm512_max_ps(_mm512_set1_ps(kLow), x));
  const Parts p = Core16(xc);
  const __mmask16 big = _mm512_cmp_ps_mask(xc, _mm512_set1_ps(kBig), _CMP_GT_OQ);
  const __m512 e_r = _mm512_fmadd_ps(p.r2, p.q, _mm512_add_ps(_mm512_set1_ps(1.0f), p.r));
  __m512 out = _mm512_mask_scalef_ps(p.value, big, e_r, p.k);
  out = _mm512_add_ps(out, _mm512_sub_ps(xc, x));
  return _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(x, _mm512_set1_ps(kHigh), _CMP_GT_OQ),
                            _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}

// Sum over one row of mean^2 + e^x - 1 - x, 16 lanes at a time (the tail masked).
// kAnyX: Expm1mx16 for every x; else Core16, and `out_of_range` flags any |x| > 87
// or NaN, for which the caller redoes the row with kAnyX.
template <bool kAnyX>
inline __m512 RowTerms(const float* m, const float* v, int64_t dim, __mmask16 tail,
                       __mmask16* out_of_range) {
  const __m512 limit = _mm512_set1_ps(-kLow);
  __m512 acc = _mm512_setzero_ps();
  __mmask16 bad = 0;
  auto add = [&](__m512 mj, __m512 vj, __mmask16 lanes) {
    __m512 e;
    if (kAnyX) {
      e = Expm1mx16(vj);
    } else {
      bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(vj), limit, _CMP_NLE_UQ);
      e = Core16(vj).value;
    }
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(lanes, _mm512_fmadd_ps(mj, mj, e)));
  };
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) add(_mm512_loadu_ps(m + j), _mm512_loadu_ps(v + j), 0xFFFF);
  if (tail) add(_mm512_maskz_loadu_ps(tail, m + j), _mm512_maskz_loadu_ps(tail, v + j), tail);
  *out_of_range = bad;
  return acc;
}

void rows_kl(const float* mean, const float* log_var, float* out, int64_t begin, int64_t end,
             int64_t dim) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim % 16)) - 1);
  for (int64_t i = begin; i < end; ++i) {
    const float* m = mean + i * dim;
    const float* v = log_var + i * dim;
    __mmask16 out_of_range;
    // Log-variances beyond +-87 are rare: their rows take the slower form that handles them.
    __m512 acc = RowTerms<false>(m, v, dim, tail, &out_of_range);
    if (out_of_range) acc = RowTerms<true>(m, v, dim, tail, &out_of_range);
    out[i] = 0.5f * _mm512_reduce_add_ps(acc);
  }
}
#else
inline float expm1mx(float x) {
  const float xc = x < kLow ? kLow : (x > kHigh ? kHigh : x);  // Not fmin: a libm call.
  // Round to nearest by the 1.5 * 2^23 trick (|x log2 e| < 2^22): vectorises, unlike nearbyint.
  const float k = (xc * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  int32_t bits = (static_cast<int32_t>(k) + 126) << 23;  // 2^(k-1): finite for k <= 128.
  float half;
  std::memcpy(&half, &bits, sizeof(half));
  const float two_k = 2.0f * half;
  const float c = ((two_k - 1.0f) - k * kLn2Hi) - k * kLn2Lo;
  const float r2 = r * r;
  const float small = (c + (two_k - 1.0f) * r) + two_k * r2 * q;
  const float big = (((1.0f + r) + r2 * q) * half) * 2.0f;
  const float out = (xc > kBig ? big : small) + (xc - x);
  return x > kHigh ? std::numeric_limits<float>::infinity() : out;
}

void rows_kl(const float* mean, const float* log_var, float* out, int64_t begin, int64_t end,
             int64_t dim) {
  for (int64_t i = begin; i < end; ++i) {
    const float* m = mean + i * dim;
    const float* v = log_var + i * dim;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < dim; ++j) acc += m[j] * m[j] + expm1mx(v[j]);
    out[i] = 0.5f * acc;
  }
}
#endif

// Runs fn(task) for every task in [0, tasks) and returns when all are done. The
// caller and pool helpers claim tasks from a shared counter, so the caller waits
// only for tasks already running: when every pool thread is busy (say, running
// another kernel that waits in here), the caller does all the tasks itself and
// nothing deadlocks. A helper that starts after every task is claimed touches
// only the shared state, which it co-owns.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, Fn fn) {
  if (tasks <= 1) {
    fn(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, tasks, fn = &fn] {
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      (*fn)(t);
      if (state->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_one();
      }
    }
  };
  for (int64_t t = 1; t < tasks; ++t) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

ffi::Error KlDiagImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> log_var, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = mean.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("kl_diag: mean must have an event axis");
  const int64_t dim = dims.back();
  const int64_t rows = dim == 0 ? 0 : static_cast<int64_t>(mean.element_count()) / dim;
  const float* m = mean.typed_data();
  const float* v = log_var.typed_data();
  float* o = out->typed_data();
  const int64_t threads = pool.num_threads();
  // Below ~1M elements a second thread does not pay for its scheduling.
  const int64_t tasks = (threads > 1 && rows * dim >= (1 << 20)) ? threads : 1;
  const int64_t chunk = (rows + tasks - 1) / tasks;
  ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t b = t * chunk, e = b + chunk < rows ? b + chunk : rows;
    if (b < e) rows_kl(m, v, o, b, e, dim);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VaeklKlDiag, KlDiagImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
