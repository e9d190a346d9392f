// Decode attention over the paged KV cache on the CPU: one query token per sequence against that
// sequence's keys and values read in place through its block table. torch's paths first gather
// every sequence's blocks into a padded copy, mask the padding and run SDPA (eager), or loop over
// the padded copy inside inductor's reductions (compiled); at 16 sequences the gather, the mask
// and the padding are most of a decode step's attention time. Here a task is one sequence's KV
// head, or all its KV heads where sequences are many (attention_rows.h): the query heads sharing a
// KV head (GQA) are its rows, scores and softmax are float32, and only the sequence's own keys are
// read (the last `window` of them with a sliding window), each key's row asked for kAhead keys
// before its use. bfloat16 keys and values are read as pairs of values in 32-bit lanes: the scores
// by vdpbf16ps (AVX512-BF16), the values' even and odd halves by a shift and a mask, so neither is
// converted value by value; a step's KV cache comes from memory, and these cut the arithmetic that
// kept the reads from overlapping it (docs/perf-history.md, "decode attention by pairs").
//
//   q [n, heads, head_dim]                      contiguous; heads = kv_heads * rows
//   k_cache, v_cache [blocks, block_size, kv_heads, head_dim]   q's dtype, contiguous
//   block_tables [n, max_blocks] int64/int32 (rows may be strided)    seq_lens [n] int64/int32 (0: a padding row)
//   window > 0: a query sees only the last `window` keys; softcap > 0: s = softcap * tanh(s / softcap)
//
// Returns [n, heads, head_dim] in q's dtype, rounded once.
#include "attention_rows.h"

namespace {

using namespace pagoda_cpu;
using attention::AttendFn;
using attention::Task;

using attention::kMaxRows;
using attention::prefetch_row;
constexpr int64_t kAhead = 16;  // keys: each head's row of the key this far on is asked for as a key is read
constexpr int64_t kMaxChunks = attention::kMaxHeadDim / 16;

#ifdef PAGODA_VNNI

// e^x for x <= 0 (scores less their maximum), 16 at a time: x = (n + f) ln 2 with |f| <= 1/2,
// 2^f by its Taylor series to f^6 (relative error ~2e-7, under float32's own), times 2^n by scalef.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The sums of four vectors' lanes: 512 -> 4 x 128 bits (lane j: a[j]'s partial sums), then each
// 128-bit lane summed; a tenth of four separate horizontal reductions' shuffles.
inline __m128 sum4(const __m512* a) {
  const __m512 r01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 r23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  // r01 lanes: [a0 lo+hi (L0+L2), a0 (L1+L3), a1 (L0+L2), a1 (L1+L3)]; r23 alike
  __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xDD));
  // r lanes: a0, a1, a2, a3, each four partial sums
  r = _mm512_add_ps(r, _mm512_permute_ps(r, 0x4E));
  r = _mm512_add_ps(r, _mm512_permute_ps(r, 0xB1));
  // every element of lane j is a[j]'s sum: pick element 0 of each lane
  const __m512i pick = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, r));
}

