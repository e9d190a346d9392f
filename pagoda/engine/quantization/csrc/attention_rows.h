// What both decode attention kernels (attention.cpp on AVX-512, attention_avx2.cpp on AVX2) share:
// the task of one (sequence, KV head), and the loop that checks the sequence lengths, sizes the
// scratch buffers and hands the tasks to the threads. Each kernel brings its own `attend`, picked
// once a call for the task's shape (`Pick::template pick<T, I>(task)`).
#pragma once

#include "common.h"

namespace pagoda_cpu {
namespace attention {

constexpr int64_t kInline = 1 << 20;  // multiply-adds below which a call stays on this thread
constexpr int64_t kMaxRows = 16;      // query heads per KV head (attention.cpp checks both)
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;     // KV heads one task takes, at most

// Asks for a key's or value's row ahead of its use: the rows of one KV head are `head_dim` values
// in every kv_heads * head_dim, a stride the hardware prefetcher does not follow across blocks,
// and from memory (a decode step's KV cache is far larger than the caches) the loads alone ran
// at a third of the memory's bandwidth.
constexpr int64_t kAhead = 8;  // keys
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

struct Task {
  int64_t rows, chunks, block_size, kv_heads, head_dim;  // chunks: head_dim / the kernel's lanes
  float scale, softcap;
};

// One sequence and KV heads [head, head + heads): (its queries, k_cache, v_cache, its block table,
// first key, length, head, heads, task, scores scratch [heads * rows * keys], key rows scratch
// [keys], accumulator scratch [heads * rows * head_dim], its out).
template <typename T, typename I>
using AttendFn = void (*)(const T*, const T*, const T*, const I*, int64_t, int64_t, int64_t, int64_t, const Task&,
                          float*, int64_t*, float*, T*);

template <typename Pick, typename T, typename I, typename L>
void decode_rows(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& lens, int64_t window, const Task& t) {
  const int64_t n = q.size(0), heads = q.size(1), max_blocks = tables.size(1), table_stride = tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const I* tp = tables.data_ptr<I>();
  const L* lp = lens.data_ptr<L>();
  T* op = out.data_ptr<T>();
  int64_t longest = 0, work = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t len = static_cast<int64_t>(lp[s]);
    TORCH_CHECK(len >= 0 && len <= max_blocks * t.block_size, "decode_attention: seq_len beyond its block table");
    longest = std::max(longest, len);
    work += len;
  }
  work *= heads * t.head_dim * 2;
  // A task is a sequence's KV head, or all of them (Pick::kGroups) where there are sequences
  // enough to share among the threads: a slot's heads lie side by side, so the task reads them in
  // order. The arithmetic is the same either way.
  const int64_t per = Pick::kGroups && t.kv_heads <= kMaxGroup && n >= 4 * at::get_num_threads() ? t.kv_heads : 1;
  const int64_t groups = t.kv_heads / per, tasks = n * groups;
  const AttendFn<T, I> attend_one = Pick::template pick<T, I>(t);
  const int64_t grain = work < kInline ? std::max<int64_t>(tasks, 1) : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(per * t.rows * longest, 1)));
    std::vector<int64_t> rows(static_cast<size_t>(std::max<int64_t>(longest, 1)));
    std::vector<float> acc(static_cast<size_t>(per * t.rows * t.head_dim));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t s = task / groups, head = task % groups * per;
      const int64_t len = static_cast<int64_t>(lp[s]);
      const int64_t offset = (s * heads + head * t.rows) * t.head_dim;
      if (len == 0) {  // a padding row
        std::memset(static_cast<void*>(op + offset), 0, sizeof(T) * per * t.rows * t.head_dim);
        continue;
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      attend_one(qp + offset, kc, vc, tp + s * table_stride, first, len, head, per, t, scores.data(), rows.data(),
                 acc.data(), op + offset);
    }
  });
}

template <typename Pick, typename T>
void dispatch_index(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& tables, const at::Tensor& lens, int64_t window, const Task& t) {
  const bool tables64 = tables.scalar_type() == at::kLong, lens64 = lens.scalar_type() == at::kLong;
  if (tables64 && lens64) {
    decode_rows<Pick, T, int64_t, int64_t>(out, q, k_cache, v_cache, tables, lens, window, t);
  } else if (tables64) {
    decode_rows<Pick, T, int64_t, int32_t>(out, q, k_cache, v_cache, tables, lens, window, t);
  } else if (lens64) {
    decode_rows<Pick, T, int32_t, int64_t>(out, q, k_cache, v_cache, tables, lens, window, t);
  } else {
    decode_rows<Pick, T, int32_t, int32_t>(out, q, k_cache, v_cache, tables, lens, window, t);
  }
}

// The task for q's dtype and the index types of the tables and lengths.
template <typename Pick>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& tables, const at::Tensor& lens, int64_t window, const Task& t) {
  if (q.scalar_type() == at::kFloat) {
    dispatch_index<Pick, float>(out, q, k_cache, v_cache, tables, lens, window, t);
  } else {
    dispatch_index<Pick, at::BFloat16>(out, q, k_cache, v_cache, tables, lens, window, t);
  }
}

}  // namespace attention
}  // namespace pagoda_cpu
