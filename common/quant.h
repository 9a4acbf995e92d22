// Packed weight formats (DESIGN.md "The packed store"): OCP fp8 e4m3fn with one float32 scale per
// output row, and unsigned int4 with a (scale, min) pair of IEEE halves per G inputs of a row.
//
// These are the definitions: the packer quantizes with them, the CPU backend dequantizes with
// them, and the CUDA kernels are tested against them. Everything here is exact and portable
// (integer and power-of-two arithmetic, round to nearest even; the scale searches in double, with
// a fixed order of operations and no contraction into fused multiply-adds), so every machine packs
// the same bytes.
#pragma once

#include <cstdint>

namespace ringllama {

inline constexpr float kE4m3Max = 448.0f;  // the largest finite e4m3fn value (0x7e)

// How the quantizers choose scales. kMinMax: the plain rule (fp8 max|w| / 448; int4 the group's min
// and (max - min) / 15). kSearch: a search for the scales with the least squared error, never
// worse than the plain rule. Both write the same layout.
enum class ScaleRule { kMinMax, kSearch };

// The packer's rule per format, by default the one that measured best (DESIGN.md "Packed weights"):
// the search for int4; the plain rule for fp8, whose search lowers the squared error by 9 % but not
// the perplexity.
struct ScaleRules {
  ScaleRule fp8 = ScaleRule::kMinMax;
  ScaleRule int4 = ScaleRule::kSearch;
};

// e4m3fn bits -> float; 0x7f and 0xff are NaN (never written by the packer).
float e4m3_to_float(uint8_t b);
// float -> e4m3fn, round to nearest even, saturating at +-448 (the format has no infinity). NaN
// becomes 0x7f; the quantizers below never pass one.
uint8_t float_to_e4m3(float f);

// IEEE binary16 <-> float; float_to_half rounds to nearest even, overflow gives infinity.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// fp8 row of n weights: q[c] = e4m3(w[c] / scale) (0 for a zero row, whose bytes are all 0).
// kMinMax: scale = max|w| / 448. kSearch: the scale of least squared error among max|w| / (448 -
// 8k), k = 0..4 (max|w| maps to 448 ... 416: nothing saturates, the row moves along e4m3's grid).
// Returns the scale. Throws Error for a value that is not finite.
float quantize_row_fp8(const float* w, int64_t n, uint8_t* q, ScaleRule rule = ScaleRule::kMinMax);
void dequantize_row_fp8(const uint8_t* q, float scale, int64_t n, float* out);

// int4 row of n weights in groups of g (n % g == 0, g even): q holds n / 2 bytes, element 2j in
// the low nibble of byte j and 2j + 1 in the high one; sm holds n / g pairs of halves (scale,
// min); w ~ q * scale + min. Per group, kMinMax: min = min(w), scale = (max - min) / 15, both
// rounded to half. kSearch: of that pair and the least-squares pairs of llama.cpp's
// make_qkx2_quants search (levels from 6 candidate scales, then refits), rounded to halves, the
// one whose squared error is least. Either way q = clamp(round_even((w - min_h) / scale_h), 0, 15)
// (0 where scale_h is 0). Throws Error for a value that is not finite or a group whose plain
// scale or min overflows a half.
void quantize_row_int4(const float* w, int64_t n, int64_t g, uint8_t* q, uint16_t* sm,
                       ScaleRule rule = ScaleRule::kSearch);
void dequantize_row_int4(const uint8_t* q, const uint16_t* sm, int64_t n, int64_t g, float* out);

}  // namespace ringllama