// The even and the odd bfloat16 values of 32 in a vector (the low and the high half of each 32-bit
// lane) as 16 float32 each: a shift and a mask, no conversion value by value.
inline __m512 even_values(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 odd_values(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Row s[0, n) becomes e^(s - max s); returns 1 / its sum.
inline float softmax_row(float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {  // masked loads: the row may end at the buffer's end
    const __mmask16 mask = tail_mask(n - i);
    m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, s + i));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + i), top));
    _mm512_mask_storeu_ps(s + i, mask, e);
    sum = _mm512_mask_add_ps(sum, mask, sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// The query rows' scores against keys [i0, i1) of one KV head (`kh`: that head's rows, at
// `rows`), scaled, into s[g * n + i]. Keys go four at a time: each key's sum is its own, so the
// grouping never changes a score. Pairs: bfloat16 in chunks of 32 values; q holds the raw queries
// and the products are exact in float32 (vdpbf16ps with AVX512-BF16, else even and odd halves).
template <typename T, int64_t R, int64_t C, bool Pairs>
inline void score_keys(const T* q, const T* kh, const int64_t* rows, int64_t i0, int64_t i1, int64_t n,
                       const Task& t, float* s) {
  auto pf = [&](int64_t i) {
    if (i + kAhead < n) prefetch_row(kh + rows[i + kAhead], t.head_dim);
  };
  const int64_t nr = R > 0 ? R : t.rows, nc = C > 0 ? C : t.chunks, d = t.head_dim;
  constexpr int64_t kR = R > 0 ? R : kMaxRows, kC = C > 0 ? C : kMaxChunks;
  const __m512 scale = _mm512_set1_ps(t.scale);
  if constexpr (Pairs) {
    const int64_t np = nc / 2;
#ifdef PAGODA_BF16
    __m512bh qv[kR][kC / 2];
    for (int64_t g = 0; g < nr; ++g)
      for (int64_t c = 0; c < np; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512(q + g * d + 32 * c);
    auto dot = [&](__m512 acc, int64_t g, int64_t c, __m512i k) {
      return _mm512_dpbf16_ps(acc, qv[g][c], (__m512bh)k);
    };
#else
    __m512 qe[kR][kC / 2], qo[kR][kC / 2];  // the even and odd values of each chunk of 32
    for (int64_t g = 0; g < nr; ++g)
      for (int64_t c = 0; c < np; ++c) {
        const __m512i x = _mm512_loadu_si512(q + g * d + 32 * c);
        qe[g][c] = even_values(x), qo[g][c] = odd_values(x);
      }
    auto dot = [&](__m512 acc, int64_t g, int64_t c, __m512i k) {
      return _mm512_fmadd_ps(qo[g][c], odd_values(k), _mm512_fmadd_ps(qe[g][c], even_values(k), acc));
    };
#endif
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      __m512i kv[4][kC / 2];
      for (int j = 0; j < 4; ++j) pf(i + j);
      for (int j = 0; j < 4; ++j)
        for (int64_t c = 0; c < np; ++c) kv[j][c] = _mm512_loadu_si512(kh + rows[i + j] + 32 * c);
      for (int64_t g = 0; g < nr; ++g) {
        __m512 acc[4];
        for (int j = 0; j < 4; ++j) {
          acc[j] = _mm512_setzero_ps();
          for (int64_t c = 0; c < np; ++c) acc[j] = dot(acc[j], g, c, kv[j][c]);
        }
        _mm_storeu_ps(s + g * n + i, _mm_mul_ps(sum4(acc), _mm512_castps512_ps128(scale)));
      }
    }
    for (; i < i1; ++i)
      for (int64_t g = 0; g < nr; ++g) {
        if (g == 0) pf(i);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < np; ++c) acc = dot(acc, g, c, _mm512_loadu_si512(kh + rows[i] + 32 * c));
        s[g * n + i] = _mm512_reduce_add_ps(acc) * t.scale;
      }
  } else {
    __m512 qv[kR][kC];  // the queries, scaled: scores come out scaled
    for (int64_t g = 0; g < nr; ++g)
      for (int64_t c = 0; c < nc; ++c) qv[g][c] = _mm512_mul_ps(load_row16(q + g * d + 16 * c, 0xFFFF), scale);
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      __m512 kv[4][kC];
      for (int j = 0; j < 4; ++j) pf(i + j);
      for (int j = 0; j < 4; ++j)
        for (int64_t c = 0; c < nc; ++c) kv[j][c] = load_row16(kh + rows[i + j] + 16 * c, 0xFFFF);
      for (int64_t g = 0; g < nr; ++g) {
        __m512 acc[4];
        for (int j = 0; j < 4; ++j) {
          acc[j] = _mm512_mul_ps(qv[g][0], kv[j][0]);
          for (int64_t c = 1; c < nc; ++c) acc[j] = _mm512_fmadd_ps(qv[g][c], kv[j][c], acc[j]);
        }
        _mm_storeu_ps(s + g * n + i, sum4(acc));
      }
    }
    for (; i < i1; ++i)
      for (int64_t g = 0; g < nr; ++g) {
        if (g == 0) pf(i);
        __m512 acc = _mm512_mul_ps(qv[g][0], load_row16(kh + rows[i], 0xFFFF));
        for (int64_t c = 1; c < nc; ++c) acc = _mm512_fmadd_ps(qv[g][c], load_row16(kh + rows[i] + 16 * c, 0xFFFF), acc);
        s[g * n + i] = _mm512_reduce_add_ps(acc);
      }
  }
}

