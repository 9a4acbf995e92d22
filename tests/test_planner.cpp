// The memory planner (DESIGN.md "The memory planner"): every line of the table checked against
// arithmetic written here from the published Llama 3.1 shapes and the store's alignment rules (not
// from the planner's own functions), auto resident layers, the group pool's sizing, the paged KV cache's
// blocks and waste, the refusal and its suggestions, and `ringllama-generate --plan-only`.
#include "worker/planner.h"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <map>
#include <sstream>

#include "common/errors.h"
#include "common/store.h"
#include "daemon/random_model.h"
#include "tests/test_util.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include "worker/cuda_backend.h"
#endif

namespace ringllama {
namespace {

constexpr uint64_t MiB = uint64_t{1} << 20;
constexpr uint64_t GiB = uint64_t{1} << 30;

// The published shapes, written out (not taken from the packer).
struct Shape {
  const char* name;
  int64_t dim, layers, heads, kv_heads, head_dim, ffn, vocab;
  bool tied;
};
constexpr Shape k8B{"llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, false};
constexpr Shape k70B{"llama-3.1-70b", 8192, 80, 64, 8, 128, 28672, 128256, false};

// What the plan is asked for; a Config is made from it.
struct Settings {
  double card_gib = 80;
  double limit = 0.9;
  int64_t guard_mb = 1024;
  int64_t ahead = 4;
  int64_t max_groups = kAuto;
  int64_t resident = kAuto;
  int64_t batch = 8;
  int64_t context = 4096;
  int64_t prefill = 512;
  int64_t block = 16;
};

Config config_of(const Settings& s) {
  Config c;
  c.gpu_memory_limit = s.limit;
  c.free_guard_mb = s.guard_mb;
  c.gpu_ahead_layers = s.ahead;
  c.gpu_max_groups = s.max_groups;
  c.resident_layers = s.resident;
  c.batch_size = s.batch;
  c.max_context = s.context;
  c.prefill_chunk_tokens = s.prefill;
  c.kv_block_tokens = s.block;
  return c;
}

Settings settings_of(const Config& c, double card_gib) {
  Settings s;
  s.card_gib = card_gib;
  s.limit = c.gpu_memory_limit;
  s.guard_mb = c.free_guard_mb;
  s.ahead = c.gpu_ahead_layers;
  s.max_groups = c.gpu_max_groups;
  s.resident = c.resident_layers;
  s.batch = c.batch_size;
  s.context = c.max_context;
  s.prefill = c.prefill_chunk_tokens;
  s.block = c.kv_block_tokens;
  return s;
}

uint64_t up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// A group of bf16 tensors with these element counts: each tensor starts on 256 bytes, the group
// is padded to 4 KiB (DESIGN.md "The packed store").
uint64_t group_bytes(std::initializer_list<uint64_t> numels) {
  uint64_t at = 0;
  for (uint64_t n : numels) at = up(at, 256) + n * 2;
  return up(at, 4096);
}

struct Expected {
  std::map<std::string, uint64_t> line;  // component -> bytes
  uint64_t layer = 0, attn = 0, ffn = 0;
  int64_t resident = 0, attn_buffers = 0, ffn_buffers = 0;
  uint64_t block_bytes = 0;
  int64_t waste_tokens = 0;
  uint64_t total = 0, budget = 0;
  bool fits = false;
};

// From first principles. `pin_resident` >= 0 holds the resident count (what the suggestions compare).
Expected expect(const Shape& m, const Settings& s, int64_t pin_resident = -1) {
  Expected e;
  const uint64_t D = m.dim, Q = m.heads * m.head_dim, KV = m.kv_heads * m.head_dim, F = m.ffn, V = m.vocab;
  e.line["CUDA context"] = 576 * MiB;  // the --plan-only estimates
  e.line["cuBLAS"] = 128 * MiB;
  e.line["resident globals"] = m.tied ? group_bytes({V * D, D}) : group_bytes({V * D, D, V * D});
  e.attn = group_bytes({D, Q * D, KV * D, KV * D, D * Q});
  e.ffn = group_bytes({D, F * D, F * D, D * F});
  e.layer = e.attn + e.ffn;

  const uint64_t token = uint64_t(m.layers) * KV * 2 /* K and V */ * 2 /* bf16 */;
  const int64_t per_seq = (s.context + s.block - 1) / s.block;
  e.block_bytes = uint64_t(s.block) * token;
  e.line["KV cache"] = uint64_t(s.batch * per_seq) * e.block_bytes;
  e.waste_tokens = s.batch * (per_seq * s.block - s.context);
  e.line["KV rounding waste"] = uint64_t(e.waste_tokens) * token;
  e.line["KV block table"] = uint64_t(s.batch * per_seq) * 4;

  const uint64_t T = uint64_t(s.batch * s.prefill);
  e.line["residual stream"] = T * D * 4;
  e.line["normed input"] = T * D * 2;
  e.line["q"] = T * Q * 2;
  e.line["k"] = T * KV * 2;
  e.line["v"] = T * KV * 2;
  e.line["attention output"] = T * Q * 2;
  e.line["projection output"] = T * D * 4;
  e.line["FFN gate"] = T * F * 2;
  e.line["FFN up"] = T * F * 2;
  e.line["logits"] = uint64_t(s.batch) * V * 4;
  e.line["lm_head rows"] = uint64_t(s.batch) * D * 2;
  e.line["sampled ids"] = uint64_t(s.batch) * 4;
  e.line["sampling rows"] = uint64_t(s.batch) * 40;  // SampleParams: 2 doubles, 2 uint64, 2 int32
  const uint64_t tiles = T * uint64_t(m.heads / m.kv_heads) / 16 + uint64_t(s.batch);
  e.line["step metadata"] = (3 * T + 4 * uint64_t(s.batch) + 2 * tiles) * 4;
  e.line["RoPE frequencies"] = uint64_t(m.head_dim / 2) * 4;
  e.line["attention scratch"] = 0;
  uint64_t act = 0;
  for (const char* a : {"residual stream", "normed input", "q", "k", "v", "attention output", "projection output",
                        "FFN gate", "FFN up", "logits", "lm_head rows", "sampled ids", "sampling rows",
                        "step metadata", "RoPE frequencies", "attention scratch"})
    act += e.line[a];
  e.line["activations"] = act;
  // Decode attention's partials: at most 16 sequences x 64 splits (larger batches take fewer splits).
  e.line["workspace"] = std::min<uint64_t>(s.batch, 16) * 64 * uint64_t(m.heads) * uint64_t(m.head_dim + 2) * 4;
  e.line["free guard"] = uint64_t(s.guard_mb) * MiB;

  e.budget = static_cast<uint64_t>(s.limit * s.card_gib * GiB);
  const uint64_t fixed = e.line["CUDA context"] + e.line["cuBLAS"] + e.line["resident globals"] + e.line["KV cache"] +
                         e.line["KV block table"] + act + e.line["workspace"] + e.line["free guard"];
  const int64_t want_attn = s.max_groups == kAuto ? s.ahead + 1 : s.max_groups - s.max_groups / 2;
  const int64_t want_ffn = s.max_groups == kAuto ? s.ahead + 1 : s.max_groups / 2;
  auto at = [&](int64_t r) {
    e.resident = r;
    e.attn_buffers = std::min(want_attn, m.layers - r);
    e.ffn_buffers = std::min(want_ffn, m.layers - r);
    e.line["resident layers"] = uint64_t(r) * e.layer;
    e.line["group pool"] = uint64_t(e.attn_buffers) * e.attn + uint64_t(e.ffn_buffers) * e.ffn;
    e.total = fixed + e.line["resident layers"] + e.line["group pool"];
  };
  if (s.resident != kAuto) {
    at(s.resident);
  } else if (pin_resident >= 0) {
    at(pin_resident);
  } else {
    int64_t best = 0;
    for (int64_t r = 0; r <= m.layers; ++r) {
      at(r);
      if (e.total <= e.budget) best = r;
    }
    at(best);
  }
  e.fits = e.total <= e.budget;
  return e;
}

Manifest manifest_of(const Shape& s) {
  Manifest man = Manifest::plan(random_shape(s.name), std::string("random:") + s.name);
  const ModelConfig& m = man.model;
  // The literal shape above is the one the packer builds.
  EXPECT_EQ(m.dim, s.dim);
  EXPECT_EQ(m.n_layers, s.layers);
  EXPECT_EQ(m.n_heads, s.heads);
  EXPECT_EQ(m.n_kv_heads, s.kv_heads);
  EXPECT_EQ(m.head_dim, s.head_dim);
  EXPECT_EQ(m.ffn_dim, s.ffn);
  EXPECT_EQ(m.vocab_size, s.vocab);
  EXPECT_EQ(m.tie_word_embeddings, s.tied);
  return man;
}

MemoryPlan plan(const Shape& shape, const Settings& s) {
  return plan_memory(manifest_of(shape), config_of(s), estimated_inputs(static_cast<uint64_t>(s.card_gib * GiB)));
}

// "512.0 MiB" / "9.9 GiB": how the table and the refusal quote sizes.
std::string size_text(uint64_t b) {
  char buf[64];
  if (b >= GiB) std::snprintf(buf, sizeof buf, "%.1f GiB", double(b) / double(GiB));
  else if (b >= MiB) std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / double(MiB));
  else if (b >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", double(b) / 1024.0);
  else std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

// Every line of the table (and of lines()) against the arithmetic above, and the total.
void check_every_line(const Shape& shape, const Settings& s) {
  SCOPED_TRACE(shape.name);
  const MemoryPlan p = plan(shape, s);
  const Expected e = expect(shape, s);
  const std::vector<TableLine> lines = p.lines();
  EXPECT_EQ(lines.size(), e.line.size());
  std::map<std::string, int> seen;
  const std::string table = p.table();
  std::istringstream rows(table);
  std::vector<std::string> printed;
  for (std::string row; std::getline(rows, row);) printed.push_back(row);
  ASSERT_EQ(printed.size(), lines.size() + 2) << table;  // header, lines, total
  for (size_t i = 0; i < lines.size(); ++i) {
    const TableLine& l = lines[i];
    ++seen[l.component];
    ASSERT_TRUE(e.line.count(l.component)) << "unexpected line " << l.component;
    EXPECT_EQ(l.bytes, e.line.at(l.component)) << l.component;
    // The printed row: the name (sub-lines indented), the exact bytes, the size.
    const std::string& row = printed[i + 1];
    EXPECT_EQ(row.rfind((l.sub ? "  " : "") + l.component, 0), 0u) << row;
    EXPECT_HAS(row, " " + std::to_string(e.line.at(l.component)) + " ");
    EXPECT_HAS(row, size_text(e.line.at(l.component)));
  }
  for (const auto& [name, n] : seen) EXPECT_EQ(n, 1) << name;
  EXPECT_EQ(p.total_bytes, e.total);
  EXPECT_EQ(p.budget_bytes, e.budget);
  EXPECT_EQ(p.fits, e.fits);
  EXPECT_EQ(p.resident_layers, e.resident);
  EXPECT_EQ(p.pool_attn_buffers, e.attn_buffers);
  EXPECT_EQ(p.pool_ffn_buffers, e.ffn_buffers);
  const std::string& total_row = printed.back();
  EXPECT_EQ(total_row.rfind("total", 0), 0u);
  EXPECT_HAS(total_row, std::to_string(e.total));
  EXPECT_HAS(total_row, "budget " + size_text(e.budget));
  EXPECT_HAS(total_row, e.fits ? ": fits" : ": does not fit");
}

TEST(Planner, EveryLineOf8BOnAnH100) { check_every_line(k8B, Settings{}); }

TEST(Planner, EveryLineOf70BOnAnH100) { check_every_line(k70B, Settings{}); }

TEST(Planner, EveryLineAtOtherSettings) {
  Settings s;
  s.card_gib = 24;
  s.batch = 3;
  s.context = 1000;
  s.prefill = 100;
  s.block = 48;
  s.ahead = 2;
  s.guard_mb = 512;
  check_every_line(k8B, s);
  s.card_gib = 40;
  s.max_groups = 5;
  check_every_line(k70B, s);
}

TEST(Planner, TotalIsTheSumOfTheTopLines) {
  for (const Shape* shape : {&k8B, &k70B}) {
    const MemoryPlan p = plan(*shape, Settings{});
    uint64_t sum = 0;
    for (const auto& l : p.lines())
      if (!l.sub) sum += l.bytes;
    EXPECT_EQ(sum, p.total_bytes) << shape->name;
  }
}

TEST(Planner, KvBlockBytesAndRoundingWaste) {
  // 70B: 80 layers x 8 kv heads x 128 x (K + V) x bf16 = 320 KiB a token, 5 MiB a 16-token block.
  Settings s;
  MemoryPlan p = plan(k70B, s);
  EXPECT_EQ(p.kv_token_bytes, 320u * 1024);
  EXPECT_EQ(p.kv_block_bytes, 5 * MiB);
  EXPECT_EQ(p.kv_blocks_per_sequence, 256);
  EXPECT_EQ(p.kv_blocks, 8 * 256);
  EXPECT_EQ(p.kv_bytes, 10 * GiB);
  EXPECT_EQ(p.kv_waste_tokens, 0);
  EXPECT_EQ(p.kv_waste_bytes, 0u);

  // 8B, 1000 tokens in blocks of 16: 63 blocks hold 1008, 8 tokens wasted a sequence, x 8 sequences;
  // 128 KiB a token, so 64 tokens are 8 MiB.
  s.context = 1000;
  p = plan(k8B, s);
  EXPECT_EQ(p.kv_block_bytes, 2 * MiB);
  EXPECT_EQ(p.kv_blocks_per_sequence, 63);
  EXPECT_EQ(p.kv_waste_tokens, 64);
  EXPECT_EQ(p.kv_waste_bytes, 8 * MiB);
  EXPECT_HAS(p.table(), "64 tokens (8 seqs x (63 x 16 - 1000))");
}

TEST(Planner, AutoResidentLayersTakeTheRoomLeft) {
  // 70B on 80 GiB: the layers that fit once everything else is counted, and not one more.
  const MemoryPlan p = plan(k70B, Settings{});
  const Expected e = expect(k70B, Settings{});
  ASSERT_TRUE(p.fits);
  EXPECT_EQ(p.resident_layers, e.resident);
  EXPECT_GT(p.resident_layers, 0);
  EXPECT_LT(p.resident_layers, 80);
  EXPECT_LE(p.total_bytes, p.budget_bytes);
  EXPECT_GT(p.total_bytes + p.layer_bytes, p.budget_bytes) << "one more resident layer would still fit";
  std::cout << p.table();
}

TEST(Planner, AutoResidentNeverExceedsTheLayerCountAndThenNeedsNoPool) {
  Settings s;
  s.card_gib = 1000;
  for (const Shape* shape : {&k8B, &k70B}) {
    const MemoryPlan p = plan(*shape, s);
    EXPECT_EQ(p.resident_layers, shape->layers);
    EXPECT_EQ(p.pool_bytes, 0u);
    EXPECT_EQ(p.pool_attn_buffers, 0);
    EXPECT_EQ(p.pool_ffn_buffers, 0);
    EXPECT_HAS(p.table(), "not needed: every layer is resident");
  }
  // 8B on an 80 GiB card: all 32 layers resident, no pool.
  const MemoryPlan p = plan(k8B, Settings{});
  EXPECT_EQ(p.resident_layers, 32);
  EXPECT_EQ(p.pool_bytes, 0u);
  EXPECT_TRUE(p.fits);
}

TEST(Planner, ExplicitResidentLayers) {
  Settings s;
  s.resident = 10;
  const MemoryPlan p = plan(k70B, s);
  const Expected e = expect(k70B, s);
  EXPECT_EQ(p.resident_layers, 10);
  EXPECT_FALSE(p.resident_auto);
  EXPECT_EQ(p.resident_bytes, 10 * e.layer);
  EXPECT_EQ(p.pool_bytes, 5 * e.attn + 5 * e.ffn);
  s.resident = 81;
  EXPECT_THROW(plan(k70B, s), ConfigError);
}

TEST(Planner, GroupPoolExplicitMaxGroupsSplitsBetweenKinds) {
  Settings s;
  s.resident = 0;
  const Expected e = expect(k70B, s);
  for (auto [groups, attn, ffn] : {std::tuple<int64_t, int64_t, int64_t>{2, 1, 1}, {5, 3, 2}, {8, 4, 4}, {11, 6, 5}}) {
    s.max_groups = groups;
    const MemoryPlan p = plan(k70B, s);
    EXPECT_EQ(p.pool_attn_buffers, attn) << groups;
    EXPECT_EQ(p.pool_ffn_buffers, ffn) << groups;
    EXPECT_EQ(p.pool_bytes, uint64_t(attn) * e.attn + uint64_t(ffn) * e.ffn) << groups;
  }
  // Never more buffers than streamed layers.
  s.max_groups = 8;
  s.resident = 79;
  const MemoryPlan p = plan(k70B, s);
  EXPECT_EQ(p.pool_attn_buffers, 1);
  EXPECT_EQ(p.pool_ffn_buffers, 1);
  EXPECT_HAS(p.table(), "(gpu_max_groups 8 split between kinds, capped at the 1 streamed layers)");
}

TEST(Planner, GroupSizesOf70B) {
  // attn: attn_norm 8192 x 2 = 16 KiB, then wq and wo 8192 x 8192 x 2 = 128 MiB each, wk and wv
  // 1024 x 8192 x 2 = 16 MiB each; ffn: ffn_norm 16 KiB, then three of 28672 x 8192 x 2 = 448 MiB.
  // Every offset is already a multiple of 256 and the ends of 4 KiB: no padding.
  const Expected e = expect(k70B, Settings{});
  EXPECT_EQ(e.attn, 16 * 1024 + 288 * MiB);
  EXPECT_EQ(e.ffn, 16 * 1024 + 3 * 448 * MiB);
  const MemoryPlan p = plan(k70B, Settings{});
  EXPECT_EQ(p.attn_group_bytes, e.attn);
  EXPECT_EQ(p.ffn_group_bytes, e.ffn);
  EXPECT_EQ(p.layer_bytes, e.attn + e.ffn);
  // Globals: two 128256 x 8192 bf16 matrices (embedding, lm_head) and the final norm.
  EXPECT_EQ(p.globals_bytes, up(2 * 128256ull * 8192 * 2 + 16 * 1024, 4096));
}

TEST(Planner, BudgetFromFreeMemory) {
  Settings s;
  s.limit = 0;
  Manifest man = manifest_of(k8B);
  PlanInputs in;
  in.device_total_bytes = 80 * GiB;
  in.device_free_bytes = 50 * GiB;
  in.context_bytes = 500 * MiB;
  in.cublas_bytes = 40 * MiB;
  in.measured = true;
  MemoryPlan p = plan_memory(man, config_of(s), in);
  // Measured free memory already lacks the context and cuBLAS, which the table counts again.
  EXPECT_EQ(p.budget_bytes, 50 * GiB + 540 * MiB);
  EXPECT_EQ(p.context_bytes, 500 * MiB);
  EXPECT_HAS(p.table(), "measured at start");
  in.measured = false;
  p = plan_memory(man, config_of(s), in);
  EXPECT_EQ(p.budget_bytes, 50 * GiB);
}

// A backend that keeps every layer resident (the CUDA backend before streaming): the plan holds all
// layers whatever resident_layers says, and a refusal never offers resident_layers as a key.
TEST(Planner, AllResidentPlansEveryLayerAndNeverSuggestsFewer) {
  Settings s;
  s.card_gib = 32;
  s.resident = 10;
  const Manifest man = manifest_of(k8B);
  PlanInputs in = estimated_inputs(32 * GiB);
  in.all_resident = true;
  MemoryPlan p = plan_memory(man, config_of(s), in);
  EXPECT_EQ(p.resident_layers, k8B.layers);
  EXPECT_EQ(p.pool_bytes, 0u);
  s.resident = k8B.layers;
  EXPECT_EQ(p.total_bytes, expect(k8B, s).total);
  EXPECT_TRUE(p.fits) << p.table();

  in = estimated_inputs(20 * GiB);  // the weights fit, the KV cache of 8 x 4096 tokens does not
  in.all_resident = true;
  p = plan_memory(man, config_of(s), in);
  EXPECT_FALSE(p.fits);
  EXPECT_EQ(p.resident_layers, k8B.layers);
  ASSERT_FALSE(p.suggestions.empty()) << p.refusal();
  for (const Suggestion& sg : p.suggestions)
    for (const ConfigChange& ch : sg.changes) EXPECT_NE(ch.key, "resident_layers") << sg.text();
  std::cout << p.refusal();
}

// The seeds' case: Llama 3.1 70B on a 16 GB card at batch 8, planned at the defaults of the other
// keys: max_context 4096, prefill_chunk_tokens 512, gpu_ahead_layers 4, kv_block_tokens 16,
// free_guard_mb 1024, gpu_memory_limit 0.9. The arithmetic says it does not fit (24.5 GiB against
// 14.4 GiB); every fix the refusal offers must fit when applied, and quote what it saves.
TEST(Planner, SeedsCase70BOn16GBAtBatch8DoesNotFitAndTheFixesDo) {
  Settings s;
  s.card_gib = 16;
  s.limit = 0.9;
  s.batch = 8;
  s.context = 4096;
  s.prefill = 512;
  s.ahead = 4;
  s.block = 16;
  std::cout << "seeds' case: llama-3.1-70b on a 16 GiB card, gpu_memory_limit 0.9, batch_size 8, max_context 4096,"
               " prefill_chunk_tokens 512, gpu_ahead_layers 4, kv_block_tokens 16, free_guard_mb 1024\n";
  const Manifest man = manifest_of(k70B);
  const Config c = config_of(s);
  const PlanInputs in = estimated_inputs(16 * GiB);
  const MemoryPlan p = plan_memory(man, c, in);
  const Expected e = expect(k70B, s);
  std::cout << p.table() << p.refusal();

  // Globals 3.9 GiB + a pool of 5 layers 8.0 GiB + a KV cache of 8 x 4096 tokens x 320 KiB = 10 GiB
  // already pass the 14.4 GiB budget.
  EXPECT_FALSE(e.fits);
  EXPECT_FALSE(p.fits);
  EXPECT_EQ(p.total_bytes, e.total);
  EXPECT_EQ(p.resident_layers, 0);
  const std::string msg = p.refusal();
  EXPECT_HAS(msg, "the plan does not fit");
  EXPECT_HAS(msg, size_text(e.total - e.budget) + " over");

  ASSERT_FALSE(p.suggestions.empty());
  bool one_fits = false;
  for (const Suggestion& sg : p.suggestions) {
    SCOPED_TRACE(sg.text());
    const Config fixed = sg.apply(c);
    // The saving quoted is the drop in the total at the same resident count, by the arithmetic here.
    const Expected after = expect(k70B, settings_of(fixed, 16), 0);
    EXPECT_EQ(sg.saves, e.total - after.total);
    EXPECT_HAS(msg, "saves " + size_text(e.total - after.total));
    for (const ConfigChange& ch : sg.changes) EXPECT_HAS(msg, ch.key + " " + std::to_string(ch.from) + " -> " +
                                                                  std::to_string(ch.to));
    // Re-planned with the change applied (resident layers back to auto), it fits when it says so.
    const MemoryPlan again = plan_memory(man, fixed, in);
    EXPECT_EQ(again.fits, sg.fits);
    EXPECT_EQ(again.fits, expect(k70B, settings_of(fixed, 16)).fits);
    one_fits = one_fits || again.fits;
    // The smallest change of a count that fits: one step less would not.
    if (sg.fits && sg.changes.size() == 1 && (sg.changes[0].key == "batch_size" ||
                                              sg.changes[0].key == "gpu_ahead_layers")) {
      Config nearer = c;
      if (sg.changes[0].key == "batch_size") nearer.batch_size = sg.changes[0].to + 1;
      else nearer.gpu_ahead_layers = sg.changes[0].to + 1;
      if (sg.changes[0].to + 1 < sg.changes[0].from) {
        EXPECT_FALSE(plan_memory(man, nearer, in).fits);
      }
    }
  }
  EXPECT_TRUE(one_fits);
  // The combined fix: several keys at once, milder than any one key cut alone.
  const Suggestion& together = p.suggestions.back();
  EXPECT_GT(together.changes.size(), 1u);
  EXPECT_TRUE(together.fits);
  EXPECT_HAS(msg, "or all of these together: " + together.text() + ": fits");
}

TEST(Planner, RefusesWhenNothingTheKeysCanLowerIsEnough) {
  // A 70B's globals alone (3.9 GiB) pass a 4 GiB card's budget.
  Settings s;
  s.card_gib = 4;
  const MemoryPlan p = plan(k70B, s);
  EXPECT_FALSE(p.fits);
  EXPECT_HAS(p.refusal(), "no setting the planner may lower makes it fit");
  for (const Suggestion& sg : p.suggestions) EXPECT_FALSE(sg.fits);
}

TEST(Planner, SuggestsKvBlockTokensWhenTheWasteMatters) {
  // Blocks of 4096 for a 4097-token context: almost a whole block wasted on every sequence.
  Settings s;
  s.card_gib = 16;
  s.context = 4097;
  s.block = 4096;
  s.prefill = 512;
  const MemoryPlan p = plan(k70B, s);
  ASSERT_FALSE(p.fits);
  EXPECT_GT(p.kv_waste_tokens, 8 * 4000);
  bool found = false;
  for (const Suggestion& sg : p.suggestions)
    if (sg.changes[0].key == "kv_block_tokens") found = true;
  EXPECT_TRUE(found) << p.refusal();
}

// ringllama-generate --plan-only reads only the manifest: a 70B manifest without weights.
class PlanOnlyCli : public ::testing::Test {
 protected:
  void SetUp() override {
    Manifest::plan(random_shape("llama-3.1-70b"), "random:llama-3.1-70b").save(dir_ / kManifestFile);
  }
  test::TempDir dir_;
};

TEST_F(PlanOnlyCli, SixteenGigabytesDoesNotFitAndSaysWhatToLower) {
  auto r = test::run_bin("ringllama-generate", {"--store", dir_.path(), "--plan-only", "--device-memory", "16"});
  EXPECT_EQ(r.status, 1) << r.out << r.err;
  EXPECT_EQ(r.out.rfind("component", 0), 0u);
  for (const char* line : {"CUDA context", "cuBLAS", "resident globals", "resident layers", "group pool",
                           "KV cache", "activations", "workspace", "free guard", "total"})
    EXPECT_HAS(r.out, std::string("\n") + line);
  EXPECT_HAS(r.out, "estimate (--plan-only)");
  EXPECT_HAS(r.out, "budget 14.4 GiB (0.90 x 16.0 GiB): does not fit");
  EXPECT_HAS(r.out, "the plan does not fit");
  EXPECT_HAS(r.out, "saves");
}

TEST_F(PlanOnlyCli, EightyGigabytesFits) {
  auto r = test::run_bin("ringllama-generate", {"--store", dir_.path(), "--plan-only", "--device-memory", "80"});
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_HAS(r.out, "budget 72.0 GiB (0.90 x 80.0 GiB): fits");
  // Flags reach the plan like any config key.
  r = test::run_bin("ringllama-generate", {"--store", dir_.path(), "--plan-only", "--device-memory", "80",
                                           "--batch-size", "64", "--max-context", "8192"});
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_HAS(r.out, "64 seqs");
}

TEST_F(PlanOnlyCli, WithoutDeviceMemoryAndWithoutAGpuItAsksForIt) {
#ifdef RINGLLAMA_HAVE_CUDA
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present: --plan-only plans for it";
#endif
  auto r = test::run_bin("ringllama-generate", {"--store", dir_.path(), "--plan-only"});
  EXPECT_EQ(r.status, 1);
  EXPECT_HAS(r.err, "pass --device-memory");
  r = test::run_bin("ringllama-generate", {"--store", dir_.path(), "--device-memory", "16"});
  EXPECT_EQ(r.status, 1);
  EXPECT_HAS(r.err, "--device-memory goes with --plan-only");
}

}  // namespace
}  // namespace ringllama
