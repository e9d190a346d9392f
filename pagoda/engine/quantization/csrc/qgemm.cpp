// pagoda's CPU GEMM for integer weights: 4- or 8-bit unsigned codes in groups, each group with its
// own scale and offset (w = scale * u + offset - zero_code * scale), against activations quantized
// per row and group at call time, to 8 bits (W8A8, as llama.cpp runs Q4/Q8 blocks against Q8
// activations) or to 16 bits held as two int8 digits (weight-only layers: more precise than
// bfloat16 activations, at twice the integer products). The inner product is AVX512-VNNI's
// vpdpbusd (u8 x s8 -> s32); a row's arithmetic never depends on the other rows.
//
// Weight layout (packed once at load, pagoda/engine/quantization/vnni.py): tiles of 16 outputs;
// within a tile, 64-byte chunks in input order. An 8-bit chunk holds 4 inputs of each of the 16
// outputs ([16][4] bytes: one int32 lane per output, so vpdpbusd accumulates 16 outputs at once
// and no horizontal sum is needed). A 4-bit chunk
// holds 8 inputs: the low nibbles are inputs 0-3, the high nibbles 4-7. Scales and offsets are
// [tiles][groups][16] (float32, float16 or bfloat16).
//
// Each weight chunk is loaded once per block of up to 8 activation rows, so a batch of 16 reads
// the weights twice from L1 instead of 16 times from memory.
#include "common.h"

namespace {

using namespace pagoda_cpu;

// A 16-bit code c is 256 * high + low with low in [-128, 127]; |c| <= kLevels16 keeps high within
// +-127 (high = (c + 128) >> 8), so both digits are int8 and joining them is a shift.
constexpr int kLevels16 = 127 * 256 + 127;

// Activations [m, k] quantized per row and group: codes c = round(x / step) with step the peak
// over 127 (8 bits) or over kLevels16 (16 bits, stored as the digits of c). Per (row, group):
// the step, and the step times the group's code sum (the offset term's factor).
struct QuantizedActs {
  int64_t rows, k;
  std::vector<int8_t> q;     // [digits][rows][k], the high digit first
  std::vector<float> scale;  // [m, groups]
  std::vector<float> sum;    // [m, groups]
  const int8_t* digit(int d) const { return q.data() + d * rows * k; }
};

#ifdef PAGODA_VNNI

// Vectorized, 16 inputs at a time (a masked tail for groups that are not multiples of 16):
// the peak, then codes rounded to nearest even (the default MXCSR mode, as torch.round).
// `rows` >= m: AMX reads rows 16 at a time, and the rows past m stay zero.
template <int DIGITS, typename T>
QuantizedActs quantize_acts(const T* x, int64_t m, int64_t rows, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  const float levels = DIGITS == 2 ? static_cast<float>(kLevels16) : 127.f;
  QuantizedActs a{rows, k, std::vector<int8_t>(DIGITS * rows * k), std::vector<float>(m * groups),
                  std::vector<float>(m * groups)};
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* v = x + r * k + g * group;
        __m512 peak = _mm512_setzero_ps();
        for (int64_t i = 0; i < group; i += 16) {
          const __mmask16 mask = tail_mask(group - i);
          peak = _mm512_max_ps(peak, _mm512_and_ps(load_row16(v + i, mask), sign_off));
        }
        const float top = _mm512_reduce_max_ps(peak);
        const __m512 inv = _mm512_set1_ps(top > 0.f ? levels / top : 0.f);
        int8_t* q = a.q.data() + r * k + g * group;
        __m512i total = _mm512_setzero_si512();
        for (int64_t i = 0; i < group; i += 16) {
          const __mmask16 mask = tail_mask(group - i);
          const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(load_row16(v + i, mask), inv));
          if constexpr (DIGITS == 2) {
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(128)), 8);
            const __m512i lo = _mm512_sub_epi32(c, _mm512_slli_epi32(hi, 8));
            _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtsepi32_epi8(hi));
            _mm_mask_storeu_epi8(q + rows * k + i, mask, _mm512_cvtsepi32_epi8(lo));
          } else {
            _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtsepi32_epi8(c));
          }
          total = _mm512_mask_add_epi32(total, mask, total, c);
        }
        a.scale[r * groups + g] = top / levels;
        a.sum[r * groups + g] = static_cast<float>(_mm512_reduce_add_epi32(total)) * (top / levels);
      }
    }
  });
  return a;
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

