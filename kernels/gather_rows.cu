#include "kernels/gather_rows.cuh"

#include <algorithm>
#include <string>

#include "kernels/check.h"

namespace ringllama {

namespace {

__global__ void gather_rows_kernel(const __nv_bfloat16* __restrict__ src, int64_t src_stride,
                                   const int32_t* __restrict__ rows, int64_t width, __nv_bfloat16* __restrict__ dst,
                                   int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    dst[i] = src[static_cast<int64_t>(rows[r]) * src_stride + c];
  }
}

}  // namespace

void launch_gather_rows(const __nv_bfloat16* src, int64_t src_row_stride, const int32_t* rows, int64_t n_rows,
                        int64_t width, __nv_bfloat16* dst, cudaStream_t stream) {
  const char* op = "launch_gather_rows";
  KERNEL_REQUIRE(src && rows && dst, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && width > 0 && src_row_stride >= width, op,
                 "need n_rows > 0, width > 0 and src_row_stride >= width");
  const int64_t total = n_rows * width;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  gather_rows_kernel<<<blocks, kThreads, 0, stream>>>(src, src_row_stride, rows, width, dst, total);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
