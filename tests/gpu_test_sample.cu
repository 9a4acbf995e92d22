// The GPU sampler (kernels/sample.cu) against the CPU sampler (worker/sampler.cpp): greedy rows are
// the argmax; sampled rows pick the same token as sample_row for the same logits and (seed, step);
// top_k and top_p restrict what can be drawn; one launch mixes rows of every kind. Ends with the
// kernel's time at batch 1, 8, 64 and 256 over a Llama 3 vocabulary.
//
// The two sides compute the same integer weights and sums (kernels/sample_common.h); only exp()
// may differ by an ulp between the CUDA and C libraries, which can move a weight by one unit of
// 2^-40 and a draw only when it lands on that unit. Agreement is therefore expected to be exact;
// the tests allow one disagreement per 10^4 rows and print each.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/errors.h"
#include "kernels/argmax.cuh"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "kernels/sample.cuh"
#include "tests/gpu_skip.h"
#include "worker/sampler.h"

namespace ringllama {
namespace {

constexpr const char* kGpuSuite = "the GPU sampler tests";  // in the message where there is no GPU

constexpr int kLlama3Vocab = 128256;

SampleParams row_params(double t, int32_t k, double p, uint64_t seed, uint64_t step) {
  SampleParams r{};
  r.temperature = t;
  r.top_k = k;
  r.top_p = p;
  r.seed = seed;
  r.step = step;
  return r;
}

std::string describe(const SampleParams& p) {
  return "T " + std::to_string(p.temperature) + " k " + std::to_string(p.top_k) + " p " + std::to_string(p.top_p) +
         " seed " + std::to_string(p.seed) + " step " + std::to_string(p.step);
}

// Logits as a model gives them: a normal bulk and a few strong candidates; `ties` rounds them to
// a coarse grid so that thresholds fall inside runs of equal logits.
void fill_logits(float* row, int n, std::mt19937_64& rng, bool ties) {
  std::normal_distribution<float> nd(0.0f, 2.5f);
  for (int i = 0; i < n; ++i) row[i] = nd(rng);
  const int strong = 1 + static_cast<int>(rng() % 8);
  for (int j = 0; j < strong; ++j) row[rng() % n] = 8.0f + nd(rng);
  if (ties)
    for (int i = 0; i < n; ++i) row[i] = std::round(row[i] * 2.0f) / 2.0f;
}

// Device copies of a batch; sample() launches and returns the tokens.
struct Batch {
  Batch(int rows_, int vocab_, int64_t stride_)
      : rows(rows_), vocab(vocab_), stride(stride_), logits(static_cast<size_t>(rows_) * stride_, 0.0f),
        params(rows_), d_logits(logits.size(), "sampler test logits"), d_params(rows_, "sampler test params"),
        d_tokens(rows_, "sampler test tokens") {}

