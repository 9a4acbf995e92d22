// The block kernels behind HybridCpuMatmul (worker/hybrid_cpu.h), one set per instruction set.
//
// A block is R rows of W times T tokens of x: R*T fp32 dot products over the full length `in`,
// with R*T accumulators held in registers. The caller walks the rows in blocks of the kernel's
// largest R and, inside each, the tokens in blocks of its largest T, so a block's weight rows are
// read from DRAM once and from L1/L2 for the other token blocks.
#pragma once

#include <cstddef>
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

// The kernels of one instruction set; the caller checks that the CPU runs it. For amx: the
// AVX-512 blocks, which take what the tiles do not (worker/hybrid_cpu_amx.cpp).
const Kernel& kernel_for(CpuIsa isa);

// ---- AMX-BF16 (worker/hybrid_cpu_amx.cpp) ----------------------------------------------------------
//
// A tile multiply takes 16 rows of W as they lie (64 bytes of each, the row stride `in`) times x in
// the tiles' pair layout, which differs from x's own: x is packed once per call (it is small and
// read for every row block), the weights never are.

constexpr int64_t kAmxRows = 16;     // weight rows per tile
constexpr int64_t kAmxK = 32;        // inputs per tile step (64 bytes of bf16)
constexpr int64_t kAmxTokens = 16;   // tokens per tile
constexpr int64_t kAmxMinTokens = 16;  // below this the AVX-512 kernel is as fast (memory-bound)

// AMX-BF16 in the CPU and the OS's permission for the tile data (requested once per process).
bool amx_usable();
// Whether amx_rows takes a call of this shape (the rest goes to the AVX-512 blocks).
inline bool amx_fits(int64_t in, int64_t tokens) { return in % kAmxK == 0 && tokens >= kAmxMinTokens; }
// uint32 elements of x packed for the tiles.
inline size_t amx_packed_x_size(int64_t in, int64_t tokens) {
  return static_cast<size_t>(in / kAmxK * ((tokens + kAmxTokens - 1) / kAmxTokens) * kAmxTokens * kAmxTokens);
}
// xp[(kb * token_tiles + tt) * 256 + i * 16 + n] = the pair x[tt*16 + n][kb*32 + 2i, +1] (zero past
// the last token): tile row i holds input pair i of 16 tokens, as tdpbf16ps reads its second operand.
void amx_pack_x(const uint16_t* x, int64_t in, int64_t tokens, uint32_t* xp);
// y[t*ldy + r] for r < rows (a multiple of 16) and t < tokens, from W's rows (stride in) and the packed x.
void amx_rows(const uint16_t* w, int64_t in, int64_t rows, const uint32_t* xp, int64_t tokens, float* y,
              int64_t ldy);

}  // namespace ringllama::hybrid
