// pagoda's CPU GEMM for float8_e4m3fn weights: CPUs have no fp8 math, so each tile of 16 outputs is
// dequantized into a k x 16 float32 buffer and multiplied there; no dequantized matrix is held.
#include "common.h"

namespace {

using namespace pagoda_cpu;

#ifdef PAGODA_VNNI

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

TORCH_LIBRARY_FRAGMENT(pagoda_cpu, m) { m.def("fp8_gemm(Tensor x, Tensor codes, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("fp8_gemm", &fp8_gemm_op); }
