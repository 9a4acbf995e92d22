// Rows of a matrix picked by index into a dense one: dst[r] = src[rows[r]]. For the rows of a step
// that need logits (each sequence's last token), so that lm_head runs on those rows only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ringllama {

// src: rows of `width` bf16 at row stride src_row_stride; rows: [n_rows] int32 on the device;
// dst: [n_rows, width] bf16, dense.
void launch_gather_rows(const __nv_bfloat16* src, int64_t src_row_stride, const int32_t* rows, int64_t n_rows,
                        int64_t width, __nv_bfloat16* dst, cudaStream_t stream);

}  // namespace ringllama
