// pagoda's CPU GEMM for integer weights: 4- or 8-bit unsigned codes in groups, each group with its
// own scale and offset (w = scale * u + offset - zero_code * scale), against activations quantized
// to int8 per row and group at call time. The inner product is AVX512-VNNI's vpdpbusd (u8 x s8 ->
// s32), as llama.cpp runs its Q4/Q8 blocks.
//
// Weight layout (packed once at load, pagoda/engine/quantization/vnni.py): tiles of 16 outputs;
// within a tile, 64-byte chunks in input order. An 8-bit chunk holds 4 inputs of each of the 16
// outputs ([16][4] bytes: one int32 lane per output, so vpdpbusd accumulates 16 outputs at once
// and no horizontal sum is needed). A 4-bit chunk holds 8 inputs: the low nibbles are inputs 0-3,
// the high nibbles 4-7. Scales and offsets are [tiles][groups][16] (float32, float16 or bfloat16).
//
// Each weight chunk is loaded once per block of up to 8 activation rows, so a batch of 16 reads
// the weights twice from L1 instead of 16 times from memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PAGODA_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTile = 16;

// Activations [m, k] as int8 per row and group: q = round(x * 127 / absmax), with per (row, group)
// the scale absmax / 127 and that scale times the group's code sum (the offset term's factor).
struct QuantizedActs {
  std::vector<int8_t> q;     // [m, k]
  std::vector<float> scale;  // [m, groups]
  std::vector<float> sum;    // [m, groups]
};

#ifdef PAGODA_VNNI

inline __m512 load_row16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_row16(const at::BFloat16* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Vectorized, 16 inputs at a time (a masked tail for groups that are not multiples of 16):
// the peak, then codes rounded to nearest even (the default MXCSR mode, as torch.round).
template <typename T>
QuantizedActs quantize_acts(const T* x, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  QuantizedActs a{std::vector<int8_t>(m * k), std::vector<float>(m * groups), std::vector<float>(m * groups)};
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* v = x + r * k + g * group;
        __m512 peak = _mm512_setzero_ps();
        for (int64_t i = 0; i < group; i += 16) {
          const __mmask16 mask = group - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (group - i)) - 1);
          peak = _mm512_max_ps(peak, _mm512_and_ps(load_row16(v + i, mask), sign_off));
        }
        const float top = _mm512_reduce_max_ps(peak);
        const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
        int8_t* q = a.q.data() + r * k + g * group;
        __m512i total = _mm512_setzero_si512();
        for (int64_t i = 0; i < group; i += 16) {
          const __mmask16 mask = group - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (group - i)) - 1);
          const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(load_row16(v + i, mask), inv));
          _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtsepi32_epi8(c));
          total = _mm512_mask_add_epi32(total, mask, total, c);
        }
        a.scale[r * groups + g] = top / 127.f;
        a.sum[r * groups + g] = static_cast<float>(_mm512_reduce_add_epi32(total)) * (top / 127.f);
      }
    }
  });
  return a;
}

