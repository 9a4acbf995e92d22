// The CUDA backend with layers streamed through the GPU group pool gives the resident run's logits
// bit for bit: the same kernels in the same order on the same group layout, only the buffers
// differ. For every golden fixture: (a) the smallest pool (no resident layer, one attn and one ffn
// buffer: every layer is copied every step) over this process's ring window, and a pool with one
// resident layer; (b) through a ringllama-loaderd whose window (cpu_cap_layers 2) is smaller than
// the model; (c) fully resident, the reference. Then a batch of three sequences of different
// lengths, streamed against resident. The hybrid (cpu_share) is off in these (0): its CPU rows
// are fp32 sums in another order, so they are held to the fixtures' tolerance instead, at several
// shares, in CudaStreamGolden.HybridMatchesTheFixtures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/golden.h"
#include "tests/gpu_skip.h"
#include "tests/test_loaderd_proc.h"
#include "tests/row_compare.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"
#include "worker/daemon_weights.h"
#include "worker/generation.h"
#include "worker/window_weights.h"

namespace ringllama {
namespace {

constexpr const char* kGpuSuite = "the CUDA streaming tests";  // in the message where there is no GPU

// Teacher-forced logits rows: the prompt, then each golden token in turn.
std::vector<std::vector<float>> teacher_rows(Backend& b, const std::vector<int32_t>& prompt,
                                             const std::vector<int32_t>& tokens, int64_t rows) {
  std::vector<std::vector<float>> out;
  int64_t pos = 0;
  for (int64_t r = 0; r < rows; ++r) {
    out.push_back(r == 0 ? b.forward(prompt, 0) : b.forward({tokens[r - 1]}, pos));
    pos = r == 0 ? static_cast<int64_t>(prompt.size()) : pos + 1;
  }
  return out;
}

// Bit for bit; names the first row and element that differ.
void expect_bits(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& ref,
                 const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  for (size_t r = 0; r < got.size(); ++r) {
    ASSERT_EQ(got[r].size(), ref[r].size()) << what << " row " << r;
    if (std::memcmp(got[r].data(), ref[r].data(), got[r].size() * sizeof(float)) == 0) continue;
    size_t i = 0;
    while (i < got[r].size() && std::memcmp(&got[r][i], &ref[r][i], sizeof(float)) == 0) ++i;
    ADD_FAILURE() << what << ": row " << r << " differs first at " << i << " (" << got[r][i] << " vs " << ref[r][i]
                  << ")";
    return;
  }
}

CudaStreamReport report_of(const Backend& b) {
  CudaStreamReport r;
  EXPECT_TRUE(cuda_stream_report(b, &r));
  return r;
}

// The fixture packed into tmp/store, and a Config for it: that store, a context for `rows` rows
// after the prompt, the hybrid off (cpu_share 0).
Config packed_fixture(const test::Golden& g, const test::TempDir& tmp, int64_t rows) {
  const std::string store = tmp / "store";
  auto pack = test::run_bin("ringllama-pack", {"--hf", g.hf_dir(), "--out", store, "--quiet"}, 120);
  RL_REQUIRE(pack.status == 0, "ringllama-pack failed:\n{}{}", pack.err, pack.out);
  Config c;
  c.store = store;
  c.max_context = static_cast<int64_t>(g.prompt_ids.size()) + rows + 1;
  c.cpu_share = 0;
  return c;
}

class CudaStreamGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU(kGpuSuite); }
};

