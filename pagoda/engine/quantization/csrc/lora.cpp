// Multi-LoRA on the CPU in one op per projection: y[t] += B[s]^T (A[s] x[t]) for each row t with an
// adapter slot s, for each sub-projection (q, k, v of a fused QKV; gate, up) that slot's adapter
// targets, into that sub-projection's columns of the base output. Only the useful arithmetic runs
// (each row against its own adapter's rank rows), where torch's batched ops either compute every
// slot's rank columns for every row (8x the work at 8 adapters) or loop per segment in Python: at
// 16 decode rows the arithmetic is ~0.2 MFMA a projection and torch's 5 ops cost ~80 us of it.
//
//   y [T, out]                      the base output, updated in place (rows may be strided)
//   x [T, in]                       the projection's input
//   a [subs, slots, max_rank, in]   each sub-projection's A per slot
//   b [slots, max_rank, out]        each slot's scaled B, sub i's in its own columns
//   row_slot [T] int32              the row's slot, -1: the base model alone
//   ranks [slots, subs] int32       the rank of the adapter in (slot, sub); 0: none targets it
//   firsts, widths                  each sub-projection's columns of y
//
// h = A x stays in float32 (torch's path rounds it to the run dtype first); y is rounded once.
#include "common.h"

namespace {

using namespace pagoda_cpu;

constexpr int64_t kMaxRank = 512;

#ifdef PAGODA_VNNI

inline void store_row16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store_row16(at::BFloat16* p, __m512 v, __mmask16 mask) { store_bf16(p, round_bf16(v), mask); }

inline __mmask16 lanes(int64_t left) { return left <= 0 ? static_cast<__mmask16>(0) : tail_mask(left); }

// h[g][r] = a[r] . x[g] for G rows of one slot and r < rank, R rank rows at a time: G x R
// independent accumulator chains (the FMA latency hidden), each load of x serving R rank rows and
// each load of a serving G rows.
template <int G, int R, typename T>
void shrink_block(const T* const* x, const T* a, int64_t r, int64_t in, float (*h)[kMaxRank]) {
  __m512 acc[G][R];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < R; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 mask = tail_mask(in - k);
    __m512 av[R];
    for (int i = 0; i < R; ++i) av[i] = load_row16(a + (r + i) * in + k, mask);
    for (int g = 0; g < G; ++g) {
      const __m512 xv = load_row16(x[g] + k, mask);
      for (int i = 0; i < R; ++i) acc[g][i] = _mm512_fmadd_ps(xv, av[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < R; ++i) h[g][r + i] = _mm512_reduce_add_ps(acc[g][i]);
}

template <int G, typename T>
void shrink_rows(const T* const* x, const T* a, int64_t rank, int64_t in, float (*h)[kMaxRank]) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) shrink_block<G, 4>(x, a, r, in, h);
  for (; r < rank; ++r) shrink_block<G, 1>(x, a, r, in, h);
}

// y[g][j] += sum_r h[g][r] b[r, j] for G rows and j < width, 64 columns at a time: each load of b
// serves G rows.
template <int G, typename T>
void expand_rows(float (*h)[kMaxRank], const T* b, int64_t rank, int64_t out, int64_t width, T* const* y) {
  for (int64_t j = 0; j < width; j += 64) {
    __mmask16 mask[4];
    __m512 acc[G][4];
    for (int i = 0; i < 4; ++i) {
      mask[i] = lanes(width - j - 16 * i);
      for (int g = 0; g < G; ++g) acc[g][i] = load_row16(y[g] + j + 16 * i, mask[i]);
    }
    for (int64_t r = 0; r < rank; ++r) {
      __m512 bv[4];
      for (int i = 0; i < 4; ++i) bv[i] = load_row16(b + r * out + j + 16 * i, mask[i]);
      for (int g = 0; g < G; ++g) {
        const __m512 hv = _mm512_set1_ps(h[g][r]);
        for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(hv, bv[i], acc[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) store_row16(y[g] + j + 16 * i, acc[g][i], mask[i]);
  }
}

// G rows (1-4) of slot s, every sub-projection its adapter targets.
template <int G, typename T>
void lora_group(const T* const* x, T* const* y, const T* ap, const T* bp, int64_t s, const int32_t* ranks,
                int64_t subs, int64_t slots, int64_t max_rank, int64_t in, int64_t out,
                const std::vector<int64_t>& firsts, const std::vector<int64_t>& widths) {
  float h[G][kMaxRank];
  for (int64_t i = 0; i < subs; ++i) {
    const int64_t rank = ranks[s * subs + i];
    if (rank == 0) continue;
    shrink_rows<G>(x, ap + ((i * slots + s) * max_rank) * in, rank, in, h);
    T* yi[G];
    for (int g = 0; g < G; ++g) yi[g] = y[g] + firsts[i];
    expand_rows<G>(h, bp + s * max_rank * out + firsts[i], rank, out, widths[i], yi);
  }
}

template <typename T>
void lora_rows(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
               const int32_t* row_slot, const int32_t* ranks, const std::vector<int64_t>& firsts,
               const std::vector<int64_t>& widths) {
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1), y_stride = y.stride(0);
  const int64_t subs = a.size(0), slots = a.size(1), max_rank = a.size(2);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  // groups of up to 4 rows of one slot (rows come sorted by adapter); a prompt's many groups are
  // split over the threads, a decode step's few (8 for 16 rows over 8 adapters) run inline: an
  // OpenMP region per projection cost 0.3-7 ms whenever another process held a core (2 cores)
  struct Group {
    int64_t first, n, slot;
  };
  std::vector<Group> groups;
  for (int64_t t = 0; t < rows;) {
    const int64_t s = row_slot[t];
    int64_t n = 1;
    while (n < 4 && t + n < rows && row_slot[t + n] == s) ++n;
    if (s >= 0) groups.push_back({t, n, s});
    t += n;
  }
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 16, [&](int64_t g0, int64_t g1) {
    for (int64_t k = g0; k < g1; ++k) {
      const Group& grp = groups[k];
      const T* xs[4];
      T* ys[4];
      for (int64_t g = 0; g < grp.n; ++g) {
        xs[g] = xp + (grp.first + g) * in;
        ys[g] = yp + (grp.first + g) * y_stride;
      }
      const int64_t s = grp.slot;
      switch (grp.n) {
        case 1: lora_group<1>(xs, ys, ap, bp, s, ranks, subs, slots, max_rank, in, out, firsts, widths); break;
        case 2: lora_group<2>(xs, ys, ap, bp, s, ranks, subs, slots, max_rank, in, out, firsts, widths); break;
        case 3: lora_group<3>(xs, ys, ap, bp, s, ranks, subs, slots, max_rank, in, out, firsts, widths); break;
        default: lora_group<4>(xs, ys, ap, bp, s, ranks, subs, slots, max_rank, in, out, firsts, widths);
      }
    }
  });
}

#endif  // PAGODA_VNNI

void lora_add(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& row_slot, const at::Tensor& ranks, at::IntArrayRef firsts, at::IntArrayRef widths) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "lora_add_: x must be float32 or bfloat16");
  TORCH_CHECK(y.scalar_type() == dtype && a.scalar_type() == dtype && b.scalar_type() == dtype,
              "lora_add_: y, a and b must have x's dtype");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && y.dim() == 2 && y.stride(1) == 1 && y.size(0) == x.size(0),
              "lora_add_: x [T, in] contiguous, y [T, out] with unit column stride");
  TORCH_CHECK(a.dim() == 4 && a.is_contiguous() && a.size(3) == x.size(1) && a.size(2) <= kMaxRank,
              "lora_add_: a [subs, slots, rank <= 512, in] contiguous");
  TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.size(0) == a.size(1) && b.size(1) == a.size(2) &&
                  b.size(2) == y.size(1),
              "lora_add_: b [slots, rank, out] contiguous");
  TORCH_CHECK(row_slot.scalar_type() == at::kInt && row_slot.numel() == x.size(0) && row_slot.is_contiguous(),
              "lora_add_: row_slot int32 [T]");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.dim() == 2 &&
                  ranks.size(0) == a.size(1) && ranks.size(1) == a.size(0),
              "lora_add_: ranks int32 [slots, subs]");
  TORCH_CHECK(static_cast<int64_t>(firsts.size()) == a.size(0) && widths.size() == firsts.size(),
              "lora_add_: one (first, width) per sub-projection");
  for (size_t i = 0; i < firsts.size(); ++i) {
    TORCH_CHECK(firsts[i] >= 0 && widths[i] >= 0 && firsts[i] + widths[i] <= y.size(1), "lora_add_: columns");
  }
#ifdef PAGODA_VNNI
  const int32_t* slot_p = row_slot.data_ptr<int32_t>();
  const int32_t* rank_p = ranks.data_ptr<int32_t>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    TORCH_CHECK(slot_p[t] >= -1 && slot_p[t] < a.size(1), "lora_add_: row_slot out of range");
  }
  for (int64_t i = 0; i < ranks.numel(); ++i) {
    TORCH_CHECK(rank_p[i] >= 0 && rank_p[i] <= a.size(2), "lora_add_: rank out of range");
  }
  const std::vector<int64_t> f(firsts.begin(), firsts.end()), w(widths.begin(), widths.end());
  if (dtype == at::kFloat) {
    lora_rows<float>(y, x, a, b, slot_p, rank_p, f, w);
  } else {
    lora_rows<at::BFloat16>(y, x, a, b, slot_p, rank_p, f, w);
  }
#else
  TORCH_CHECK(false, "lora_add_: built without AVX512-VNNI");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda_cpu, m) {
  m.def(
      "lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor row_slot, Tensor ranks, int[] firsts, "
      "int[] widths) -> ()");
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("lora_add_", &lora_add); }
