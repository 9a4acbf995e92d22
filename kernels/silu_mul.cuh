// SwiGLU's elementwise step, in place: gate[i] = silu(gate[i]) * up[i] (SiLU(x) = x / (1 + e^-x)),
// computed in fp32 and rounded to bf16 once. In place so that the FFN needs no third [tokens, ffn]
// buffer (DESIGN.md: gate, up, one output, never a fourth temporary).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ringllama {

// gate, up: n bf16 elements each (any n > 0; 16-byte aligned buffers with n % 8 == 0 take the
// vectorised path).
void launch_silu_mul(__nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n, cudaStream_t stream);

// The same over the output of one fused gate|up GEMM: gu is [n_rows, 2 * ffn], each row the gate
// (ffn values) then the up projection; the product goes over the gate half of each row.
void launch_silu_mul_rows(__nv_bfloat16* gu, int64_t n_rows, int64_t ffn, cudaStream_t stream);

}  // namespace ringllama
