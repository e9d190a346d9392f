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
// - 16-bit activations of 8 rows or more (prompts, a batch's LM head) put the rows in the lanes
//   instead (gemm_lanes): one vpmaddwd then multiplies an input pair of 8 rows by one output's
//   codes, and no vector is unpacked or added across per row block. 0.82-0.97x the time of the
//   row blocks at 128 rows, 0.87x for the demo's LM head at 16 (docs/perf-history.md).
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

// A chunk's weight codes (one half tile: 8 outputs x 8 inputs at 4 bits, x 4 at 8) widened to int16:
// w[0] = outputs 0, 1 | 4, 5 and w[1] = outputs 2, 3 | 6, 7, of inputs 0-3; at 4 bits w[2], w[3]
// the same of inputs 4-7 (the high nibbles).
template <int BITS>
inline void widen_chunk(__m256i v, __m256i* w) {
  const __m256i zero = _mm256_setzero_si256();
  if constexpr (BITS == 4) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    w[0] = _mm256_unpacklo_epi8(lo, zero), w[1] = _mm256_unpackhi_epi8(lo, zero);
    w[2] = _mm256_unpacklo_epi8(hi, zero), w[3] = _mm256_unpackhi_epi8(hi, zero);
  } else {
    w[0] = _mm256_unpacklo_epi8(v, zero), w[1] = _mm256_unpackhi_epi8(v, zero);
  }
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
        __m256i wv[4];
        widen_chunk<BITS>(v, wv);
        if constexpr (BITS == 4) {  // low nibbles: inputs k..k+3; high: k+4..k+7
          for (int r = 0; r < R; ++r) {
            const __m256i x0 = broadcast4x16(x + r * a.k), x1 = broadcast4x16(x + r * a.k + 4);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(wv[0], x0), _mm256_madd_epi16(wv[2], x1)));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_add_epi32(_mm256_madd_epi16(wv[1], x0), _mm256_madd_epi16(wv[3], x1)));
          }
        } else {  // inputs k..k+3 as bytes
          for (int r = 0; r < R; ++r) {
            const __m256i x0 = broadcast4x16(x + r * a.k);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(wv[0], x0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(wv[1], x0));
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

// 16-bit activations over 8 rows or more, rows in the lanes. The activation codes are laid out
// once a call as int16 pairs of 8 rows, [block of 8 rows][pair of inputs][8 rows] (RowPairs), and a
// half tile's weight codes are widened to int16 once a panel (per chunk the vectors half_block
// makes, in a buffer); each vpmaddwd then multiplies one input pair of 8 rows by one output's pair
// of codes broadcast, into that output's accumulator. The same integer sums and the same float
// arithmetic as half_block, element by element, so a row's result does not depend on the path.
struct RowPairs {
  int64_t blocks, pairs, groups;
  std::vector<int32_t> x;       // [blocks][pairs][8]: rows past m are zero
  std::vector<float> scale, sum;  // [blocks][groups][8]
};

RowPairs row_pairs(const Acts& a) {
  const int64_t blocks = (a.m + 7) / 8, pairs = a.k / 2;
  RowPairs t{blocks, pairs, a.groups, std::vector<int32_t>(blocks * pairs * 8, 0),
             std::vector<float>(blocks * a.groups * 8, 0.f), std::vector<float>(blocks * a.groups * 8, 0.f)};
  const int32_t* codes = reinterpret_cast<const int32_t*>(a.codes16());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < 8 && b * 8 + r < a.m; ++r) {
        const int64_t row = b * 8 + r;
        for (int64_t p = 0; p < pairs; ++p) t.x[(b * pairs + p) * 8 + r] = codes[row * pairs + p];
        for (int64_t g = 0; g < a.groups; ++g) {
          t.scale[(b * a.groups + g) * 8 + r] = a.scale[row * a.groups + g];
          t.sum[(b * a.groups + g) * 8 + r] = a.sum[row * a.groups + g];
        }
      }
    }
  });
  return t;
}

// The int32 lane of the widened chunk (w0, w1, w2, w3 as half_block makes them, 8 lanes each) that
// holds output j's codes for input pair q of the chunk (q 0, 1: inputs 0-3; 2, 3: inputs 4-7).
constexpr int lane_of(int j, int q) { return (q >> 1) * 16 + ((j >> 1) & 1) * 8 + (j >> 2) * 4 + (j & 1) * 2 + (q & 1); }