TEST_P(CudaStreamGolden, StreamedLogitsAreTheResidentOnesBitForBit) {
  const test::Golden g = test::load_golden(GetParam());
  const std::vector<int32_t>& prompt = g.prompt_ids;
  const std::vector<int32_t>& tokens = g.tokens;
  const int64_t rows = std::min<int64_t>(g.rows, 6);

  test::TempDir tmp;
  const Config base = packed_fixture(g, tmp, rows);
  const std::string store = base.store;

  // (c) fully resident: the reference.
  std::vector<std::vector<float>> ref;
  int64_t n_layers = 0;
  {
    auto ws = open_store_weights(store);
    n_layers = ws->manifest().model.n_layers;
    auto gpu = make_cuda_backend(*ws, base);
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_EQ(r.resident_layers, n_layers);
    EXPECT_TRUE(r.graphs);
    ref = teacher_rows(*gpu, prompt, tokens, rows);
    EXPECT_EQ(report_of(*gpu).bytes, 0u);
  }
  ASSERT_GE(n_layers, 2);

  // (a) the smallest pool over this process's ring window: every layer streams every step.
  {
    Config c = base;
    c.resident_layers = 0;
    c.gpu_max_groups = 2;
    c.cpu_cap_layers = 2;
    auto ws = open_window_weights(store, c);
    auto gpu = make_cuda_backend(*ws, c);
    expect_bits(teacher_rows(*gpu, prompt, tokens, rows), ref, GetParam() + " streamed, 1 attn + 1 ffn buffer");
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_EQ(r.resident_layers, 0);
    EXPECT_EQ(r.attn_buffers, 1);
    EXPECT_EQ(r.ffn_buffers, 1);
    EXPECT_FALSE(r.graphs);
    EXPECT_GE(r.passes, static_cast<uint64_t>(rows));
    EXPECT_GT(r.bytes, 0u);
    std::printf("  %-24s smallest pool: %llu passes, %llu bytes streamed, %.2f GB/s, %llu stalls\n",
                GetParam().c_str(), static_cast<unsigned long long>(r.passes),
                static_cast<unsigned long long>(r.bytes), r.gb_per_s(),
                static_cast<unsigned long long>(r.source_stalls));
  }
  // One resident layer, the rest through the default pool (gpu_ahead_layers 1).
  {
    Config c = base;
    c.resident_layers = 1;
    c.gpu_ahead_layers = 1;
    c.cpu_cap_layers = n_layers;
    auto ws = open_window_weights(store, c);
    auto gpu = make_cuda_backend(*ws, c);
    expect_bits(teacher_rows(*gpu, prompt, tokens, rows), ref, GetParam() + " streamed, 1 resident layer");
    EXPECT_EQ(report_of(*gpu).resident_layers, 1);
  }
  // (b) through a loader daemon whose window holds 2 layers.
  {
    const std::string control = "ipc://" + (tmp / "ctl.sock");
    test::Proc d("ringllama-loaderd",
                 {"--store", store, "--control", control, "--cpu-cap-layers", "2", "--mlock", "warn"},
                 tmp / "daemon.log");
    ASSERT_TRUE(test::wait_daemon_ready(d, control)) << d.log();
    Config c = base;
    c.resident_layers = 0;
    c.gpu_max_groups = 2;
    auto ws = open_daemon_weights(control, c);
    auto gpu = make_cuda_backend(*ws, c);
    expect_bits(teacher_rows(*gpu, prompt, tokens, rows), ref, GetParam() + " streamed from the daemon");
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_EQ(r.resident_layers, 0);
    EXPECT_GT(r.bytes, 0u);
    gpu.reset();
    ws.reset();
    d.signal(SIGTERM);
    EXPECT_EQ(d.wait(10000), 0) << d.log();
  }
}

