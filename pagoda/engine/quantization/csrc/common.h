// What pagoda's CPU kernels share: the tile of 16 outputs (one 512-bit register of float32) and
// loads of 16 scales or offsets in any of the dtypes the packed weights keep them in.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PAGODA_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// qgemm and decode_attention only (qgemm_avx2.cpp, attention_avx2.cpp): the others need AVX-512
#define PAGODA_AVX2 1
#include <immintrin.h>
#endif
// AVX512-BF16 (Cooper Lake, Sapphire Rapids and newer Xeons, Zen 4 and newer EPYCs): wgemm.cpp.
#if defined(PAGODA_VNNI) && defined(__AVX512BF16__)
#define PAGODA_BF16 1
#endif
// AMX (Sapphire Rapids and newer) comes with all three tile extensions and AVX512-BF16.
#if defined(PAGODA_BF16) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define PAGODA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pagoda_cpu {

constexpr int64_t kTile = 16;

// The packed weight as the kernels read it (layout: the top of qgemm.cpp).
struct PackedWeight {
  const uint8_t* w;    // codes, [tiles][chunks][64]
  const void* scale;   // [tiles][groups][16]
  const void* offset;  // as scale; nullptr: none
  float zero_code;
  int64_t k, n, groups, group, chunks_per_tile;
};

// Checks the arguments every op on packed weights takes and describes the weight.
inline PackedWeight packed_weight(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                  const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group,
                                  double zero_code, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x float32 or bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              op, ": packed layout");
  TORCH_CHECK(scale.dim() == 3 && scale.size(2) == kTile && scale.is_contiguous(), op, ": scale layout");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf ||
                  scale.scalar_type() == at::kBFloat16,
              op, ": scales float32, float16 or bfloat16");
  const int64_t k = x.size(1), tiles = packed.size(0), groups = scale.size(1);
  const int64_t chunk = bits == 4 ? 8 : 4;
  TORCH_CHECK(group % chunk == 0 && k == groups * group, op, ": groups do not tile the inputs");
  TORCH_CHECK(packed.size(1) == k / chunk && scale.size(0) == tiles, op, ": packed shape mismatch");
  const void* off = nullptr;
  if (offset.has_value()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == scale.scalar_type(), op, ": offset");
    off = offset->data_ptr();
  }
  return {packed.data_ptr<uint8_t>(), scale.data_ptr(), off, static_cast<float>(zero_code), k, tiles * kTile,
          groups, group, k / chunk};
}

// Calls fn(bits, scale) with bits a std::integral_constant (4 or 8) and scale a value of the
// scales' element type, so that kernels are instantiated per combination.
template <typename Fn>
void dispatch_weight(at::ScalarType scale_type, int64_t bits, Fn&& fn) {
  auto with_bits = [&](auto s) {
    if (bits == 4) {
      fn(std::integral_constant<int, 4>{}, s);
    } else {
      fn(std::integral_constant<int, 8>{}, s);
    }
  };
  switch (scale_type) {
    case at::kFloat: with_bits(float{}); break;
    case at::kHalf: with_bits(at::Half{}); break;
    default: with_bits(at::BFloat16{}); break;
  }
}

#ifdef PAGODA_AVX2
// qgemm's arguments checked (packed_weight) and its work done on AVX2 (qgemm_avx2.cpp)
at::Tensor qgemm_avx2(const at::Tensor& x, const PackedWeight& w, at::ScalarType scale_type, int64_t bits,
                      int64_t act_bits);
#endif

// Whether this process may use AMX: Linux grants the tile state on request, once per process.
inline bool amx_ready() {
#ifdef PAGODA_AMX
  static const bool ok = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef PAGODA_AMX
// Tiles 0, 1 and 2 as 16 rows of 64 bytes (what both AMX kernels use).
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64};
    uint8_t rows[16] = {16, 16, 16};
  } cfg;
  // GCC 12 does not see ldtilecfg read the struct and drops its stores without this
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
#endif

#ifdef PAGODA_VNNI

// The lanes of the next 16 values when `left` remain in a row (all 16, or a masked tail).
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 (or the masked lanes of) float32 or bfloat16 values as float32.
inline __m512 load_row16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_row16(const at::BFloat16* p, __mmask16 mask) {
  const __m256i half = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 16 scales or offsets as float32.
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
  return load_row16(p, 0xFFFF);
}

// float32 rounded to bfloat16 (nearest even), kept in float32.
inline __m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The masked lanes of 16 float32 already on bfloat16's grid (round_bf16) stored as bfloat16.
inline void store_bf16(at::BFloat16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// 16 float32 stored as they are, or rounded to nearest even as bfloat16.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  store_bf16(p, round_bf16(v), 0xFFFF);
#endif
}

#endif  // PAGODA_VNNI

#ifdef PAGODA_AVX2
// Up to 8 values from p as float32 (zeros past `n`).
inline __m256 load8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  alignas(32) float v[8] = {};
  std::memcpy(v, p, n * sizeof(float));
  return _mm256_load_ps(v);
}
inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 load8(const at::BFloat16* p, int64_t n) {
  if (n >= 8) return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // the hot case: no copy
  alignas(16) uint16_t v[8] = {};
  std::memcpy(v, p, n * sizeof(uint16_t));
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(v)));
}

// 8 float32 stored as they are, or rounded to nearest even as bfloat16.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {  // rounded to nearest even
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// The largest of 8 lanes, and the sum.
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// decode_attention's work on AVX2 (attention_avx2.cpp), its arguments checked by attention.cpp.
void decode_attention_avx2(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
                           double softcap);

#endif  // PAGODA_AVX2

}  // namespace pagoda_cpu
