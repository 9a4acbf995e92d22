// The memory planner driving the CUDA backend (DESIGN.md "The memory planner"): on a random
// llama-3.2-1b store cut to 4 layers, the backend measures its context and cuBLAS, plans with
// them, allocates what the plan lists, and the device memory it then measures in use is within 3%
// of the budget of the plan (the free guard aside, which is never allocated); steps allocate
// nothing more; a budget too small for the resident layers asked for is refused with the planner's
// suggestions, and a resident layer count below the model's streams the others through the pool.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/gpu_skip.h"
#include "tests/test_util.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"
#include "worker/sampler.h"

namespace ringllama {
namespace {

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

class CudaPlan : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (cuda_device_count() == 0) return;
    dir_ = new test::TempDir();
    const test::RunResult r = test::run_bin(
        "ringllama-pack", {"--random", "llama-3.2-1b", "--layers", "4", "--out", *dir_ / "store", "--quiet"}, 600);
    pack_error_ = r.status == 0 ? "" : "ringllama-pack failed (" + std::to_string(r.status) + "): " + r.err;
    if (pack_error_.empty()) weights_ = open_store_weights(*dir_ / "store").release();
  }
  static void TearDownTestSuite() {
    delete weights_;
    weights_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    RL_SKIP_WITHOUT_GPU("the memory plan tests");
    ASSERT_TRUE(pack_error_.empty()) << pack_error_;
  }

  static Config config() {
    Config c;
    c.batch_size = 8;
    c.max_context = 4096;
    c.prefill_chunk_tokens = 512;
    c.kv_block_tokens = 16;
    return c;
  }

  // Builds the backend, prints its plan and measurement, checks them against each other, and runs
  // a prefill and decode steps, which must not take more device memory.
  static void build_and_check(const Config& c, const char* what) {
    std::unique_ptr<Backend> b = make_cuda_backend(*weights_, c);
    const CudaMemoryReport* r = cuda_memory_report(*b);
    ASSERT_NE(r, nullptr);
    const MemoryPlan& p = r->plan;
    std::printf("---- %s: the plan ----\n%s", what, p.table().c_str());
    std::printf("---- %s: %s\n", what, r->summary().c_str());
    EXPECT_TRUE(p.fits);
    EXPECT_EQ(p.resident_layers, p.n_layers);
    EXPECT_EQ(p.pool_bytes, 0u);
    EXPECT_TRUE(p.measured);
    EXPECT_GT(r->context_bytes, 0u);
    // The backend's own allocations are the plan's lines, less the store's 4 KiB group padding
    // (the backend packs tensors at 256 bytes).
    EXPECT_LE(r->allocated_bytes, r->planned_allocations);
    EXPECT_LT(r->planned_allocations - r->allocated_bytes, 8 * kMiB);
    const double off = std::fabs(static_cast<double>(r->difference())) / static_cast<double>(p.budget_bytes);
    EXPECT_LT(off, 0.03) << r->summary();

    // Steps: a prompt chunk for every sequence, then decode steps of each batch size (graphs).
    const DeviceMemory before = device_memory();
    const int64_t n = c.batch_size;
    std::vector<StepItem> items;
    std::vector<SampleParams> params(static_cast<size_t>(n), SampleParams{0.8, 0.9, 1, 0, 40, 0});
    for (int64_t s = 0; s < n; ++s) {
      b->add_sequence(s);
      items.push_back({s, std::vector<int32_t>(static_cast<size_t>(c.prefill_chunk_tokens), static_cast<int32_t>(s)),
                       true});
    }
    std::vector<int32_t> ids = b->step_sample(items, params);
    for (int64_t k = n; k >= 1; --k) {
      std::vector<StepItem> dec;
      for (int64_t s = 0; s < k; ++s) dec.push_back({s, {ids[static_cast<size_t>(s)]}, true});
      std::vector<SampleParams> rows(params.begin(), params.begin() + k);
      const std::vector<int32_t> got = b->step_sample(dec, rows);
      for (int64_t s = 0; s < k; ++s) ids[static_cast<size_t>(s)] = got[static_cast<size_t>(s)];
      b->step({{0, {ids[0]}, true}});
    }
    const DeviceMemory after = device_memory();
    const int64_t grew = static_cast<int64_t>(after.used()) - static_cast<int64_t>(before.used());
    std::printf("---- %s: device use grew by %.1f MiB over a prefill and %lld decode steps\n", what,
                static_cast<double>(grew) / static_cast<double>(kMiB), static_cast<long long>(2 * n));
    // Nothing is allocated in a step; kernels of the prefill path that no decode step used may
    // still be loaded at their first launch (lazy module loading): a few MiB at most.
    EXPECT_LT(grew, static_cast<int64_t>(64 * kMiB));
  }

