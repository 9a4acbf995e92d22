// The packed-weight kernels (kernels/gemv_packed.cuh) and flash-decoding (the split launch of
// kernels/attention_paged.cuh) against double-precision CPU references.
//
// The references decode e4m3 and half from their bit layouts here, independently of the store's
// code. Two references per GEMV: the exact one (weights as the layout defines them, in double), and
// the one over the weights the kernel multiplies (each rounded once to bf16, as the dequant kernel
// writes them, which this file checks bit for bit). The GEMV must be within fp32 accumulation error
// of the second and within bf16 rounding of the first; both bounds are per output row, relative
// to sum_c |x_c w_c|, so that rows with extreme scales are held to the same standard.
// Inputs are drawn fresh per case; the seed is printed with any failure. Outputs start as NaN.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "kernels/attention_paged.cuh"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "kernels/gemv_packed.cuh"
#include "tests/attention_reference.h"
#include "tests/gpu_skip.h"

namespace ringllama {
namespace {

using bf16 = __nv_bfloat16;
using test::attention_ref;

struct Rng {
  explicit Rng(uint64_t s) : seed(s), gen(s) {}
  uint64_t seed;
  std::mt19937_64 gen;
  float normal(float sd = 1.0f) { return std::normal_distribution<float>(0.0f, sd)(gen); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
};

uint64_t fresh_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

template <typename D, typename H>
DeviceBuffer<D> to_device(const std::vector<H>& h) {
  DeviceBuffer<D> d(std::max<size_t>(h.size() * sizeof(H) / sizeof(D), 1), "test input");
  CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(H), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> download(const DeviceBuffer<T>& d, size_t n) {
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <typename D>
DeviceBuffer<D> poisoned(size_t n) {
  DeviceBuffer<D> d(std::max<size_t>(n, 1), "test output");
  CUDA_CHECK(cudaMemset(d.get(), 0xFF, n * sizeof(D)));  // NaN for bf16 and fp32
  return d;
}

// ---------------------------------------------------------------------------------------------
// Reference decoding, from the bit layouts

// OCP e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F/0xFF NaN.
double e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return (b & 0x80) ? -mag : mag;
}

// IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
double half_value(uint16_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  const double mag = e == 0 ? std::ldexp(m / 1024.0, -14) : std::ldexp(1.0 + m / 1024.0, e - 15);
  return (h & 0x8000) ? -mag : mag;
}

// The nearest half (round to nearest even), for building scales; finite inputs in half range only.
uint16_t to_half(double v) {
  uint16_t best = 0;
  double best_d = INFINITY;
  // The half line is monotone in its bits per sign: binary search over the 0x7C00 finite magnitudes.
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const double a = std::fabs(v);
  int lo = 0, hi = 0x7BFF;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (half_value(static_cast<uint16_t>(mid)) <= a) lo = mid; else hi = mid - 1;
  }
  for (int c : {lo, std::min(lo + 1, 0x7BFF)}) {
    const double d = std::fabs(half_value(static_cast<uint16_t>(c)) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) best_d = d, best = static_cast<uint16_t>(c);
  }
  return static_cast<uint16_t>(best | sign);
}

// Round to the nearest bf16 (ties to even) straight from double: no float step, which could round
// twice. bf16 keeps 8 significant bits; the values here are normal.
double round_bf16(double v) {
  if (v == 0) return v;
  int e = 0;
  const double m = std::frexp(v, &e);  // v = m * 2^e, 0.5 <= |m| < 1
  return std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
}

// A packed matrix on the host: the bytes the kernels read and the values the layout defines.
struct HostPacked {
  PackedFormat format;
  int64_t rows, cols, group;
  std::vector<uint8_t> data;
  std::vector<float> row_scale;    // fp8
  std::vector<uint16_t> halves;    // int4: [rows][cols / group][2] (scale, min) bits
  std::vector<double> exact;       // [rows][cols] w by the layout, in double
  std::vector<double> as_bf16;     // [rows][cols] the bf16 weights the kernels make
  std::vector<double> slack;       // [rows][cols] a bound on |as_bf16 - exact|
};

HostPacked make_packed(PackedFormat f, int64_t rows, int64_t cols, int64_t group, Rng& rng) {
  HostPacked h{f, rows, cols, group, {}, {}, {}, {}, {}, {}};
  h.exact.resize(rows * cols);
  h.as_bf16.resize(rows * cols);
  h.slack.resize(rows * cols);
  if (f == PackedFormat::FP8_E4M3) {
    h.data.resize(rows * cols);
    h.row_scale.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      // Extreme row scales among ordinary ones, and an all-zero row.
      const int kind = r % 7;
      const float s = kind == 1 ? 1e-30f : kind == 2 ? 1e30f : kind == 3 ? 0.0f : kind == 4 ? -2.5e-3f
                                                                                             : std::ldexp(1.0f + rng.normal(0.1f), -8);
      h.row_scale[r] = s;
      for (int64_t c = 0; c < cols; ++c) {
        uint8_t b = static_cast<uint8_t>(rng.integer(0, 255));
        if ((b & 0x7F) == 0x7F) b ^= 1;  // not NaN
        if (kind == 5) b = 0;              // zero bytes under a normal scale
        h.data[r * cols + c] = b;
        h.exact[r * cols + c] = e4m3_value(b) * static_cast<double>(s);
        // The kernels: float(e4m3) * scale in fp32, rounded once to bf16.
        h.as_bf16[r * cols + c] = bf16_to_f32(f32_to_bf16(static_cast<float>(e4m3_value(b)) * s));
        h.slack[r * cols + c] = std::ldexp(std::fabs(h.exact[r * cols + c]), -8);  // one rounding: 2^-9
      }
    }
    return h;
  }
  const int64_t groups = cols / group;
  h.data.resize(rows * cols / 2);
  h.halves.resize(rows * groups * 2);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int kind = static_cast<int>((r * 3 + gi) % 9);
      double s = std::ldexp(1.0 + rng.normal(0.1f), -6), mn = -7.5 * s + rng.normal(1e-3f);
      if (kind == 1) s = 65504.0, mn = -65504.0;           // the largest half
      if (kind == 2) s = std::ldexp(1.0, -24), mn = 0.0;   // the smallest (subnormal) half
      if (kind == 3) s = 0.0, mn = 0.0;                    // an all-zero group (bytes random below)
      if (kind == 4) s = -0.125, mn = 3.0;                 // negative scale
      const uint16_t sh = to_half(s), mh = to_half(mn);
      h.halves[(r * groups + gi) * 2] = sh;
      h.halves[(r * groups + gi) * 2 + 1] = mh;
      const double sv = half_value(sh), mv = half_value(mh);
      // The kernels: scale and min rounded to bf16, then one bf16 fma (exact here in double: the
      // product has 12 significant bits and the sum spans at most 2^-24 .. 2^20).
      const double sb = bf16_to_f32(f32_to_bf16(static_cast<float>(sv)));
      const double mb = bf16_to_f32(f32_to_bf16(static_cast<float>(mv)));
      for (int64_t c = gi * group; c < (gi + 1) * group; ++c) {
        int qv = rng.integer(0, 15);
        if (kind == 5) qv = 0;
        if (kind == 6) qv = 15;
        uint8_t& byte = h.data[r * cols / 2 + c / 2];
        byte = static_cast<uint8_t>(c % 2 == 0 ? (byte & 0xF0) | qv : (byte & 0x0F) | (qv << 4));
        h.exact[r * cols + c] = qv * sv + mv;
        h.as_bf16[r * cols + c] = round_bf16(qv * sb + mb);
        // Scale and min to bf16 (2^-9 each), then the result's rounding (2^-9).
        h.slack[r * cols + c] = std::ldexp(qv * std::fabs(sv) + std::fabs(mv) + std::fabs(h.exact[r * cols + c]), -8);
      }
    }
  return h;
}

struct DevicePacked {
  DeviceBuffer<uint8_t> data;
  DeviceBuffer<uint8_t> scales;
  PackedWeight w;
};

DevicePacked upload(const HostPacked& h) {
  DevicePacked d;
  d.data = to_device<uint8_t>(h.data);
  d.scales = h.format == PackedFormat::FP8_E4M3 ? to_device<uint8_t>(h.row_scale) : to_device<uint8_t>(h.halves);
  d.w = PackedWeight{h.format, d.data.get(), d.scales.get(), h.rows, h.cols, h.group};
  return d;
}

std::string describe(const HostPacked& h) {
  std::string s = std::string(packed_format_name(h.format)) + " " + std::to_string(h.rows) + "x" + std::to_string(h.cols);
  if (h.format == PackedFormat::INT4) s += " g" + std::to_string(h.group);
  return s;
}

class PackedKernels : public ::testing::Test {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU("the packed-weight and flash-decoding kernel tests"); }
};

