#include "kernels/add_rms_norm.cuh"

#include <string>

#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

constexpr int kThreads = 256;

// One block per row. The second pass re-reads x, which the first pass just left in L1/L2.
template <typename R>
__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(float* __restrict__ x, const R* __restrict__ residual,
                                                                const __nv_bfloat16* __restrict__ w, float eps,
                                                                __nv_bfloat16* __restrict__ out, int64_t dim) {
  __shared__ float partial[kThreads / 32];
  const int64_t row = blockIdx.x;
  float* xr = x + row * dim;
  float ss = 0.0f;
  if (residual) {
    const R* rr = residual + row * dim;
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      const float v = xr[d] + to_float(rr[d]);
      xr[d] = v;
      ss += v * v;
    }
  } else {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) ss += xr[d] * xr[d];
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
  const float rstd = rsqrtf(total / static_cast<float>(dim) + eps);
  __nv_bfloat16* orow = out + row * dim;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) orow[d] = __float2bfloat16_rn(xr[d] * rstd * __bfloat162float(w[d]));
}

}  // namespace

void launch_add_rms_norm(float* x, const void* residual, ElemType residual_type, const __nv_bfloat16* w, float eps,
                         __nv_bfloat16* out, int64_t n_rows, int64_t dim, cudaStream_t stream) {
  const char* op = "launch_add_rms_norm";
  KERNEL_REQUIRE(x && w && out, op, "null pointer");
  KERNEL_REQUIRE(n_rows > 0 && dim > 0, op,
                 "sizes must be > 0, got n_rows=" + std::to_string(n_rows) + " dim=" + std::to_string(dim));
  KERNEL_REQUIRE(n_rows <= 0x7fffffff, op, "too many rows");
  KERNEL_REQUIRE(eps > 0.0f, op, "eps must be > 0");
  dispatch_elem_type(residual_type, op, [&](auto tag) {
    using R = decltype(tag);
    add_rms_norm_kernel<R><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
        x, static_cast<const R*>(residual), w, eps, out, dim);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
