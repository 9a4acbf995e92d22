// Every CUDA kernel against a plain CPU reference computed here in double precision from the same
// (bf16-rounded) inputs, at sizes that are and are not multiples of 8, 16 and 128. Inputs are drawn
// fresh for every case (the seed is printed with any failure); outputs are poisoned with NaN before
// each launch, so an element the kernel forgot to write fails the check.
//
// Each case prints its error as max|got - ref| / max|ref|; the table at the end gives the worst per
// kernel. Tolerances: outputs rounded to bf16 carry up to 2^-9 relative error per element, plus
// fp32 accumulation: 1e-2 of max|ref| for bf16 outputs, 1e-4 for fp32 ones.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/model_config.h"
#include "kernels/add_rms_norm.cuh"
#include "kernels/argmax.cuh"
#include "kernels/attention_paged.cuh"
#include "kernels/gather_rows.cuh"
#include "kernels/kv_store.cuh"
#include "kernels/check.h"
#include "kernels/copy_logits.cuh"
#include "kernels/device_info.h"
#include "kernels/embedding.cuh"
#include "kernels/gemm.h"
#include "kernels/rope.cuh"
#include "kernels/silu_mul.cuh"
#include "tests/attention_batch_util.h"
#include "tests/gpu_skip.h"

namespace ringllama {
namespace {

using bf16 = __nv_bfloat16;

constexpr double kTolBf16 = 1e-2;
constexpr double kTolF32 = 1e-4;

// ---------------------------------------------------------------------------------------------
// Helpers

// The worst error seen per kernel, printed at the end of the run.
std::map<std::string, double>& worst_errors() {
  static std::map<std::string, double> m;
  return m;
}

class ErrorTable : public ::testing::Environment {
 public:
  void TearDown() override {
    if (worst_errors().empty()) return;
    std::printf("\nkernel               worst max|got-ref|/max|ref|\n");
    for (const auto& [k, v] : worst_errors()) std::printf("%-20s %.3e\n", k.c_str(), v);
    std::fflush(stdout);
  }
};
const auto* const kErrorTable = ::testing::AddGlobalTestEnvironment(new ErrorTable);

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

// bf16 values as raw bits, and the same values as doubles for the reference.
struct Bf16Data {
  std::vector<bf16_t> bits;
  std::vector<double> val;
};

Bf16Data random_bf16(Rng& rng, size_t n, float sd = 1.0f) {
  Bf16Data d;
  d.bits.resize(n);
  d.val.resize(n);
  for (size_t i = 0; i < n; ++i) {
    d.bits[i] = f32_to_bf16(rng.normal(sd));
    d.val[i] = bf16_to_f32(d.bits[i]);
  }
  return d;
}

template <typename D, typename H>
DeviceBuffer<D> to_device(const std::vector<H>& h) {
  static_assert(sizeof(D) == sizeof(H));
  DeviceBuffer<D> d(std::max<size_t>(h.size(), 1), "test input");
  CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(H), cudaMemcpyHostToDevice));
  return d;
}

// NaN in every element (all-ones bits are NaN for bf16 and fp32).
template <typename D>
DeviceBuffer<D> poisoned(size_t n) {
  DeviceBuffer<D> d(std::max<size_t>(n, 1), "test output");
  CUDA_CHECK(cudaMemset(d.get(), 0xFF, n * sizeof(D)));
  return d;
}

std::vector<double> download_bf16(const DeviceBuffer<bf16>& d, size_t n) {
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<bf16_t> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d.get(), n * 2, cudaMemcpyDeviceToHost));
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = bf16_to_f32(h[i]);
  return out;
}

std::vector<double> download_f32(const DeviceBuffer<float>& d, size_t n) {
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d.get(), n * 4, cudaMemcpyDeviceToHost));
  return std::vector<double>(h.begin(), h.end());
}

