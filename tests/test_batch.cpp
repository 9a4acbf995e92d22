// Many sequences per step on the CPU backend: the paged KV cache's block pool, and batches that give
// every sequence exactly the bits it gets when it runs alone (the CPU backend's rows do not depend
// on what shares their step).
#include <gtest/gtest.h>

#include <string>

#include "common/errors.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"
#include "worker/generation.h"
#include "worker/kv_blocks.h"
#include "worker/sampler.h"

namespace ringllama {
namespace {

using test::MemoryWeights;
using test::TinyModel;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

StepLimits limits(int64_t items, int64_t chunk, int64_t ctx) { return StepLimits{items, chunk, ctx, 100}; }

// ---- The block pool ----

TEST(KvBlockPool, BlocksComeAsASequenceGrowsAndGoBackWhenItEnds) {
  KvBlockPool pool(4, 6, 16);  // 6 blocks of 4 tokens
  EXPECT_EQ(pool.max_blocks_per_sequence(), 4);
  pool.add_sequence(7);
  pool.add_sequence(9);
  StepLayout L = pool.prepare({{7, {1, 2, 3, 4, 5}, true}, {9, {6}, true}}, limits(2, 8, 16));
  pool.commit(L);
  EXPECT_EQ(pool.table(7), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(pool.table(9), (std::vector<int32_t>{2}));
  EXPECT_EQ(pool.free_blocks(), 3);
  EXPECT_EQ(L.slot, (std::vector<int32_t>{0, 1, 2, 3, 4, 8}));  // block * 4 + position % 4
  EXPECT_EQ(L.pos, (std::vector<int32_t>{0, 1, 2, 3, 4, 0}));
  EXPECT_EQ(L.logit_rows, (std::vector<int64_t>{4, 5}));
  // Growing inside the last block takes nothing; crossing into a new one takes the next free block.
  pool.commit(pool.prepare({{7, {1, 2, 3}, true}}, limits(2, 8, 16)));
  EXPECT_EQ(pool.table(7), (std::vector<int32_t>{0, 1}));
  pool.commit(pool.prepare({{7, {1}, false}}, limits(2, 8, 16)));
  EXPECT_EQ(pool.table(7), (std::vector<int32_t>{0, 1, 3}));
  EXPECT_EQ(pool.length(7), 9);
  pool.free_sequence(7);
  EXPECT_EQ(pool.free_blocks(), 5);
  EXPECT_FALSE(pool.has(7));
  // Freed blocks are reused.
  pool.add_sequence(1);
  pool.commit(pool.prepare({{1, std::vector<int32_t>(12, 1), true}}, limits(2, 16, 16)));
  EXPECT_EQ(pool.table(1).size(), 3u);
  EXPECT_EQ(pool.free_blocks(), 2);
}

TEST(KvBlockPool, ExhaustionIsAClearErrorAndTakesNothing) {
  KvBlockPool pool(4, 3, 16);
  pool.add_sequence(0);
  pool.add_sequence(1);
  pool.commit(pool.prepare({{0, std::vector<int32_t>(8, 1), true}}, limits(2, 16, 16)));
  const std::string e =
      error_of([&] { pool.prepare({{0, {1}, true}, {1, std::vector<int32_t>(5, 1), true}}, limits(2, 16, 16)); });
  EXPECT_NE(e.find("KV cache pool is exhausted"), std::string::npos) << e;
  EXPECT_NE(e.find("needs 3 more blocks and 1 of 3 are free"), std::string::npos) << e;
  EXPECT_EQ(pool.free_blocks(), 1);
  EXPECT_EQ(pool.length(0), 8);
  EXPECT_TRUE(pool.table(1).empty());
}

TEST(KvBlockPool, RefusesBadSteps) {
  KvBlockPool pool(4, 8, 8);
  pool.add_sequence(0);
  pool.add_sequence(1);
  EXPECT_NE(error_of([&] { pool.add_sequence(0); }).find("already exists"), std::string::npos);
  EXPECT_NE(error_of([&] { pool.free_sequence(5); }).find("does not exist"), std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{5, {1}, true}}, limits(2, 8, 8)); }).find("does not exist"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, {1}, true}, {0, {2}, true}}, limits(2, 8, 8)); }).find("twice"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, {}, true}}, limits(2, 8, 8)); }).find("at least one token"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, std::vector<int32_t>(5, 1), true}}, limits(2, 4, 8)); })
                .find("exceed prefill_chunk_tokens (4)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, {100}, true}}, limits(2, 8, 8)); }).find("outside the vocabulary"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, std::vector<int32_t>(9, 1), true}}, limits(2, 16, 8)); })
                .find("exceeds max_context (8)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.prepare({{0, {1}, true}, {1, {1}, true}}, limits(1, 8, 8)); })
                .find("exceeds batch_size (1)"),
            std::string::npos);
  EXPECT_EQ(pool.free_blocks(), 8);
}

