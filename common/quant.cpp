#include "common/quant.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "common/errors.h"

namespace ringllama {

namespace {

// Every e4m3fn value, by its bits: decoding is a lookup.
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 0xF, m = b & 7;
    float v = e == 0 ? std::ldexp(static_cast<float>(m), -9)              // subnormal: m/8 * 2^-6
                     : std::ldexp(static_cast<float>(8 + m), e - 7 - 3);  // (1 + m/8) * 2^(e-7)
    if ((b & 0x7F) == 0x7F) v = NAN;
    t[static_cast<size_t>(b)] = (b & 0x80) ? -v : v;
  }
  return t;
}

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> t = make_e4m3_table();
  return t;
}

// x rounded to a multiple of `quantum` (a power of two, so x / quantum is exact), ties to even.
float round_to_quantum(float x, float quantum) { return std::nearbyint(x / quantum) * quantum; }

}  // namespace

float e4m3_to_float(uint8_t b) { return e4m3_table()[b]; }

uint8_t float_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7FFFFFFF;
  if (a > 0x7F800000) return 0x7F;             // NaN
  if (a >= 0x43E00000) return sign | 0x7E;     // |f| >= 448, infinity included: saturate
  if (a < 0x3C800000) {                        // |f| < 2^-6: multiples of the subnormal step 2^-9
    float m;
    std::memcpy(&m, &a, 4);
    // Exact scaling, then round to nearest even; 8 steps is 2^-6, whose code 0x08 is the smallest normal.
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(m * 512.0f)));
  }
  // Normal: keep 3 of the 23 mantissa bits, round to nearest even on the 20 dropped (a carry moves
  // into the exponent, as it should), and rebias the exponent from 127 to 7.
  const uint32_t r = a + 0x7FFFF + ((a >> 20) & 1);
  const uint32_t code = (r >> 20) - (120u << 3);
  return static_cast<uint8_t>(sign | std::min<uint32_t>(code, 0x7E));
}

float half_to_float(uint16_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float v;
  if (e == 0) v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(1024 + m), e - 15 - 10);
  return (h & 0x8000) ? -v : v;
}

uint16_t float_to_half(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return 0x7E00;
  float a = std::fabs(f);
  if (std::isinf(a)) return sign | 0x7C00;
  int exp = 0;
  std::frexp(a, &exp);
  const float quantum = a < 0x1p-14f ? 0x1p-24f : std::ldexp(1.0f, exp - 1 - 10);
  a = round_to_quantum(a, quantum);
  if (a == 0) return sign;
  if (a > 65504.0f) return sign | 0x7C00;
  if (a < 0x1p-14f) return static_cast<uint16_t>(sign | static_cast<uint16_t>(a * 0x1p24f));
  std::frexp(a, &exp);
  const int e = exp - 1 + 15;
  const int m = static_cast<int>(std::ldexp(a, -(exp - 1)) * 1024.0f) - 1024;
  return static_cast<uint16_t>(sign | (e << 10) | m);
}

float quantize_row_fp8(const float* w, int64_t n, uint8_t* q) {
  float amax = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (!std::isfinite(w[c])) throw Error(fmt::format("fp8: weight {} of a row is {}", c, w[c]));
    amax = std::max(amax, std::fabs(w[c]));
  }
  if (amax == 0) {
    std::memset(q, 0, static_cast<size_t>(n));
    return 0.0f;
  }
  const float scale = amax / kE4m3Max;
  // The largest |w| / scale may come out a hair above 448: float_to_e4m3 saturates it.
  for (int64_t c = 0; c < n; ++c) q[c] = float_to_e4m3(w[c] / scale);
  return scale;
}

void dequantize_row_fp8(const uint8_t* q, float scale, int64_t n, float* out) {
  const std::array<float, 256>& t = e4m3_table();
  for (int64_t c = 0; c < n; ++c) out[c] = t[q[c]] * scale;
}

void quantize_row_int4(const float* w, int64_t n, int64_t g, uint8_t* q, uint16_t* sm) {
  if (g <= 0 || g % 2 != 0 || n % g != 0)
    throw Error(fmt::format("int4: a row of {} weights does not split into groups of {}", n, g));
  std::memset(q, 0, static_cast<size_t>(n / 2));
  for (int64_t k = 0; k < n / g; ++k) {
    const float* x = w + k * g;
    float lo = x[0], hi = x[0];
    for (int64_t i = 0; i < g; ++i) {
      if (!std::isfinite(x[i])) throw Error(fmt::format("int4: weight {} of a row is {}", k * g + i, x[i]));
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const uint16_t min_h = float_to_half(lo);
    const float min_f = half_to_float(min_h);
    const uint16_t scale_h = float_to_half((hi - min_f) / 15.0f);
    const float scale_f = half_to_float(scale_h);
    if (!std::isfinite(min_f) || !std::isfinite(scale_f))
      throw Error(fmt::format("int4: a group spans [{}, {}], beyond what half scales hold", lo, hi));
    sm[2 * k] = scale_h;
    sm[2 * k + 1] = min_h;
    for (int64_t i = 0; i < g; ++i) {
      const float v = scale_f == 0 ? 0.0f : std::nearbyint((x[i] - min_f) / scale_f);
      const auto u = static_cast<uint8_t>(std::clamp(v, 0.0f, 15.0f));
      const int64_t c = k * g + i;
      q[c / 2] |= static_cast<uint8_t>(c % 2 ? u << 4 : u);
    }
  }
}

void dequantize_row_int4(const uint8_t* q, const uint16_t* sm, int64_t n, int64_t g, float* out) {
  for (int64_t k = 0; k < n / g; ++k) {
    const float scale = half_to_float(sm[2 * k]), min = half_to_float(sm[2 * k + 1]);
    for (int64_t i = 0; i < g; ++i) {
      const int64_t c = k * g + i;
      const int u = c % 2 ? q[c / 2] >> 4 : q[c / 2] & 0xF;
      out[c] = static_cast<float>(u) * scale + min;
    }
  }
}

}  // namespace ringllama