// Checks every element is finite (written) and max|got - ref| / max|ref| <= tol; records the error.
void expect_close(const std::string& kernel, const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& ref, double tol, uint64_t seed) {
  ASSERT_EQ(got.size(), ref.size());
  double max_diff = 0, max_ref = 0;
  size_t worst = 0, non_finite = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (non_finite++ == 0) worst = i;
      continue;
    }
    const double d = std::fabs(got[i] - ref[i]);
    if (d > max_diff) {
      max_diff = d;
      if (non_finite == 0) worst = i;
    }
    max_ref = std::max(max_ref, std::fabs(ref[i]));
  }
  const double rel = max_diff / std::max(max_ref, 1e-30);
  std::printf("  %-16s %-52s max|diff|/max|ref| = %.3e\n", kernel.c_str(), what.c_str(), rel);
  double& w = worst_errors()[kernel];
  w = std::max(w, non_finite ? std::numeric_limits<double>::infinity() : rel);
  EXPECT_EQ(non_finite, 0u) << kernel << " " << what << ": element " << worst << " not written or not finite (seed "
                            << seed << ")";
  EXPECT_LE(rel, tol) << kernel << " " << what << ": worst element " << worst << " got " << got[worst] << " want "
                      << ref[worst] << " (seed " << seed << ")";
}

class Kernels : public ::testing::Test {
 protected:
  void SetUp() override {
    RL_SKIP_WITHOUT_GPU("the CUDA kernel tests");
  }
};

// ---------------------------------------------------------------------------------------------
// Embedding