// ---- Batches against sequences alone ----

ModelConfig long_model() {
  ModelConfig m = test::tiny_config();
  m.max_position_embeddings = 512;
  return m;
}

Config config_for(int64_t batch, int64_t chunk, int64_t block, int64_t ctx = 400) {
  Config c;
  c.batch_size = batch;
  c.prefill_chunk_tokens = chunk;
  c.kv_block_tokens = block;
  c.max_context = ctx;
  return c;
}

struct Outcome {
  std::vector<GenResult> results;
  std::vector<std::vector<std::vector<float>>> rows;  // [request][token] logits
};

Outcome run_all(Backend& b, const std::vector<GenRequest>& reqs, bool with_logits = true) {
  Outcome r;
  r.rows.resize(reqs.size());
  r.results = generate_all(b, reqs, with_logits,
                           [&](size_t i, int32_t, const std::vector<float>& row) { r.rows[i].push_back(row); });
  return r;
}

// Every request alone on a fresh backend (batch 1): the reference.
Outcome run_alone(WeightSource& ws, const Config& c, const std::vector<GenRequest>& reqs) {
  Outcome all;
  for (const GenRequest& q : reqs) {
    Config one = c;
    one.batch_size = 1;
    auto b = make_cpu_backend(ws, one);
    Outcome r = run_all(*b, {q});
    all.results.push_back(r.results[0]);
    all.rows.push_back(r.rows[0]);
  }
  return all;
}

void expect_same(const Outcome& batch, const Outcome& alone) {
  ASSERT_EQ(batch.results.size(), alone.results.size());
  for (size_t i = 0; i < batch.results.size(); ++i) {
    EXPECT_EQ(batch.results[i].tokens, alone.results[i].tokens) << "request " << i;
    EXPECT_EQ(batch.results[i].reason, alone.results[i].reason) << "request " << i;
    ASSERT_EQ(batch.rows[i].size(), alone.rows[i].size()) << "request " << i;
    for (size_t t = 0; t < batch.rows[i].size(); ++t)
      EXPECT_EQ(batch.rows[i][t], alone.rows[i][t]) << "request " << i << " token " << t << ": bits differ";
  }
}

GenRequest request(std::vector<int32_t> prompt, int64_t max_tokens, std::set<int32_t> stop = {}) {
  GenRequest q;
  q.prompt = std::move(prompt);
  q.max_tokens = max_tokens;
  q.stop = std::move(stop);
  return q;
}

struct BatchCase {
  int64_t block, chunk, batch;
};

class CpuBatch : public ::testing::TestWithParam<BatchCase> {};

// Lengths 5 and 300 (300 crosses many blocks and, with a chunk of 64, takes five prompt steps while
// the short one decodes), one of 53, different max_tokens: each sequence gets the bits it gets alone.
TEST_P(CpuBatch, EachSequenceGetsWhatItGetsAlone) {
  const BatchCase bc = GetParam();
  const ModelConfig m = long_model();
  TinyModel tm(m, 21);
  MemoryWeights ws(tm);
  const Config c = config_for(bc.batch, bc.chunk, bc.block);
  std::vector<GenRequest> reqs = {request(test::random_tokens(5, m.vocab_size, 1), 20),
                                  request(test::random_tokens(300, m.vocab_size, 2), 6),
                                  request(test::random_tokens(53, m.vocab_size, 3), 11)};
  const Outcome alone = run_alone(ws, c, reqs);
  auto b = make_cpu_backend(ws, c);
  const Outcome batch = run_all(*b, reqs);
  expect_same(batch, alone);
  for (const auto& r : batch.results) EXPECT_EQ(r.reason, "length");
  EXPECT_EQ(b->kv().free_blocks(), b->kv().n_blocks()) << "every block goes back when its sequence ends";
  EXPECT_EQ(b->kv().sequences(), 0);
  EXPECT_EQ(ws.held, 0);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuBatch,
                         ::testing::Values(BatchCase{16, 64, 8}, BatchCase{4, 64, 8}, BatchCase{4, 512, 3},
                                           BatchCase{16, 7, 2}),
                         [](const auto& info) {
                           return "block" + std::to_string(info.param.block) + "_chunk" +
                                  std::to_string(info.param.chunk) + "_batch" + std::to_string(info.param.batch);
                         });

