// The packer's scale searches (common/quant.h ScaleRule::kSearch): never a larger squared error
// than the plain min/max rule, on random and on adversarial inputs; the same bytes on every run
// and every machine; the stored values within a bound of the weights. Errors are measured here on
// the exact stored values (q x scale + min of two halves, e4m3 x scale: exact in double).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "common/quant.h"

namespace ringllama {
namespace {

// Inputs from mt19937's raw outputs (specified by the standard, unlike its distributions), so that
// every standard library draws the same weights.
class Draw {
 public:
  explicit Draw(uint32_t seed) : rng_(seed) {}
  double uniform() { return (static_cast<double>(rng_()) + 0.5) / 4294967296.0; }  // (0, 1)
  float normal(double mean, double sd) {
    const double r = std::sqrt(-2 * std::log(uniform())), a = 6.283185307179586 * uniform();
    return static_cast<float>(mean + sd * r * std::cos(a));
  }

 private:
  std::mt19937 rng_;
};

struct Int4Result {
  std::vector<uint8_t> q;
  std::vector<uint16_t> sm;
  double err = 0;  // squared error of the stored values
};

Int4Result int4(const std::vector<float>& w, int64_t g, ScaleRule rule) {
  const auto n = static_cast<int64_t>(w.size());
  Int4Result r;
  r.q.resize(static_cast<size_t>(n / 2));
  r.sm.resize(static_cast<size_t>(n / g * 2));
  quantize_row_int4(w.data(), n, g, r.q.data(), r.sm.data(), rule);
  for (int64_t c = 0; c < n; ++c) {
    const int u = c % 2 ? r.q[c / 2] >> 4 : r.q[c / 2] & 0xF;
    const double s = half_to_float(r.sm[c / g * 2]), m = half_to_float(r.sm[c / g * 2 + 1]);
    const double d = u * s + m - w[c];
    r.err += d * d;
  }
  return r;
}

struct Fp8Result {
  std::vector<uint8_t> q;
  float scale = 0;
  double err = 0;
};

Fp8Result fp8(const std::vector<float>& w, ScaleRule rule) {
  Fp8Result r;
  r.q.resize(w.size());
  r.scale = quantize_row_fp8(w.data(), static_cast<int64_t>(w.size()), r.q.data(), rule);
  for (size_t c = 0; c < w.size(); ++c) {
    const double d = static_cast<double>(e4m3_to_float(r.q[c])) * r.scale - w[c];
    r.err += d * d;
  }
  return r;
}

// Groups of 128 that are hard on a quantizer, by name.
std::vector<std::pair<std::string, std::vector<float>>> adversarial_groups() {
  Draw d(17);
  std::vector<std::pair<std::string, std::vector<float>>> out;
  auto make = [&](const std::string& name, const std::function<float(int)>& f) {
    std::vector<float> w(128);
    for (int i = 0; i < 128; ++i) w[i] = f(i);
    out.emplace_back(name, std::move(w));
  };
  make("constant", [](int) { return 0.1f; });  // not a half: the min itself rounds
  make("constant zero", [](int) { return 0.0f; });
  make("one outlier", [&](int i) { return i == 77 ? 1.0f : d.normal(0, 0.01); });
  make("all negative", [&](int) { return static_cast<float>(-1 - 2 * d.uniform()); });
  make("two clusters", [&](int i) { return d.normal(i % 2 ? 0.5 : -0.5, 0.01); });
  make("near half subnormals", [&](int) { return d.normal(0, 2e-7); });  // steps below 2^-24
  make("subnormal and normal", [&](int i) { return i == 3 ? 1e-3f : d.normal(0, 1e-6); });
  make("near half max", [&](int) { return static_cast<float>(30000 + 35504 * d.uniform()); });
  make("full half range", [&](int i) { return i == 0 ? -65504.0f : i == 1 ? 65504.0f : std::clamp(d.normal(0, 20000), -65000.0f, 65000.0f); });
  make("steps of 1/15", [](int i) { return static_cast<float>(i % 16) / 15.0f; });
  return out;
}

TEST(QuantSearch, Int4NeverWorseThanThePlainRule) {
  // Up to the rounding of the sums the search compares (a few units in the 15th digit).
  auto check = [](const std::string& name, const std::vector<float>& w, int64_t g) {
    const Int4Result plain = int4(w, g, ScaleRule::kMinMax), search = int4(w, g, ScaleRule::kSearch);
    EXPECT_LE(search.err, plain.err * (1 + 1e-12)) << name << " g" << g;
    for (uint16_t h : search.sm) EXPECT_TRUE(std::isfinite(half_to_float(h))) << name;
    return std::pair<double, double>(plain.err, search.err);
  };
  for (const auto& [name, w] : adversarial_groups())
    for (int64_t g : {32, 128}) check(name, w, g);

  // Weight-like rows: normal, a few outliers; the search must also gain something on them.
  Draw d(29);
  double plain = 0, search = 0;
  for (int row = 0; row < 200; ++row) {
    std::vector<float> w(1024);
    const double sd = 0.002 + 0.05 * d.uniform();
    for (auto& x : w) x = d.normal(0.001, sd);
    if (row % 3 == 0) w[static_cast<size_t>(row) % 1024] = static_cast<float>(8 * sd);
    for (int64_t g : {32, 128}) {
      const auto [p, s] = check("row " + std::to_string(row), w, g);
      if (g == 128) plain += p, search += s;
    }
  }
  // A search that found nothing would give 1.
  std::cout << "int4 g128, squared error of the search / the plain rule: " << search / plain << "\n";
  EXPECT_LT(search / plain, 0.9);
}

TEST(QuantSearch, Fp8NeverWorseThanThePlainRule) {
  for (const auto& [name, w] : adversarial_groups()) {
    const Fp8Result plain = fp8(w, ScaleRule::kMinMax), search = fp8(w, ScaleRule::kSearch);
    EXPECT_LE(search.err, plain.err) << name;
  }
  Draw d(31);
  double plain = 0, search = 0;
  for (int row = 0; row < 200; ++row) {
    std::vector<float> w(2048);
    for (auto& x : w) x = d.normal(0, 0.02);
    const Fp8Result p = fp8(w, ScaleRule::kMinMax), s = fp8(w, ScaleRule::kSearch);
    EXPECT_LE(s.err, p.err) << row;
    plain += p.err, search += s.err;
  }
  // Small: e4m3's 3 mantissa bits are most of the error, whatever the scale.
  std::cout << "fp8, squared error of the search / the plain rule: " << search / plain << "\n";
  EXPECT_LT(search / plain, 0.99);
}

TEST(QuantSearch, StoredValuesWithinTheBound) {
  Draw d(37);
  for (int row = 0; row < 100; ++row) {
    std::vector<float> w(512);
    for (auto& x : w) x = d.normal(0.01, 0.05);
    // int4: per group, the RMS error is within the plain rule's bound of half a step.
    const Int4Result r = int4(w, 128, ScaleRule::kSearch);
    std::vector<float> back(w.size());
    dequantize_row_int4(r.q.data(), r.sm.data(), 512, 128, back.data());
    for (int k = 0; k < 4; ++k) {
      float lo = w[k * 128], hi = lo;
      double e = 0;
      for (int i = 0; i < 128; ++i) {
        lo = std::min(lo, w[k * 128 + i]), hi = std::max(hi, w[k * 128 + i]);
        e += (static_cast<double>(back[k * 128 + i]) - w[k * 128 + i]) * (back[k * 128 + i] - w[k * 128 + i]);
      }
      EXPECT_LE(std::sqrt(e / 128), (hi - lo) / 15 * 0.5 + std::fabs(lo) * 0x1p-10f) << row << " group " << k;
    }
    // fp8: max|w| maps to 416 ... 448, so nothing saturates and every weight is within half an
    // e4m3 step.
    const Fp8Result f = fp8(w, ScaleRule::kSearch);
    float amax = 0;
    for (float x : w) amax = std::max(amax, std::fabs(x));
    EXPECT_GE(f.scale, amax / 448.0f) << row;
    EXPECT_LE(f.scale, amax / 416.0f) << row;
    std::vector<float> fb(w.size());
    dequantize_row_fp8(f.q.data(), f.scale, 512, fb.data());
    for (size_t c = 0; c < w.size(); ++c)
      EXPECT_LE(std::fabs(fb[c] - w[c]), std::fabs(w[c]) * 0x1p-4f + f.scale * 0x1p-10f + 1e-9f) << row << " " << c;
  }
}

// FNV-1a over the bytes.
uint64_t fnv(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 1099511628211ull;
  return h;
}

TEST(QuantSearch, SameBytesOnEveryRunAndMachine) {
  Draw d(41);
  std::vector<float> w(64 * 256);
  for (auto& x : w) x = d.normal(0.002, 0.03);
  auto pack = [&] {
    uint64_t h = fnv(nullptr, 0);
    for (int r = 0; r < 64; ++r) {
      const std::vector<float> row(w.begin() + r * 256, w.begin() + (r + 1) * 256);
      const Int4Result a = int4(row, 128, ScaleRule::kSearch), b = int4(row, 32, ScaleRule::kSearch);
      const Fp8Result f = fp8(row, ScaleRule::kSearch);
      h = fnv(a.q.data(), a.q.size(), h), h = fnv(a.sm.data(), a.sm.size() * 2, h);
      h = fnv(b.q.data(), b.q.size(), h), h = fnv(b.sm.data(), b.sm.size() * 2, h);
      h = fnv(f.q.data(), f.q.size(), h), h = fnv(&f.scale, 4, h);
    }
    return h;
  };
  const uint64_t first = pack();
  EXPECT_EQ(pack(), first);
  // The bytes this input packs to where the searches were written. Another value on another
  // machine or compiler means packs there differ (a contracted multiply-add, another rounding).
  EXPECT_EQ(first, 0x4846622ebb591fcdull) << std::hex << first;
}

TEST(QuantSearch, HalfRoundsToTheNearerNeighbourTiesToEven) {
  // float_to_half works on the bits; every float goes to the nearer of the two halves around it.
  Draw d(43);
  for (int i = 0; i < 200000; ++i) {
    const double mag = std::ldexp(1.0, static_cast<int>(d.uniform() * 44) - 28);  // 2^-28 .. 2^16
    const auto f = static_cast<float>((d.uniform() * 2 - 1) * mag);
    const uint16_t h = float_to_half(f);
    const float v = half_to_float(h);
    if (std::isinf(v)) {
      ASSERT_GE(std::fabs(f), 65520.0f) << f;
      continue;
    }
    const uint16_t up = static_cast<uint16_t>(h + 1), down = static_cast<uint16_t>(h - 1);
    for (uint16_t n : {up, down}) {
      if ((h & 0x7FFF) == 0 || (n & 0x7C00) == 0x7C00) continue;
      const float nv = half_to_float(n);
      ASSERT_LE(std::fabs(static_cast<double>(v) - f), std::fabs(static_cast<double>(nv) - f)) << f;
      if (std::fabs(static_cast<double>(v) - f) == std::fabs(static_cast<double>(nv) - f)) {
        ASSERT_EQ(h & 1, 0) << f << ": a tie goes to the even half";
      }
    }
  }
  EXPECT_EQ(float_to_half(65519.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);  // the tie with 65536 goes up, past the largest half
  EXPECT_EQ(float_to_half(0x1p-25f), 0x0000);  // a tie at the smallest subnormal: even, 0
  EXPECT_EQ(float_to_half(3 * 0x1p-25f), 0x0002);
  EXPECT_EQ(float_to_half(0x1p-14f - 0x1p-26f), 0x0400);  // rounds up into the smallest normal
}

}  // namespace
}  // namespace ringllama
