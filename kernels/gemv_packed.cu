#include "kernels/gemv_packed.cuh"

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/check.h"
#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

constexpr int kWarps = 8;  // of a GEMV block: all on the same rows, each on every 8th span of columns
constexpr int kThreads = kWarps * 32;
// Spans per warp whose loads are issued together, and whether the next group's loads are issued
// before this group is computed (software pipelining). Measured on an H200: pipelining helps every
// shape but fp8 with two row tiles (lm_head, MLP up), which does better with 2 spans unpipelined
// (fewer registers, two blocks per SM).
template <PackedFormat F, int RT>
inline constexpr bool kPipelined = !(F == PackedFormat::FP8_E4M3 && RT == 2);
template <PackedFormat F, int RT>
inline constexpr int kUnroll = RT == 1 || !kPipelined<F, RT> ? 2 : 1;

// Every thread reads 16 packed bytes of a row per span: 16 fp8 or 32 int4 columns (a "chunk").
// The 4 lanes of an mma quad read 4 neighbouring chunks, so a span is 4 chunks wide.
template <PackedFormat F>
struct Packing {
  static constexpr int kChunkCols = F == PackedFormat::FP8_E4M3 ? 16 : 32;
  static constexpr int kSpanCols = 4 * kChunkCols;
  static constexpr int kSteps = kChunkCols / 4;  // mma k-steps per chunk (4 columns per lane each)
  __host__ __device__ static constexpr int64_t bytes_per_row(int64_t cols) {
    return F == PackedFormat::FP8_E4M3 ? cols : cols / 2;
  }
};

// Streamed once: keep it out of L1, which holds x (read by every warp).
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two e4m3 bytes (the first in the low byte) as floats; exact.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xFFFFu), __NV_E4M3);
  return __half22float2(__half2(h));
}

// One 16-byte chunk dequantized to bf16 pairs in "mma order": k-step j of the chunk takes A pairs
// out[2j] and out[2j + 1], multiplied with the x pairs x_pairs() gives for the same j.
//
// fp8: pairs in column order, out[m] = (col 2m, col 2m + 1); e4m3 values times `mul` in fp32,
// rounded once (the GEMV passes 1 and scales the fp32 sum instead, which is exact).
//
// int4: a nibble pair lands in a bf16x2 by one mask, (w >> s) & 0x000F000F | 0x43004300 giving
// (128 + q_a, 128 + q_b), from which one subtraction (exact) and one bf16x2 fma make the weights:
// about 1 instruction per weight, against 4 through fp32 (the int4 GEMV is bound by this
// arithmetic, not by memory, otherwise). The pairs this yields are columns (c, c + 4), so word i
// (columns 8i..8i+7) gives out[4i..4i+3] = (0,4) (1,5) (2,6) (3,7) + 8i, and x is paired the same
// way. Weights: bf16(q * bf16(scale) + bf16(min)), rounded once (bf16 fma); the scale and min
// lose their last 3 bits to bf16, far below the 4-bit quantization's own step.
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat162 v) { return *reinterpret_cast<const uint32_t*>(&v); }

__device__ __forceinline__ uint32_t int4_pair(uint32_t shifted, __nv_bfloat162 s2, __nv_bfloat162 m2) {
  uint32_t t = (shifted & 0x000F000Fu) | 0x43004300u;
  const __nv_bfloat162 q = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&t), __floats2bfloat162_rn(128.0f, 128.0f));
  return bits_of(__hfma2(q, s2, m2));
}

template <PackedFormat F>
__device__ __forceinline__ void dequant_chunk(const uint4& v, float mul, __nv_bfloat162 s2, __nv_bfloat162 m2,
                                              uint32_t (&out)[Packing<F>::kChunkCols / 2]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (F == PackedFormat::FP8_E4M3) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = fp8x2_to_float2(w[i]), b = fp8x2_to_float2(w[i] >> 16);
      out[2 * i] = pack_bf16x2(a.x * mul, a.y * mul);
      out[2 * i + 1] = pack_bf16x2(b.x * mul, b.y * mul);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int sh = 0; sh < 4; ++sh) out[4 * i + sh] = int4_pair(w[i] >> (4 * sh), s2, m2);
  }
}

