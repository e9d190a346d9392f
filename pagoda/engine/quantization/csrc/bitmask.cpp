// Structured outputs: the grammar's token bitmask applied to a step's logits in place. torch has
// no op for it: unpacking 16 rows of a 49k vocabulary into a bool mask and masked_fill took ~3 ms a
// step on these CPUs (pagoda/engine/sampling/sampler.py keeps that path for other machines); this
// loop skips the words whose 32 tokens are all allowed (inside a JSON string, nearly all of them).
#include "common.h"

#include <limits>

namespace {

// logits[rows[i], t] = -inf for every token t whose bit (t % 32 of word t / 32 of bitmask[i]) is 0;
// tokens past the bitmask's words are banned too.
void apply_token_bitmask(at::Tensor logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "apply_token_bitmask_: logits must be contiguous float32 [rows, vocab]");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous(),
              "apply_token_bitmask_: bitmask must be contiguous int32 [k, words]");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.size(0) == bitmask.size(0),
              "apply_token_bitmask_: rows must be int64 [k]");
  const int64_t vocab = logits.size(1), words = bitmask.size(1), k = rows.size(0);
  const int64_t covered = std::min(vocab, words * 32);
  float* out = logits.data_ptr<float>();
  const auto* masks = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < logits.size(0), "apply_token_bitmask_: row out of range");
  }
  at::parallel_for(0, k, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = out + row_ids[i] * vocab;
      const uint32_t* mask = masks + i * words;
      for (int64_t base = 0; base < covered; base += 32) {
        const uint32_t bits = mask[base / 32];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t n = std::min<int64_t>(32, covered - base);
#ifdef PAGODA_VNNI
        if (n == 32) {  // two masked stores: -inf where a bit is 0
          const __m512 fill = _mm512_set1_ps(ninf);
          _mm512_mask_storeu_ps(row + base, static_cast<__mmask16>(~bits & 0xFFFFu), fill);
          _mm512_mask_storeu_ps(row + base + 16, static_cast<__mmask16>(~bits >> 16), fill);
          continue;
        }
#endif
        for (int64_t t = 0; t < n; ++t) {
          if (((bits >> t) & 1u) == 0) row[base + t] = ninf;
        }
      }
      for (int64_t t = covered; t < vocab; ++t) row[t] = ninf;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda_cpu, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(pagoda_cpu, CPU, m) { m.impl("apply_token_bitmask_", &apply_token_bitmask); }
