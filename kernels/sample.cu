#include "kernels/sample.cuh"

#include <string>

#include "kernels/check.h"

namespace ringllama {

namespace {

// One block per row: rows are few (the batch), a row is long (the vocabulary), and every step of
// the rule needs the whole row. Nothing is sorted: top_k and top_p are thresholds found by radix
// selection on the 32-bit order key (three passes of 11 + 11 + 10 bits, counting tokens for top_k
// and summing weights for top_p), ties on the threshold key resolved by index, and the draw is a
// block prefix sum in index order. The row is re-read on each pass; it stays in L2.
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == 32, "the block scans give each warp one lane of the last warp");
// Loads in flight per thread: one block reads a row alone, so a pass is latency-bound without them.
constexpr int kUnroll = 8;
constexpr int kMaxBins = 2048;
static_assert(kMaxBins % kThreads == 0, "find_crossing gives each thread the same number of bins");

using u64 = unsigned long long;

__device__ __forceinline__ int digit_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__device__ __forceinline__ int digit_bins(int pass) { return pass == 2 ? 1024 : 2048; }

struct Shared {
  union {
    uint32_t count[kMaxBins];  // tokens per digit (top_k)
    u64 mass[kMaxBins];        // weight per digit (top_p)
  } hist;
  u64 warp_part[kWarps];
  uint32_t warp_key[kWarps];
  int warp_index[kWarps];
  // Results broadcast to the block.
  uint32_t bin;
  u64 above, in_bin, total;
  int index;
};

__device__ __forceinline__ u64 warp_inclusive_scan(u64 v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

__device__ __forceinline__ u64 warp_sum(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Exclusive prefix sum over the threads of the block; *total gets the sum of all.
__device__ u64 block_exclusive_scan(u64 v, Shared& sh, u64* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const u64 incl = warp_inclusive_scan(v);
  if (lane == 31) sh.warp_part[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const u64 t = sh.warp_part[lane];
    const u64 ti = warp_inclusive_scan(t);
    sh.warp_part[lane] = ti - t;
    if (lane == 31) sh.total = ti;
  }
  __syncthreads();
  const u64 res = sh.warp_part[warp] + incl - v;
  *total = sh.total;
  __syncthreads();
  return res;
}

// f(i, valid, logit) for every i of the row; the loop is the same on every lane of a warp (valid
// says whether i < n), so f may use warp collectives.
template <typename F>
__device__ __forceinline__ void for_each_in_row(const float* __restrict__ row, int n, F&& f) {
  for (int base = 0; base < n; base += kThreads * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + static_cast<int>(threadIdx.x);
      v[u] = i < n ? row[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + static_cast<int>(threadIdx.x);
      f(i, i < n, v[u]);
    }
  }
}

__device__ __forceinline__ bool beats(uint32_t k, int i, uint32_t bk, int bi) { return k > bk || (k == bk && i < bi); }

// The first token in rank order: the largest key, the lowest index on ties.
__device__ int block_argmax(const float* __restrict__ row, int n, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t bk = 0;  // below every real token's key
  int bi = n;
  for_each_in_row(row, n, [&](int i, bool valid, float v) {
    const uint32_t k = sample_key(v);
    if (valid && beats(k, i, bk, bi)) {
      bk = k;
      bi = i;
    }
  });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t ok = __shfl_xor_sync(0xffffffffu, bk, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ok, oi, bk, bi)) {
      bk = ok;
      bi = oi;
    }
  }
  if (lane == 0) {
    sh.warp_key[warp] = bk;
    sh.warp_index[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bk = sh.warp_key[lane];
    bi = sh.warp_index[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const uint32_t ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (beats(ok, oi, bk, bi)) {
        bk = ok;
        bi = oi;
      }
    }
    if (lane == 0) sh.index = bi;
  }
  __syncthreads();
  const int best = sh.index;
  __syncthreads();
  return best;
}

// Walking the bins from the highest down, the bin where the running sum reaches need_of(sum of
// all bins): above < need <= above + hist[bin]. Sets sh.bin, sh.above, sh.in_bin; returns need.
template <typename T, typename NeedOf>
__device__ u64 find_crossing(const T* hist, int bins, NeedOf need_of, Shared& sh) {
  const int per = bins / kThreads;
  u64 s = 0;
  for (int j = 0; j < per; ++j) s += hist[bins - 1 - (static_cast<int>(threadIdx.x) * per + j)];
  u64 total;
  u64 running = block_exclusive_scan(s, sh, &total);
  const u64 need = need_of(total);
  for (int j = 0; j < per; ++j) {
    const int b = bins - 1 - (static_cast<int>(threadIdx.x) * per + j);
    const u64 c = hist[b];
    if (running < need && need <= running + c) {  // exactly one bin, as the running sum only grows
      sh.bin = static_cast<uint32_t>(b);
      sh.above = running;
      sh.in_bin = c;
    }
    running += c;
  }
  __syncthreads();
  return need;
}

// The smallest i with f(0) + ... + f(i) > r_of(f(0) + ... + f(n - 1)), or -1. Each warp owns one
// stretch of the row; the warps' sums pick the stretch, which its warp then walks 32 at a time.
template <typename F, typename ROf>
__device__ int index_search(const float* __restrict__ row, int n, F f, ROf r_of, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int stretch = ((n + kWarps - 1) / kWarps + 31) & ~31;
  const int begin = min(n, warp * stretch), end = min(n, begin + stretch);
  u64 s = 0;
  for (int base = begin; base < end; base += 32 * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32 + lane;
      v[u] = i < end ? row[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < end) s += f(i, v[u]);
    }
  }
  s = warp_sum(s);
  if (threadIdx.x == 0) sh.index = -1;
  if (lane == 0) sh.warp_part[warp] = s;
  __syncthreads();
  u64 above = 0, total = 0;
  for (int w = 0; w < kWarps; ++w) {
    const u64 x = sh.warp_part[w];
    if (w < warp) above += x;
    total += x;
  }
  const u64 r = r_of(total);
  if (above <= r && r < above + s) {  // the same on every lane of the warp
    u64 running = above;
    for (int base = begin; base < end; base += 32) {
      const int i = base + lane;
      const u64 incl = warp_inclusive_scan(i < end ? f(i, row[i]) : 0);
      const unsigned hit = __ballot_sync(0xffffffffu, running + incl > r);
      if (hit) {
        if (lane == 0) sh.index = base + __ffs(hit) - 1;
        break;
      }
      running += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  const int index = sh.index;
  __syncthreads();
  return index;
}

// The k-th token in rank order (1 < k < n) as a cut: everything ranked at or before it is kept.
__device__ SampleCut select_top_k(const float* __restrict__ row, int n, int k, Shared& sh) {
  uint32_t prefix = 0, mask = 0;
  u64 need = static_cast<u64>(k), in_bin = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = digit_shift(pass), bins = digit_bins(pass);
    for (int b = threadIdx.x; b < bins; b += kThreads) sh.hist.count[b] = 0;
    __syncthreads();
    for_each_in_row(row, n, [&](int, bool valid, float v) {
      const uint32_t key = sample_key(v);
      const bool match = valid && (key & mask) == prefix;
      const uint32_t bin = match ? (key >> shift) & static_cast<uint32_t>(bins - 1) : 0xffffffffu;
      // Logits share a few exponents, so tokens crowd a few bins: one atomic per bin per warp.
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (match && (threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1))
        atomicAdd(&sh.hist.count[bin], static_cast<uint32_t>(__popc(peers)));
    });
    __syncthreads();
    find_crossing(sh.hist.count, bins, [need](u64) { return need; }, sh);
    need -= sh.above;
    in_bin = sh.in_bin;
    prefix |= sh.bin << shift;
    mask |= static_cast<uint32_t>(bins - 1) << shift;
    __syncthreads();  // all have read sh before the next pass rewrites it
  }
  // `need` of the in_bin tokens with key == prefix are kept: those of the lowest indices.
  if (need == in_bin) return SampleCut{prefix, n - 1};
  const int index = index_search(
      row, n, [prefix](int, float v) -> u64 { return sample_key(v) == prefix ? 1 : 0; },
      [need](u64) { return need - 1; }, sh);
  return SampleCut{prefix, index};
}

// Of the tokens `kept` keeps, the shortest ranked prefix whose weight reaches
// sample_top_p_target(top_p, their weight), as a cut.
__device__ SampleCut select_top_p(const float* __restrict__ row, int n, double mx, double temperature, double top_p,
                                  SampleCut kept, Shared& sh) {
  uint32_t prefix = 0, mask = 0;
  u64 need = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = digit_shift(pass), bins = digit_bins(pass);
    for (int b = threadIdx.x; b < bins; b += kThreads) sh.hist.mass[b] = 0;
    __syncthreads();
    for_each_in_row(row, n, [&](int i, bool valid, float v) {
      const uint32_t key = sample_key(v);
      if (!valid || (key & mask) != prefix || !sample_kept(kept, key, i)) return;
      const u64 w = sample_weight(v, mx, temperature);
      if (w != 0) atomicAdd(&sh.hist.mass[(key >> shift) & static_cast<uint32_t>(bins - 1)], w);
    });
    __syncthreads();
    if (pass == 0) {
      need = find_crossing(sh.hist.mass, bins, [top_p](u64 total) { return sample_top_p_target(top_p, total); }, sh);
    } else {
      find_crossing(sh.hist.mass, bins, [need](u64) { return need; }, sh);
    }
    need -= sh.above;
    prefix |= sh.bin << shift;
    mask |= static_cast<uint32_t>(bins - 1) << shift;
    __syncthreads();
  }
  // Among the kept tokens with key == prefix, in index order, the one where `need` is reached.
  const int index = index_search(
      row, n,
      [=](int i, float v) -> u64 {
        const uint32_t key = sample_key(v);
        return key == prefix && sample_kept(kept, key, i) ? sample_weight(v, mx, temperature) : 0;
      },
      [need](u64) { return need - 1; }, sh);
  return SampleCut{prefix, index};
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float* __restrict__ logits, int n, int64_t row_stride,
                                                          const SampleParams* __restrict__ params,
                                                          int32_t* __restrict__ out) {
  __shared__ Shared sh;
  const float* row = logits + blockIdx.x * row_stride;
  const SampleParams p = params[blockIdx.x];
  const int best = block_argmax(row, n, sh);
  const double mx = row[best];
  // The same early outs as sample_row (worker/sampler.cpp): greedy, a row without a finite
  // maximum, and top_k = 1 (the best token is all that is kept).
  if (!(p.temperature > 0) || !isfinite(mx) || p.top_k == 1) {
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  SampleCut cut{0, n - 1};
  if (p.top_k > 0 && p.top_k < n) cut = select_top_k(row, n, p.top_k, sh);
  if (p.top_p < 1) cut = select_top_p(row, n, mx, p.temperature, p.top_p, cut, sh);
  const uint64_t bits = random_bits53(p.seed, p.step);
  const int index = index_search(
      row, n,
      [=](int i, float v) -> u64 {
        const uint32_t key = sample_key(v);
        return sample_kept(cut, key, i) ? sample_weight(v, mx, p.temperature) : 0;
      },
      [bits](u64 total) { return sample_draw_point(bits, total); }, sh);
  if (threadIdx.x == 0) out[blockIdx.x] = index >= 0 ? index : best;
}

}  // namespace

size_t sample_workspace_bytes(int rows, int vocab) {
  (void)rows;
  (void)vocab;
  return 0;  // a block per row keeps all its state in shared memory
}

void launch_sample(const float* logits, int rows, int vocab, int64_t row_stride, const SampleParams* params_device,
                   int32_t* out_tokens, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const char* op = "launch_sample";
  KERNEL_REQUIRE(logits && params_device && out_tokens, op, "null pointer");
  KERNEL_REQUIRE(rows > 0, op, "rows must be > 0, got " + std::to_string(rows));
  KERNEL_REQUIRE(vocab > 0 && vocab <= kSampleMaxVocab, op,
                 "vocab must be in [1, " + std::to_string(kSampleMaxVocab) + "], got " + std::to_string(vocab));
  KERNEL_REQUIRE(row_stride >= vocab, op,
                 "row_stride " + std::to_string(row_stride) + " < vocab " + std::to_string(vocab));
  const size_t need = sample_workspace_bytes(rows, vocab);
  KERNEL_REQUIRE(workspace_bytes >= need && (need == 0 || workspace), op,
                 "workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need));
  sample_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, row_stride, params_device,
                                                                       out_tokens);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