// The x pairs of k-step j, from the chunk's x as bf16 pairs in column order (xw[m] = cols 2m, 2m+1).
template <PackedFormat F>
__device__ __forceinline__ void x_pairs(const uint32_t* xw, int j, uint32_t& b0, uint32_t& b1) {
  if constexpr (F == PackedFormat::FP8_E4M3) {
    b0 = xw[2 * j];
    b1 = xw[2 * j + 1];
  } else {
    // k-step 2i + h: columns (8i + 2h, 8i + 2h + 4) and (8i + 2h + 1, 8i + 2h + 5).
    const uint32_t a = xw[4 * (j >> 1) + (j & 1)], c = xw[4 * (j >> 1) + 2 + (j & 1)];
    b0 = __byte_perm(a, c, 0x5410);
    b1 = __byte_perm(a, c, 0x7632);
  }
}

// A group's (scale, min) as bf16x2 broadcasts.
__device__ __forceinline__ void scale_min(__half2 sm, __nv_bfloat162& s2, __nv_bfloat162& m2) {
  const float2 f = __half22float2(sm);
  s2 = __float2bfloat162_rn(f.x);
  m2 = __float2bfloat162_rn(f.y);
}

__device__ __forceinline__ void mma_bf16_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c = A B, starting from zero (no instructions to clear c).
__device__ __forceinline__ void mma_bf16_16x8x16_first(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  const float z = 0.0f;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
}

// The factored int4 kernel's A: nibbles 0 and 4 of `shifted` as the bf16 pair (128 + q_a, 128 + q_b),
// int4_pair without its two bf16x2 ops. 128 + q is exact in bf16 (8 significant bits), and so is its
// product with a bf16 x; the mma adds the products in fp32.
__device__ __forceinline__ uint32_t int4_biased_pair(uint32_t shifted) { return (shifted & 0x000F000Fu) | 0x43004300u; }

// Block: RT tiles of 16 rows; its 8 warps split the columns and add up in shared memory.
// Within a warp, the mma m16n8k16 sees rows as M, tokens as N (8) and columns as K. The columns of
// a k-step are permuted (a dot product does not care, as long as A and B agree): lane (g, q) of
// the quad layout holds, for k-step j, columns 4j..4j+3 of its own 16-byte chunk, both as A (rows
// g and g + 8) and as B (token g). So each lane loads whole 16-byte chunks of weights, and of x
// the same columns, and no data moves between lanes.
//
// int4, Factored (groups a multiple of 128, so a span of 128 columns has one (scale, min) per row):
// sum_c x_c (q_c s + m) over a span is s * sum_c x_c (128 + q_c) + (m - 128 s) * sum_c x_c. The mma
// takes 128 + q as the nibble mask makes it (int4_biased_pair), a second mma with A all ones gives
// sum_c x_c for the span (for every row tile at once), and the span's two terms are added to the
// fp32 accumulators per row. Per weight that leaves the mask and the shifts: the legacy path's
// bf16x2 subtraction and fma per pair, and its scale conversions per chunk, are gone. The bias
// costs little accuracy: 128 + q is ~17x q, so the mma's fp32 sums carry ~4 bits less of sum x q
// than they would for q alone; an emulation of the test's cases (the accumulation truncating, as
// tensor cores may) stays within 6e-7 of sum |x w|, where bf16 weights are off by up to 2^-9 each.

