// decode_attention (see attention.cpp: the contract, the arguments it checks) for CPUs with AVX2
// and no AVX-512. The same work per (sequence, KV head) task in 8 lanes: the scaled queries in a
// float32 buffer (16 registers hold neither them nor the accumulators of several rows), scores
// for four keys at a time reduced together, e^x built in the exponent bits, and P V in blocks of
// up to 4 query rows x 16 or 32 dimensions, whose accumulators stay in registers while every key
// of the sequence passes.
#include "attention_rows.h"

#ifdef PAGODA_AVX2

namespace pagoda_cpu {
namespace {

using attention::AttendFn;
using attention::kAhead;
using attention::prefetch_row;
using attention::Task;

// e^x for x <= 0, 8 at a time: attention.cpp's series for 2^f, and 2^n as exponent bits (n >= -126
// after the clamp, a normal float).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718f));
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The sums of four vectors' lanes, in order.
inline __m128 sum4(const __m256* a) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Row s[0, n) becomes e^(s - max s); returns 1 / its sum.
inline float softmax_row(float* s, int64_t n) {
  const int64_t whole = n / 8 * 8;
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < whole; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
  float top = hmax8(m);
  for (int64_t i = whole; i < n; ++i) top = std::max(top, s[i]);
  const __m256 topv = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), topv));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum8(sum);
  if (whole < n) {  // the tail through a buffer
    alignas(32) float tail[8];
    _mm256_store_ps(tail, exp_nonpositive(_mm256_sub_ps(load8(s + whole, n - whole), topv)));
    for (int64_t i = whole; i < n; ++i) total += s[i] = tail[i - whole];
  }
  return 1.0f / total;
}

// o[g0 .. g0 + RB) = P V over the n keys at `rows`, CB chunks of 8 dimensions at a time.
template <int RB, int CB, typename T>
void weigh_values(const T* vc, const int64_t* rows, const float* p, int64_t n, int64_t g0, const float* inv,
                  const Task& t, T* out) {
  for (int64_t c0 = 0; c0 < t.chunks; c0 += CB) {
    __m256 acc[RB][CB];
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < CB; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const T* v = vc + rows[i] + 8 * c0;
      __m256 vv[CB];
      for (int c = 0; c < CB; ++c) vv[c] = load8(v + 8 * c, 8);
      for (int r = 0; r < RB; ++r) {
        const __m256 pr = _mm256_broadcast_ss(p + (g0 + r) * n + i);
        for (int c = 0; c < CB; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const __m256 scale = _mm256_set1_ps(inv[g0 + r]);
      for (int c = 0; c < CB; ++c) store8(out + (g0 + r) * t.head_dim + 8 * (c0 + c), _mm256_mul_ps(acc[r][c], scale));
    }
  }
}

// One sequence and KV head (PickAvx2 gives every task one): o[g] = softmax(scale * q[g] . K) V
// over keys [first, len); `scores` holds rows * (len - first) floats, `rows` len - first.
template <typename T, typename I>
void attend(const T* q, const T* kc, const T* vc, const I* table, int64_t first, int64_t len, int64_t head,
            int64_t /*heads: 1*/, const Task& t, float* scores, int64_t* rows, float* /*acc*/, T* out) {
  const int64_t nr = t.rows, nc = t.chunks, d = t.head_dim, n = len - first;
  float qs[attention::kMaxRows * attention::kMaxHeadDim];  // the scaled queries
  int64_t block = first / t.block_size, offset = first % t.block_size;
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = ((static_cast<int64_t>(table[block]) * t.block_size + offset) * t.kv_heads + head) * d;
    if (++offset == t.block_size) offset = 0, ++block;
  }
  const __m256 scale = _mm256_set1_ps(t.scale);  // folded into the queries: scores come out scaled
  for (int64_t j = 0; j < nr * d; j += 8) _mm256_storeu_ps(qs + j, _mm256_mul_ps(load8(q + j, 8), scale));
  for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(kc + rows[j], d);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T* k[4] = {kc + rows[i], kc + rows[i + 1], kc + rows[i + 2], kc + rows[i + 3]};
    for (int64_t j = i; j < i + 4; ++j) {  // the keys kAhead on, and these keys' values for P V
      if (j + kAhead < n) prefetch_row(kc + rows[j + kAhead], d);
      prefetch_row(vc + rows[j], d);
    }
    for (int64_t g = 0; g < nr; ++g) {
      const float* qg = qs + g * d;
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(k[j], 8));
      for (int64_t c = 1; c < nc; ++c)
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), load8(k[j] + 8 * c, 8), acc[j]);
      _mm_storeu_ps(scores + g * n + i, sum4(acc));
    }
  }
  for (; i < n; ++i) {
    const T* k = kc + rows[i];
    prefetch_row(vc + rows[i], d);
    for (int64_t g = 0; g < nr; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < nc; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qs + g * d + 8 * c), load8(k + 8 * c, 8), acc);
      scores[g * n + i] = hsum8(acc);
    }
  }
  if (t.softcap > 0.0f) {
    for (int64_t j = 0; j < nr * n; ++j) scores[j] = t.softcap * std::tanh(scores[j] / t.softcap);
  }
  float inv[attention::kMaxRows];
  for (int64_t g = 0; g < nr; ++g) inv[g] = softmax_row(scores + g * n, n);
  const bool wide = nc % 4 == 0;  // 32 dimensions a pass where the head divides into them
  for (int64_t g0 = 0; g0 < nr;) {
    const int64_t left = nr - g0;
    if (left >= 4) {
      weigh_values<4, 2>(vc, rows, scores, n, g0, inv, t, out), g0 += 4;
    } else if (left == 3) {
      weigh_values<3, 2>(vc, rows, scores, n, g0, inv, t, out), g0 += 3;
    } else if (left == 2) {
      wide ? weigh_values<2, 4>(vc, rows, scores, n, g0, inv, t, out) : weigh_values<2, 2>(vc, rows, scores, n, g0, inv, t, out);
      g0 += 2;
    } else {
      wide ? weigh_values<1, 4>(vc, rows, scores, n, g0, inv, t, out) : weigh_values<1, 2>(vc, rows, scores, n, g0, inv, t, out);
      g0 += 1;
    }
  }
}

struct PickAvx2 {
  static constexpr bool kGroups = false;
  template <typename T, typename I>
  static AttendFn<T, I> pick(const Task&) {
    return &attend<T, I>;
  }
};

}  // namespace

void decode_attention_avx2(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
                           double softcap) {
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  const Task t{q.size(1) / kv_heads, head_dim / 8, k_cache.size(1), kv_heads, head_dim, static_cast<float>(scale),
               static_cast<float>(softcap)};
  attention::run<PickAvx2>(out, q, k_cache, v_cache, tables, lens, window, t);
}

}  // namespace pagoda_cpu

#endif  // PAGODA_AVX2
