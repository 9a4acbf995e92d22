// Logits out: rows of a [rows, vocab] matrix (bf16 or fp32, any row stride) into a dense fp32
// [n_rows, vocab] buffer, e.g. the positions that need logits out of a batch, for one copy to the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

// src row r is read from src + rows[r] * src_row_stride (rows == nullptr: row r itself).
// dst: [n_rows, vocab] fp32.
void launch_copy_logits(const void* src, ElemType src_type, int64_t src_row_stride, const int32_t* rows,
                        int64_t n_rows, int64_t vocab, float* dst, cudaStream_t stream);

}  // namespace ringllama