// The hybrid: every layer streamed, each matrix's last rows computed by the CPU from the window's
// host copy, at several shares. The logits stay within the bf16 tolerance of transformers' and the
// greedy picks are the fixture's but for near ties; the pool copies only the GPU's rows.
TEST_P(CudaStreamGolden, HybridMatchesTheFixtures) {
  const test::Golden g = test::load_golden(GetParam());
  const int64_t rows = g.rows, vocab = g.vocab_size;
  test::TempDir tmp;
  Config base = packed_fixture(g, tmp, rows);
  const std::string store = base.store;
  base.resident_layers = 0;
  base.cpu_threads = 3;
  uint64_t pure_bytes = 0, pure_passes = 0;
  {
    Config c = base;
    c.cpu_share = 0;
    auto ws = open_window_weights(store, c);
    base.cpu_cap_layers = ws->manifest().model.n_layers;
    auto gpu = make_cuda_backend(*ws, c);
    teacher_rows(*gpu, g.prompt_ids, g.tokens, rows);
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_FALSE(r.hybrid);
    pure_bytes = r.bytes;
    pure_passes = r.passes;
  }
  for (double share : {0.25, 0.5, 0.9}) {
    Config c = base;
    c.cpu_share = share;
    auto ws = open_window_weights(store, c);
    auto gpu = make_cuda_backend(*ws, c);
    const std::vector<std::vector<float>> got = teacher_rows(*gpu, g.prompt_ids, g.tokens, rows);
    double worst = 0;
    int near_ties = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* ref = g.logits.data() + r * vocab;
      const test::RowDiff d = test::compare_row(got[r], ref, static_cast<size_t>(vocab));
      const double max_diff = d.max_diff;
      worst = std::max(worst, d.ratio);
      EXPECT_LT(d.ratio, 5e-2) << GetParam() << " share " << share << " row " << r;
      const int32_t pick = static_cast<int32_t>(std::max_element(got[r].begin(), got[r].end()) - got[r].begin());
      if (pick != g.tokens[r]) {
        const double gap = double(ref[g.tokens[r]]) - ref[pick];
        EXPECT_LE(gap, 2 * max_diff) << GetParam() << " share " << share << " row " << r << ": picks " << pick
                                     << ", transformers " << g.tokens[r] << " (not a near tie)";
        ++near_ties;
      }
    }
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_TRUE(r.hybrid);
    EXPECT_GT(r.cpu_calls, 0u);
    EXPECT_GT(r.cpu_bytes, 0u);
    EXPECT_GT(r.skipped_bytes, 0u);
    ASSERT_EQ(r.passes, pure_passes);
    // What the CPU read was not copied: the pool's bytes are the pure run's less those.
    EXPECT_EQ(r.bytes + r.skipped_bytes, pure_bytes) << "share " << share;
    EXPECT_EQ(r.cpu_bytes, r.skipped_bytes) << "share " << share;
    std::printf("  %-24s hybrid, CPU share %.2f (%s): worst max|diff|/max|golden| %.3e, %d near ties; %.1f%% of the "
                "streamed bytes on the CPU\n",
                GetParam().c_str(), share, r.cpu_isa.c_str(), worst, near_ties,
                100.0 * double(r.cpu_bytes) / double(pure_bytes));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaStreamGolden, ::testing::ValuesIn(test::golden_fixture_names()),
                         test::FixtureTestName());

// ---------------------------------------------------------------------------------------------
// A batch of three sequences of different lengths (one over the prefill chunk), streamed.

struct Outcome {
  std::vector<GenResult> results;
  std::vector<std::vector<std::vector<float>>> rows;
};

Outcome run_all(Backend& b, const std::vector<GenRequest>& reqs) {
  Outcome o;
  o.rows.resize(reqs.size());
  o.results = generate_all(b, reqs, true,
                           [&](size_t i, int32_t, const std::vector<float>& row) { o.rows[i].push_back(row); });
  return o;
}

TEST(CudaStreamBatch, ThreeSequencesStreamedAreTheResidentOnes) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  ModelConfig m = test::wide_config();
  m.n_layers = 4;
  test::TinyModel tm(m, 41);
  test::MemoryWeights ws(tm);
  Config c;
  c.cpu_share = 0;
  c.batch_size = 3;
  c.prefill_chunk_tokens = 64;
  c.kv_block_tokens = 16;
  c.max_context = 512;
  std::vector<GenRequest> reqs(3);
  const int64_t lens[3] = {5, 300, 53}, gen[3] = {24, 6, 12};
  for (int i = 0; i < 3; ++i) {
    reqs[static_cast<size_t>(i)].prompt = test::random_tokens(lens[i], m.vocab_size, static_cast<uint64_t>(i + 1));
    reqs[static_cast<size_t>(i)].max_tokens = gen[i];
  }
  Outcome ref;
  {
    auto gpu = make_cuda_backend(ws, c);
    ref = run_all(*gpu, reqs);
  }
  for (int64_t resident : {int64_t{0}, int64_t{2}}) {
    Config s = c;
    s.resident_layers = resident;
    s.gpu_max_groups = 2;
    auto gpu = make_cuda_backend(ws, s);
    const Outcome got = run_all(*gpu, reqs);
    const std::string what = "batch of 3, " + std::to_string(resident) + " resident layers";
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ(got.results[i].tokens, ref.results[i].tokens) << what << ": sequence " << i;
      expect_bits(got.rows[i], ref.rows[i], what + ": sequence " + std::to_string(i));
    }
    const CudaStreamReport r = report_of(*gpu);
    EXPECT_EQ(r.resident_layers, resident);
    EXPECT_GT(r.bytes, 0u);
    EXPECT_EQ(ws.held, 0);
  }
}

}  // namespace
}  // namespace ringllama
