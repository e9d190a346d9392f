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

template <typename T>
QuantizedActs quantize_acts(const T* x, int64_t m, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  QuantizedActs a{std::vector<int8_t>(m * k), std::vector<float>(m * groups), std::vector<float>(m * groups)};
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(k);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(x[r * k + i]);
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = row.data() + g * group;
        float peak = 0.f;
        for (int64_t i = 0; i < group; ++i) peak = std::max(peak, std::fabs(v[i]));
        const float inv = peak > 0.f ? 127.f / peak : 0.f;
        int8_t* q = a.q.data() + r * k + g * group;
        int32_t total = 0;
        for (int64_t i = 0; i < group; ++i) {
          const int32_t c = static_cast<int32_t>(std::nearbyint(v[i] * inv));
          q[i] = static_cast<int8_t>(c);
          total += c;
        }
        a.scale[r * groups + g] = peak / 127.f;
        a.sum[r * groups + g] = static_cast<float>(total) * (peak / 127.f);
      }
    }
  });
  return a;
}

#ifdef PAGODA_VNNI

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

// R rows (r0 ..) times one tile of 16 outputs, written as float32 to out[R][16].
template <int BITS, int R, typename S>
inline void tile_block(const Problem& p, int64_t tile, int64_t r0, float* out) {
  constexpr int64_t kChunk = BITS == 4 ? 8 : 4;  // inputs per 64-byte chunk
  const int64_t chunks = p.group / kChunk;
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64;
  const S* scale = static_cast<const S*>(p.scale) + tile * p.groups * kTile;
  const S* offset = p.offset ? static_cast<const S*>(p.offset) + tile * p.groups * kTile : nullptr;
  const int8_t* xq = p.acts->q.data() + r0 * p.k;
  const float* xs = p.acts->scale.data() + r0 * p.groups;
  const float* xsum = p.acts->sum.data() + r0 * p.groups;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 zero_code = _mm512_set1_ps(p.zero_code);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    const int64_t k0 = g * p.group;
    for (int64_t c = 0; c < chunks; ++c, w += 64) {
      const __m512i v = _mm512_loadu_si512(w);
      const int64_t k = k0 + c * kChunk;
      if constexpr (BITS == 4) {
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm512_dpbusd_epi32(acc[r], lo, broadcast4(xq + r * p.k + k));
          acc[r] = _mm512_dpbusd_epi32(acc[r], hi, broadcast4(xq + r * p.k + k + 4));
        }
      } else {
        for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], v, broadcast4(xq + r * p.k + k));
      }
    }
    const __m512 sc = load16<S>(scale + g * kTile);
    __m512 off = offset ? load16<S>(offset + g * kTile) : _mm512_setzero_ps();
    off = _mm512_fnmadd_ps(sc, zero_code, off);  // offset - zero_code * scale
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(acc[r]);
      total[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(xs[r * p.groups + g])), total[r]);
      total[r] = _mm512_fmadd_ps(off, _mm512_set1_ps(xsum[r * p.groups + g]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * kTile, total[r]);
}

template <int BITS, typename S, typename O>
void gemm(const Problem& p, int64_t m, O* y) {
  const int64_t tiles = p.n / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float block[8 * kTile];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r0 = 0; r0 < m;) {
        const int64_t left = m - r0;
        const int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        switch (rows) {
          case 8: tile_block<BITS, 8, S>(p, t, r0, block); break;
          case 4: tile_block<BITS, 4, S>(p, t, r0, block); break;
          case 2: tile_block<BITS, 2, S>(p, t, r0, block); break;
          default: tile_block<BITS, 1, S>(p, t, r0, block); break;
        }
        for (int r = 0; r < rows; ++r)
          for (int64_t j = 0; j < kTile; ++j) y[(r0 + r) * p.n + t * kTile + j] = static_cast<O>(block[r * kTile + j]);
        r0 += rows;
      }
    }
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

}  // namespace

TORCH_LIBRARY(pagoda_cpu, m) {
  m.def("qgemm(Tensor x, Tensor packed, Tensor scale, Tensor? offset, int bits, int group, float zero_code) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("qgemm", &qgemm); }
