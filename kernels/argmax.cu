#include "kernels/argmax.cuh"

#include <cmath>
#include <string>

#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

constexpr int kThreads = 512;

// (v, i) beats (bv, bi) when larger, or equal and earlier: the order does not depend on how the
// threads split the row, so the result is the same for any launch shape.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

template <typename T>
__global__ void __launch_bounds__(kThreads) argmax_kernel(const T* __restrict__ x, int n, int64_t row_stride,
                                                          int32_t* __restrict__ out) {
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  const T* row = x + blockIdx.x * row_stride;
  float bv = -INFINITY;
  int bi = n;  // sentinel: any real element, even -inf, beats it
  for (int i = threadIdx.x; i < n; i += kThreads) {
    float v = to_float(row[i]);
    if (isnan(v)) v = -INFINITY;
    if (better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if ((threadIdx.x & 31) == 0) {
    sv[threadIdx.x >> 5] = bv;
    si[threadIdx.x >> 5] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w)
      if (better(sv[w], si[w], bv, bi)) {
        bv = sv[w];
        bi = si[w];
      }
    out[blockIdx.x] = bi;
  }
}

}  // namespace

void launch_argmax(const void* x, ElemType x_type, int64_t n_rows, int64_t n, int64_t row_stride, int32_t* out,
                   cudaStream_t stream) {
  const char* op = "launch_argmax";
  KERNEL_REQUIRE(x && out, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && n > 0 && n < 0x7fffffff && n_rows <= 0x7fffffff, op,
                 "need 0 < n < 2^31 and 0 < n_rows < 2^31, got n=" + std::to_string(n) +
                     " n_rows=" + std::to_string(n_rows));
  KERNEL_REQUIRE(row_stride >= n, op, "row_stride < n");
  dispatch_elem_type(x_type, op, [&](auto tag) {
    using T = decltype(tag);
    argmax_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                                             static_cast<int>(n), row_stride, out);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
