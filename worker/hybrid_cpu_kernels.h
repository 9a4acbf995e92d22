// The block kernels behind HybridCpuMatmul (worker/hybrid_cpu.h), one set per instruction set.
//
// A block is R rows of W times T tokens of x: R*T fp32 dot products over the full length `in`,
// with R*T accumulators held in registers. The caller walks the rows in blocks of the kernel's
// largest R and, inside each, the tokens in blocks of its largest T, so a block's weight rows are
// read from DRAM once and from L1/L2 for the other token blocks.
#pragma once

#include <cstdint>

#include "worker/hybrid_cpu.h"

namespace ringllama::hybrid {

constexpr int kMaxBlockRows = 4;
constexpr int kMaxBlockTokens = 4;

// y[t*ldy + r] = sum_k x[t*in + k] * w[r*in + k] for r < R, t < T (R, T fixed by the function).
using BlockFn = void (*)(const uint16_t* w, const uint16_t* x, int64_t in, float* y, int64_t ldy);

struct Kernel {
  int rows = 0;    // largest R
  int tokens = 0;  // largest T
  BlockFn block[kMaxBlockRows][kMaxBlockTokens] = {};  // [R - 1][T - 1], every R <= rows, T <= tokens
};

// The kernels of one instruction set; the caller checks that the CPU runs it.
const Kernel& kernel_for(CpuIsa isa);

}  // namespace ringllama::hybrid
