#include "kernels/gemm.h"

#include <climits>
#include <string>
#include <type_traits>

#include "kernels/device_info.h"

namespace ringllama {

Gemm::Gemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  CUBLAS_CHECK(cublasCreate(&handle_));
  try {
    workspace_ = device_alloc(workspace_bytes_, "the cuBLAS workspace");
    // Reduced-precision reductions would let cuBLAS sum partial products in bf16 on some paths;
    // the forward promises fp32 accumulation.
    CUBLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  } catch (...) {
    device_free(workspace_);
    cublasDestroy(handle_);
    throw;
  }
}

Gemm::~Gemm() {
  if (handle_) cublasDestroy(handle_);
  device_free(workspace_);
}

void Gemm::matmul(const __nv_bfloat16* x, int64_t n, int64_t in, const __nv_bfloat16* w, int64_t out, void* y,
                  ElemType y_type, int64_t ldy, cudaStream_t stream, float beta, int64_t ldx) {
  const char* op = "Gemm::matmul";
  KERNEL_REQUIRE(x && w && y, op, "null pointer");
  KERNEL_REQUIRE(n > 0 && in > 0 && out > 0, op,
                 "sizes must be > 0, got n=" + std::to_string(n) + " in=" + std::to_string(in) +
                     " out=" + std::to_string(out));
  KERNEL_REQUIRE(n <= INT_MAX && in <= INT_MAX && out <= INT_MAX && ldy <= INT_MAX, op, "size over INT_MAX");
  KERNEL_REQUIRE(ldy >= out, op, "ldy " + std::to_string(ldy) + " < out " + std::to_string(out));
  if (ldx == 0) ldx = in;
  KERNEL_REQUIRE(ldx >= in && ldx <= INT_MAX, op, "ldx " + std::to_string(ldx) + " < in " + std::to_string(in));
  cudaDataType_t c_type = CUDA_R_32F;
  dispatch_elem_type(y_type, op, [&](auto tag) {
    c_type = std::is_same_v<decltype(tag), float> ? CUDA_R_32F : CUDA_R_16BF;
  });
  CUBLAS_CHECK(cublasSetStream(handle_, stream));
  CUBLAS_CHECK(cublasSetWorkspace(handle_, workspace_, workspace_bytes_));
  const float alpha = 1.0f;
  // cuBLAS is column-major: a row-major y[n, out] is a column-major y^T[out, n] = W · x^T, where the
  // row-major W[out, in] is the column-major [in, out] matrix transposed (op T, lda = in) and the
  // row-major x[n, in] is the column-major [in, n] matrix as it is (op N, ldb = in).
  CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(n),
                            static_cast<int>(in), &alpha, w, CUDA_R_16BF, static_cast<int>(in), x, CUDA_R_16BF,
                            static_cast<int>(ldx), &beta, y, c_type, static_cast<int>(ldy), CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

}  // namespace ringllama
