// qgemm (see qgemm.cpp) for CPUs with AVX2 and no AVX512-VNNI (Zen 1-3 EPYCs, Intel client
// cores): the same packed weights, the same activation codes and the same integer sums, so a
// row's result equals the VNNI kernel's bit for bit. AVX2 has no u8 x s8 -> s32 product, and the
// tile's 16 outputs fill two 256-bit halves of 8, each its own unit of work:
// - 16-bit activations (weight-only layers) are kept whole as int16 codes, not two int8 digits;
//   each chunk's weight codes are widened to int16 once for all the rows of a block, then
//   vpmaddwd (s16 x s16 pairs -> s32) multiplies them by each row's codes: four multiplies a row
//   per 64 products, where two digits would take six (four vpmaddubsw, two vpmaddwd);
// - 8-bit activations go through vpmaddubsw (u8 x s8 pairs -> s16) and vpmaddwd (the s16 pairs
//   summed), as llama.cpp's AVX2 dot products do. The unsigned operand is always a 4-bit nibble,
//   so the pair sums (at most 2 * 15 * 128) never saturate: an 8-bit code is split into its two
//   nibbles, the high one weighted 16 in vpmaddwd.
#include "common.h"

#ifdef PAGODA_AVX2

namespace pagoda_cpu {
namespace {

constexpr int kLevels16 = 127 * 256 + 127;  // as qgemm.cpp: both digits stay int8
constexpr int64_t kHalf = 8;                 // outputs per 256-bit half of a tile
constexpr int64_t kPanelRows = 64;           // activation rows whose codes stay in L2 together

// Activation codes per row and group, as qgemm.cpp's QuantizedActs makes them: [m][k] int8 (8 bits)
// or int16 (16 bits: the codes whole, where the VNNI kernel keeps two int8 digits); per (row,
// group) the step and the step times the group's code sum.
struct Acts {
  int64_t m, k, groups;
  std::vector<int8_t> q;  // m * k codes of 1 or 2 bytes
  std::vector<float> scale, sum;
  const int8_t* codes8() const { return q.data(); }
  const int16_t* codes16() const { return reinterpret_cast<const int16_t*>(q.data()); }
};

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// The low byte of each of 8 int32 lanes (all within int8), `n` of them stored at p.
inline void store_codes(int8_t* p, __m256i c, int64_t n) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  const __m128i b8 = _mm_packs_epi16(w16, w16);
  if (n >= 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b8);
  } else {
    alignas(16) int8_t v[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(v), b8);
    std::memcpy(p, v, n);
  }
}

// The low halves of 8 int32 lanes (all within int16), `n` of them stored at p.
inline void store_codes16(int16_t* p, __m256i c, int64_t n) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), w16);
  } else {
    alignas(16) int16_t v[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(v), w16);
    std::memcpy(p, v, n * sizeof(int16_t));
  }
}

// qgemm.cpp's quantize_acts, 8 inputs at a time: the peak, codes rounded to nearest even.
template <int DIGITS, typename T>
Acts quantize(const T* x, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  const float levels = DIGITS == 2 ? static_cast<float>(kLevels16) : 127.f;
  Acts a{m, k, groups, std::vector<int8_t>(DIGITS * m * k), std::vector<float>(m * groups),
         std::vector<float>(m * groups)};
  const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* v = x + r * k + g * group;
        __m256 peak = _mm256_setzero_ps();
        for (int64_t i = 0; i < group; i += 8) peak = _mm256_max_ps(peak, _mm256_and_ps(load8(v + i, group - i), sign_off));
        const float top = hmax8(peak);
        const __m256 inv = _mm256_set1_ps(top > 0.f ? levels / top : 0.f);
        int8_t* q = a.q.data() + r * k + g * group;  // 8-bit codes
        __m256i total = _mm256_setzero_si256();
        for (int64_t i = 0; i < group; i += 8) {
          const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(load8(v + i, group - i), inv));  // zeros past the end
          if constexpr (DIGITS == 2) {
            store_codes16(reinterpret_cast<int16_t*>(a.q.data()) + r * k + g * group + i, c, group - i);
          } else {
            store_codes(q + i, c, group - i);
          }
          total = _mm256_add_epi32(total, c);
        }
        a.scale[r * groups + g] = top / levels;
        a.sum[r * groups + g] = static_cast<float>(hsum8(total)) * (top / levels);
      }
    }
  });
  return a;
}

// 8 scales or offsets as float32.
inline __m256 load_s8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_s8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load_s8(const at::BFloat16* p) { return load8(p, 8); }

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// The int16 lanes of 4 activation codes (16-bit activations), repeated: each int32 lane of the
// products below holds one output's pair of inputs (0, 1) or (2, 3).
inline __m256i broadcast4x16(const int16_t* p) {
  int64_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi64x(v);
}