// ---------------------------------------------------------------------------------------------
// Dequantize to bf16

TEST_F(PackedKernels, DequantMatchesLayoutBitForBit) {
  struct Case {
    PackedFormat f;
    int64_t rows, cols, group;
  };
  for (Case c : {Case{PackedFormat::FP8_E4M3, 37, 48, 0}, Case{PackedFormat::FP8_E4M3, 300, 4096, 0},
                 Case{PackedFormat::INT4, 37, 96, 32}, Case{PackedFormat::INT4, 29, 384, 128},
                 Case{PackedFormat::INT4, 300, 4096, 128}, Case{PackedFormat::INT4, 64, 4096, 32}}) {
    Rng rng(fresh_seed());
    const HostPacked h = make_packed(c.f, c.rows, c.cols, c.group, rng);
    DevicePacked d = upload(h);
    // A row range into rows wider than cols: the padding must stay NaN.
    const int64_t row0 = c.rows > 10 ? 5 : 0, n = c.rows - row0 - (c.rows > 10 ? 3 : 0), ld = c.cols + 8;
    auto out = poisoned<bf16>(n * ld);
    launch_dequant_packed(d.w, row0, n, out.get(), ld, nullptr);
    const auto got = download(out, n * ld);
    int64_t bad = 0, bad_pad = 0, far = 0;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t col = 0; col < ld; ++col) {
        uint16_t bits;
        std::memcpy(&bits, &got[r * ld + col], 2);
        if (col >= c.cols) {
          bad_pad += bits != 0xFFFF;
          continue;
        }
        const double v = bf16_to_f32(bits), want = h.as_bf16[(row0 + r) * c.cols + col];
        const double exact = h.exact[(row0 + r) * c.cols + col];
        if (!(v == want)) {
          if (bad++ < 3)
            ADD_FAILURE() << describe(h) << " row " << row0 + r << " col " << col << ": got " << v << " want " << want
                          << " (seed " << rng.seed << ")";
        }
        far += std::fabs(v - exact) > h.slack[(row0 + r) * c.cols + col];
      }
    std::printf("  dequant %-24s rows [%lld, %lld): %lld mismatches, %lld beyond bf16 rounding\n", describe(h).c_str(),
                static_cast<long long>(row0), static_cast<long long>(row0 + n), static_cast<long long>(bad),
                static_cast<long long>(far));
    EXPECT_EQ(bad, 0) << describe(h) << " seed " << rng.seed;
    EXPECT_EQ(far, 0) << describe(h) << " seed " << rng.seed;
    EXPECT_EQ(bad_pad, 0) << describe(h) << ": wrote past cols";
  }
}