// acc[g] += P[g, i] V[i] over keys [i0, i1) of one KV head, `acc` in memory between calls. Pairs:
// each chunk of 32 bfloat16 values as its even and odd halves (a shift and a mask, no
// conversion), acc holding [even 16 | odd 16] per chunk of 32.
template <typename T, int64_t R, int64_t C, bool Pairs>
inline void weigh_values(const T* vh, const int64_t* rows, int64_t i0, int64_t i1, int64_t n, const float* p,
                         const Task& t, float* acc_mem) {
  const int64_t nr = R > 0 ? R : t.rows, nc = C > 0 ? C : t.chunks;
  constexpr int64_t kR = R > 0 ? R : kMaxRows, kC = C > 0 ? C : kMaxChunks;
  __m512 acc[kR][kC];
  for (int64_t g = 0; g < nr; ++g)
    for (int64_t c = 0; c < nc; ++c) acc[g][c] = _mm512_loadu_ps(acc_mem + (g * nc + c) * 16);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kAhead < n) prefetch_row(vh + rows[i + kAhead], t.head_dim);
    const T* v = vh + rows[i];
    __m512 vv[kC];
    if constexpr (Pairs) {
      for (int64_t c = 0; c < nc / 2; ++c) {
        const __m512i x = _mm512_loadu_si512(v + 32 * c);
        vv[2 * c] = even_values(x), vv[2 * c + 1] = odd_values(x);
      }
    } else {
      for (int64_t c = 0; c < nc; ++c) vv[c] = load_row16(v + 16 * c, 0xFFFF);
    }
    for (int64_t g = 0; g < nr; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * n + i]);
      for (int64_t c = 0; c < nc; ++c) acc[g][c] = _mm512_fmadd_ps(pg, vv[c], acc[g][c]);
    }
  }
  for (int64_t g = 0; g < nr; ++g)
    for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(acc_mem + (g * nc + c) * 16, acc[g][c]);
}

// One sequence and KV heads [head, head + heads): o[g] = softmax(scale * q[g] . K) V over keys
// [first, len). The keys go in chunks of kChunk, every head's rows of a chunk together (a slot's
// heads are adjacent in the cache, so a whole-sequence task reads it in order), each head's row
// asked for kAhead keys before it is read. R query rows and C chunks of 16 known at compile time (0: the task's, at
// run time): with both known the loops unroll and the queries and accumulators stay in registers.
// A head's arithmetic does not depend on `heads`, nor a sequence's on the batch.
template <typename T, typename I, int64_t R, int64_t C, bool Pairs>
void attend(const T* q, const T* kc, const T* vc, const I* table, int64_t first, int64_t len, int64_t head,
            int64_t heads, const Task& t, float* scores, int64_t* rows, float* acc, T* out) {
  constexpr int64_t kChunk = 16;
  const int64_t nr = R > 0 ? R : t.rows, nc = C > 0 ? C : t.chunks, d = t.head_dim;
  const int64_t n = len - first, slot = t.kv_heads * d;
  int64_t block = first / t.block_size, offset = first % t.block_size;
  for (int64_t i = 0; i < n; ++i) {  // each key's slot in the caches (no division per key)
    rows[i] = (static_cast<int64_t>(table[block]) * t.block_size + offset) * slot;
    if (++offset == t.block_size) offset = 0, ++block;
  }
  for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(kc + rows[j] + head * d, heads * d);
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    for (int64_t h = 0; h < heads; ++h)
      score_keys<T, R, C, Pairs>(q + h * nr * d, kc + (head + h) * d, rows, i0, std::min(n, i0 + kChunk), n, t,
                                 scores + h * nr * n);
  }
  const int64_t lines = heads * nr;
  if (t.softcap > 0.0f)
    for (int64_t j = 0; j < lines * n; ++j) scores[j] = t.softcap * std::tanh(scores[j] / t.softcap);
  float inv[kMaxRows * attention::kMaxGroup];
  for (int64_t g = 0; g < lines; ++g) inv[g] = softmax_row(scores + g * n, n);
  std::fill(acc, acc + lines * d, 0.0f);
  for (int64_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(vc + rows[j] + head * d, heads * d);
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    for (int64_t h = 0; h < heads; ++h)
      weigh_values<T, R, C, Pairs>(vc + (head + h) * d, rows, i0, std::min(n, i0 + kChunk), n, scores + h * nr * n,
                                   t, acc + h * nr * d);
  }
  for (int64_t g = 0; g < lines; ++g) {
    const __m512 r = _mm512_set1_ps(inv[g]);
    const float* a = acc + g * d;
    T* o = out + g * d;
    if constexpr (Pairs) {  // [even | odd] back to the values' order
      const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
      for (int64_t c = 0; c < nc / 2; ++c) {
        const __m512 even = _mm512_loadu_ps(a + 32 * c), odd = _mm512_loadu_ps(a + 32 * c + 16);
        store16(o + 32 * c, _mm512_mul_ps(_mm512_permutex2var_ps(even, lo, odd), r));
        store16(o + 32 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(even, hi, odd), r));
      }
    } else {
      for (int64_t c = 0; c < nc; ++c) store16(o + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), r));
    }
  }
}