// The body of both kernels below (a device function, so that each takes its own launch bounds).
template <PackedFormat F, int RT, bool Factored, typename OutT>
__device__ __forceinline__ void gemv_packed_body(const __nv_bfloat16* __restrict__ x, int n_tokens, int64_t ldx,
                                                 const uint8_t* __restrict__ data, const void* __restrict__ scales,
                                                 int rows, int cols, int group, OutT* __restrict__ y, int64_t ldy) {
  using P = Packing<F>;
  __shared__ float red[kWarps][RT * 16][8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int row_base = blockIdx.x * RT * 16;
  const int64_t row_bytes = P::bytes_per_row(cols);
  const int groups = F == PackedFormat::INT4 ? cols / group : 1;

  // Rows g and g + 8 of each tile; rows past the end load the last row (their sums are dropped).
  int64_t row_of[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_of[rt][h] = min(row_base + rt * 16 + g + 8 * h, rows - 1);
  const bool has_token = g < n_tokens;
  const __nv_bfloat16* xrow = x + static_cast<int64_t>(has_token ? g : 0) * ldx;

  float acc[RT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[rt][i] = 0.0f;

  constexpr int U = kUnroll<F, RT>;
  const int n_spans = (cols + P::kSpanCols - 1) / P::kSpanCols;
  uint4 wv[U][RT][2];
  uint4 xv[U][P::kChunkCols / 8];
  // int4: each chunk's (scale, min), fetched with its bytes (a load issued only when the chunk is
  // computed would put a full memory latency in every iteration).
  uint32_t sv[U][RT][2];
  auto fetch = [&](int s0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c0 = (s0 + u * kWarps) * P::kSpanCols + q * P::kChunkCols;
      const bool valid = c0 < cols;  // also false for spans past the end
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wv[u][rt][h] = valid ? load_stream(data + row_of[rt][h] * row_bytes + (F == PackedFormat::FP8_E4M3 ? c0 : c0 / 2))
                               : make_uint4(0, 0, 0, 0);
          if constexpr (F == PackedFormat::INT4)
            sv[u][rt][h] = valid ? __ldg(static_cast<const uint32_t*>(scales) + row_of[rt][h] * groups + c0 / group) : 0u;
        }
      // The factored kernel loads x when it computes the span instead (below): x comes from L1 or
      // L2, and 32 registers fewer keep it at two blocks per SM without spilling.
      if constexpr (!Factored) {
#pragma unroll
        for (int i = 0; i < P::kChunkCols / 8; ++i)
          xv[u][i] = valid && has_token ? __ldg(reinterpret_cast<const uint4*>(xrow + c0) + i) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  constexpr bool pipelined = kPipelined<F, RT>;
  if constexpr (pipelined) fetch(warp);
  for (int s0 = warp; s0 < n_spans; s0 += kWarps * U) {
    if constexpr (!pipelined) fetch(s0);
    uint4 wc[U][RT][2];
    uint4 xc[U][P::kChunkCols / 8];
    uint32_t sc[U][RT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        wc[u][rt][0] = wv[u][rt][0], wc[u][rt][1] = wv[u][rt][1];
        if constexpr (F == PackedFormat::INT4) sc[u][rt][0] = sv[u][rt][0], sc[u][rt][1] = sv[u][rt][1];
      }
      if constexpr (!Factored) {
#pragma unroll
        for (int i = 0; i < P::kChunkCols / 8; ++i) xc[u][i] = xv[u][i];
      }
    }
    if (pipelined && s0 + kWarps * U < n_spans) fetch(s0 + kWarps * U);  // in flight while this group is computed
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + u * kWarps >= n_spans) break;  // uniform over the warp: every lane runs each mma
      if constexpr (Factored) {
        static_assert(F == PackedFormat::INT4, "the factored kernel is int4's");
        const int c0 = (s0 + u * kWarps) * P::kSpanCols + q * P::kChunkCols;  // < cols: groups fill the row
#pragma unroll
        for (int i = 0; i < P::kChunkCols / 8; ++i)
          xc[u][i] = has_token ? __ldg(reinterpret_cast<const uint4*>(xrow + c0) + i) : make_uint4(0, 0, 0, 0);
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(xc[u]);
        // k-step j takes word j / 2 of each chunk, nibble pairs 2 (j & 1) and 2 (j & 1) + 1 (as
        // dequant_chunk orders them), and the x pairs x_pairs() gives; made step by step, so that
        // only the packed words stay live (registers decide how many blocks fit on an SM).
        constexpr uint32_t kOnes = 0x3F803F80u;  // bf16x2 (1, 1)
        float part[RT][4], xsum[4];
#pragma unroll
        for (int j = 0; j < P::kSteps; ++j) {
          uint32_t b0, b1;
          x_pairs<F>(xw, j, b0, b1);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const uint32_t* lo = reinterpret_cast<const uint32_t*>(&wc[u][rt][0]);
            const uint32_t* hi = reinterpret_cast<const uint32_t*>(&wc[u][rt][1]);
            const int sh = 8 * (j & 1);
            const uint32_t a0 = int4_biased_pair(lo[j >> 1] >> sh), a2 = int4_biased_pair(lo[j >> 1] >> (sh + 4));
            const uint32_t a1 = int4_biased_pair(hi[j >> 1] >> sh), a3 = int4_biased_pair(hi[j >> 1] >> (sh + 4));
            if (j == 0)
              mma_bf16_16x8x16_first(part[rt], a0, a1, a2, a3, b0, b1);
            else
              mma_bf16_16x8x16(part[rt], a0, a1, a2, a3, b0, b1);
          }
          // The sum of x over the span, for tokens 2q, 2q + 1 in xsum[0], xsum[1] (xsum[2], [3]
          // repeat them for rows g + 8). Any order of the columns will do: x as loaded.
          if (j == 0)
            mma_bf16_16x8x16_first(xsum, kOnes, kOnes, kOnes, kOnes, xw[0], xw[1]);
          else
            mma_bf16_16x8x16(xsum, kOnes, kOnes, kOnes, kOnes, xw[2 * j], xw[2 * j + 1]);
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          // (scale, min) of rows g and g + 8 for this span's group, exact in fp32.
          const float2 sm_lo = __half22float2(*reinterpret_cast<const __half2*>(&sc[u][rt][0]));
          const float2 sm_hi = __half22float2(*reinterpret_cast<const __half2*>(&sc[u][rt][1]));
          const float off_lo = fmaf(-128.0f, sm_lo.x, sm_lo.y), off_hi = fmaf(-128.0f, sm_hi.x, sm_hi.y);
          acc[rt][0] = fmaf(off_lo, xsum[0], fmaf(sm_lo.x, part[rt][0], acc[rt][0]));
          acc[rt][1] = fmaf(off_lo, xsum[1], fmaf(sm_lo.x, part[rt][1], acc[rt][1]));
          acc[rt][2] = fmaf(off_hi, xsum[0], fmaf(sm_hi.x, part[rt][2], acc[rt][2]));
          acc[rt][3] = fmaf(off_hi, xsum[1], fmaf(sm_hi.x, part[rt][3], acc[rt][3]));
        }
      } else {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(xc[u]);
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          uint32_t lo[P::kChunkCols / 2], hi[P::kChunkCols / 2];
          __nv_bfloat162 s_lo = __float2bfloat162_rn(0.0f), m_lo = s_lo, s_hi = s_lo, m_hi = s_lo;
          if constexpr (F == PackedFormat::INT4) {
            // Past the end the pair is 0: x is 0 there and so is every product.
            scale_min(*reinterpret_cast<const __half2*>(&sc[u][rt][0]), s_lo, m_lo);
            scale_min(*reinterpret_cast<const __half2*>(&sc[u][rt][1]), s_hi, m_hi);
          }
          dequant_chunk<F>(wc[u][rt][0], 1.0f, s_lo, m_lo, lo);
          dequant_chunk<F>(wc[u][rt][1], 1.0f, s_hi, m_hi, hi);
#pragma unroll
          for (int j = 0; j < P::kSteps; ++j) {
            uint32_t b0, b1;
            x_pairs<F>(xw, j, b0, b1);
            mma_bf16_16x8x16(acc[rt], lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1], b0, b1);
          }
        }
      }
    }
  }

  // Accumulator layout: c0, c1 = (row g, tokens 2q, 2q + 1); c2, c3 = (row g + 8, same tokens).
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    red[warp][rt * 16 + g][2 * q] = acc[rt][0];
    red[warp][rt * 16 + g][2 * q + 1] = acc[rt][1];
    red[warp][rt * 16 + g + 8][2 * q] = acc[rt][2];
    red[warp][rt * 16 + g + 8][2 * q + 1] = acc[rt][3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < RT * 16 * 8; idx += kThreads) {
    const int t = idx / (RT * 16), rl = idx % (RT * 16), row = row_base + rl;  // consecutive rows: coalesced
    if (t >= n_tokens || row >= rows) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w][rl][t];
    if constexpr (F == PackedFormat::FP8_E4M3) sum *= static_cast<const float*>(scales)[row];
    y[t * ldy + row] = from_float<OutT>(sum);
  }
}