// Stop ids end one sequence early while the others go on; more requests than batch_size queue and
// join as places free up.
TEST(CpuSteps, SequencesFinishAtDifferentTimesAndWaitingOnesJoin) {
  const ModelConfig m = long_model();
  TinyModel tm(m, 22);
  MemoryWeights ws(tm);
  const Config c = config_for(2, 16, 4);
  std::vector<GenRequest> reqs = {request(test::random_tokens(9, m.vocab_size, 11), 12),
                                  request(test::random_tokens(40, m.vocab_size, 12), 3),
                                  request(test::random_tokens(17, m.vocab_size, 13), 8),
                                  request(test::random_tokens(2, m.vocab_size, 14), 5)};
  // Make request 0 stop at its 4th token: take that token from a run alone.
  const Outcome probe = run_alone(ws, c, {reqs[0]});
  reqs[0].stop = {probe.results[0].tokens[3]};
  const Outcome alone = run_alone(ws, c, reqs);
  ASSERT_EQ(alone.results[0].reason, "stop");
  ASSERT_LE(alone.results[0].tokens.size(), 4u);
  auto b = make_cpu_backend(ws, c);
  const Outcome batch = run_all(*b, reqs);
  expect_same(batch, alone);
  // Greedy on ids only gives the same tokens.
  auto g = make_cpu_backend(ws, c);
  const Outcome ids = run_all(*g, reqs, /*with_logits=*/false);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(ids.results[i].tokens, alone.results[i].tokens) << "request " << i;
    for (const auto& row : ids.rows[i]) EXPECT_TRUE(row.empty());
  }
}

// One step mixing a prefill chunk (with a cached prefix) and decode tokens of other sequences.
TEST(CpuSteps, OneStepMixesPrefillChunksAndDecodeTokens) {
  const ModelConfig m = long_model();
  TinyModel tm(m, 23);
  MemoryWeights ws(tm);
  const Config c = config_for(4, 32, 4);
  const auto a = test::random_tokens(50, m.vocab_size, 31), bt = test::random_tokens(20, m.vocab_size, 32);
  auto solo = make_cpu_backend(ws, c);
  std::vector<float> a_ref = solo->forward(a, 0);
  solo->reset();
  solo->forward(std::vector<int32_t>(bt.begin(), bt.end() - 1), 0);
  std::vector<float> b_ref = solo->forward({bt.back()}, 19);

  auto b = make_cpu_backend(ws, c);
  b->add_sequence(10);
  b->add_sequence(20);
  b->step({{10, std::vector<int32_t>(a.begin(), a.begin() + 18), false}});
  auto r1 = b->step({{10, std::vector<int32_t>(a.begin() + 18, a.begin() + 50), true},
                     {20, std::vector<int32_t>(bt.begin(), bt.end() - 1), false}});
  EXPECT_EQ(r1[0], a_ref);
  EXPECT_TRUE(r1[1].empty());
  auto r2 = b->step({{20, {bt.back()}, true}});
  EXPECT_EQ(r2[0], b_ref);
  EXPECT_EQ(b->cached_tokens(10), 50);
  EXPECT_EQ(b->cached_tokens(20), 20);
  EXPECT_GE(b->kv().table(10).size(), 13u);  // 50 tokens in blocks of 4
}

TEST(CpuSteps, ThePoolRunsOutWithAClearError) {
  const ModelConfig m = long_model();
  TinyModel tm(m, 24);
  MemoryWeights ws(tm);
  const Config c = config_for(2, 16, 4, 16);  // 2 x 4 blocks
  auto b = make_cpu_backend(ws, c);
  for (int64_t s = 0; s < 3; ++s) b->add_sequence(s);
  b->step({{0, std::vector<int32_t>(16, 1), true}});
  b->step({{1, std::vector<int32_t>(12, 1), true}});
  const std::string e = error_of([&] { b->step({{2, std::vector<int32_t>(8, 1), true}}); });
  EXPECT_NE(e.find("KV cache pool is exhausted"), std::string::npos) << e;
  b->free_sequence(0);
  EXPECT_NO_THROW(b->step({{2, std::vector<int32_t>(8, 1), true}}));
}

