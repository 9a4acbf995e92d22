// The residual add fused with the RMSNorm that follows it:
//   x += residual;  out = x / sqrt(mean(x^2) + eps) * w
// x is the residual stream, kept in fp32: it is summed into 2 × n_layers times, and a bf16 stream
// would round every one of those sums to 8 bits of mantissa (transformers does exactly that; the
// fp32 stream is closer to the exact model and to the CPU reference, and costs 4 bytes per element
// of one [tokens, dim] buffer). The norm is computed in fp32 and rounded to bf16 once, for the GEMMs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

// x: [n_rows, dim] fp32, updated in place when residual is non-null (residual: [n_rows, dim] of
// residual_type, e.g. a GEMM's fp32 output); w: [dim] bf16; out: [n_rows, dim] bf16.
void launch_add_rms_norm(float* x, const void* residual, ElemType residual_type, const __nv_bfloat16* w, float eps,
                         __nv_bfloat16* out, int64_t n_rows, int64_t dim, cudaStream_t stream);

}  // namespace ringllama
