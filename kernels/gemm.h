// The one GEMM wrapper (STYLE.md 4): owns the cuBLAS handle and its workspace.
//   y[n, out] = x[n, in] · W[out, in]^T (+ beta · y)
// x and W are bf16, row-major, as the store keeps linear weights ([out, in], transformers' layout);
// accumulation is fp32 (CUBLAS_COMPUTE_32F); y is bf16 or fp32 with row stride ldy >= out.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

class Gemm {
 public:
  // workspace_bytes: cuBLAS scratch; a fixed workspace keeps cuBLAS from allocating while it runs
  // (and makes graph capture possible later).
  explicit Gemm(size_t workspace_bytes = size_t{32} << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // ldx: x's row stride (0 = in), e.g. the gate half of a fused gate|up output.
  void matmul(const __nv_bfloat16* x, int64_t n, int64_t in, const __nv_bfloat16* w, int64_t out, void* y,
              ElemType y_type, int64_t ldy, cudaStream_t stream, float beta = 0.0f, int64_t ldx = 0);

 private:
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

}  // namespace ringllama