struct Problem : PackedWeight {
  const QuantizedActs* acts;
};

// One group's integer dot products (one per digit) added into the float total.
template <int DIGITS>
inline __m512 add_group(const __m512i* dot, __m512 sc, __m512 off, float a_scale, float a_sum, __m512 total) {
  __m512i codes = dot[0];
  if constexpr (DIGITS == 2) codes = _mm512_add_epi32(_mm512_slli_epi32(dot[0], 8), dot[1]);
  total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), _mm512_mul_ps(sc, _mm512_set1_ps(a_scale)), total);
  return _mm512_fmadd_ps(off, _mm512_set1_ps(a_sum), total);
}

// A tile's scale and offset - zero_code * scale for group g.
template <typename S>
inline void group_scales(const Problem& p, int64_t tile, int64_t g, __m512& sc, __m512& off) {
  const int64_t at = (tile * p.groups + g) * kTile;
  sc = load16<S>(static_cast<const S*>(p.scale) + at);
  off = p.offset ? load16<S>(static_cast<const S*>(p.offset) + at) : _mm512_setzero_ps();
  off = _mm512_fnmadd_ps(sc, _mm512_set1_ps(p.zero_code), off);
}

// R rows (r0 ..) times T adjacent tiles of 16 outputs, into those rows and outputs of y. Each
// activation broadcast feeds T tiles and each weight chunk R rows.
template <int BITS, int DIGITS, int R, int T, typename S, typename O>
inline void tile_block(const Problem& p, int64_t tile, int64_t r0, O* y) {
  constexpr int64_t kChunk = BITS == 4 ? 8 : 4;  // inputs per 64-byte chunk
  const int64_t chunks = p.group / kChunk;
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64;
  const int64_t w_stride = p.chunks_per_tile * 64;
  const int8_t* xq = p.acts->digit(0) + r0 * p.k;
  const int64_t d_stride = p.acts->rows * p.k;  // from one digit to the next
  const float* xs = p.acts->scale.data() + r0 * p.groups;
  const float* xsum = p.acts->sum.data() + r0 * p.groups;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[R][T][DIGITS];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < DIGITS; ++d) acc[r][t][d] = _mm512_setzero_si512();
    const int64_t k0 = g * p.group;
    for (int64_t c = 0; c < chunks; ++c, w += 64) {
      const int64_t k = k0 + c * kChunk;
      if constexpr (BITS == 4) {
        __m512i lo[T], hi[T];
        for (int t = 0; t < T; ++t) {
          const __m512i v = _mm512_loadu_si512(w + t * w_stride);
          lo[t] = _mm512_and_si512(v, nibble);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          for (int d = 0; d < DIGITS; ++d) {
            const int8_t* a = xq + d * d_stride + r * p.k + k;
            const __m512i a0 = broadcast4(a), a1 = broadcast4(a + 4);
            for (int t = 0; t < T; ++t) {
              acc[r][t][d] = _mm512_dpbusd_epi32(acc[r][t][d], lo[t], a0);
              acc[r][t][d] = _mm512_dpbusd_epi32(acc[r][t][d], hi[t], a1);
            }
          }
        }
      } else {
        __m512i v[T];
        for (int t = 0; t < T; ++t) v[t] = _mm512_loadu_si512(w + t * w_stride);
        for (int r = 0; r < R; ++r) {
          for (int d = 0; d < DIGITS; ++d) {
            const __m512i a = broadcast4(xq + d * d_stride + r * p.k + k);
            for (int t = 0; t < T; ++t) acc[r][t][d] = _mm512_dpbusd_epi32(acc[r][t][d], v[t], a);
          }
        }
      }
    }
    __m512 sc[T], off[T];
    for (int t = 0; t < T; ++t) group_scales<S>(p, tile + t, g, sc[t], off[t]);
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        total[r][t] = add_group<DIGITS>(acc[r][t], sc[t], off[t], xs[r * p.groups + g], xsum[r * p.groups + g],
                                        total[r][t]);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) store16(y + (r0 + r) * p.n + (tile + t) * kTile, total[r][t]);
}

