#include "kernels/kv_store.cuh"

#include <algorithm>
#include <string>

#include "kernels/check.h"

namespace ringllama {

namespace {

// One thread per (row, bf16 pair), for keys and values alike.
__global__ void kv_store_kernel(const __nv_bfloat162* __restrict__ k, const __nv_bfloat162* __restrict__ v,
                                int64_t src_stride2, int kv2, const int32_t* __restrict__ slots,
                                __nv_bfloat162* __restrict__ kp, __nv_bfloat162* __restrict__ vp,
                                int64_t pool_stride2, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / kv2;
    const int c = static_cast<int>(i % kv2);
    const int64_t dst = static_cast<int64_t>(slots[t]) * pool_stride2 + c;
    kp[dst] = k[t * src_stride2 + c];
    vp[dst] = v[t * src_stride2 + c];
  }
}

}  // namespace

void launch_kv_store(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t src_row_stride, int64_t n_rows,
                     int64_t kv_dim, const int32_t* slots, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,
                     int64_t pool_row_stride, cudaStream_t stream) {
  const char* op = "launch_kv_store";
  KERNEL_REQUIRE(k && v && slots && k_pool && v_pool, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && kv_dim > 0 && kv_dim % 2 == 0 && kv_dim <= 0x7ffffffe, op,
                 "need n_rows > 0 and an even kv_dim > 0, got " + std::to_string(n_rows) + ", " +
                     std::to_string(kv_dim));
  KERNEL_REQUIRE(src_row_stride >= kv_dim && src_row_stride % 2 == 0 && pool_row_stride >= kv_dim &&
                     pool_row_stride % 2 == 0,
                 op, "row strides must be even and >= kv_dim");
  KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(k) % 4 == 0 && reinterpret_cast<uintptr_t>(v) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(k_pool) % 4 == 0 && reinterpret_cast<uintptr_t>(v_pool) % 4 == 0,
                 op, "pointers must be 4-byte aligned");
  const int64_t total = n_rows * (kv_dim / 2);
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  kv_store_kernel<<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat162*>(k), reinterpret_cast<const __nv_bfloat162*>(v), src_row_stride / 2,
      static_cast<int>(kv_dim / 2), slots, reinterpret_cast<__nv_bfloat162*>(k_pool),
      reinterpret_cast<__nv_bfloat162*>(v_pool), pool_row_stride / 2, total);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