  void upload_logits() {
    CUDA_CHECK(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  std::vector<int32_t> sample(cudaStream_t stream = nullptr) {
    CUDA_CHECK(cudaMemcpy(d_params.get(), params.data(), rows * sizeof(SampleParams), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(d_tokens.get(), 0xff, rows * sizeof(int32_t)));  // -1: a row never written fails
    launch_sample(d_logits.get(), rows, vocab, stride, d_params.get(), d_tokens.get(), nullptr,
                  sample_workspace_bytes(rows, vocab), stream);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int32_t> out(rows);
    CUDA_CHECK(cudaMemcpy(out.data(), d_tokens.get(), rows * sizeof(int32_t), cudaMemcpyDeviceToHost));
    return out;
  }

  const float* row(int r) const { return logits.data() + static_cast<size_t>(r) * stride; }
  float* row(int r) { return logits.data() + static_cast<size_t>(r) * stride; }

  int rows, vocab;
  int64_t stride;
  std::vector<float> logits;
  std::vector<SampleParams> params;
  DeviceBuffer<float> d_logits;
  DeviceBuffer<SampleParams> d_params;
  DeviceBuffer<int32_t> d_tokens;
};

// Rows compared, and rows where the GPU and the CPU disagree (printed as they come).
struct Agreement {
  long rows = 0, differ = 0;
  void compare(const Batch& b, const std::vector<int32_t>& gpu, SampleScratch& scratch) {
    for (int r = 0; r < b.rows; ++r) {
      const int32_t cpu = sample_row(b.row(r), b.vocab, b.params[r], scratch);
      ++rows;
      ASSERT_GE(gpu[r], 0) << "row " << r << " not written";
      ASSERT_LT(gpu[r], b.vocab);
      if (gpu[r] != cpu) {
        ++differ;
        std::printf("  differ: vocab %d row %d %s: gpu %d cpu %d\n", b.vocab, r, describe(b.params[r]).c_str(),
                    gpu[r], cpu);
      }
    }
  }
};

TEST(GpuSample, GreedyIsTheArgmax) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  std::mt19937_64 rng(1);
  SampleScratch scratch;
  for (int vocab : {1, 2, 31, 32, 33, 1000, 4097, 32000, 32003, kLlama3Vocab, kLlama3Vocab + 1}) {
    const int rows = 5;
    Batch b(rows, vocab, vocab + 3);
    for (int r = 0; r < rows; ++r) {
      fill_logits(b.row(r), vocab, rng, r % 2 == 1);
      b.params[r] = row_params(0.0, static_cast<int32_t>(rng() % 3), 0.9, rng(), r);
    }
    if (vocab > 40) {
      b.row(2)[7] = NAN;                                      // NaN never wins
      std::fill(b.row(3), b.row(3) + vocab, 1.25f);            // all tied: the first
      b.row(4)[vocab - 1] = 100.0f;                           // the very last
      b.row(4)[vocab / 2] = 100.0f;                           // tied with an earlier one
    }
    b.upload_logits();
    const auto got = b.sample();
    DeviceBuffer<int32_t> d_arg(rows, "argmax out");
    launch_argmax(b.d_logits.get(), ElemType::F32, rows, vocab, b.stride, d_arg.get(), nullptr);
    std::vector<int32_t> arg(rows);
    CUDA_CHECK(cudaMemcpy(arg.data(), d_arg.get(), rows * sizeof(int32_t), cudaMemcpyDeviceToHost));
    for (int r = 0; r < rows; ++r) {
      EXPECT_EQ(got[r], argmax(b.row(r), vocab)) << "vocab " << vocab << " row " << r;
      EXPECT_EQ(got[r], sample_row(b.row(r), vocab, b.params[r], scratch)) << "vocab " << vocab << " row " << r;
      EXPECT_EQ(got[r], arg[r]) << "vocab " << vocab << " row " << r;
    }
  }
}

// Many (seed, step) pairs over rows of every kind; ties in half the rows.
TEST(GpuSample, SameTokensAsTheCpu) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const SampleParams kinds[] = {
      row_params(1.0, 0, 1.0, 0, 0),    row_params(0.7, 50, 1.0, 0, 0),   row_params(1.0, 0, 0.9, 0, 0),
      row_params(0.8, 40, 0.95, 0, 0),  row_params(1.3, 1000, 0.5, 0, 0), row_params(1.0, 2, 1.0, 0, 0),
      row_params(2.0, 0, 0.999, 0, 0),  row_params(0.3, 0, 0.2, 0, 0),    row_params(1.0, 1, 0.7, 0, 0),
      row_params(5.0, 20000, 0.98, 0, 0),
  };
  const int n_kinds = sizeof(kinds) / sizeof(kinds[0]);
  std::mt19937_64 rng(2);
  SampleScratch scratch;
  Agreement total;
  struct Shape {
    int vocab, rows, launches;
  };
  for (const Shape s : {Shape{1000, 256, 12}, Shape{5003, 256, 6}, Shape{32000, 128, 3}, Shape{kLlama3Vocab, 64, 3}}) {
    Agreement a;
    Batch b(s.rows, s.vocab, s.vocab);
    for (int l = 0; l < s.launches; ++l) {
      for (int r = 0; r < s.rows; ++r) {
        // Half the launches: one row of logits drawn many times (steps); the others: fresh rows.
        if (l % 2 == 0 || r == 0)
          fill_logits(b.row(r), s.vocab, rng, (l / 2 + r) % 2 == 1);
        else
          std::copy(b.row(0), b.row(0) + s.vocab, b.row(r));
        SampleParams p = kinds[(r + l) % n_kinds];
        p.seed = l % 2 == 0 ? rng() : 777;
        p.step = l % 2 == 0 ? rng() % 100000 : static_cast<uint64_t>(r + l * s.rows);
        b.params[r] = p;
      }
      b.upload_logits();
      a.compare(b, b.sample(), scratch);
    }
    std::printf("vocab %6d: %ld rows, %ld differ\n", s.vocab, a.rows, a.differ);
    total.rows += a.rows;
    total.differ += a.differ;
  }
  std::printf("all: %ld rows, %ld differ\n", total.rows, total.differ);
  EXPECT_LE(total.differ, total.rows / 10000);
}

// Thousands of draws from one row: only what the CPU computes as allowed ever comes out, and with a
// flat enough distribution all of it does.
TEST(GpuSample, TopKAndTopPRestrictTheSupport) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const int vocab = kLlama3Vocab, rows = 256, launches = 16;
  std::mt19937_64 rng(3);
  std::vector<float> l(vocab);
  fill_logits(l.data(), vocab, rng, false);
  std::vector<int32_t> rank(vocab);
  std::iota(rank.begin(), rank.end(), 0);
  std::sort(rank.begin(), rank.end(), [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });

  struct Case {
    double t;
    int32_t k;
    double p;
  };
  for (const Case c : {Case{3.0, 20, 1.0}, Case{1.0, 0, 0.8}, Case{2.0, 300, 0.6}}) {
    // The allowed set, the plain way: the top k by rank, then the shortest prefix with the mass.
    const int keep_k = c.k > 0 ? c.k : vocab;
    const double mx = l[rank[0]];
    uint64_t kept_mass = 0;
    for (int j = 0; j < keep_k; ++j) kept_mass += sample_weight(l[rank[j]], mx, c.t);
    int keep = keep_k;
    if (c.p < 1) {
      const uint64_t target = sample_top_p_target(c.p, kept_mass);
      uint64_t m = 0;
      keep = 0;
      while (m < target) m += sample_weight(l[rank[keep++]], mx, c.t);
    }
    const std::set<int32_t> allowed(rank.begin(), rank.begin() + keep);
    Batch b(rows, vocab, vocab);
    for (int r = 0; r < rows; ++r) std::copy(l.begin(), l.end(), b.row(r));
    b.upload_logits();
    std::set<int32_t> drawn;
    int outside = 0;
    for (int launch = 0; launch < launches; ++launch) {
      for (int r = 0; r < rows; ++r) b.params[r] = row_params(c.t, c.k, c.p, 99, static_cast<uint64_t>(launch * rows + r));
      for (int32_t tok : b.sample()) {
        outside += !allowed.count(tok);
        drawn.insert(tok);
      }
    }
    std::printf("T %.1f top_k %d top_p %.2f: %zu allowed, %zu distinct drawn in %d draws, %d outside\n", c.t, c.k, c.p,
                allowed.size(), drawn.size(), rows * launches, outside);
    EXPECT_EQ(outside, 0);
    if (allowed.size() <= 20) EXPECT_EQ(drawn.size(), allowed.size());
    EXPECT_GT(drawn.size(), std::min<size_t>(allowed.size() / 3, 500));
  }
}

// One launch, rows of every kind side by side, rows with padding between them.
TEST(GpuSample, OneLaunchMixesGreedyAndSampledRows) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const int vocab = 50000, rows = 40;
  std::mt19937_64 rng(4);
  Batch b(rows, vocab, vocab + 64);
  for (int r = 0; r < rows; ++r) {
    fill_logits(b.row(r), vocab, rng, r % 3 == 0);
    switch (r % 5) {
      case 0: b.params[r] = row_params(0.0, 0, 1.0, rng(), r); break;
      case 1: b.params[r] = row_params(0.9, 40, 1.0, rng(), r); break;
      case 2: b.params[r] = row_params(1.0, 0, 0.9, rng(), r); break;
      case 3: b.params[r] = row_params(1.1, 0, 1.0, rng(), r); break;
      default: b.params[r] = row_params(0.6, 100, 0.8, rng(), r); break;
    }
  }
  b.upload_logits();
  const auto got = b.sample();
  SampleScratch scratch;
  Agreement a;
  a.compare(b, got, scratch);
  EXPECT_EQ(a.differ, 0);
  for (int r = 0; r < rows; r += 5) EXPECT_EQ(got[r], argmax(b.row(r), vocab)) << "greedy row " << r;
  // The same launch again: the same tokens.
  EXPECT_EQ(b.sample(), got);
}

TEST(GpuSample, LauncherRejectsBadArguments) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  DeviceBuffer<float> l(64, "l");
  DeviceBuffer<SampleParams> p(2, "p");
  DeviceBuffer<int32_t> o(2, "o");
  EXPECT_THROW(launch_sample(nullptr, 1, 10, 10, p.get(), o.get(), nullptr, 0, nullptr), Error);
  EXPECT_THROW(launch_sample(l.get(), 0, 10, 10, p.get(), o.get(), nullptr, 0, nullptr), Error);
  EXPECT_THROW(launch_sample(l.get(), 1, 0, 10, p.get(), o.get(), nullptr, 0, nullptr), Error);
  EXPECT_THROW(launch_sample(l.get(), 1, 20, 10, p.get(), o.get(), nullptr, 0, nullptr), Error);
  EXPECT_THROW(launch_sample(l.get(), 1, static_cast<int>(kSampleMaxVocab) + 1, kSampleMaxVocab + 1, p.get(), o.get(),
                             nullptr, 0, nullptr),
               Error);
}