// ---------------------------------------------------------------------------------------------
// GEMV

const char* int4_kernel_name(GemvInt4Kernel k) {
  return k == GemvInt4Kernel::Factored ? "factored" : k == GemvInt4Kernel::Legacy ? "legacy" : "auto";
}

// y of each int4 kernel (fp8: its one kernel) against both references. The legacy int4 kernel
// multiplies the bf16 weights; the factored one, like fp8, the exact weights, so that its fp32
// accumulation bound holds against the exact reference.
void check_gemv(const HostPacked& h, int64_t T, ElemType yt, uint64_t seed) {
  Rng rng(seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t ldx = h.cols + 8, ldy = h.rows + 3;
  std::vector<bf16_t> xb(T * ldx, 0xFFFF);  // NaN between rows: the kernel must not read them
  std::vector<double> x(T * h.cols);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < h.cols; ++c) {
      xb[t * ldx + c] = f32_to_bf16(rng.normal(t == 1 ? 30.0f : 1.0f));
      x[t * h.cols + c] = bf16_to_f32(xb[t * ldx + c]);
    }
  DevicePacked d = upload(h);
  auto dx = to_device<bf16>(xb);
  const size_t n_out = T * ldy;
  auto run = [&](GemvInt4Kernel k) {
    std::vector<double> got(n_out);
    if (yt == ElemType::F32) {
      auto y = poisoned<float>(n_out);
      launch_gemv_packed(dx.get(), T, ldx, d.w, y.get(), yt, ldy, nullptr, k);
      const auto g = download(y, n_out);
      for (size_t i = 0; i < n_out; ++i) got[i] = g[i];
    } else {
      auto y = poisoned<bf16>(n_out);
      launch_gemv_packed(dx.get(), T, ldx, d.w, y.get(), yt, ldy, nullptr, k);
      const auto g = download(y, n_out);
      for (size_t i = 0; i < n_out; ++i) {
        uint16_t bits;
        std::memcpy(&bits, &g[i], 2);
        got[i] = bf16_to_f32(bits);
      }
    }
    return got;
  };
  // The references, once for every kernel.
  std::vector<double> ref_exact(T * h.rows), ref_bf16(T * h.rows), mag(T * h.rows), slack(T * h.rows);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < h.rows; ++r) {
      double re = 0, rb = 0, m = 0, sl = 0;
      const double* wx = &h.exact[r * h.cols];
      const double* wb = &h.as_bf16[r * h.cols];
      const double* xr = &x[t * h.cols];
      for (int64_t c = 0; c < h.cols; ++c) {
        re += xr[c] * wx[c];
        rb += xr[c] * wb[c];
        m += std::fabs(xr[c]) * std::max(std::fabs(wx[c]), std::fabs(wb[c]));
        sl += std::fabs(xr[c]) * h.slack[r * h.cols + c];
      }
      ref_exact[t * h.rows + r] = re, ref_bf16[t * h.rows + r] = rb, mag[t * h.rows + r] = m;
      slack[t * h.rows + r] = sl;
    }
  // fp32 accumulation of up to 14336 products (sum |x w| bounds it), then the output's rounding.
  const double acc_tol = 1e-4, out_tol = yt == ElemType::BF16 ? std::ldexp(1.0, -8) : 1e-6;
  const std::vector<GemvInt4Kernel> kernels = h.format == PackedFormat::INT4
                                                  ? std::vector{GemvInt4Kernel::Factored, GemvInt4Kernel::Legacy}
                                                  : std::vector{GemvInt4Kernel::Legacy};
  for (GemvInt4Kernel asked : kernels) {
    const GemvInt4Kernel k = gemv_int4_kernel_for(d.w, asked);
    const std::vector<double> got = run(asked);
    // fp8 and factored int4 multiply the exact weights; legacy int4 the bf16 ones.
    const bool exact_weights = h.format == PackedFormat::FP8_E4M3 || k == GemvInt4Kernel::Factored;
    const std::string what = describe(h) + " T " + std::to_string(T) + " " + elem_type_name(yt) +
                             (h.format == PackedFormat::INT4 ? std::string(" ") + int4_kernel_name(k) : "");
    double worst = 0;
    int64_t failures = 0, pad_written = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t r = 0; r < h.rows; ++r) {
        const double ref_x = ref_exact[t * h.rows + r], m = mag[t * h.rows + r];
        const double ref_b = exact_weights ? ref_x : ref_bf16[t * h.rows + r];
        const double v = got[t * ldy + r];
        const double err_b = std::fabs(v - ref_b), err_x = std::fabs(v - ref_x);
        const double tol_b = acc_tol * m + out_tol * std::fabs(ref_b) + 1e-300;
        const double tol_x = tol_b + slack[t * h.rows + r];  // + how far each bf16 weight may be from the exact one
        if (m > 0) worst = std::max(worst, err_b / m);
        if (!std::isfinite(v) || err_b > tol_b || err_x > tol_x) {
          if (failures++ < 3)
            ADD_FAILURE() << what << ": y[" << t << "][" << r << "] = " << v << ", want " << ref_b << " (exact "
                          << ref_x << ", sum|xw| " << m << ") seed " << seed;
        }
      }
      for (int64_t r = h.rows; r < ldy; ++r) pad_written += !std::isnan(got[t * ldy + r]);
    }
    EXPECT_EQ(failures, 0) << what;
    EXPECT_EQ(pad_written, 0) << what << ": wrote past rows";
    std::printf("  gemv %-44s worst |y - ref|/sum|xw| = %.2e\n", what.c_str(), worst);
  }
}