template <PackedFormat F, int RT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    gemv_packed_kernel(const __nv_bfloat16* __restrict__ x, int n_tokens, int64_t ldx, const uint8_t* __restrict__ data,
                       const void* __restrict__ scales, int rows, int cols, int group, OutT* __restrict__ y,
                       int64_t ldy) {
  gemv_packed_body<F, RT, false, OutT>(x, n_tokens, ldx, data, scales, rows, cols, group, y, ldy);
}

// At most 128 registers: two blocks per SM, as the legacy int4 kernel gets.
template <int RT, typename OutT>
__global__ void __launch_bounds__(kThreads, 2)
    gemv_int4_factored_kernel(const __nv_bfloat16* __restrict__ x, int n_tokens, int64_t ldx,
                              const uint8_t* __restrict__ data, const void* __restrict__ scales, int rows, int cols,
                              int group, OutT* __restrict__ y, int64_t ldy) {
  gemv_packed_body<PackedFormat::INT4, RT, true, OutT>(x, n_tokens, ldx, data, scales, rows, cols, group, y, ldy);
}

template <PackedFormat F>
__global__ void dequant_packed_kernel(const uint8_t* __restrict__ data, const void* __restrict__ scales, int64_t row0,
                                      int64_t n_rows, int cols, int group, __nv_bfloat16* __restrict__ out,
                                      int64_t ld_out) {
  using P = Packing<F>;
  const int chunks = cols / P::kChunkCols;
  const int64_t row_bytes = P::bytes_per_row(cols);
  const int64_t total = n_rows * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, row = row0 + r;
    const int c0 = static_cast<int>(i % chunks) * P::kChunkCols;
    const uint4 v = load_stream(data + row * row_bytes + (F == PackedFormat::FP8_E4M3 ? c0 : c0 / 2));
    float mul = 1.0f;
    __nv_bfloat162 s2 = __float2bfloat162_rn(0.0f), m2 = s2;
    if constexpr (F == PackedFormat::FP8_E4M3)
      mul = static_cast<const float*>(scales)[row];
    else
      scale_min(static_cast<const __half2*>(scales)[row * (cols / group) + c0 / group], s2, m2);
    uint32_t o[P::kChunkCols / 2];
    dequant_chunk<F>(v, mul, s2, m2, o);
    if constexpr (F == PackedFormat::INT4) {
      // From mma order back to column order: word i's pairs (0,4) (1,5) (2,6) (3,7) to (0,1) ... (6,7).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t p04 = o[4 * i], p15 = o[4 * i + 1], p26 = o[4 * i + 2], p37 = o[4 * i + 3];
        o[4 * i] = __byte_perm(p04, p15, 0x5410);
        o[4 * i + 1] = __byte_perm(p26, p37, 0x5410);
        o[4 * i + 2] = __byte_perm(p04, p15, 0x7632);
        o[4 * i + 3] = __byte_perm(p26, p37, 0x7632);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(out + r * ld_out + c0);
#pragma unroll
    for (int k = 0; k < P::kChunkCols / 8; ++k) dst[k] = make_uint4(o[4 * k], o[4 * k + 1], o[4 * k + 2], o[4 * k + 3]);
  }
}