template <typename S>
inline __m512 load16(const S* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

struct Problem {
  const uint8_t* w;  // packed codes
  const void* scale;
  const void* offset;  // nullptr: none
  float zero_code;
  int64_t k, n, groups, group, chunks_per_tile;
  const QuantizedActs* acts;
};

// R rows (r0 ..) times T adjacent tiles of 16 outputs, written as float32 to out[R][T * 16]. Each
// activation broadcast feeds T tiles and each weight chunk R rows.
template <int BITS, int R, int T, typename S>
inline void tile_block(const Problem& p, int64_t tile, int64_t r0, float* out) {
  constexpr int64_t kChunk = BITS == 4 ? 8 : 4;  // inputs per 64-byte chunk
  const int64_t chunks = p.group / kChunk;
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64;
  const int64_t w_stride = p.chunks_per_tile * 64;
  const S* scale = static_cast<const S*>(p.scale) + tile * p.groups * kTile;
  const S* offset = p.offset ? static_cast<const S*>(p.offset) + tile * p.groups * kTile : nullptr;
  const int64_t s_stride = p.groups * kTile;
  const int8_t* xq = p.acts->q.data() + r0 * p.k;
  const float* xs = p.acts->scale.data() + r0 * p.groups;
  const float* xsum = p.acts->sum.data() + r0 * p.groups;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 zero_code = _mm512_set1_ps(p.zero_code);
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
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
          const __m512i a0 = broadcast4(xq + r * p.k + k), a1 = broadcast4(xq + r * p.k + k + 4);
          for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], a0);
            acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi[t], a1);
          }
        }
      } else {
        __m512i v[T];
        for (int t = 0; t < T; ++t) v[t] = _mm512_loadu_si512(w + t * w_stride);
        for (int r = 0; r < R; ++r) {
          const __m512i a = broadcast4(xq + r * p.k + k);
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], v[t], a);
        }
      }
    }
    __m512 sc[T], off[T];
    for (int t = 0; t < T; ++t) {
      sc[t] = load16<S>(scale + t * s_stride + g * kTile);
      off[t] = offset ? load16<S>(offset + t * s_stride + g * kTile) : _mm512_setzero_ps();
      off[t] = _mm512_fnmadd_ps(sc[t], zero_code, off[t]);  // offset - zero_code * scale
    }
    for (int r = 0; r < R; ++r) {
      const __m512 a_scale = _mm512_set1_ps(xs[r * p.groups + g]);
      const __m512 a_sum = _mm512_set1_ps(xsum[r * p.groups + g]);
      for (int t = 0; t < T; ++t) {
        const __m512 dot = _mm512_cvtepi32_ps(acc[r][t]);
        total[r][t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc[t], a_scale), total[r][t]);
        total[r][t] = _mm512_fmadd_ps(off[t], a_sum, total[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + (r * T + t) * kTile, total[r][t]);
}

// Rows r0 .. of T tiles from `tile` on: blocks of up to 8 rows (one tile) or 4 (two tiles).
template <int BITS, int T, typename S, typename O>
void tile_rows(const Problem& p, int64_t tile, int64_t m, O* y) {
  float block[8 * 2 * kTile];
  for (int64_t r0 = 0; r0 < m;) {
    const int64_t left = m - r0;
    const int rows = left >= 8 && T == 1 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    switch (rows) {
      case 8: tile_block<BITS, 8, 1, S>(p, tile, r0, block); break;
      case 4: tile_block<BITS, 4, T, S>(p, tile, r0, block); break;
      case 2: tile_block<BITS, 2, T, S>(p, tile, r0, block); break;
      default: tile_block<BITS, 1, T, S>(p, tile, r0, block); break;
    }
    for (int r = 0; r < rows; ++r)
      for (int64_t j = 0; j < T * kTile; ++j)
        y[(r0 + r) * p.n + tile * kTile + j] = static_cast<O>(block[r * T * kTile + j]);
    r0 += rows;
  }
}

template <int BITS, typename S, typename O>
void gemm(const Problem& p, int64_t m, O* y) {
  const int64_t tiles = p.n / kTile;
  // two tiles at a time when several rows share them (one activation broadcast feeds both)
  if (m >= 2) {
    at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        if (2 * q + 1 < tiles) {
          tile_rows<BITS, 2, S>(p, 2 * q, m, y);
        } else {
          tile_rows<BITS, 1, S>(p, 2 * q, m, y);
        }
      }
    });
    return;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile_rows<BITS, 1, S>(p, t, m, y);
  });
}

template <int BITS, typename S>
void gemm_out(const Problem& p, int64_t m, at::Tensor& y) {
  if (y.scalar_type() == at::kBFloat16) {
    gemm<BITS, S>(p, m, y.data_ptr<at::BFloat16>());
  } else {
    gemm<BITS, S>(p, m, y.data_ptr<float>());
  }
}

template <typename S>
void gemm_bits(const Problem& p, int64_t bits, int64_t m, at::Tensor& y) {
  if (bits == 4) {
    gemm_out<4, S>(p, m, y);
  } else {
    gemm_out<8, S>(p, m, y);
  }
}

// float8_e4m3fn bytes -> float32, 16 at a time: sign, 4 exponent bits (bias 7), 3 mantissa bits;
// exponent 0 is subnormal (mantissa * 2^-9). 0x7F/0xFF (NaN) come out as +-480: checkpoints hold none.
inline __m512 fp8_to_f32(__m128i bytes) {
  const __m512i b = _mm512_cvtepu8_epi32(bytes);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  const __m512i exp = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(0xF));
  const __m512i man = _mm512_and_si512(b, _mm512_set1_epi32(0x7));
  const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exp, _mm512_set1_epi32(120)), 23),
                                         _mm512_slli_epi32(man, 20));
  const __m512 tiny = _mm512_mul_ps(_mm512_cvtepi32_ps(man), _mm512_set1_ps(1.0f / 512.0f));
  const __mmask16 is_tiny = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
  const __m512 mag = _mm512_mask_blend_ps(is_tiny, _mm512_castsi512_ps(normal), tiny);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign));
}

// R rows times one tile of 16 fp8 outputs whose weights were dequantized into wt[k][16] (float32).
template <int R>
inline void fp8_rows(const float* wt, const float* x, int64_t k, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const __m512 w = _mm512_loadu_ps(wt + i * kTile);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * k + i]), w, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kTile, acc[r]);
}