TEST_F(PackedKernels, GemvOddShapes) {
  struct Case {
    PackedFormat f;
    int64_t rows, cols, group;
  };
  for (Case c : {Case{PackedFormat::FP8_E4M3, 1, 16, 0}, Case{PackedFormat::FP8_E4M3, 37, 48, 0},
                 Case{PackedFormat::FP8_E4M3, 301, 1040, 0}, Case{PackedFormat::INT4, 1, 32, 32},
                 Case{PackedFormat::INT4, 37, 96, 32}, Case{PackedFormat::INT4, 29, 384, 128},
                 Case{PackedFormat::INT4, 301, 1152, 128}, Case{PackedFormat::INT4, 8209, 256, 32},
                 Case{PackedFormat::INT4, 45, 768, 256}}) {  // g256: a group over two spans (factored)
    for (int64_t T : {1, 3, 8, 11}) {  // 11: two passes
      for (ElemType yt : {ElemType::F32, ElemType::BF16}) {
        Rng rng(fresh_seed());
        const HostPacked h = make_packed(c.f, c.rows, c.cols, c.group, rng);
        check_gemv(h, T, yt, rng.seed);
      }
    }
  }
}

// The 8B model's shapes (rows x cols): q/o, k/v, gate/up, down; lm_head's 128256 x 4096 in a slice
// of its rows (the kernel does not see the difference, and the reference is 32x cheaper).
TEST_F(PackedKernels, GemvModelShapes) {
  struct Case {
    int64_t rows, cols;
  };
  for (Case c : {Case{4096, 4096}, Case{1024, 4096}, Case{14336, 4096}, Case{4096, 14336}, Case{8192 + 5, 4096}}) {
    for (PackedFormat f : {PackedFormat::FP8_E4M3, PackedFormat::INT4}) {
      for (int64_t group : f == PackedFormat::INT4 ? std::vector<int64_t>{128, 32} : std::vector<int64_t>{0}) {
        Rng rng(fresh_seed());
        const HostPacked h = make_packed(f, c.rows, c.cols, group, rng);
        for (int64_t T : {1, 3, 8}) check_gemv(h, T, T == 3 ? ElemType::F32 : ElemType::BF16, rng.seed + T);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Flash-decoding


// One decode step of sequences at contexts 1, 17, 1000, 4097 and 32768 (the 8B's 32 q heads, 8 kv
// heads, head_dim 128) over a shuffled paged cache, run unsplit with the unvectorized loads (the
// kernel as it was before splitting: kv rows of an odd number of 16-byte pieces), unsplit with 16-
// byte loads, and split 2, 7, 64 ways and as attention_paged_splits picks. Every result against the
// double reference; the unsplit ones, and any tile whose context fits one span, bit for bit equal.
// The decode kernel (decode_only) likewise, unsplit and split, within the same bounds.
TEST_F(PackedKernels, FlashDecodingMatchesReference) {
  const int64_t H = 32, KVH = 8, hd = 128, kv_dim = KVH * hd, q_dim = H * hd, B = 16;
  const std::vector<int64_t> ctx = {1, 17, 1000, 4097, 32768};
  const int64_t n = static_cast<int64_t>(ctx.size());
  Rng rng(fresh_seed());
  int64_t blocks = 0, max_blocks = 0;
  for (int64_t c : ctx) {
    blocks += (c + B - 1) / B;
    max_blocks = std::max(max_blocks, (c + B - 1) / B);
  }
  std::vector<int32_t> perm(blocks + 3);
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), rng.gen);
  std::vector<bf16_t> qb(n * q_dim);
  std::vector<double> ref;
  std::vector<int32_t> row0, count, start, tables(n * max_blocks, -1);
  struct Pool {
    int64_t stride;
    std::vector<bf16_t> k, v;
  };
  // Pool 0: rows of kv_dim (16-byte loads); pool 1: rows of kv_dim + 4 values (8 bytes more: the
  // 4-byte loads of the kernel before 16-byte loads were added).
  Pool pools[2] = {{kv_dim, {}, {}}, {kv_dim + 4, {}, {}}};
  for (Pool& p : pools) p.k.assign(perm.size() * B * p.stride, 0xFFFF), p.v.assign(p.k.size(), 0xFFFF);
  int64_t used = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = ctx[i], nb = (len + B - 1) / B;
    for (int64_t b = 0; b < nb; ++b) tables[i * max_blocks + b] = perm[used++];
    std::vector<double> q(q_dim), k(len * kv_dim), v(len * kv_dim);
    for (int64_t d = 0; d < q_dim; ++d) q[d] = bf16_to_f32(qb[i * q_dim + d] = f32_to_bf16(rng.normal(1.5f)));
    for (int64_t p = 0; p < len; ++p) {
      const int64_t pr = tables[i * max_blocks + p / B] * B + p % B;
      for (int64_t d = 0; d < kv_dim; ++d) {
        const bf16_t kb = f32_to_bf16(rng.normal()), vb = f32_to_bf16(rng.normal());
        k[p * kv_dim + d] = bf16_to_f32(kb);
        v[p * kv_dim + d] = bf16_to_f32(vb);
        for (Pool& pool : pools) pool.k[pr * pool.stride + d] = kb, pool.v[pr * pool.stride + d] = vb;
      }
    }
    const auto o = attention_ref(q, k, v, len - 1, H, KVH, hd);
    ref.insert(ref.end(), o.begin(), o.end());
    row0.push_back(static_cast<int32_t>(i));
    count.push_back(1);
    start.push_back(static_cast<int32_t>(len - 1));
  }
  std::vector<int32_t> tile_item, tile_row0;
  attention_paged_tiles(std::vector<int64_t>(n, 1), H / KVH, &tile_item, &tile_row0);
  auto d_q = to_device<bf16>(qb);
  auto d_row0 = to_device<int32_t>(row0), d_count = to_device<int32_t>(count), d_start = to_device<int32_t>(start);
  auto d_tables = to_device<int32_t>(tables);
  auto d_ti = to_device<int32_t>(tile_item), d_tr = to_device<int32_t>(tile_row0);
  PagedAttentionBatch b;
  b.item_row0 = d_row0.get();
  b.item_count = d_count.get();
  b.item_start = d_start.get();
  b.block_tables = d_tables.get();
  b.table_stride = max_blocks;
  b.tile_item = d_ti.get();
  b.tile_row0 = d_tr.get();
  b.n_tiles = static_cast<int64_t>(tile_item.size());
  const size_t ws_bytes = attention_paged_workspace_bytes(n, H, hd, kAttentionPagedMaxSplits);
  DeviceBuffer<unsigned char> ws(ws_bytes, "split partials");
  CUDA_CHECK(cudaMemset(ws.get(), 0xFF, ws_bytes));  // NaN: a partial read before it is written shows
  const int auto_splits = attention_paged_splits(b.n_tiles, KVH, 32768, cuda_sm_count(0), n, H, hd, ws_bytes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  auto run = [&](const Pool& pool, int splits, bool decode_only) {
    auto dk = to_device<bf16>(pool.k), dv = to_device<bf16>(pool.v);
    auto out = poisoned<bf16>(n * q_dim);
    PagedAttentionSplit sp;
    sp.splits = splits;
    sp.n_tokens = n;
    sp.workspace = ws.get();
    sp.workspace_bytes = ws_bytes;
    PagedAttentionBatch bb = b;
    bb.decode_only = decode_only;
    launch_attention_paged(d_q.get(), q_dim, dk.get(), dv.get(), pool.stride, B, out.get(), q_dim, bb, H, KVH, hd,
                           scale, nullptr, sp);
    const auto raw = download(out, n * q_dim);
    std::vector<uint16_t> bits(raw.size());
    std::memcpy(bits.data(), raw.data(), raw.size() * 2);
    return bits;
  };
  const std::vector<uint16_t> old_kernel = run(pools[1], 1, false);
  struct Run {
    int pool, splits;
    bool decode;  // the decode kernel (decode_only)
  };
  const int S = kAttentionPagedMaxSplits;
  for (const auto& [pool, splits, decode] : std::vector<Run>{{1, 1, false}, {0, 1, false}, {0, 2, false},
                                                             {0, 7, false}, {0, S, false}, {0, auto_splits, false},
                                                             {1, 7, false}, {0, 1, true}, {0, S, true},
                                                             {0, auto_splits, true}, {1, 7, true}}) {
    const std::vector<uint16_t> got =
        pool == 1 && splits == 1 && !decode ? old_kernel : run(pools[pool], splits, decode);
    for (int64_t i = 0; i < n; ++i) {
      double max_diff = 0, max_ref = 0, max_vs_old = 0;
      int64_t differ = 0, non_finite = 0;
      for (int64_t d = 0; d < q_dim; ++d) {
        const double v = bf16_to_f32(got[i * q_dim + d]), r = ref[i * q_dim + d];
        const double o = bf16_to_f32(old_kernel[i * q_dim + d]);
        non_finite += !std::isfinite(v);
        max_diff = std::max(max_diff, std::fabs(v - r));
        max_ref = std::max(max_ref, std::fabs(r));
        max_vs_old = std::max(max_vs_old, std::fabs(v - o));
        differ += got[i * q_dim + d] != old_kernel[i * q_dim + d];
      }
      const double rel = max_diff / max_ref, rel_old = max_vs_old / max_ref;
      std::printf("  flash-decoding%s context %5lld splits %2d (%s loads): max|diff|/max|ref| %.2e, vs unsplit %.2e\n",
                  decode ? " (decode kernel)" : "", static_cast<long long>(ctx[i]), splits,
                  pool == 0 ? "16-byte" : "4-byte", rel, rel_old);
      const std::string what = "context " + std::to_string(ctx[i]) + " splits " + std::to_string(splits) +
                               (decode ? " decode kernel" : "") + " seed " + std::to_string(rng.seed);
      EXPECT_EQ(non_finite, 0) << what;
      EXPECT_LE(rel, 1e-2) << what;
      EXPECT_LE(rel_old, 1e-2) << what;
      // One span (no split, or a context of at most one 32-key tile): the same arithmetic as before.
      if (!decode && (splits == 1 || ctx[i] <= 32))
        EXPECT_EQ(differ, 0) << "context " << ctx[i] << " splits " << splits;
    }
  }
}

TEST(PackedKernelLaunchers, RefuseBadArguments) {
  auto* x = reinterpret_cast<bf16*>(0x1000);  // never dereferenced: every call below fails its checks
  const void* p = reinterpret_cast<const void*>(0x1000);
  PackedWeight w{PackedFormat::FP8_E4M3, p, p, 64, 64, 0};
  EXPECT_THROW(launch_gemv_packed(x, 0, 64, w, x, ElemType::BF16, 64, nullptr), Error);       // no tokens
  EXPECT_THROW(launch_gemv_packed(x, 1, 60, w, x, ElemType::BF16, 64, nullptr), Error);       // ldx < cols
  EXPECT_THROW(launch_gemv_packed(x, 1, 64, w, x, ElemType::BF16, 63, nullptr), Error);       // ldy < rows
  EXPECT_THROW(launch_gemv_packed(x + 1, 1, 64, w, x, ElemType::BF16, 64, nullptr), Error);   // x alignment
  PackedWeight odd = w;
  odd.cols = 40;
  EXPECT_THROW(launch_gemv_packed(x, 1, 40, odd, x, ElemType::BF16, 64, nullptr), Error);     // cols % 16
  PackedWeight i4{PackedFormat::INT4, p, p, 64, 256, 48};
  EXPECT_THROW(launch_gemv_packed(x, 1, 256, i4, x, ElemType::F32, 64, nullptr), Error);      // group 48
  i4.group = 512;
  EXPECT_THROW(launch_dequant_packed(i4, 0, 64, x, 256, nullptr), Error);                     // group > cols
  i4.group = 128;
  EXPECT_THROW(launch_dequant_packed(i4, 10, 60, x, 256, nullptr), Error);                    // rows past end
  EXPECT_THROW(launch_dequant_packed(i4, 0, 64, x, 250, nullptr), Error);                     // ld_out
  PackedWeight nodata = w;
  nodata.scales = nullptr;
  EXPECT_THROW(launch_dequant_packed(nodata, 0, 64, x, 64, nullptr), Error);
  PagedAttentionBatch b;
  auto* ids = reinterpret_cast<int32_t*>(0x1000);
  b.item_row0 = b.item_count = b.item_start = b.block_tables = b.tile_item = b.tile_row0 = ids;
  b.table_stride = 4;
  b.n_tiles = 1;
  PagedAttentionSplit sp;
  sp.splits = kAttentionPagedMaxSplits + 1;
  EXPECT_THROW(launch_attention_paged(x, 256, x, x, 256, 16, x, 256, b, 4, 4, 64, 0.1f, nullptr, sp), Error);
  sp.splits = 2;
  sp.n_tokens = 1;
  sp.workspace = reinterpret_cast<void*>(0x1000);
  sp.workspace_bytes = attention_paged_workspace_bytes(1, 4, 64, 2) - 4;  // one float short
  EXPECT_THROW(launch_attention_paged(x, 256, x, x, 256, 16, x, 256, b, 4, 4, 64, 0.1f, nullptr, sp), Error);
}

// Which int4 kernel a launch takes: factored for groups of 128 (or a multiple), legacy otherwise.
TEST(PackedKernelLaunchers, Int4KernelChoice) {
  const void* p = reinterpret_cast<const void*>(0x1000);
  const PackedWeight g128{PackedFormat::INT4, p, p, 64, 512, 128}, g256{PackedFormat::INT4, p, p, 64, 512, 256};
  const PackedWeight g32{PackedFormat::INT4, p, p, 64, 512, 32}, g64{PackedFormat::INT4, p, p, 64, 512, 64};
  const PackedWeight fp8{PackedFormat::FP8_E4M3, p, p, 64, 512, 0};
  EXPECT_EQ(gemv_int4_kernel_for(g128, GemvInt4Kernel::Factored), GemvInt4Kernel::Factored);
  EXPECT_EQ(gemv_int4_kernel_for(g256, GemvInt4Kernel::Factored), GemvInt4Kernel::Factored);
  EXPECT_EQ(gemv_int4_kernel_for(g32, GemvInt4Kernel::Factored), GemvInt4Kernel::Legacy);
  EXPECT_EQ(gemv_int4_kernel_for(g64, GemvInt4Kernel::Factored), GemvInt4Kernel::Legacy);
  EXPECT_EQ(gemv_int4_kernel_for(g128, GemvInt4Kernel::Legacy), GemvInt4Kernel::Legacy);
  EXPECT_EQ(gemv_int4_kernel_for(fp8, GemvInt4Kernel::Factored), GemvInt4Kernel::Legacy);
  // Auto is the environment's choice, legacy where RINGLLAMA_GEMV_INT4 is unset.
  const char* env = std::getenv("RINGLLAMA_GEMV_INT4");
  const GemvInt4Kernel want = env && std::string(env) == "factored" ? GemvInt4Kernel::Factored : GemvInt4Kernel::Legacy;
  EXPECT_EQ(gemv_int4_default(), want);
  EXPECT_EQ(gemv_int4_kernel_for(g128, GemvInt4Kernel::Auto), want);
}

TEST(PackedKernelLaunchers, SplitCountRule) {
  const size_t ws = attention_paged_workspace_bytes(64, 32, 128, kAttentionPagedMaxSplits);
  // Decode of one sequence at 32k on 132 SMs: 8 blocks unsplit; split up to the cap.
  EXPECT_EQ(attention_paged_splits(1, 8, 32768, 132, 1, 32, 128, ws), kAttentionPagedMaxSplits);
  // A short context: no span under the minimum.
  EXPECT_EQ(attention_paged_splits(1, 8, 300, 132, 1, 32, 128, ws), 2);
  // 64 sequences already give 512 blocks: a split of 3 brings it to 8 per SM.
  EXPECT_EQ(attention_paged_splits(64, 8, 32768, 132, 64, 32, 128, ws), 3);
  // A prefill step of many tiles: none.
  EXPECT_EQ(attention_paged_splits(2048, 8, 32768, 132, 8192, 32, 128, ws), 1);
  // The workspace caps it.
  EXPECT_EQ(attention_paged_splits(1, 8, 32768, 132, 1, 32, 128, attention_paged_workspace_bytes(1, 32, 128, 5)), 5);
  EXPECT_EQ(attention_paged_splits(1, 8, 32768, 132, 1, 32, 128, 0), 1);
}

}  // namespace
}  // namespace ringllama
