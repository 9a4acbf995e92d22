#include "worker/hybrid_cpu_split.h"

#include <algorithm>
#include <cmath>

#include "common/errors.h"

namespace ringllama {
namespace {

bool positive(double v) { return std::isfinite(v) && v > 0; }

}  // namespace

void validate(const HybridRates& r) {
  RL_REQUIRE(positive(r.h2d_gbs), "hybrid split: h2d_gbs must be a positive rate, not {}", r.h2d_gbs);
  RL_REQUIRE(r.row_granularity > 0, "hybrid split: row_granularity must be positive, not {}", r.row_granularity);
  if (r.cpu_share) {
    const double s = *r.cpu_share;
    RL_REQUIRE(std::isfinite(s) && s >= 0 && s <= 1, "hybrid split: cpu_share must be in [0, 1], not {}", s);
    if (s == 0) return;  // the CPU is off: its rates play no part
  }
  if (!r.cpu_gbs_by_tokens.empty()) {
    int last = 0;
    for (const auto& [tokens, gbs] : r.cpu_gbs_by_tokens) {
      RL_REQUIRE(tokens > last, "hybrid split: cpu_gbs_by_tokens must have ascending token counts from 1 ({} after {})",
                 tokens, last);
      RL_REQUIRE(positive(gbs), "hybrid split: cpu_gbs_by_tokens at {} tokens must be a positive rate, not {}",
                 tokens, gbs);
      last = tokens;
    }
    return;
  }
  RL_REQUIRE(positive(r.cpu_mem_gbs), "hybrid split: cpu_mem_gbs must be a positive rate, not {}", r.cpu_mem_gbs);
  RL_REQUIRE(positive(r.cpu_gflops), "hybrid split: cpu_gflops must be a positive rate, not {}", r.cpu_gflops);
}

double cpu_rate_gbs(const HybridRates& r, int tokens) {
  RL_REQUIRE(tokens >= 1, "hybrid split: {} tokens", tokens);
  const auto& table = r.cpu_gbs_by_tokens;
  if (table.empty()) return std::min(r.cpu_mem_gbs, r.cpu_gflops / tokens);
  if (tokens <= table.front().first) return table.front().second;
  const auto& [t_last, gbs_last] = table.back();
  if (tokens >= t_last) return gbs_last * t_last / tokens;
  size_t i = 1;
  while (table[i].first < tokens) ++i;
  // Linear in seconds per byte: a step's time is what adds up across the layer's bytes.
  const auto& [t0, g0] = table[i - 1];
  const auto& [t1, g1] = table[i];
  const double a = static_cast<double>(tokens - t0) / (t1 - t0);
  return 1.0 / ((1 - a) / g0 + a / g1);
}

double choose_gpu_fraction(int64_t bytes_per_layer, int tokens, const HybridRates& rates) {
  validate(rates);
  RL_REQUIRE(bytes_per_layer > 0, "hybrid split: {} bytes per layer", bytes_per_layer);
  RL_REQUIRE(tokens >= 1, "hybrid split: {} tokens", tokens);
  if (rates.cpu_share) return 1.0 - *rates.cpu_share;
  const double cpu = cpu_rate_gbs(rates, tokens);
  return rates.h2d_gbs / (rates.h2d_gbs + cpu);
}

int64_t gpu_rows(int64_t rows, double f, int64_t granularity) {
  RL_REQUIRE(rows >= 0, "hybrid split: {} rows", rows);
  RL_REQUIRE(granularity > 0, "hybrid split: row granularity {}", granularity);
  RL_REQUIRE(std::isfinite(f) && f >= 0 && f <= 1, "hybrid split: GPU share {} is not in [0, 1]", f);
  // Up, never down: the CPU then gets at most its exact share and the GPU at most one block more
  // per matrix, so a rounded split is never slower than streaming everything. The slack keeps an
  // exact multiple (0.75 * 4096 / 64 computed as 48.000000001) from taking one block more.
  const double blocks = std::ceil(f * static_cast<double>(rows) / static_cast<double>(granularity) - 1e-9);
  return std::min<int64_t>(static_cast<int64_t>(std::max(0.0, blocks)) * granularity, rows);
}

HybridSplit split_layer(const std::vector<HybridMatrix>& matrices, int tokens, const HybridRates& rates) {
  RL_REQUIRE(!matrices.empty(), "hybrid split: a layer without matrices");
  int64_t bytes = 0;
  for (const HybridMatrix& m : matrices) {
    RL_REQUIRE(m.rows > 0 && m.in > 0, "hybrid split: a {}x{} matrix", m.rows, m.in);
    bytes += m.rows * m.in * 2;
  }
  HybridSplit s;
  s.f = choose_gpu_fraction(bytes, tokens, rates);
  for (const HybridMatrix& m : matrices) {
    const int64_t g = gpu_rows(m.rows, s.f, rates.row_granularity);
    s.gpu_rows.push_back(g);
    s.gpu_bytes += g * m.in * 2;
    s.cpu_bytes += (m.rows - g) * m.in * 2;
  }
  s.gpu_seconds = static_cast<double>(s.gpu_bytes) / (rates.h2d_gbs * 1e9);
  if (s.cpu_bytes > 0) s.cpu_seconds = static_cast<double>(s.cpu_bytes) / (cpu_rate_gbs(rates, tokens) * 1e9);
  return s;
}

double hybrid_tokens_per_s_bound(const HybridSplit& split, int64_t streamed_layers, int tokens) {
  RL_REQUIRE(streamed_layers >= 1 && tokens >= 1, "hybrid split: {} streamed layers, {} tokens", streamed_layers,
             tokens);
  RL_REQUIRE(split.seconds() > 0, "hybrid split: a layer that takes no time");
  return tokens / (static_cast<double>(streamed_layers) * split.seconds());
}

std::vector<HybridMatrix> hybrid_layer_matrices(const ModelConfig& m) {
  const int64_t q_dim = m.q_dim(), kv_dim = m.kv_dim();
  return {{q_dim + 2 * kv_dim, m.dim}, {m.dim, q_dim}, {2 * m.ffn_dim, m.dim}, {m.dim, m.ffn_dim}};
}

namespace {

// The tensors of each matrix: (group is ffn, names back to back).
struct HybridTensors {
  bool ffn;
  std::vector<const char*> names;
};
const std::vector<HybridTensors>& hybrid_tensors() {
  static const std::vector<HybridTensors> t = {
      {false, {"wq", "wk", "wv"}}, {false, {"wo"}}, {true, {"w1", "w3"}}, {true, {"w2"}}};
  return t;
}

}  // namespace

std::string hybrid_layer_refusal(const Manifest& man, int64_t layer) {
  RL_REQUIRE(layer >= 0 && layer < man.model.n_layers, "hybrid: layer {} does not exist (the model has {})", layer,
             man.model.n_layers);
  for (const HybridTensors& t : hybrid_tensors()) {
    const GroupEntry& g = t.ffn ? man.ffn(layer) : man.attn(layer);
    const TensorEntry* prev = nullptr;
    for (const char* name : t.names) {
      const TensorEntry& e = g.tensor(name);
      if (e.dtype != DType::BF16)
        return fmt::format("layer {}'s {} is {} (the CPU multiplies bf16)", layer, name, dtype_name(e.dtype));
      if (prev && e.offset != prev->offset + prev->size)
        return fmt::format("layer {}'s {} does not follow {} in its group", layer, name, prev->name);
      prev = &e;
    }
  }
  return "";
}

std::string hybrid_refusal(const Manifest& man, int64_t first_streamed, int64_t held_layers) {
  if (first_streamed >= man.model.n_layers) return "every layer is resident: nothing streams";
  for (int64_t l = std::max<int64_t>(0, first_streamed); l < man.model.n_layers; ++l) {
    std::string why = hybrid_layer_refusal(man, l);
    if (!why.empty()) return why;
  }
  if (held_layers < 2)
    return fmt::format("the weight source lets the pool hold {} host layer at once; the CPU's share needs the layer "
                       "computing held besides the next copy (2 or more)",
                       held_layers);
  return "";
}

std::vector<HybridHostRange> hybrid_cpu_ranges(const Manifest& man, int64_t layer,
                                               const std::vector<int64_t>& gpu_rows) {
  const std::string why = hybrid_layer_refusal(man, layer);
  RL_REQUIRE(why.empty(), "hybrid: {}", why);
  const std::vector<HybridMatrix> mats = hybrid_layer_matrices(man.model);
  RL_REQUIRE(gpu_rows.size() == mats.size(), "hybrid: {} GPU row counts for the {} matrices of a layer",
             gpu_rows.size(), mats.size());
  std::vector<HybridHostRange> out;
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t g = gpu_rows[i], rows = mats[i].rows, row_bytes = mats[i].in * 2;
    RL_REQUIRE(g >= 0 && g <= rows, "hybrid: {} GPU rows of a matrix of {}", g, rows);
    if (g == rows) continue;
    const HybridTensors& t = hybrid_tensors()[i];
    const GroupEntry& grp = t.ffn ? man.ffn(layer) : man.attn(layer);
    const TensorEntry& first = grp.tensor(t.names.front());
    const TensorEntry& last = grp.tensor(t.names.back());
    // The shapes agree with the model's (the manifest was validated against it); the bytes too.
    RL_REQUIRE(last.offset + last.size - first.offset == static_cast<uint64_t>(rows * row_bytes),
               "hybrid: layer {}'s {} .. {} hold {} bytes, not the {} of [{}, {}] bf16", layer, first.name, last.name,
               last.offset + last.size - first.offset, rows * row_bytes, rows, mats[i].in);
    out.push_back({t.ffn, first.offset + static_cast<uint64_t>(g * row_bytes),
                   first.offset + static_cast<uint64_t>(rows * row_bytes)});
  }
  return out;
}

}  // namespace ringllama