// Rows r0 .. of T tiles from `tile` on: blocks of up to 8 rows (one tile, one digit) or 4.
template <int BITS, int DIGITS, int T, typename S, typename O>
void tile_rows(const Problem& p, int64_t tile, int64_t m, O* y) {
  for (int64_t r0 = 0; r0 < m;) {
    const int64_t left = m - r0;
    const int rows = left >= 8 && T == 1 && DIGITS == 1 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    switch (rows) {
      case 8: tile_block<BITS, DIGITS, 8, 1, S>(p, tile, r0, y); break;
      case 4: tile_block<BITS, DIGITS, 4, T, S>(p, tile, r0, y); break;
      case 2: tile_block<BITS, DIGITS, 2, T, S>(p, tile, r0, y); break;
      default: tile_block<BITS, DIGITS, 1, T, S>(p, tile, r0, y); break;
    }
    r0 += rows;
  }
}

template <int BITS, int DIGITS, typename S, typename O>
void vnni_gemm(const Problem& p, int64_t m, O* y) {
  const int64_t tiles = p.n / kTile;
  // two tiles at a time when several rows share them (one activation broadcast feeds both)
  if (m >= 2) {
    at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        if (2 * q + 1 < tiles) {
          tile_rows<BITS, DIGITS, 2, S>(p, 2 * q, m, y);
        } else {
          tile_rows<BITS, DIGITS, 1, S>(p, 2 * q, m, y);
        }
      }
    });
    return;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile_rows<BITS, DIGITS, 1, S>(p, t, m, y);
  });
}

#ifdef PAGODA_AMX
// AMX for 8-bit weights against activations with one scale per row (W8A8's per-token scheme, per
// channel weights): one integer sum per output over all the inputs, so each 16 x 16 block of sums
// leaves the tiles once (with a scale per group of inputs, the stores per group cost more than
// VNNI's products: measured). 16 chunks of 8-bit codes are a B tile as they lie.
constexpr int64_t kAmxMinRows = 4;  // fewer rows run on VNNI; both give the same bits



template <typename S, typename O>
void amx_gemm(const Problem& p, int64_t m, O* y) {
  const QuantizedActs& a = *p.acts;
  at::parallel_for(0, p.n / kTile, 1, [&](int64_t t0, int64_t t1) {
    configure_tiles();  // 0: int32 sums [16 rows][16 outputs]; 1: 16 rows x 64 inputs; 2: weights
    alignas(64) int32_t sums[16 * kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* w = p.w + t * p.chunks_per_tile * 64;
      __m512 sc, off;
      group_scales<S>(p, t, 0, sc, off);
      for (int64_t r0 = 0; r0 < m; r0 += 16) {
        _tile_zero(0);
        for (int64_t i = 0; i < p.k; i += 64) {
          _tile_loadd(1, a.digit(0) + r0 * p.k + i, p.k);
          _tile_loadd(2, w + i * kTile, 64);
          _tile_dpbsud(0, 1, 2);
        }
        _tile_stored(0, sums, 64);
        for (int64_t r = 0; r < std::min<int64_t>(16, m - r0); ++r) {
          const __m512i dot = _mm512_load_si512(sums + r * kTile);
          const __m512 v = add_group<1>(&dot, sc, off, a.scale[r0 + r], a.sum[r0 + r], _mm512_setzero_ps());
          store16(y + (r0 + r) * p.n + t * kTile, v);
        }
      }
    }
    _tile_release();
  });
}

