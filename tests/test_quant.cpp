// The packed formats' definitions (common/quant.h): exact conversions, rounding to nearest even,
// and the error bounds that the pack and the CPU backend rely on.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/errors.h"
#include "common/quant.h"

namespace ringllama {
namespace {

TEST(Quant, E4m3DecodesTheFormat) {
  EXPECT_EQ(e4m3_to_float(0x00), 0.0f);
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);         // exponent 7 = bias
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);       // the largest finite value
  EXPECT_EQ(e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), 0x1p-9f);      // the smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x08), 0x1p-6f);      // the smallest normal
  EXPECT_EQ(e4m3_to_float(0x3C), 1.5f);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xFF)));
}

TEST(Quant, E4m3RoundTripsEveryValueAndNeverWritesNaN) {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;
    const float f = e4m3_to_float(static_cast<uint8_t>(b));
    EXPECT_EQ(float_to_e4m3(f), b == 0x80 ? 0x80 : b) << b;
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1000.0f, 1000.0f);
  for (int i = 0; i < 100000; ++i) {
    const uint8_t q = float_to_e4m3(u(rng));
    EXPECT_NE(q & 0x7F, 0x7F);
  }
  EXPECT_EQ(float_to_e4m3(1e30f), 0x7E);  // saturates: the format has no infinity
  EXPECT_EQ(float_to_e4m3(-500.0f), 0xFE);
}

TEST(Quant, E4m3RoundsToNearestEven) {
  // Between 1 (0x38) and 1.125 (0x39) the tie goes to the even mantissa, 1; between 1.125 and 1.25
  // (0x3A) to 1.25.
  EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);
  EXPECT_EQ(float_to_e4m3(1.1875f), 0x3A);
  EXPECT_EQ(float_to_e4m3(1.07f), 0x39);
  // Subnormal ties: 1.5 and 2.5 quanta of 2^-9.
  EXPECT_EQ(float_to_e4m3(1.5f * 0x1p-9f), 0x02);
  EXPECT_EQ(float_to_e4m3(2.5f * 0x1p-9f), 0x02);
  EXPECT_EQ(float_to_e4m3(0.25f * 0x1p-9f), 0x00);
  // Carry into the next binade: just under 2, rounded up, is 2 (0x40).
  EXPECT_EQ(float_to_e4m3(1.99f), 0x40);
  // Every float rounds to one of its two neighbours, the nearer one.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-448.0f, 448.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = u(rng) * (i % 2 ? 1.0f : 0.01f);
    const float y = e4m3_to_float(float_to_e4m3(x));
    for (int b = 0; b < 256; ++b) {
      const float c = e4m3_to_float(static_cast<uint8_t>(b));
      if (!std::isnan(c)) ASSERT_LE(std::fabs(y - x), std::fabs(c - x)) << x << " went to " << y << ", " << c << " is nearer";
    }
  }
}

TEST(Quant, HalfRoundTripsAndRoundsToNearestEven) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00 && (h & 0x3FF)) continue;  // NaN
    const float f = half_to_float(static_cast<uint16_t>(h));
    EXPECT_EQ(float_to_half(f), h) << h;
  }
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(float_to_half(1.0f + 0x1p-11f), 0x3C00);              // tie: even
  EXPECT_EQ(float_to_half(1.0f + 3 * 0x1p-11f), 0x3C02);          // tie: even
  EXPECT_EQ(float_to_half(70000.0f), 0x7C00);                     // overflow
  EXPECT_EQ(float_to_half(-0x1p-26f), 0x8000);                    // underflow keeps the sign
}

TEST(Quant, Fp8PlainRowWithinHalfAStepOfEveryWeight) {
  std::mt19937 rng(11);
  std::normal_distribution<float> n(0.0f, 0.05f);
  std::vector<float> w(1000), back(1000);
  std::vector<uint8_t> q(1000);
  for (auto& x : w) x = n(rng);
  w[17] = 0.9f;  // an outlier sets the scale
  const float scale = quantize_row_fp8(w.data(), 1000, q.data(), ScaleRule::kMinMax);
  EXPECT_EQ(scale, 0.9f / 448.0f);
  EXPECT_EQ(q[17], 0x7E);
  dequantize_row_fp8(q.data(), scale, 1000, back.data());
  for (size_t i = 0; i < w.size(); ++i)
    EXPECT_LE(std::fabs(back[i] - w[i]), std::fabs(w[i]) * 0x1p-4f + scale * 0x1p-10f + 1e-9f) << i;
  std::vector<float> zero(8, 0.0f);
  EXPECT_EQ(quantize_row_fp8(zero.data(), 8, q.data()), 0.0f);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], 0);
  w[3] = NAN;
  EXPECT_THROW(quantize_row_fp8(w.data(), 1000, q.data()), Error);
}

TEST(Quant, Int4RowLayoutAndPlainRuleBound) {
  // Group 0: 0..15 exactly (scale 1, min 0); group 1: constant (scale 0).
  std::vector<float> w(64);
  for (int i = 0; i < 32; ++i) w[i] = static_cast<float>(i % 16);
  for (int i = 32; i < 64; ++i) w[i] = -2.5f;
  std::vector<uint8_t> q(32);
  std::vector<uint16_t> sm(4);
  quantize_row_int4(w.data(), 64, 32, q.data(), sm.data());
  EXPECT_EQ(half_to_float(sm[0]), 1.0f);
  EXPECT_EQ(half_to_float(sm[1]), 0.0f);
  EXPECT_EQ(half_to_float(sm[2]), 0.0f);
  EXPECT_EQ(half_to_float(sm[3]), -2.5f);
  EXPECT_EQ(q[0], 0x10);  // element 0 low nibble, element 1 high nibble
  EXPECT_EQ(q[7], 0xFE);  // elements 14 and 15
  EXPECT_EQ(q[16], 0x00);
  std::vector<float> back(64);
  dequantize_row_int4(q.data(), sm.data(), 64, 32, back.data());
  EXPECT_EQ(back, w);

  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.01f, 0.05f);
  std::vector<float> r(256), rb(256);
  std::vector<uint8_t> rq(128);
  std::vector<uint16_t> rsm(4);
  for (auto& x : r) x = n(rng);
  quantize_row_int4(r.data(), 256, 128, rq.data(), rsm.data(), ScaleRule::kMinMax);
  dequantize_row_int4(rq.data(), rsm.data(), 256, 128, rb.data());
  for (int k = 0; k < 2; ++k) {
    float lo = r[k * 128], hi = lo;
    for (int i = 0; i < 128; ++i) lo = std::min(lo, r[k * 128 + i]), hi = std::max(hi, r[k * 128 + i]);
    const float step = (hi - lo) / 15;
    for (int i = 0; i < 128; ++i)
      EXPECT_LE(std::fabs(rb[k * 128 + i] - r[k * 128 + i]), step * 0.5f * 1.01f + std::fabs(lo) * 0x1p-10f)
          << k * 128 + i;
  }
  EXPECT_THROW(quantize_row_int4(r.data(), 100, 32, rq.data(), rsm.data()), Error);
}

}  // namespace
}  // namespace ringllama
