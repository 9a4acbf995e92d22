// Greedy pick: the index of the largest value of each row; ties go to the lowest index, NaN counts
// as -inf (so a row always yields an index in [0, n)).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

// x: [n_rows, n] of x_type, row stride row_stride (>= n) elements; out: [n_rows] int32.
void launch_argmax(const void* x, ElemType x_type, int64_t n_rows, int64_t n, int64_t row_stride, int32_t* out,
                   cudaStream_t stream);

}  // namespace ringllama