// Format and shape checks both launchers share.
void check_packed(const char* op, const PackedWeight& w) {
  KERNEL_REQUIRE(w.data && w.scales, op, "null weight data or scales");
  KERNEL_REQUIRE(w.rows > 0 && w.cols > 0 && w.rows <= INT_MAX && w.cols <= INT_MAX, op,
                 "rows and cols must be in [1, 2^31), got " + std::to_string(w.rows) + " x " + std::to_string(w.cols));
  KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && reinterpret_cast<uintptr_t>(w.scales) % 4 == 0, op,
                 "data must be 16-byte and scales 4-byte aligned");
  switch (w.format) {
    case PackedFormat::FP8_E4M3:
      KERNEL_REQUIRE(w.cols % 16 == 0, op, "fp8 cols must be a multiple of 16, got " + std::to_string(w.cols));
      return;
    case PackedFormat::INT4:
      KERNEL_REQUIRE(w.group > 0 && w.group % 32 == 0 && w.cols % w.group == 0, op,
                     "int4 group must be a multiple of 32 dividing cols, got group " + std::to_string(w.group) +
                         " cols " + std::to_string(w.cols));
      return;
  }
  throw_arg_error(op, "unknown packed format " + std::to_string(static_cast<int>(w.format)));
}

// The one runtime → template switch for the format.
template <typename Fn>
void dispatch_packed_format(PackedFormat f, Fn&& fn) {
  if (f == PackedFormat::FP8_E4M3)
    fn(std::integral_constant<PackedFormat, PackedFormat::FP8_E4M3>{});
  else
    fn(std::integral_constant<PackedFormat, PackedFormat::INT4>{});
}

}  // namespace