  static test::TempDir* dir_;
  static WeightSource* weights_;
  static std::string pack_error_;
};

test::TempDir* CudaPlan::dir_ = nullptr;
WeightSource* CudaPlan::weights_ = nullptr;
std::string CudaPlan::pack_error_;

TEST_F(CudaPlan, MeasuredUseIsWithinThreePercentOfTheBudget) {
  build_and_check(config(), "gpu_memory_limit 0.9");
}

// A budget only 1 GiB over the plan: 3% of it is ~100 MiB, so the comparison means something.
TEST_F(CudaPlan, MeasuredUseIsWithinThreePercentOfATightBudget) {
  uint64_t total = 0, device = 0;
  {
    std::unique_ptr<Backend> b = make_cuda_backend(*weights_, config());
    total = cuda_memory_report(*b)->plan.total_bytes;
    device = device_memory().total;
  }
  Config c = config();
  c.gpu_memory_limit = static_cast<double>(total + kGiB) / static_cast<double>(device);
  build_and_check(c, "a budget 1 GiB over the plan");
}

TEST_F(CudaPlan, ABudgetTooSmallIsRefusedWithWhatToLower) {
  MemoryPlan fitting;
  {
    std::unique_ptr<Backend> b = make_cuda_backend(*weights_, config());
    fitting = cuda_memory_report(*b)->plan;
  }
  // Every layer kept resident, half the KV cache short: lowering batch_size or max_context alone fits.
  Config c = config();
  c.resident_layers = fitting.n_layers;
  c.gpu_memory_limit = static_cast<double>(fitting.total_bytes - fitting.kv_bytes / 2) /
                       static_cast<double>(device_memory().total);
  try {
    make_cuda_backend(*weights_, c);
    ADD_FAILURE() << "no refusal";
  } catch (const Error& e) {
    const std::string m = e.what();
    std::printf("---- the refusal ----\n%s\n", m.c_str());
    EXPECT_HAS(m, "the plan does not fit");
    EXPECT_HAS(m, "lower one of these");
    EXPECT_HAS(m, "batch_size 8 -> ");
    EXPECT_HAS(m, "max_context 4096 -> ");
  }
  // What the refusal says fits does fit.
  c.batch_size = 4;
  EXPECT_NO_THROW(make_cuda_backend(*weights_, c));
}

TEST_F(CudaPlan, FewerResidentLayersStreamTheOthers) {
  Config c = config();
  c.resident_layers = 2;
  std::unique_ptr<Backend> b = make_cuda_backend(*weights_, c);
  CudaStreamReport r;
  ASSERT_TRUE(cuda_stream_report(*b, &r));
  EXPECT_EQ(r.resident_layers, 2);
  EXPECT_GT(r.attn_buffers, 0);
  EXPECT_FALSE(r.graphs);
  const MemoryPlan& p = cuda_memory_report(*b)->plan;
  EXPECT_GT(p.pool_bytes, 0u);
  b->add_sequence(0);
  EXPECT_EQ(b->step_greedy({{0, {1, 2, 3}, true}}).size(), 1u);
  EXPECT_EQ(b->step_greedy({{0, {4}, true}}).size(), 1u);
  ASSERT_TRUE(cuda_stream_report(*b, &r));
  EXPECT_GT(r.bytes, 0u);
}

}  // namespace
}  // namespace ringllama
