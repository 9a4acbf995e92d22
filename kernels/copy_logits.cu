#include "kernels/copy_logits.cuh"

#include <string>

#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

// grid (column blocks, rows): coalesced reads and writes along the vocabulary.
template <typename T>
__global__ void copy_logits_kernel(const T* __restrict__ src, int64_t src_row_stride, const int32_t* __restrict__ rows,
                                   int64_t vocab, float* __restrict__ dst) {
  const int64_t r = blockIdx.y;
  const int64_t sr = rows ? rows[r] : r;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < vocab) dst[r * vocab + c] = to_float(src[sr * src_row_stride + c]);
}

}  // namespace

void launch_copy_logits(const void* src, ElemType src_type, int64_t src_row_stride, const int32_t* rows,
                        int64_t n_rows, int64_t vocab, float* dst, cudaStream_t stream) {
  const char* op = "launch_copy_logits";
  KERNEL_REQUIRE(src && dst, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && n_rows <= 65535 && vocab > 0, op,
                 "need 0 < n_rows <= 65535 and vocab > 0, got n_rows=" + std::to_string(n_rows) +
                     " vocab=" + std::to_string(vocab));
  KERNEL_REQUIRE(src_row_stride >= vocab, op, "src_row_stride < vocab");
  constexpr int kThreads = 256;
  const int64_t col_blocks = (vocab + kThreads - 1) / kThreads;
  KERNEL_REQUIRE(col_blocks <= 0x7fffffff, op, "vocab too large");
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(n_rows));
  dispatch_elem_type(src_type, op, [&](auto tag) {
    using T = decltype(tag);
    copy_logits_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(src), src_row_stride, rows, vocab, dst);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
