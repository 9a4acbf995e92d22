#include "kernels/embedding.cuh"

#include <string>

#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

// One block per token; threads stride over the row (a plain copy: bandwidth-bound and tiny).
template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, const __nv_bfloat16* __restrict__ table,
                                 int64_t dim, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* row = table + static_cast<int64_t>(ids[t]) * dim;
  T* dst = out + t * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = from_float<T>(__bfloat162float(row[d]));
}

}  // namespace

void launch_embedding(const int32_t* ids, int64_t n_tokens, const __nv_bfloat16* table, int64_t vocab,
                      int64_t dim, void* out, ElemType out_type, cudaStream_t stream) {
  const char* op = "launch_embedding";
  KERNEL_REQUIRE(ids && table && out, op, "null pointer");
  KERNEL_REQUIRE(n_tokens > 0 && vocab > 0 && dim > 0, op,
                 "sizes must be > 0, got n_tokens=" + std::to_string(n_tokens) + " vocab=" +
                     std::to_string(vocab) + " dim=" + std::to_string(dim));
  KERNEL_REQUIRE(n_tokens <= 0x7fffffff, op, "too many tokens");
  const int threads = dim >= 256 ? 256 : static_cast<int>((dim + 31) / 32 * 32);
  dispatch_elem_type(out_type, op, [&](auto tag) {
    using T = decltype(tag);
    embedding_kernel<T><<<static_cast<unsigned>(n_tokens), threads, 0, stream>>>(ids, table, dim, static_cast<T*>(out));
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