// Whether qgemm takes the AMX path for these weights and rows.
bool use_amx(int64_t bits, int64_t act_bits, int64_t groups, int64_t k, int64_t m) {
  return bits == 8 && act_bits == 8 && groups == 1 && k % 64 == 0 && m >= kAmxMinRows && amx_ready();
}
#else
bool use_amx(int64_t, int64_t, int64_t, int64_t, int64_t) { return false; }
#endif  // PAGODA_AMX

template <int BITS, int DIGITS, typename S, typename O>
void gemm(const Problem& p, int64_t m, bool amx, O* y) {
#ifdef PAGODA_AMX
  if constexpr (BITS == 8 && DIGITS == 1) {
    if (amx) {
      amx_gemm<S>(p, m, y);
      return;
    }
  }
#endif
  vnni_gemm<BITS, DIGITS, S>(p, m, y);
}

#endif  // PAGODA_VNNI

// y[m, n] = x[m, k] @ W^T for the packed W (see the top of this file), with x quantized to
// `act_bits` (8 or 16) per row and group. x: float32 or bfloat16, contiguous; y has x's dtype.
at::Tensor qgemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group, double zero_code,
                 int64_t act_bits) {
#if defined(PAGODA_VNNI) || defined(PAGODA_AVX2)
  const PackedWeight w = packed_weight(x, packed, scale, offset, bits, group, zero_code, "qgemm");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "qgemm: act_bits must be 8 or 16");
  TORCH_CHECK(act_bits == 8 || group <= 128, "qgemm: 16-bit activations in groups of at most 128");
#endif
#ifdef PAGODA_VNNI
  const int64_t m = x.size(0), k = w.k;
  at::Tensor y = at::empty({m, w.n}, x.options());
  if (m == 0) return y;
  const bool amx = use_amx(bits, act_bits, w.groups, k, m);
  const int64_t rows = amx ? (m + 15) / 16 * 16 : m;
  auto run = [&](auto digits) {
    constexpr int kDigits = decltype(digits)::value;
    const QuantizedActs acts = x.scalar_type() == at::kFloat
                                   ? quantize_acts<kDigits>(x.data_ptr<float>(), m, rows, k, group)
                                   : quantize_acts<kDigits>(x.data_ptr<at::BFloat16>(), m, rows, k, group);
    const Problem p{w, &acts};
    dispatch_weight(scale.scalar_type(), bits, [&](auto b, auto s) {
      constexpr int kBits = decltype(b)::value;
      if (y.scalar_type() == at::kBFloat16) {
        gemm<kBits, kDigits, decltype(s)>(p, m, amx, y.data_ptr<at::BFloat16>());
      } else {
        gemm<kBits, kDigits, decltype(s)>(p, m, amx, y.data_ptr<float>());
      }
    });
  };
  if (act_bits == 16) {
    run(std::integral_constant<int, 2>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  return y;
#elif defined(PAGODA_AVX2)
  return qgemm_avx2(x, w, scale.scalar_type(), bits, act_bits);
#else
  TORCH_CHECK(false, "qgemm needs AVX512-VNNI or AVX2, which this build does not have");
#endif
}

// Whether qgemm runs per-token 8-bit layers on AMX here (from 4 rows on).
bool amx() {
#ifdef PAGODA_VNNI
  return amx_ready();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(pagoda_cpu, m) {
  m.def(
      "qgemm(Tensor x, Tensor packed, Tensor scale, Tensor? offset, int bits, int group, float zero_code, "
      "int act_bits) -> Tensor");
  m.def("amx() -> bool", &amx);
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("qgemm", &qgemm); }