// R rows (from r0) of one half tile (8 outputs) over all the groups, into y.
// 8-bit activations: vpmaddubsw on the weight nibbles, vpmaddwd to sum the pairs.
// 16-bit activations: the weight codes widened to int16 once a chunk (for all R rows), then
// vpmaddwd against each row's codes; the two accumulators a row keeps hold outputs 0, 1 | 4, 5 and
// 2, 3 | 6, 7 as pairs of partial sums, which one vphaddd a group puts in order.
template <int BITS, int DIGITS, int R, typename S, typename O>
void half_block(const PackedWeight& p, const Acts& a, int64_t tile, int64_t half, int64_t r0, O* y) {
  constexpr int64_t kChunk = BITS == 4 ? 8 : 4;  // inputs per 64-byte chunk
  constexpr int kAccs = DIGITS == 2 ? 2 : 1;
  const int64_t chunks = p.group / kChunk;
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64 + half * 32;
  const __m256i nibble = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi16(1), n16 = _mm256_set1_epi16(16);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[R][kAccs];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < kAccs; ++i) acc[r][i] = zero;
    for (int64_t c = 0; c < chunks; ++c, w += 64) {
      const int64_t k = g * p.group + c * kChunk;
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      if constexpr (DIGITS == 2) {
        const int16_t* x = a.codes16() + r0 * a.k + k;
        if constexpr (BITS == 4) {  // low nibbles: inputs k..k+3; high: k+4..k+7
          const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          const __m256i w0 = _mm256_unpacklo_epi8(lo, zero), w1 = _mm256_unpackhi_epi8(lo, zero);
          const __m256i w2 = _mm256_unpacklo_epi8(hi, zero), w3 = _mm256_unpackhi_epi8(hi, zero);
          for (int r = 0; r < R; ++r) {
            const __m256i x0 = broadcast4x16(x + r * a.k), x1 = broadcast4x16(x + r * a.k + 4);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w2, x1)));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_add_epi32(_mm256_madd_epi16(w1, x0), _mm256_madd_epi16(w3, x1)));
          }
        } else {  // inputs k..k+3 as bytes
          const __m256i w0 = _mm256_unpacklo_epi8(v, zero), w1 = _mm256_unpackhi_epi8(v, zero);
          for (int r = 0; r < R; ++r) {
            const __m256i x0 = broadcast4x16(x + r * a.k);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, x0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, x0));
          }
        }
      } else {
        const int8_t* x = a.codes8() + r0 * a.k + k;
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const __m256i x0 = broadcast4(x + r * a.k);
          if constexpr (BITS == 4) {
            const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, broadcast4(x + r * a.k + 4)));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(s, one));
          } else {  // an 8-bit code's nibbles: 16 * hi + lo
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(hi, x0), n16),
                                                                     _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), one)));
          }
        }
      }
    }
    // as qgemm.cpp's add_group: codes * (scale * step) + (offset - zero_code * scale) * step * sum
    const int64_t at = (tile * p.groups + g) * kTile + half * kHalf;
    const __m256 sc = load_s8(static_cast<const S*>(p.scale) + at);
    __m256 off = p.offset ? load_s8(static_cast<const S*>(p.offset) + at) : _mm256_setzero_ps();
    off = _mm256_fnmadd_ps(sc, _mm256_set1_ps(p.zero_code), off);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * p.groups + g;
      const __m256i dot = DIGITS == 2 ? _mm256_hadd_epi32(acc[r][0], acc[r][kAccs - 1]) : acc[r][0];
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sc, _mm256_set1_ps(a.scale[i])), total[r]);
      total[r] = _mm256_fmadd_ps(off, _mm256_set1_ps(a.sum[i]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) store8(y + (r0 + r) * p.n + tile * kTile + half * kHalf, total[r]);
}

// Rows r0 .. r1 of one half tile, in register blocks of 4, 2 and 1 rows.
template <int BITS, int DIGITS, typename S, typename O>
void half_rows(const PackedWeight& p, const Acts& a, int64_t strip, int64_t r0, int64_t r1, O* y) {
  const int64_t tile = strip / 2, half = strip % 2;
  while (r0 < r1) {
    const int64_t left = r1 - r0;
    if (left >= 4) {
      half_block<BITS, DIGITS, 4, S>(p, a, tile, half, r0, y);
      r0 += 4;
    } else if (left >= 2) {
      half_block<BITS, DIGITS, 2, S>(p, a, tile, half, r0, y);
      r0 += 2;
    } else {
      half_block<BITS, DIGITS, 1, S>(p, a, tile, half, r0, y);
      r0 += 1;
    }
  }
}

// Panels of up to kPanelRows rows times half tiles, split over the threads panel by panel.
template <int BITS, int DIGITS, typename S, typename O>
void gemm(const PackedWeight& p, const Acts& a, O* y) {
  const int64_t strips = p.n / kHalf, panels = (a.m + kPanelRows - 1) / kPanelRows;
  at::parallel_for(0, panels * strips, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i / strips * kPanelRows;
      half_rows<BITS, DIGITS, S>(p, a, i % strips, r0, std::min(a.m, r0 + kPanelRows), y);
    }
  });
}

}  // namespace

at::Tensor qgemm_avx2(const at::Tensor& x, const PackedWeight& w, at::ScalarType scale_type, int64_t bits,
                      int64_t act_bits) {
  const int64_t m = x.size(0), k = w.k;
  at::Tensor y = at::empty({m, w.n}, x.options());
  if (m == 0) return y;
  auto run = [&](auto digits) {
    constexpr int kDigits = decltype(digits)::value;
    const Acts acts = x.scalar_type() == at::kFloat ? quantize<kDigits>(x.data_ptr<float>(), m, k, w.group)
                                                    : quantize<kDigits>(x.data_ptr<at::BFloat16>(), m, k, w.group);
    dispatch_weight(scale_type, bits, [&](auto b, auto s) {
      constexpr int kBits = decltype(b)::value;
      if (y.scalar_type() == at::kBFloat16) {
        gemm<kBits, kDigits, decltype(s)>(w, acts, y.data_ptr<at::BFloat16>());
      } else {
        gemm<kBits, kDigits, decltype(s)>(w, acts, y.data_ptr<float>());
      }
    });
  };
  if (act_bits == 16) {
    run(std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  return y;
}

}  // namespace pagoda_cpu

#endif  // PAGODA_AVX2