// y = x @ (codes * scale)^T with codes float8 in tiles [tiles][k][16] (16 outputs' bytes of one
// input side by side): each tile is dequantized once into a k x 16 float32 buffer (L1/L2-sized),
// then every row of x multiplies it; no dequantized matrix is ever held.
template <typename O>
void fp8_gemm(const uint8_t* codes, const float* scale, const float* x, int64_t m, int64_t k, int64_t n, O* y) {
  const int64_t tiles = n / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> wt(k * kTile);
    float block[8 * kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const __m512 sc = _mm512_loadu_ps(scale + t * kTile);
      const uint8_t* c = codes + t * k * kTile;
      for (int64_t i = 0; i < k; ++i) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i * kTile));
        _mm512_storeu_ps(wt.data() + i * kTile, _mm512_mul_ps(fp8_to_f32(bytes), sc));
      }
      for (int64_t r0 = 0; r0 < m;) {
        const int64_t left = m - r0;
        const int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float* xr = x + r0 * k;
        switch (rows) {
          case 8: fp8_rows<8>(wt.data(), xr, k, block); break;
          case 4: fp8_rows<4>(wt.data(), xr, k, block); break;
          case 2: fp8_rows<2>(wt.data(), xr, k, block); break;
          default: fp8_rows<1>(wt.data(), xr, k, block); break;
        }
        for (int r = 0; r < rows; ++r)
          for (int64_t j = 0; j < kTile; ++j) y[(r0 + r) * n + t * kTile + j] = static_cast<O>(block[r * kTile + j]);
        r0 += rows;
      }
    }
  });
}

#endif  // PAGODA_VNNI

// y[m, n] = x[m, k] @ W^T for the packed W (see the top of this file). x: float32 or bfloat16,
// contiguous; y has x's dtype.
at::Tensor qgemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group, double zero_code) {
#ifdef PAGODA_VNNI
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "qgemm: x must be a contiguous matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qgemm: x float32 or bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, "qgemm: bits must be 4 or 8");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64, "qgemm: packed layout");
  TORCH_CHECK(scale.dim() == 3 && scale.size(2) == kTile && scale.is_contiguous(), "qgemm: scale layout");
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0), groups = scale.size(1);
  const int64_t chunk = bits == 4 ? 8 : 4;
  TORCH_CHECK(group % chunk == 0 && k == groups * group, "qgemm: groups do not tile the inputs");
  TORCH_CHECK(packed.size(1) == k / chunk && scale.size(0) == tiles, "qgemm: packed shape mismatch");
  const void* off = nullptr;
  if (offset.has_value()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == scale.scalar_type(), "qgemm: offset");
    off = offset->data_ptr();
  }
  at::Tensor y = at::empty({m, tiles * kTile}, x.options());
  if (m == 0) return y;
  const QuantizedActs acts = x.scalar_type() == at::kFloat ? quantize_acts(x.data_ptr<float>(), m, k, group)
                                                           : quantize_acts(x.data_ptr<at::BFloat16>(), m, k, group);
  const Problem p{packed.data_ptr<uint8_t>(), scale.data_ptr(), off, static_cast<float>(zero_code),
                  k, tiles * kTile, groups, group, k / chunk, &acts};
  switch (scale.scalar_type()) {
    case at::kFloat: gemm_bits<float>(p, bits, m, y); break;
    case at::kHalf: gemm_bits<at::Half>(p, bits, m, y); break;
    case at::kBFloat16: gemm_bits<at::BFloat16>(p, bits, m, y); break;
    default: TORCH_CHECK(false, "qgemm: scales float32, float16 or bfloat16");
  }
  return y;
#else
  TORCH_CHECK(false, "qgemm needs AVX512-VNNI, which this build does not have");
#endif
}

// y[m, n] = x[m, k] @ (codes * scale)^T for float8_e4m3fn codes packed [n / 16, k, 16] (uint8) and
// one float32 scale per output (padded to the tiles). x float32 or bfloat16; y has x's dtype.
at::Tensor fp8_gemm_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
#ifdef PAGODA_VNNI
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fp8_gemm: x must be a float32 or bfloat16 matrix");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == kTile && codes.is_contiguous(),
              "fp8_gemm: codes layout");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0) * kTile;
  TORCH_CHECK(codes.size(1) == k, "fp8_gemm: codes take ", codes.size(1), " inputs, x has ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n && scale.is_contiguous(), "fp8_gemm: scale");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  if (y.scalar_type() == at::kBFloat16) {
    fp8_gemm(codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), xf.data_ptr<float>(), m, k, n, y.data_ptr<at::BFloat16>());
  } else {
    fp8_gemm(codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), xf.data_ptr<float>(), m, k, n, y.data_ptr<float>());
  }
  return y;
#else
  TORCH_CHECK(false, "fp8_gemm needs AVX-512, which this build does not have");
#endif
}

}  // namespace

TORCH_LIBRARY(pagoda_cpu, m) {
  m.def("qgemm(Tensor x, Tensor packed, Tensor scale, Tensor? offset, int bits, int group, float zero_code) -> Tensor");
  m.def("fp8_gemm(Tensor x, Tensor codes, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) {
  m.impl("qgemm", &qgemm);
  m.impl("fp8_gemm", &fp8_gemm_op);
}
