#include "kernels/silu_mul.cuh"

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/check.h"

namespace ringllama {

namespace {

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// 8 elements (16 bytes) per thread: the op is bandwidth-bound.
__global__ void silu_mul_vec8_kernel(uint4* __restrict__ gate, const uint4* __restrict__ up, int64_t n_vec) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint4 g = gate[i];
    const uint4 u = up[i];
    __nv_bfloat162* g2 = reinterpret_cast<__nv_bfloat162*>(&g);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(g2[k]);
      const float2 uf = __bfloat1622float2(u2[k]);
      g2[k] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
    }
    gate[i] = g;
  }
}

__global__ void silu_mul_kernel(__nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gate[i] = __float2bfloat16_rn(silu_mul(__bfloat162float(gate[i]), __bfloat162float(up[i])));
}

// Rows of gate|up: 8 elements per thread when ffn % 8 == 0 (the launcher checks), else one.
template <int V>
__global__ void silu_mul_rows_kernel(__nv_bfloat16* __restrict__ gu, int64_t ffn_v, int64_t total_v) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_v;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / ffn_v, c = i % ffn_v;
    __nv_bfloat16* g = gu + (r * 2 * ffn_v + c) * V;
    const __nv_bfloat16* u = g + ffn_v * V;
    if constexpr (V == 8) {
      uint4 gv = *reinterpret_cast<const uint4*>(g);
      const uint4 uv = *reinterpret_cast<const uint4*>(u);
      __nv_bfloat162* g2 = reinterpret_cast<__nv_bfloat162*>(&gv);
      const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 gf = __bfloat1622float2(g2[k]);
        const float2 uf = __bfloat1622float2(u2[k]);
        g2[k] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
      }
      *reinterpret_cast<uint4*>(g) = gv;
    } else {
      *g = __float2bfloat16_rn(silu_mul(__bfloat162float(*g), __bfloat162float(*u)));
    }
  }
}

}  // namespace

void launch_silu_mul_rows(__nv_bfloat16* gu, int64_t n_rows, int64_t ffn, cudaStream_t stream) {
  const char* op = "launch_silu_mul_rows";
  KERNEL_REQUIRE(gu, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && ffn > 0, op,
                 "sizes must be > 0, got n_rows=" + std::to_string(n_rows) + " ffn=" + std::to_string(ffn));
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = 4096;
  const bool vec = ffn % 8 == 0 && reinterpret_cast<uintptr_t>(gu) % 16 == 0;
  const int64_t total = n_rows * (vec ? ffn / 8 : ffn);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec) silu_mul_rows_kernel<8><<<blocks, kThreads, 0, stream>>>(gu, ffn / 8, total);
  else silu_mul_rows_kernel<1><<<blocks, kThreads, 0, stream>>>(gu, ffn, total);
  CUDA_CHECK_LAUNCH();
}

void launch_silu_mul(__nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n, cudaStream_t stream) {
  const char* op = "launch_silu_mul";
  KERNEL_REQUIRE(gate && up, op, "null pointer");
  KERNEL_REQUIRE(n > 0, op, "n must be > 0, got " + std::to_string(n));
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this: enough to fill any current GPU
  const bool vec = n % 8 == 0 && reinterpret_cast<uintptr_t>(gate) % 16 == 0 && reinterpret_cast<uintptr_t>(up) % 16 == 0;
  const int64_t items = vec ? n / 8 : n;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
  if (vec) {
    silu_mul_vec8_kernel<<<blocks, kThreads, 0, stream>>>(reinterpret_cast<uint4*>(gate),
                                                          reinterpret_cast<const uint4*>(up), items);
  } else {
    silu_mul_kernel<<<blocks, kThreads, 0, stream>>>(gate, up, n);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