// The unrolled `attend` for the common shapes (head_dim 64 or 128, up to 8 query rows per KV
// head), else the general one; bfloat16 by pairs where the head divides into chunks of 32.
template <typename T, typename I, bool Pairs>
AttendFn<T, I> pick_attend(const Task& t) {
#define PAGODA_ATTEND_ROWS(C)                       \
  switch (t.rows) {                                 \
    case 1: return &attend<T, I, 1, C, Pairs>;      \
    case 2: return &attend<T, I, 2, C, Pairs>;      \
    case 3: return &attend<T, I, 3, C, Pairs>;      \
    case 4: return &attend<T, I, 4, C, Pairs>;      \
    case 6: return &attend<T, I, 6, C, Pairs>;      \
    case 8: return &attend<T, I, 8, C, Pairs>;      \
    default: return &attend<T, I, 0, C, Pairs>;     \
  }
  if (t.chunks == 4) {
    PAGODA_ATTEND_ROWS(4)
  }
  if (t.chunks == 8) {
    PAGODA_ATTEND_ROWS(8)
  }
#undef PAGODA_ATTEND_ROWS
  return &attend<T, I, 0, 0, Pairs>;
}

struct PickAvx512 {
  static constexpr bool kGroups = true;  // a task may take every KV head of a sequence
  template <typename T, typename I>
  static AttendFn<T, I> pick(const Task& t) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (t.chunks % 2 == 0) return pick_attend<T, I, true>(t);
    }
    return pick_attend<T, I, false>(t);
  }
};

#endif  // PAGODA_VNNI

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
                            double softcap) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: q float32 or bfloat16");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "decode_attention: q [n, heads, head_dim] contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "decode_attention: caches [blocks, block_size, kv_heads, head_dim] contiguous, both alike");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype, "decode_attention: caches in q's dtype");
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(q.size(2) == head_dim && head_dim % 16 == 0 && head_dim / 16 <= kMaxChunks,
              "decode_attention: head_dim a multiple of 16, at most 256");
  TORCH_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0 && q.size(1) / kv_heads <= kMaxRows,
              "decode_attention: heads a multiple of kv_heads, at most 16 per KV head");
  auto index_ok = [](const at::Tensor& x) { return x.scalar_type() == at::kLong || x.scalar_type() == at::kInt; };
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && tables.stride(1) == 1 && index_ok(tables),
              "decode_attention: block_tables [n, max_blocks] int64 or int32, rows contiguous");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == q.size(0) && lens.is_contiguous() && index_ok(lens),
              "decode_attention: seq_lens [n] int64 or int32");
  at::Tensor out = at::empty_like(q);
#ifdef PAGODA_VNNI
  const Task t{q.size(1) / kv_heads, head_dim / 16, k_cache.size(1), kv_heads, head_dim,
               static_cast<float>(scale), static_cast<float>(softcap)};
  attention::run<PickAvx512>(out, q, k_cache, v_cache, tables, lens, window, t);
#elif defined(PAGODA_AVX2)
  decode_attention_avx2(out, q, k_cache, v_cache, tables, lens, scale, window, softcap);
#else
  TORCH_CHECK(false, "decode_attention: built without AVX512-VNNI or AVX2");
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