TEST_F(Kernels, Embedding) {
  for (int64_t dim : {72, 200, 4096}) {
    for (int64_t n : {1, 7, 33}) {
      Rng rng(fresh_seed());
      const int64_t vocab = 97;
      Bf16Data table = random_bf16(rng, vocab * dim);
      std::vector<int32_t> ids(n);
      for (auto& id : ids) id = rng.integer(0, vocab - 1);
      ids[0] = vocab - 1;  // the last row too
      auto d_table = to_device<bf16>(table.bits);
      auto d_ids = to_device<int32_t>(ids);
      std::vector<double> ref(n * dim);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t d = 0; d < dim; ++d) ref[t * dim + d] = table.val[ids[t] * dim + d];
      const std::string what = "dim " + std::to_string(dim) + " tokens " + std::to_string(n);
      auto out_f = poisoned<float>(n * dim);
      launch_embedding(d_ids.get(), n, d_table.get(), vocab, dim, out_f.get(), ElemType::F32, nullptr);
      expect_close("embedding", what + " -> f32", download_f32(out_f, n * dim), ref, 0.0, rng.seed);
      auto out_b = poisoned<bf16>(n * dim);
      launch_embedding(d_ids.get(), n, d_table.get(), vocab, dim, out_b.get(), ElemType::BF16, nullptr);
      expect_close("embedding", what + " -> bf16", download_bf16(out_b, n * dim), ref, 0.0, rng.seed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Residual add + RMSNorm

TEST_F(Kernels, AddRmsNorm) {
  const float eps = 1e-5f;
  for (int64_t dim : {72, 200, 4096}) {
    for (int64_t n : {1, 7, 33}) {
      for (int mode = 0; mode < 3; ++mode) {  // no residual, bf16 residual, fp32 residual
        Rng rng(fresh_seed());
        std::vector<float> x(n * dim);
        for (auto& v : x) v = rng.normal(3.0f);
        Bf16Data w = random_bf16(rng, dim, 0.5f);
        Bf16Data res_b = random_bf16(rng, n * dim);
        std::vector<float> res_f(n * dim);
        for (auto& v : res_f) v = rng.normal();
        auto d_x = to_device<float>(x);
        auto d_w = to_device<bf16>(w.bits);
        auto d_rb = to_device<bf16>(res_b.bits);
        auto d_rf = to_device<float>(res_f);
        auto out = poisoned<bf16>(n * dim);
        const void* res = mode == 0 ? nullptr : mode == 1 ? static_cast<const void*>(d_rb.get()) : d_rf.get();
        launch_add_rms_norm(d_x.get(), res, mode == 2 ? ElemType::F32 : ElemType::BF16, d_w.get(), eps, out.get(), n,
                            dim, nullptr);
        std::vector<double> ref_x(n * dim), ref(n * dim);
        for (int64_t t = 0; t < n; ++t) {
          double ss = 0;
          for (int64_t d = 0; d < dim; ++d) {
            const size_t i = t * dim + d;
            // The stream's sum is one fp32 addition in the kernel: compare it at fp32 tolerance.
            double v = x[i] + (mode == 0 ? 0.0 : mode == 1 ? res_b.val[i] : static_cast<double>(res_f[i]));
            ref_x[i] = v;
            ss += v * v;
          }
          const double rstd = 1.0 / std::sqrt(ss / dim + eps);
          for (int64_t d = 0; d < dim; ++d) ref[t * dim + d] = ref_x[t * dim + d] * rstd * w.val[d];
        }
        const std::string what = "dim " + std::to_string(dim) + " rows " + std::to_string(n) +
                                 (mode == 0 ? " no residual" : mode == 1 ? " bf16 residual" : " f32 residual");
        expect_close("add_rms_norm", what, download_bf16(out, n * dim), ref, kTolBf16, rng.seed);
        expect_close("add_rms_norm.x", what, download_f32(d_x, n * dim), ref_x, 1e-6, rng.seed);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE

ModelConfig rope_model(int64_t head_dim, bool llama3) {
  ModelConfig m;
  m.head_dim = head_dim;
  m.rope_theta = llama3 ? 500000.0 : 10000.0;
  if (llama3) {
    m.rope_scaling.type = "llama3";
    m.rope_scaling.factor = 8.0;
    m.rope_scaling.low_freq_factor = 1.0;
    m.rope_scaling.high_freq_factor = 4.0;
    m.rope_scaling.original_max_position_embeddings = 64;
  }
  return m;
}

TEST_F(Kernels, Rope) {
  struct Case {
    int64_t n_heads, n_kv_heads, head_dim;
    bool llama3;
  };
  for (Case c : {Case{4, 1, 24, true}, Case{6, 2, 40, false}, Case{2, 2, 64, true}, Case{8, 2, 128, true},
                 Case{3, 3, 256, false}}) {
    for (int64_t n : {1, 7, 33}) {
      Rng rng(fresh_seed());
      const int64_t hd = c.head_dim, half = hd / 2;
      // Rows wider than the heads (as when k points into a cache row with padding).
      const int64_t q_stride = c.n_heads * hd + 6, k_stride = c.n_kv_heads * hd + 2;
      Bf16Data q = random_bf16(rng, n * q_stride), k = random_bf16(rng, n * k_stride);
      std::vector<int32_t> pos(n);
      for (int64_t t = 0; t < n; ++t) pos[t] = t == 0 ? 5000 : rng.integer(0, 3000);
      const std::vector<double> inv = rope_inv_freq(rope_model(hd, c.llama3));
      std::vector<float> inv_f(inv.begin(), inv.end());
      auto d_q = to_device<bf16>(q.bits);
      auto d_k = to_device<bf16>(k.bits);
      auto d_pos = to_device<int32_t>(pos);
      auto d_inv = to_device<float>(inv_f);
      launch_rope(d_q.get(), q_stride, c.n_heads, d_k.get(), k_stride, c.n_kv_heads, hd, d_pos.get(), d_inv.get(), n,
                  nullptr);
      auto rotate = [&](std::vector<double> x, int64_t stride, int64_t heads) {
        for (int64_t t = 0; t < n; ++t)
          for (int64_t h = 0; h < heads; ++h)
            for (int64_t i = 0; i < half; ++i) {
              double* r = x.data() + t * stride + h * hd;
              const double ang = static_cast<double>(static_cast<float>(pos[t]) * inv_f[i]);
              const double a = r[i], b = r[i + half];
              r[i] = a * std::cos(ang) - b * std::sin(ang);
              r[i + half] = b * std::cos(ang) + a * std::sin(ang);
            }
        return x;
      };
      const std::string what = "heads " + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) + " hd " +
                               std::to_string(hd) + " tokens " + std::to_string(n);
      expect_close("rope", what + " q", download_bf16(d_q, n * q_stride), rotate(q.val, q_stride, c.n_heads),
                   kTolBf16, rng.seed);
      expect_close("rope", what + " k", download_bf16(d_k, n * k_stride), rotate(k.val, k_stride, c.n_kv_heads),
                   kTolBf16, rng.seed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention

struct AttnShape {
  int64_t n_heads, n_kv_heads, head_dim;
};

// out[t, h, :] for queries at positions start + t over keys [0, start + t], double precision.
std::vector<double> attention_ref(const AttnShape& s, const std::vector<double>& q, const std::vector<double>& k,
                                  const std::vector<double>& v, int64_t kv_stride, int64_t n_tokens, int64_t start) {
  const int64_t hd = s.head_dim, q_dim = s.n_heads * hd, group = s.n_heads / s.n_kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> out(n_tokens * q_dim), p;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const int64_t pos = start + t;
    for (int64_t h = 0; h < s.n_heads; ++h) {
      const int64_t g = h / group;
      p.assign(pos + 1, 0.0);
      double mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += q[t * q_dim + h * hd + d] * k[j * kv_stride + g * hd + d];
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (auto& x : p) sum += (x = std::exp(x - mx));
      for (int64_t d = 0; d < hd; ++d) {
        double acc = 0;
        for (int64_t j = 0; j <= pos; ++j) acc += p[j] * v[j * kv_stride + g * hd + d];
        out[t * q_dim + h * hd + d] = acc / sum;
      }
    }
  }
  return out;
}

const AttnShape kAttnShapes[] = {
    {4, 1, 24},   // GQA 4:1, head_dim 24
    {6, 2, 40},   // GQA 3:1, head_dim 40
    {2, 2, 64},   // 1:1
    {8, 2, 128},  // Llama 3 head_dim, GQA 4:1
    {4, 4, 256},  // the largest head_dim
    {16, 1, 64},  // a group of 16 query heads: a decode token fills a whole tile
};

// One step of several sequences over a paged cache whose blocks are shuffled: a prefill chunk
// after a cached prefix, a first chunk, decode tokens (one at position 0), GQA, head_dim up to 256,
// block sizes 4 and 16 (the longest sequence spans 30 and 8 blocks). Pool rows no sequence owns,
// and rows past each sequence's end, are NaN.
TEST_F(Kernels, AttentionPaged) {
  struct Item {
    int64_t start, n;
  };
  const std::vector<Item> items = {{45, 37}, {70, 1}, {0, 7}, {0, 1}, {17, 1}, {0, 50}};
  for (const AttnShape& s : kAttnShapes) {
    for (int64_t B : {4, 16}) {
      Rng rng(fresh_seed());
      const int64_t hd = s.head_dim, q_dim = s.n_heads * hd, kv_dim = s.n_kv_heads * hd;
      const int64_t q_stride = q_dim + 2 * kv_dim, kv_stride = kv_dim + 2;
      int64_t rows = 0, blocks = 0, max_blocks = 0;
      for (const Item& it : items) {
        rows += it.n;
        const int64_t nb = (it.start + it.n + B - 1) / B;
        blocks += nb;
        max_blocks = std::max(max_blocks, nb);
      }
      const int64_t n_blocks = blocks + 5;
      std::vector<int32_t> perm(n_blocks);
      for (int64_t i = 0; i < n_blocks; ++i) perm[i] = static_cast<int32_t>(i);
      std::shuffle(perm.begin(), perm.end(), rng.gen);
      std::vector<uint16_t> kp(n_blocks * B * kv_stride, 0xFFFF), vp(kp.size(), 0xFFFF);
      Bf16Data q = random_bf16(rng, rows * q_stride, 1.5f);
      std::vector<int32_t> row0, count, start, tables(items.size() * max_blocks, -1);
      std::vector<double> ref;
      int64_t used = 0, r0 = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        const Item& it = items[i];
        const int64_t len = it.start + it.n, nb = (len + B - 1) / B;
        for (int64_t b = 0; b < nb; ++b) tables[i * max_blocks + b] = perm[used++];
        Bf16Data k = random_bf16(rng, len * kv_dim), v = random_bf16(rng, len * kv_dim);
        for (int64_t p = 0; p < len; ++p) {
          const int64_t pr = tables[i * max_blocks + p / B] * B + p % B;
          for (int64_t d = 0; d < kv_dim; ++d) {
            kp[pr * kv_stride + d] = k.bits[p * kv_dim + d];
            vp[pr * kv_stride + d] = v.bits[p * kv_dim + d];
          }
        }
        std::vector<double> qi(it.n * q_dim);
        for (int64_t t = 0; t < it.n; ++t)
          for (int64_t d = 0; d < q_dim; ++d) qi[t * q_dim + d] = q.val[(r0 + t) * q_stride + d];
        const std::vector<double> o = attention_ref(s, qi, k.val, v.val, kv_dim, it.n, it.start);
        ref.insert(ref.end(), o.begin(), o.end());
        row0.push_back(static_cast<int32_t>(r0));
        count.push_back(static_cast<int32_t>(it.n));
        start.push_back(static_cast<int32_t>(it.start));
        r0 += it.n;
      }
      auto d_q = to_device<bf16>(q.bits);
      auto d_k = to_device<bf16>(kp);
      auto d_v = to_device<bf16>(vp);
      const test::DeviceAttentionBatch b(row0, count, start, tables, max_blocks, s.n_heads / s.n_kv_heads);
      auto out = poisoned<bf16>(rows * q_dim);
      launch_attention_paged(d_q.get(), q_stride, d_k.get(), d_v.get(), kv_stride, B, out.get(), q_dim, b.batch,
                             s.n_heads, s.n_kv_heads, hd, 1.0f / std::sqrt(static_cast<float>(hd)), nullptr);
      const std::string what = "heads " + std::to_string(s.n_heads) + "/" + std::to_string(s.n_kv_heads) + " hd " +
                               std::to_string(hd) + " block " + std::to_string(B) + " items 6";
      expect_close("attention_paged", what, download_bf16(out, rows * q_dim), ref, kTolBf16, rng.seed);
    }
  }
}

TEST_F(Kernels, KvStoreAndGatherRows) {
  Rng rng(fresh_seed());
  const int64_t n = 13, kv_dim = 24, src_stride = 3 * kv_dim, pool_rows = 40, pool_stride = kv_dim + 2;
  Bf16Data src = random_bf16(rng, n * src_stride);
  std::vector<int32_t> slots(n);
  std::vector<int32_t> all(pool_rows);
  for (int i = 0; i < pool_rows; ++i) all[i] = i;
  std::shuffle(all.begin(), all.end(), rng.gen);
  std::copy_n(all.begin(), n, slots.begin());
  auto d_src = to_device<bf16>(src.bits);
  auto d_slots = to_device<int32_t>(slots);
  auto kp = poisoned<bf16>(pool_rows * pool_stride), vp = poisoned<bf16>(pool_rows * pool_stride);
  launch_kv_store(d_src.get(), d_src.get() + kv_dim, src_stride, n, kv_dim, d_slots.get(), kp.get(), vp.get(),
                  pool_stride, nullptr);
  const std::vector<double> k = download_bf16(kp, pool_rows * pool_stride), v = download_bf16(vp, pool_rows * pool_stride);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < kv_dim; ++d) {
      ASSERT_EQ(k[slots[t] * pool_stride + d], src.val[t * src_stride + d]) << t << " " << d;
      ASSERT_EQ(v[slots[t] * pool_stride + d], src.val[t * src_stride + kv_dim + d]) << t << " " << d;
    }
  std::vector<int32_t> pick = {5, 0, 12, 5};
  auto d_pick = to_device<int32_t>(pick);
  auto g = poisoned<bf16>(pick.size() * kv_dim);
  launch_gather_rows(d_src.get(), src_stride, d_pick.get(), static_cast<int64_t>(pick.size()), kv_dim, g.get(), nullptr);
  const std::vector<double> got = download_bf16(g, pick.size() * kv_dim);
  for (size_t r = 0; r < pick.size(); ++r)
    for (int64_t d = 0; d < kv_dim; ++d) ASSERT_EQ(got[r * kv_dim + d], src.val[pick[r] * src_stride + d]);
}

TEST_F(Kernels, SiluMulRows) {
  for (int64_t ffn : {int64_t{8}, int64_t{200}, int64_t{37}}) {
    Rng rng(fresh_seed());
    const int64_t rows = 9;
    Bf16Data gu = random_bf16(rng, rows * 2 * ffn, 2.0f);
    auto d = to_device<bf16>(gu.bits);
    launch_silu_mul_rows(d.get(), rows, ffn, nullptr);
    const std::vector<double> got = download_bf16(d, rows * 2 * ffn);
    std::vector<double> want(gu.val);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < ffn; ++c) {
        const double g = gu.val[r * 2 * ffn + c], u = gu.val[r * 2 * ffn + ffn + c];
        want[r * 2 * ffn + c] = g / (1 + std::exp(-g)) * u;
      }
    expect_close("silu_mul_rows", "ffn " + std::to_string(ffn), got, want, kTolBf16, rng.seed);
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up

TEST_F(Kernels, SiluMul) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{72}, int64_t{200 * 7}, int64_t{4096 * 33}}) {
    for (int64_t offset : {0, 1}) {  // offset 1: misaligned, takes the scalar path
      Rng rng(fresh_seed());
      Bf16Data g = random_bf16(rng, n + offset, 2.0f), u = random_bf16(rng, n + offset);
      auto d_g = to_device<bf16>(g.bits);
      auto d_u = to_device<bf16>(u.bits);
      launch_silu_mul(d_g.get() + offset, d_u.get() + offset, n, nullptr);
      std::vector<double> got = download_bf16(d_g, n + offset), ref(n + offset);
      for (int64_t i = 0; i < n + offset; ++i) {
        const double x = g.val[i];
        ref[i] = i < offset ? x : x / (1.0 + std::exp(-x)) * u.val[i];
      }
      expect_close("silu_mul", "n " + std::to_string(n) + (offset ? " misaligned" : ""), got, ref, kTolBf16,
                   rng.seed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argmax

TEST_F(Kernels, Argmax) {
  for (int64_t n : {1, 7, 200, 4097, 128256}) {
    for (ElemType t : {ElemType::F32, ElemType::BF16}) {
      Rng rng(fresh_seed());
      const int64_t rows = 5, stride = n + 3;
      std::vector<float> x(rows * stride);
      for (auto& v : x) v = rng.normal();
      std::vector<int32_t> want(rows);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = x.data() + r * stride;
        if (r == 1 && n > 2) {  // a tie: the lowest index wins
          const int a = rng.integer(0, static_cast<int>(n) - 2);
          row[a] = row[n - 1] = 9.0f;
        }
        if (r == 2) row[rng.integer(0, static_cast<int>(n) - 1)] = std::numeric_limits<float>::quiet_NaN();
        if (r == 3)
          for (int64_t i = 0; i < n; ++i) row[i] = 1.0f;  // all equal: index 0
        if (r == 4) row[n - 1] = 50.0f;  // the last element
        for (int64_t i = 0; i < n; ++i)
          if (t == ElemType::BF16) row[i] = bf16_to_f32(f32_to_bf16(row[i]));
        int32_t best = 0;
        for (int64_t i = 1; i < n; ++i)
          if (!std::isnan(row[i]) && (std::isnan(row[best]) || row[i] > row[best])) best = static_cast<int32_t>(i);
        want[r] = best;
      }
      auto out = poisoned<int32_t>(rows);
      if (t == ElemType::F32) {
        auto d_x = to_device<float>(x);
        launch_argmax(d_x.get(), t, rows, n, stride, out.get(), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
      } else {
        std::vector<bf16_t> xb(x.size());
        for (size_t i = 0; i < x.size(); ++i) xb[i] = f32_to_bf16(x[i]);
        auto d_x = to_device<bf16>(xb);
        launch_argmax(d_x.get(), t, rows, n, stride, out.get(), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
      }
      std::vector<int32_t> got(rows);
      CUDA_CHECK(cudaMemcpy(got.data(), out.get(), rows * 4, cudaMemcpyDeviceToHost));
      EXPECT_EQ(got, want) << "n " << n << " " << elem_type_name(t) << " seed " << rng.seed;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Logits out

TEST_F(Kernels, CopyLogits) {
  for (int64_t vocab : {1, 200, 4097}) {
    Rng rng(fresh_seed());
    const int64_t src_rows = 9, stride = vocab + 5;
    Bf16Data src = random_bf16(rng, src_rows * stride, 4.0f);
    std::vector<float> src_f(src.val.begin(), src.val.end());
    const std::vector<int32_t> rows = {8, 0, 3};
    std::vector<double> ref(rows.size() * vocab);
    for (size_t r = 0; r < rows.size(); ++r)
      for (int64_t c = 0; c < vocab; ++c) ref[r * vocab + c] = src.val[rows[r] * stride + c];
    auto d_rows = to_device<int32_t>(rows);
    auto d_b = to_device<bf16>(src.bits);
    auto d_f = to_device<float>(src_f);
    for (ElemType t : {ElemType::BF16, ElemType::F32}) {
      auto out = poisoned<float>(rows.size() * vocab);
      launch_copy_logits(t == ElemType::BF16 ? static_cast<const void*>(d_b.get()) : d_f.get(), t, stride,
                         d_rows.get(), static_cast<int64_t>(rows.size()), vocab, out.get(), nullptr);
      expect_close("copy_logits", "vocab " + std::to_string(vocab) + " from " + elem_type_name(t),
                   download_f32(out, rows.size() * vocab), ref, 0.0, rng.seed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM

TEST_F(Kernels, Gemm) {
  struct Case {
    int64_t n, in, out;
  };
  Gemm gemm;
  for (Case c : {Case{1, 4096, 200}, Case{7, 72, 200}, Case{33, 200, 72}, Case{300, 72, 4096}, Case{1, 200, 4096},
                 Case{33, 4096, 72}, Case{300, 200, 200}}) {
    Rng rng(fresh_seed());
    Bf16Data x = random_bf16(rng, c.n * c.in), w = random_bf16(rng, c.out * c.in, 0.05f);
    std::vector<double> ref(c.n * c.out);
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t o = 0; o < c.out; ++o) {
        double acc = 0;
        for (int64_t i = 0; i < c.in; ++i) acc += x.val[t * c.in + i] * w.val[o * c.in + i];
        ref[t * c.out + o] = acc;
      }
    auto d_x = to_device<bf16>(x.bits);
    auto d_w = to_device<bf16>(w.bits);
    const std::string what =
        "n " + std::to_string(c.n) + " in " + std::to_string(c.in) + " out " + std::to_string(c.out);
    // fp32 output into rows wider than `out`: the padding must stay untouched.
    const int64_t ldy = c.out + 3;
    auto y_f = poisoned<float>(c.n * ldy);
    gemm.matmul(d_x.get(), c.n, c.in, d_w.get(), c.out, y_f.get(), ElemType::F32, ldy, nullptr);
    std::vector<double> all = download_f32(y_f, c.n * ldy), got(c.n * c.out);
    for (int64_t t = 0; t < c.n; ++t) {
      for (int64_t o = 0; o < c.out; ++o) got[t * c.out + o] = all[t * ldy + o];
      for (int64_t o = c.out; o < ldy; ++o) EXPECT_TRUE(std::isnan(all[t * ldy + o])) << "padding written";
    }
    expect_close("gemm.f32", what, got, ref, kTolF32, rng.seed);
    auto y_b = poisoned<bf16>(c.n * c.out);
    gemm.matmul(d_x.get(), c.n, c.in, d_w.get(), c.out, y_b.get(), ElemType::BF16, c.out, nullptr);
    expect_close("gemm.bf16", what, download_bf16(y_b, c.n * c.out), ref, kTolBf16, rng.seed);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers refuse what their kernels cannot do. No kernel runs, so these need no GPU.

TEST(KernelLaunchers, RefuseBadArguments) {
  auto* p = reinterpret_cast<bf16*>(0x1000);  // never dereferenced: every call below fails its checks
  auto* f = reinterpret_cast<float*>(0x1000);
  auto* ids = reinterpret_cast<int32_t*>(0x1000);
  PagedAttentionBatch b;
  b.item_row0 = b.item_count = b.item_start = b.block_tables = b.tile_item = b.tile_row0 = ids;
  b.table_stride = 4;
  b.n_tiles = 1;
  EXPECT_THROW(launch_attention_paged(p, 512, p, p, 512, 16, p, 512, b, 6, 4, 64, 0.125f, nullptr), Error);  // 6 % 4
  EXPECT_THROW(launch_attention_paged(p, 1032, p, p, 1032, 16, p, 1032, b, 4, 4, 258, 0.1f, nullptr), Error);  // hd
  EXPECT_THROW(launch_attention_paged(p, 128, p, p, 128, 16, p, 128, b, 4, 4, 25, 0.1f, nullptr), Error);  // odd hd
  EXPECT_THROW(launch_attention_paged(p, 256, p, p, 100, 16, p, 256, b, 4, 4, 64, 0.1f, nullptr), Error);  // stride
  EXPECT_THROW(launch_attention_paged(nullptr, 256, p, p, 256, 16, p, 256, b, 4, 4, 64, 0.1f, nullptr), Error);
  EXPECT_THROW(launch_attention_paged(p + 1, 256, p, p, 256, 16, p, 256, b, 4, 4, 64, 0.1f, nullptr), Error);  // align
  EXPECT_THROW(launch_rope(p, 64, 1, p, 64, 1, 63, ids, f, 1, nullptr), Error);
  EXPECT_THROW(launch_rope(p, 32, 1, p, 64, 1, 64, ids, f, 1, nullptr), Error);
  EXPECT_THROW(launch_add_rms_norm(f, nullptr, ElemType::F32, p, 1e-5f, p, 0, 64, nullptr), Error);
  EXPECT_THROW(launch_add_rms_norm(f, nullptr, static_cast<ElemType>(7), p, 1e-5f, p, 1, 64, nullptr), Error);
  EXPECT_THROW(launch_silu_mul(p, nullptr, 8, nullptr), Error);
  EXPECT_THROW(launch_embedding(ids, 0, p, 10, 8, f, ElemType::F32, nullptr), Error);
  EXPECT_THROW(launch_argmax(f, ElemType::F32, 1, 10, 5, ids, nullptr), Error);
  EXPECT_THROW(launch_copy_logits(f, ElemType::F32, 5, nullptr, 1, 10, f, nullptr), Error);
}

}  // namespace
}  // namespace ringllama
