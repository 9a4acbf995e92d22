// The CUDA backend serving many sequences per step: each sequence of a batch gets the greedy tokens
// it gets alone, with logits rows within the bf16 tolerance (cuBLAS may pick other kernels for
// other row counts, so the bits can differ); decode-step graphs agree with launches kernel by
// kernel; sequences of very different lengths, prompts longer than prefill_chunk_tokens, sequences
// that end while others go on, and more requests than batch_size.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/gpu_skip.h"
#include "tests/row_compare.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"
#include "worker/generation.h"

namespace ringllama {
namespace {

using test::row_ratio;
using test::top2_gap;

constexpr const char* kGpuSuite = "the CUDA batch tests";  // in the message where there is no GPU

constexpr double kRowTolerance = 5e-2;  // as gpu_test_cuda_backend: bf16 activations

Config config_for(int64_t batch, int64_t chunk, int64_t block) {
  Config c;
  c.batch_size = batch;
  c.prefill_chunk_tokens = chunk;
  c.kv_block_tokens = block;
  c.max_context = 512;
  return c;
}

GenRequest request(std::vector<int32_t> prompt, int64_t max_tokens) {
  GenRequest q;
  q.prompt = std::move(prompt);
  q.max_tokens = max_tokens;
  return q;
}

struct Outcome {
  std::vector<GenResult> results;
  std::vector<std::vector<std::vector<float>>> rows;
};

Outcome run_all(Backend& b, const std::vector<GenRequest>& reqs, bool with_logits = true) {
  Outcome o;
  o.rows.resize(reqs.size());
  o.results = generate_all(b, reqs, with_logits,
                           [&](size_t i, int32_t, const std::vector<float>& row) { o.rows[i].push_back(row); });
  return o;
}



// Same tokens; rows within tol (printing the worst). Returns the worst ratio.
double expect_same(const Outcome& got, const Outcome& ref, double tol, const std::string& what) {
  double worst = 0;
  EXPECT_EQ(got.results.size(), ref.results.size());
  for (size_t i = 0; i < got.results.size() && i < ref.results.size(); ++i) {
    EXPECT_EQ(got.results[i].tokens, ref.results[i].tokens) << what << ": request " << i;
    EXPECT_EQ(got.results[i].reason, ref.results[i].reason) << what << ": request " << i;
    const size_t n = std::min(got.rows[i].size(), ref.rows[i].size());
    for (size_t t = 0; t < n; ++t) {
      const double r = row_ratio(got.rows[i][t], ref.rows[i][t]);
      worst = std::max(worst, r);
      EXPECT_LT(r, tol) << what << ": request " << i << " token " << t;
    }
  }
  std::printf("  %-48s worst row max|diff|/max|ref| = %.3e\n", what.c_str(), worst);
  return worst;
}

struct Shape {
  int64_t block, chunk, batch;
};

class CudaBatch : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU(kGpuSuite); }
};

