// Linear layers over packed weights (fp8_e4m3 with a scale per output row, int4 with a scale and
// a min per group of inputs), the two ops the forward needs from them:
//   launch_gemv_packed     y[t, r] = sum_c x[t, c] * w[r, c] for a few tokens (decode): the packed
//                          bytes are read once for all tokens, dequantized in registers to bf16 and
//                          multiplied on the tensor cores (mma m16n8k16, fp32 accumulation).
//   launch_dequant_packed  w (or a range of its rows) to bf16, for Gemm::matmul at prefill sizes,
//                          where one extra pass over the weights costs little next to the GEMM.
// Both dequantize the same way, so the two paths see the same weights: fp8 as e4m3 * scale in fp32
// rounded once to bf16 (the GEMV applies the row scale to its fp32 sum instead, which is exact);
// int4 as bf16(q * bf16(scale) + bf16(min)), one bf16 fma (gemv_packed.cu says why); the GEMV's
// factored int4 kernel (below) multiplies the exact weights instead, as it does for fp8.
//
// Layout (the store's contract; data and scales are separate, 16-byte aligned or better):
//   FP8_E4M3  data [rows][cols] OCP e4m3fn bytes; scales [rows] float:  w = e4m3(q) * scale[r]
//   INT4      data [rows][cols / 2] bytes, element 2j in the low nibble of byte j, 2j + 1 in the
//             high nibble, unsigned 0..15; scales [rows][cols / group] half2 (x = scale, y = min):
//             w = q * scale + min
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

enum class PackedFormat { FP8_E4M3, INT4 };

const char* packed_format_name(PackedFormat f);

// One packed [rows, cols] weight matrix ([out, in], as the store keeps linear weights).
struct PackedWeight {
  PackedFormat format = PackedFormat::FP8_E4M3;
  const void* data = nullptr;    // the quantized values, layout above
  const void* scales = nullptr;  // fp8: float per row; int4: half2 (scale, min) per row and group
  int64_t rows = 0;              // out
  int64_t cols = 0;              // in
  int64_t group = 0;             // int4: inputs per scale (a multiple of 32 dividing cols); fp8: unused
};

// Bytes of data and of scales: what a pass over the matrix reads.
size_t packed_data_bytes(const PackedWeight& w);
size_t packed_scale_bytes(const PackedWeight& w);

// Which int4 GEMV kernel a launch takes. Both read the same bytes; they differ in how a nibble
// becomes a product:
//   Factored  the mma multiplies x with 128 + q straight from the nibbles (one LOP3 per pair, no
//             float op per weight); per row and span of 128 columns, s * sum(x (128 + q)) +
//             (min - 128 s) * sum(x) is added in fp32, sum(x) from one more mma whose A is all ones.
//             Exact weights (q * scale + min in fp32), like fp8. Needs a group that is a multiple of
//             128 (one span, one (scale, min)); other groups take the legacy kernel.
//   Legacy    each weight made in bf16 as bf16(q * bf16(scale) + bf16(min)) (two bf16x2 ops per pair)
//             before the mma.
//   Auto      Legacy unless the environment says RINGLLAMA_GEMV_INT4=factored (read once, so that a
//             benchmark or a bisection can compare the two without a rebuild). The factored kernel
//             becomes the default once a GPU run has held it to its reference and measured it faster;
//             until then it is reached only by asking for it.
enum class GemvInt4Kernel { Auto, Factored, Legacy };

// The kernel Auto stands for. Throws on a RINGLLAMA_GEMV_INT4 other than "factored" or "legacy".
GemvInt4Kernel gemv_int4_default();

// The kernel a launch of `w` with `k` runs (fp8: Legacy, the only one; Auto resolved).
GemvInt4Kernel gemv_int4_kernel_for(const PackedWeight& w, GemvInt4Kernel k);

// Tokens one pass of the GEMV serves (one mma n-tile); more tokens take more passes, each one
// reading the weights again: past a few passes, dequantize and use Gemm::matmul.
inline constexpr int64_t kGemvPackedTokens = 8;

// y[t, r] = sum_c x[t, c] * w[r, c] for t < n_tokens, r < rows.
// x: [n_tokens, ldx] bf16, 16-byte aligned, ldx a multiple of 8 and >= cols.
// y: bf16 or fp32 ([n_tokens, ldy], ldy >= rows); nothing past `rows` in a y row is written.
// Needs cols % 16 == 0 (fp8) or cols % 32 == 0 (int4), 16-byte aligned data and 4-byte aligned scales.
// int4_kernel: see GemvInt4Kernel (ignored for fp8).
void launch_gemv_packed(const __nv_bfloat16* x, int64_t n_tokens, int64_t ldx, const PackedWeight& w, void* y,
                        ElemType y_type, int64_t ldy, cudaStream_t stream,
                        GemvInt4Kernel int4_kernel = GemvInt4Kernel::Auto);

// out[r - row0, c] = bf16(w[r, c]) for r in [row0, row0 + n_rows): a layer's matrix, or the part
// of one that fits the workspace (lm_head in slices). out: [n_rows, ld_out] bf16, ld_out >= cols,
// 16-byte aligned with ld_out a multiple of 8 (the stores are 16 bytes).
void launch_dequant_packed(const PackedWeight& w, int64_t row0, int64_t n_rows, __nv_bfloat16* out, int64_t ld_out,
                           cudaStream_t stream);

}  // namespace ringllama
