// pagoda's CPU GEMM for the prompt rows of weight-only integer layers on CPUs with AVX512-BF16:
// the packed weights of qgemm.cpp, each tile of 16 outputs dequantized once per call to bfloat16
// (w = scale * u + offset - zero_code * scale in float32, rounded: what a dense bf16 copy of the
// weight holds) into [k / 2][16 outputs][2 inputs] (the B layout of AMX's tdpbf16ps, and one
// vdpbf16ps operand per pair of inputs), then multiplied by every row of x in bfloat16: on AMX 16
// rows x 32 inputs per instruction, else 2 inputs of one row per vdpbf16ps, 8 rows at a time.
// Either way a row's sums run over the inputs in one order whatever the other rows: a row's
// result does not depend on the batch. Dequantizing costs as much as a few VNNI rows, so this pays
// from tens of rows on: prompts, not decode steps. On AVX512-BF16 it runs at dense bf16's rate,
// 1.3-1.4x the 16-bit integer activations of qgemm.cpp (two vpdpbusd digits and a scale per group).
#include "common.h"

namespace {

using namespace pagoda_cpu;

#ifdef PAGODA_BF16

constexpr int64_t kRowPad = 16;  // x's rows padded to a multiple of this (AMX's tile height)

// Tile `tile` of p dequantized into buf[k / 2][16][2] (bfloat16 bits).
template <int BITS, typename S>
void dequantize_tile(const PackedWeight& p, int64_t tile, uint16_t* buf) {
  constexpr int64_t kChunk = BITS == 4 ? 8 : 4;  // inputs per 64-byte chunk
  const uint8_t* w = p.w + tile * p.chunks_per_tile * 64;
  // a 16-byte quarter of a [16 outputs][4 inputs] chunk holds outputs 4q .. 4q + 3
  __m512i spread[4];
  for (int q = 0; q < 4; ++q) {
    const int a = 4 * q, b = a + 1, c = a + 2, d = a + 3;
    spread[q] = _mm512_set_epi32(d, d, d, d, c, c, c, c, b, b, b, b, a, a, a, a);
  }
  // pairs (dwords) of inputs 0-1 / 2-3 of outputs 0-7 (first operand) and 8-15 (second)
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t at = (tile * p.groups + g) * kTile;
    const __m512 sc = load16<S>(static_cast<const S*>(p.scale) + at);
    __m512 off = p.offset ? load16<S>(static_cast<const S*>(p.offset) + at) : _mm512_setzero_ps();
    off = _mm512_fnmadd_ps(sc, _mm512_set1_ps(p.zero_code), off);
    __m512 sq[4], oq[4];
    for (int q = 0; q < 4; ++q) {
      sq[q] = _mm512_permutexvar_ps(spread[q], sc);
      oq[q] = _mm512_permutexvar_ps(spread[q], off);
    }
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += kChunk, w += 64) {
      const __m512i v = _mm512_loadu_si512(w);
      __m512i parts[2] = {v, v};
      if constexpr (BITS == 4) {
        parts[0] = _mm512_and_si512(v, nibble);
        parts[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
      for (int h = 0; h < kChunk / 4; ++h) {
        __m512 f[4];
        for (int q = 0; q < 4; ++q) {
          const __m512i u = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(parts[h], q));
          f[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), sq[q], oq[q]);
        }
        const __m512i lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0]));
        const __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[3], f[2]));
        uint16_t* row = buf + (k + 4 * h) * kTile;  // pair (k + 4h) / 2: 32 bfloat16 per pair
        _mm512_storeu_si512(row, _mm512_permutex2var_epi32(lo, even, hi));
        _mm512_storeu_si512(row + 2 * kTile, _mm512_permutex2var_epi32(lo, odd, hi));
      }
    }
  }
}

// Outputs col .. col + 15 of rows 0 .. m - 1 of y (row stride n): x [rows, k] times the tile in
// buf, 8 rows at a time, each row's 16 sums in a register across all k inputs (vdpbf16ps).
template <typename O>
void dot_tile(const uint16_t* x, int64_t m, int64_t k, const uint16_t* buf, O* y, int64_t n, int64_t col) {
  constexpr int kRows = 8;  // independent sums: enough to hide vdpbf16ps's latency
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* xr = x + r0 * k;
    for (int64_t i = 0; i < k; i += 2) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(buf + i * kTile));
      for (int r = 0; r < kRows; ++r) {
        int32_t pair;  // inputs i and i + 1 of row r
        std::memcpy(&pair, xr + r * k + i, sizeof(pair));
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), w);
      }
    }
    for (int64_t r = 0; r < std::min<int64_t>(kRows, m - r0); ++r) store16(y + (r0 + r) * n + col, acc[r]);
  }
}