// Lengths 5, 300 (over the 64-token chunk: five prompt steps while the others decode) and 53.
TEST_P(CudaBatch, EachSequenceGetsWhatItGetsAlone) {
  const Shape sh = GetParam();
  const ModelConfig m = test::wide_config();
  test::TinyModel tm(m, 41);
  test::MemoryWeights ws(tm);
  const Config c = config_for(sh.batch, sh.chunk, sh.block);
  const std::vector<GenRequest> reqs = {request(test::random_tokens(5, m.vocab_size, 1), 24),
                                        request(test::random_tokens(300, m.vocab_size, 2), 6),
                                        request(test::random_tokens(53, m.vocab_size, 3), 12)};
  Outcome alone;
  for (const GenRequest& q : reqs) {
    Config one = c;
    one.batch_size = 1;
    auto b = make_cuda_backend(ws, one);
    Outcome o = run_all(*b, {q});
    alone.results.push_back(o.results[0]);
    alone.rows.push_back(o.rows[0]);
  }
  auto gpu = make_cuda_backend(ws, c);
  const Outcome batch = run_all(*gpu, reqs);
  const std::string name = "block " + std::to_string(sh.block) + " chunk " + std::to_string(sh.chunk) + " batch " +
                           std::to_string(sh.batch);
  expect_same(batch, alone, kRowTolerance, "cuda batch vs alone, " + name);
  EXPECT_EQ(gpu->kv().free_blocks(), gpu->kv().n_blocks());

  // The CPU backend's batch: rows within the bf16 tolerance for as long as both runs have picked
  // the same tokens (a row depends on the tokens before it); where the picks part, the CPU row's
  // top-2 gap must be within the bf16 noise (a near tie), not a clear choice.
  auto cpu = make_cpu_backend(ws, c);
  const Outcome ref = run_all(*cpu, reqs);
  double worst = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& got = batch.results[i].tokens;
    const auto& want = ref.results[i].tokens;
    for (size_t t = 0; t < got.size() && t < want.size(); ++t) {
      const double r = row_ratio(batch.rows[i][t], ref.rows[i][t]);
      worst = std::max(worst, r);
      EXPECT_LT(r, kRowTolerance) << "cuda vs cpu: request " << i << " token " << t;
      if (got[t] != want[t]) {
        EXPECT_LT(top2_gap(ref.rows[i][t]), 2 * kRowTolerance) << "request " << i << " token " << t
                                                                << ": the tokens part on a clear choice";
        break;
      }
    }
  }
  std::printf("  %-48s worst row max|diff|/max|ref| = %.3e\n", ("cuda vs cpu batch, " + name).c_str(), worst);

  // Greedy on the device (ids only) gives the same tokens.
  auto ids = make_cuda_backend(ws, c);
  const Outcome greedy = run_all(*ids, reqs, /*with_logits=*/false);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(greedy.results[i].tokens, batch.results[i].tokens) << i;

  // Decode graphs against launches one by one.
  auto plain = make_cuda_backend(ws, c, CudaBackendOptions{false});
  expect_same(run_all(*plain, reqs), batch, 1e-3, "cuda without graphs vs with, " + name);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaBatch,
                         ::testing::Values(Shape{16, 64, 8}, Shape{4, 64, 3}, Shape{16, 512, 4}, Shape{4, 7, 2}),
                         [](const auto& info) {
                           return "block" + std::to_string(info.param.block) + "_chunk" +
                                  std::to_string(info.param.chunk) + "_batch" + std::to_string(info.param.batch);
                         });

// More requests than batch_size, ending at different times (max_tokens and a stop id): the ones
// waiting join as places free up, and each still gets its tokens alone.
TEST(CudaSteps, SequencesEndAtDifferentTimesAndWaitingOnesJoin) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const ModelConfig m = test::wide_config();
  test::TinyModel tm(m, 42);
  test::MemoryWeights ws(tm);
  const Config c = config_for(2, 16, 4);
  std::vector<GenRequest> reqs = {request(test::random_tokens(9, m.vocab_size, 11), 12),
                                  request(test::random_tokens(40, m.vocab_size, 12), 3),
                                  request(test::random_tokens(17, m.vocab_size, 13), 8),
                                  request(test::random_tokens(2, m.vocab_size, 14), 5)};
  Config one = c;
  one.batch_size = 1;
  {
    auto b = make_cuda_backend(ws, one);
    reqs[0].stop = {run_all(*b, {reqs[0]}).results[0].tokens[3]};
  }
  Outcome alone;
  for (const GenRequest& q : reqs) {
    auto b = make_cuda_backend(ws, one);
    Outcome o = run_all(*b, {q});
    alone.results.push_back(o.results[0]);
    alone.rows.push_back(o.rows[0]);
  }
  EXPECT_EQ(alone.results[0].reason, "stop");
  auto gpu = make_cuda_backend(ws, c);
  expect_same(run_all(*gpu, reqs), alone, kRowTolerance, "cuda queue of 4 on batch 2");
  EXPECT_EQ(gpu->kv().sequences(), 0);
}

TEST(CudaSteps, ThePoolRunsOutWithAClearError) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  const ModelConfig m = test::wide_config();
  test::TinyModel tm(m, 43);
  test::MemoryWeights ws(tm);
  Config c = config_for(2, 16, 4);
  c.max_context = 16;
  auto b = make_cuda_backend(ws, c);
  for (int64_t s = 0; s < 3; ++s) b->add_sequence(s);
  b->step({{0, std::vector<int32_t>(16, 1), true}});
  b->step({{1, std::vector<int32_t>(12, 1), true}});
  try {
    b->step({{2, std::vector<int32_t>(8, 1), true}});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache pool is exhausted"), std::string::npos) << e.what();
  }
  b->free_sequence(0);
  EXPECT_NO_THROW(b->step({{2, std::vector<int32_t>(8, 1), true}}));
}

}  // namespace
}  // namespace ringllama