// One half tile's codes widened to int16 (widen_chunk's vectors, chunk by chunk): 8 outputs x 2
// bytes an input, so 4 int32 lanes an input.
template <int BITS>
void widen(const PackedWeight& p, int64_t tile, int64_t half, int32_t* buf) {
  constexpr int64_t kVectors = BITS == 4 ? 4 : 2;  // per chunk
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64 + half * 32;
  for (int64_t c = 0; c < p.k / (2 * kVectors); ++c, w += 64) {
    __m256i wv[kVectors];
    widen_chunk<BITS>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), wv);
    for (int64_t i = 0; i < kVectors; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf) + c * kVectors + i, wv[i]);
  }
}

inline __m256i bcast32(const int32_t* p) { return _mm256_set1_epi32(*p); }

// 8 rows (block b) x one half tile (8 outputs) over all the groups, into y.
template <int BITS, typename S, typename O>
void lane_block(const PackedWeight& p, const RowPairs& t, const int32_t* buf, int64_t tile, int64_t half,
                int64_t b, int64_t m, O* y) {
  constexpr int kPairs = BITS == 4 ? 4 : 2;  // input pairs per chunk
  constexpr int kLanes = kPairs * 8;           // int32 lanes per widened chunk
  const int64_t chunks = p.group / (2 * kPairs);
  alignas(32) float total[8][8] = {};  // [output][row]
  const int32_t* xb = t.x.data() + b * t.pairs * 8;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t chunk = g * chunks + c;
      const int32_t* wc = buf + chunk * kLanes;
      const int32_t* xc = xb + chunk * kPairs * 8;
#pragma GCC unroll 4
      for (int q = 0; q < kPairs; ++q) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + q * 8));
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(xv, bcast32(wc + lane_of(j, q))));
          // pinned: unpinned, GCC sums several pairs' products before adding them, and spills them
          asm("" : "+x"(acc[j]));
        }
      }
    }
    const int64_t at = (tile * p.groups + g) * kTile + half * kHalf;
    const __m256 as = _mm256_loadu_ps(t.scale.data() + (b * t.groups + g) * 8);
    const __m256 asum = _mm256_loadu_ps(t.sum.data() + (b * t.groups + g) * 8);
    // as half_block: the outputs' scales and offsets (less zero_code times the scale), each broadcast
    alignas(32) float sc[8], off[8];
    const __m256 s8 = load_s8(static_cast<const S*>(p.scale) + at);
    const __m256 o8 = p.offset ? load_s8(static_cast<const S*>(p.offset) + at) : _mm256_setzero_ps();
    _mm256_store_ps(sc, s8);
    _mm256_store_ps(off, _mm256_fnmadd_ps(s8, _mm256_set1_ps(p.zero_code), o8));
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 tot = _mm256_load_ps(total[j]);
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j]), _mm256_mul_ps(_mm256_broadcast_ss(sc + j), as), tot);
      tot = _mm256_fmadd_ps(_mm256_broadcast_ss(off + j), asum, tot);
      _mm256_store_ps(total[j], tot);
    }
  }
  for (int64_t r = 0; r < 8 && b * 8 + r < m; ++r) {
    alignas(32) float row[8];
    for (int j = 0; j < 8; ++j) row[j] = total[j][r];
    store8(y + (b * 8 + r) * p.n + tile * kTile + half * kHalf, _mm256_load_ps(row));
  }
}

template <int BITS, typename S, typename O>
void gemm_lanes(const PackedWeight& p, const Acts& a, O* y) {
  const RowPairs t = row_pairs(a);
  const int64_t strips = p.n / kHalf, panel = kPanelRows / 8, panels = (t.blocks + panel - 1) / panel;
  at::parallel_for(0, panels * strips, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> buf(p.k * 4);  // widen's lanes
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t strip = i % strips, b0 = i / strips * panel;
      widen<BITS>(p, strip / 2, strip % 2, buf.data());
      for (int64_t b = b0; b < std::min(t.blocks, b0 + panel); ++b)
        lane_block<BITS, S>(p, t, buf.data(), strip / 2, strip % 2, b, a.m, y);
    }
  });
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
      using Scale = decltype(s);  // named here: inside the lambda below GCC may read s as a reference
      auto into = [&](auto* out) {
        if (kDigits == 2 && m >= 8) {
          gemm_lanes<kBits, Scale>(w, acts, out);
        } else {
          gemm<kBits, kDigits, Scale>(w, acts, out);
        }
      };
      if (y.scalar_type() == at::kBFloat16) {
        into(y.data_ptr<at::BFloat16>());
      } else {
        into(y.data_ptr<float>());
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