#ifdef PAGODA_AMX
// The same on AMX tiles: 16 rows x 32 inputs per tdpbf16ps.
template <typename O>
void amx_tile(const uint16_t* x, int64_t m, int64_t k, const uint16_t* buf, O* y, int64_t n, int64_t col) {
  alignas(64) float block[16 * kTile];
  for (int64_t r0 = 0; r0 < m; r0 += 16) {
    _tile_zero(0);
    for (int64_t i = 0; i < k; i += 32) {
      _tile_loadd(1, x + r0 * k + i, k * 2);
      _tile_loadd(2, buf + i * kTile, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, block, 64);
    for (int64_t r = 0; r < std::min<int64_t>(16, m - r0); ++r)
      store16(y + (r0 + r) * n + col, _mm512_load_ps(block + r * kTile));
  }
}
#endif

// x [rows, k] (bfloat16, rows a multiple of kRowPad, k of 32; zero padding) times the packed weight.
template <int BITS, typename S, typename O>
void wgemm(const PackedWeight& p, const uint16_t* x, int64_t m, int64_t k, O* y) {
  [[maybe_unused]] const bool amx = amx_ready();
  at::parallel_for(0, p.n / kTile, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> buf(k * kTile, 0);  // inputs past p.k stay zero
#ifdef PAGODA_AMX
    if (amx) configure_tiles();  // 0: float32 sums [16 rows][16 outputs]; 1: 16 rows x 32 inputs; 2: weights
#endif
    for (int64_t t = t0; t < t1; ++t) {
      dequantize_tile<BITS, S>(p, t, buf.data());
#ifdef PAGODA_AMX
      if (amx) {
        amx_tile(x, m, k, buf.data(), y, p.n, t * kTile);
        continue;
      }
#endif
      dot_tile(x, m, k, buf.data(), y, p.n, t * kTile);
    }
#ifdef PAGODA_AMX
    if (amx) _tile_release();
#endif
  });
}

#endif  // PAGODA_BF16

// Whether wgemm runs here: AVX512-BF16 in the build (and so the CPU).
bool wgemm_runs() {
#ifdef PAGODA_BF16
  return true;
#else
  return false;
#endif
}

// y[m, n] = x[m, k] @ W^T for the packed W (qgemm.cpp's layout) in bfloat16 arithmetic (float32
// x is rounded to bfloat16 first); y has x's dtype. CPUs with AVX512-BF16 only (`wgemm_runs()`).
at::Tensor wgemm_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& offset, int64_t bits, int64_t group, double zero_code) {
  const PackedWeight p = packed_weight(x, packed, scale, offset, bits, group, zero_code, "wgemm");
  TORCH_CHECK(wgemm_runs(), "wgemm needs AVX512-BF16, which this CPU or build does not have");
#ifdef PAGODA_BF16
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, p.n}, x.options());
  if (m == 0) return y;
  // AMX reads x 16 rows by 32 inputs at a time (vdpbf16ps 8 rows by 2): pad both with zeros
  const int64_t rows = (m + kRowPad - 1) / kRowPad * kRowPad, k = (p.k + 31) / 32 * 32;
  at::Tensor xb = at::zeros({rows, k}, x.options().dtype(at::kBFloat16));
  xb.narrow(0, 0, m).narrow(1, 0, p.k).copy_(x);
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  dispatch_weight(scale.scalar_type(), bits, [&](auto b, auto s) {
    constexpr int kBits = decltype(b)::value;
    if (y.scalar_type() == at::kBFloat16) {
      wgemm<kBits, decltype(s)>(p, xp, m, k, y.data_ptr<at::BFloat16>());
    } else {
      wgemm<kBits, decltype(s)>(p, xp, m, k, y.data_ptr<float>());
    }
  });
  return y;
#else
  return x;  // unreachable: wgemm_runs() is false without PAGODA_BF16
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda_cpu, m) {
  m.def("wgemm(Tensor x, Tensor packed, Tensor scale, Tensor? offset, int bits, int group, float zero_code) -> Tensor");
  m.def("wgemm_runs() -> bool", &wgemm_runs);
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("wgemm", &wgemm_op); }