TEST(IdLines, CommasAndBlanks) {
  EXPECT_EQ(parse_id_line("1,2 3\t4 ,5", "x", 10), (std::vector<int32_t>{1, 2, 3, 4, 5}));
  EXPECT_NE(error_of([] { parse_id_line("", "line 3", 10); }).find("line 3: no token ids"), std::string::npos);
  EXPECT_NE(error_of([] { parse_id_line("1,,2", "x", 10); }).find("empty id"), std::string::npos);
  EXPECT_NE(error_of([] { parse_id_line("1,a", "x", 10); }).find("'a' is not a token id"), std::string::npos);
  EXPECT_NE(error_of([] { parse_id_line("10", "x", 10); }).find("outside the vocabulary"), std::string::npos);
}


// ---- Sampling in the step ----

// step_sample draws each item's token with its own row: exactly sample_row on the logits rows that
// step() gives for the same pass (greedy, temperature, top-k, top-p side by side), -1 for an item
// that wants no logits, and the rows it hands back are those rows.
TEST(CpuSteps, StepSampleIsSampleRowOnTheSameLogits) {
  const ModelConfig m = long_model();
  TinyModel tm(m, 17);
  MemoryWeights ws(tm);
  const Config c = config_for(4, 16, 4);
  auto a = make_cpu_backend(ws, c);
  auto b = make_cpu_backend(ws, c);
  std::vector<SampleParams> params(4);
  params[0] = SampleParams{0.0, 1.0, 0, 0, 0, 0};      // greedy
  params[1] = SampleParams{0.8, 1.0, 7, 0, 40, 0};     // temperature, top-k
  params[2] = SampleParams{1.3, 0.9, 11, 5, 0, 0};     // temperature, top-p
  params[3] = SampleParams{0.7, 0.95, 3, 2, 10, 0};    // no logits wanted: not read
  for (int64_t s = 0; s < 4; ++s) {
    a->add_sequence(s);
    b->add_sequence(s);
  }
  SampleScratch scratch;
  for (int round = 0; round < 6; ++round) {
    std::vector<StepItem> items;
    for (int64_t s = 0; s < 4; ++s)
      items.push_back({s, test::random_tokens(round == 0 ? 5 + s : 1, m.vocab_size, 100 * round + s), s != 3});
    const auto rows = a->step(items);
    std::vector<std::vector<float>> got_rows;
    const std::vector<int32_t> ids = b->step_sample(items, params, &got_rows);
    ASSERT_EQ(ids.size(), items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].want_logits) {
        EXPECT_EQ(ids[i], -1);
        EXPECT_TRUE(got_rows[i].empty());
        continue;
      }
      EXPECT_EQ(got_rows[i], rows[i]) << "round " << round << " item " << i;
      EXPECT_EQ(ids[i], sample_row(rows[i].data(), m.vocab_size, params[i], scratch)) << "round " << round
                                                                                      << " item " << i;
    }
    for (auto& p : params) ++p.step;
  }
  EXPECT_THROW(b->step_sample({{0, {1}, true}}, {}), Error);  // one row per item
}

// generate_all draws through step_sample: the tokens of sampled requests are what a Sampler draws
// from the rows, and the same whether the rows come back or not.
TEST(CpuSteps, GenerateSamplesTheSameWithAndWithoutLogits) {
  const ModelConfig m = long_model();
  TinyModel tm(m, 19);
  MemoryWeights ws(tm);
  const Config c = config_for(3, 8, 4);
  std::vector<GenRequest> reqs(3);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = test::random_tokens(3 + 7 * i, m.vocab_size, 50 + i);
    reqs[i].max_tokens = 12;
    reqs[i].sampling.temperature = i == 0 ? 0.0 : 0.9;
    reqs[i].sampling.top_k = i == 1 ? 20 : 0;
    reqs[i].sampling.top_p = i == 2 ? 0.8 : 1.0;
    reqs[i].sampling.seed = 7 + i;
  }
  auto b1 = make_cpu_backend(ws, c);
  const Outcome with = run_all(*b1, reqs, true);
  auto b2 = make_cpu_backend(ws, c);
  const Outcome without = run_all(*b2, reqs, false);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(with.results[i].tokens, without.results[i].tokens) << i;
    Sampler sampler(reqs[i].sampling);
    ASSERT_EQ(with.rows[i].size(), with.results[i].tokens.size());
    for (size_t t = 0; t < with.rows[i].size(); ++t)
      EXPECT_EQ(with.results[i].tokens[t], sampler.sample(with.rows[i][t])) << "request " << i << " token " << t;
    for (const auto& row : without.rows[i]) EXPECT_TRUE(row.empty());
  }
}

}  // namespace
}  // namespace ringllama