const char* packed_format_name(PackedFormat f) {
  switch (f) {
    case PackedFormat::FP8_E4M3: return "fp8_e4m3";
    case PackedFormat::INT4: return "int4";
  }
  return "unknown";
}

size_t packed_data_bytes(const PackedWeight& w) {
  const auto n = static_cast<size_t>(w.rows) * static_cast<size_t>(w.cols);
  return w.format == PackedFormat::FP8_E4M3 ? n : n / 2;
}

size_t packed_scale_bytes(const PackedWeight& w) {
  if (w.format == PackedFormat::FP8_E4M3) return static_cast<size_t>(w.rows) * sizeof(float);
  return w.group > 0 ? static_cast<size_t>(w.rows) * static_cast<size_t>(w.cols / w.group) * sizeof(__half2) : 0;
}

GemvInt4Kernel gemv_int4_default() {
  // Read once: every launch of a process takes the same kernel.
  static const GemvInt4Kernel k = [] {
    const char* v = std::getenv("RINGLLAMA_GEMV_INT4");
    const std::string s = v ? v : "";
    if (s == "factored") return GemvInt4Kernel::Factored;
    if (s.empty() || s == "legacy") return GemvInt4Kernel::Legacy;
    throw_arg_error("RINGLLAMA_GEMV_INT4", "must be 'factored' or 'legacy', got '" + s + "'");
  }();
  return k;
}

GemvInt4Kernel gemv_int4_kernel_for(const PackedWeight& w, GemvInt4Kernel k) {
  if (w.format != PackedFormat::INT4) return GemvInt4Kernel::Legacy;
  if (k == GemvInt4Kernel::Auto) k = gemv_int4_default();
  // Factored needs one (scale, min) per row and span of 128 columns.
  return k == GemvInt4Kernel::Factored && w.group > 0 && w.group % Packing<PackedFormat::INT4>::kSpanCols == 0
             ? GemvInt4Kernel::Factored
             : GemvInt4Kernel::Legacy;
}