TEST(GpuSample, Timing) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const int vocab = kLlama3Vocab;
  std::mt19937_64 rng(5);
  struct Kind {
    const char* name;
    SampleParams p;
  };
  const Kind kinds[] = {
      {"greedy", row_params(0.0, 0, 1.0, 1, 0)},
      {"temperature", row_params(0.8, 0, 1.0, 1, 0)},
      {"top_k 50", row_params(0.8, 50, 1.0, 1, 0)},
      {"top_p 0.9", row_params(0.8, 0, 0.9, 1, 0)},
      {"top_k 50 top_p 0.9", row_params(0.8, 50, 0.9, 1, 0)},
  };
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::printf("\nlaunch_sample over %d logits, microseconds per launch\n%-20s", vocab, "rows");
  const int batches[] = {1, 8, 64, 256};
  for (int rows : batches) std::printf("%10d", rows);
  std::printf("\n");
  Batch b(256, vocab, vocab);
  for (int r = 0; r < 256; ++r) fill_logits(b.row(r), vocab, rng, false);
  b.upload_logits();
  for (const Kind& k : kinds) {
    std::printf("%-20s", k.name);
    for (int rows : batches) {
      for (int r = 0; r < rows; ++r) b.params[r] = k.p;
      CUDA_CHECK(cudaMemcpy(b.d_params.get(), b.params.data(), rows * sizeof(SampleParams), cudaMemcpyHostToDevice));
      auto launch = [&] {
        launch_sample(b.d_logits.get(), rows, vocab, vocab, b.d_params.get(), b.d_tokens.get(), nullptr, 0, nullptr);
      };
      for (int i = 0; i < 3; ++i) launch();
      const int iters = 20;
      CUDA_CHECK(cudaEventRecord(start));
      for (int i = 0; i < iters; ++i) launch();
      CUDA_CHECK(cudaEventRecord(stop));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      std::printf("%10.1f", 1000.0 * ms / iters);
    }
    std::printf("\n");
  }
  std::fflush(stdout);
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
}

}  // namespace
}  // namespace ringllama