void launch_gemv_packed(const __nv_bfloat16* x, int64_t n_tokens, int64_t ldx, const PackedWeight& w, void* y,
                        ElemType y_type, int64_t ldy, cudaStream_t stream, GemvInt4Kernel int4_kernel) {
  const char* op = "launch_gemv_packed";
  check_packed(op, w);
  KERNEL_REQUIRE(x && y, op, "null x or y");
  KERNEL_REQUIRE(n_tokens > 0, op, "n_tokens must be > 0, got " + std::to_string(n_tokens));
  KERNEL_REQUIRE(ldx >= w.cols && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0, op,
                 "x must be 16-byte aligned with ldx a multiple of 8 and >= cols, got ldx " + std::to_string(ldx));
  KERNEL_REQUIRE(ldy >= w.rows, op, "ldy " + std::to_string(ldy) + " < rows " + std::to_string(w.rows));
  if (w.format == PackedFormat::INT4)
    KERNEL_REQUIRE(w.cols % 32 == 0, op, "int4 cols must be a multiple of 32");
  // Two row tiles per block halve the x traffic per weight byte, where there are rows enough to
  // keep every SM busy with 32-row blocks (the MLP's 14336 and lm_head); otherwise 16-row blocks.
  const bool two_tiles = w.rows >= 8192;
  const bool factored = gemv_int4_kernel_for(w, int4_kernel) == GemvInt4Kernel::Factored;
  const int rows = static_cast<int>(w.rows), cols = static_cast<int>(w.cols), group = static_cast<int>(w.group);
  const auto* data = static_cast<const uint8_t*>(w.data);
  dispatch_elem_type(y_type, op, [&](auto out_tag) {
    using OutT = decltype(out_tag);
    dispatch_packed_format(w.format, [&](auto fmt) {
      constexpr PackedFormat F = decltype(fmt)::value;
      // Each pass serves 8 tokens and reads the weights once.
      for (int64_t t0 = 0; t0 < n_tokens; t0 += kGemvPackedTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kGemvPackedTokens, n_tokens - t0));
        OutT* yt = static_cast<OutT*>(y) + t0 * ldy;
        const __nv_bfloat16* xt = x + t0 * ldx;
        auto launch = [&](auto rt_tag, auto factored_tag) {
          constexpr int RT = decltype(rt_tag)::value;
          const auto blocks = static_cast<unsigned>((rows + 16 * RT - 1) / (16 * RT));
          if constexpr (decltype(factored_tag)::value)
            gemv_int4_factored_kernel<RT, OutT><<<blocks, kThreads, 0, stream>>>(xt, nt, ldx, data, w.scales, rows,
                                                                                cols, group, yt, ldy);
          else
            gemv_packed_kernel<F, RT, OutT><<<blocks, kThreads, 0, stream>>>(xt, nt, ldx, data, w.scales, rows, cols,
                                                                             group, yt, ldy);
        };
        using One = std::integral_constant<int, 1>;
        using Two = std::integral_constant<int, 2>;
        if constexpr (F == PackedFormat::INT4) {
          if (factored) {
            two_tiles ? launch(Two{}, std::true_type{}) : launch(One{}, std::true_type{});
            CUDA_CHECK_LAUNCH();
            continue;
          }
        }
        two_tiles ? launch(Two{}, std::false_type{}) : launch(One{}, std::false_type{});
        CUDA_CHECK_LAUNCH();
      }
    });
  });
}

void launch_dequant_packed(const PackedWeight& w, int64_t row0, int64_t n_rows, __nv_bfloat16* out, int64_t ld_out,
                           cudaStream_t stream) {
  const char* op = "launch_dequant_packed";
  check_packed(op, w);
  KERNEL_REQUIRE(out, op, "null out");
  KERNEL_REQUIRE(row0 >= 0 && n_rows > 0 && row0 + n_rows <= w.rows, op,
                 "rows [" + std::to_string(row0) + ", " + std::to_string(row0 + n_rows) + ") outside [0, " +
                     std::to_string(w.rows) + ")");
  KERNEL_REQUIRE(ld_out >= w.cols && ld_out % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0, op,
                 "out must be 16-byte aligned with ld_out a multiple of 8 and >= cols, got " + std::to_string(ld_out));
  if (w.format == PackedFormat::INT4)
    KERNEL_REQUIRE(w.cols % 32 == 0, op, "int4 cols must be a multiple of 32");
  dispatch_packed_format(w.format, [&](auto fmt) {
    constexpr PackedFormat F = decltype(fmt)::value;
    const int64_t chunks = n_rows * (w.cols / Packing<F>::kChunkCols);
    const int64_t blocks = std::min<int64_t>((chunks + 255) / 256, int64_t{1} << 20);  // grid-stride past that
    dequant_packed_kernel<F><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        static_cast<const uint8_t*>(w.data), w.scales, row0, n_rows, static_cast<int>(w.cols),
        static_cast<int>(w.group), out, ld_out);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace ringllama
