#include "worker/planner.h"

#include <fmt/format.h>

#include <algorithm>
#include <optional>

#include "common/errors.h"
#include "kernels/sample_common.h"

namespace ringllama {

namespace {

constexpr uint64_t kBf16 = 2;
constexpr uint64_t kFp32 = 4;
constexpr uint64_t kInt32 = 4;

uint64_t u(int64_t v) { return static_cast<uint64_t>(v); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The plan without suggestions. `pinned_resident` (kAuto: none) holds an auto resident layer
// count: suggestions compare totals at the same count, so that what a change saves is not refilled
// with layers.
MemoryPlan plan_core(const Manifest& man, const Config& c, const PlanInputs& in, int64_t pinned_resident) {
  const ModelConfig& m = man.model;
  MemoryPlan p;
  p.n_layers = m.n_layers;
  p.batch_size = c.batch_size;
  p.max_context = c.max_context;
  p.prefill_chunk_tokens = c.prefill_chunk_tokens;
  p.kv_block_tokens = c.kv_block_tokens;
  p.context_bytes = in.context_bytes;
  p.cublas_bytes = in.cublas_bytes;
  p.measured = in.measured;
  p.globals_bytes = man.globals().size;
  {
    const GroupEntry& g = man.globals();
    const TensorEntry* lm_head = g.find("output");
    p.globals_note = fmt::format("embedding {} + final norm {} + {}", format_bytes(g.tensor("tok_embeddings").size),
                                 format_bytes(g.tensor("norm").size),
                                 // A packed lm_head counts its scales too.
                                 lm_head ? "lm_head " + format_bytes(lm_head->end() - lm_head->offset)
                                         : "lm_head tied to the embedding");
  }
  for (int64_t l = 0; l < m.n_layers; ++l) {
    p.layer_bytes = std::max(p.layer_bytes, man.layer_size(l));
    p.attn_group_bytes = std::max(p.attn_group_bytes, man.attn(l).size);
    p.ffn_group_bytes = std::max(p.ffn_group_bytes, man.ffn(l).size);
  }

  // Paged KV cache: a block holds kv_block_tokens positions of K and V for every layer, so a
  // sequence needs whole blocks and the last one is partly wasted when max_context is no multiple.
  p.kv_token_bytes = 2 * u(m.n_layers) * u(m.kv_dim()) * kBf16;
  p.kv_block_bytes = u(c.kv_block_tokens) * p.kv_token_bytes;
  p.kv_blocks_per_sequence = ceil_div(c.max_context, c.kv_block_tokens);
  p.kv_blocks = c.batch_size * p.kv_blocks_per_sequence;
  p.kv_bytes = u(p.kv_blocks) * p.kv_block_bytes;
  p.kv_waste_tokens = (p.kv_blocks_per_sequence * c.kv_block_tokens - c.max_context) * c.batch_size;
  p.kv_waste_bytes = u(p.kv_waste_tokens) * p.kv_token_bytes;

  // Activations: the buffers are allocated once and every layer reuses them, so the peak is their
  // sum at the most tokens one step runs (every sequence in a prefill chunk). The dtypes are the
  // CUDA backend's: the residual stream and the projections' output in fp32 (added into the stream
  // by the next norm), the GEMM inputs and outputs in bf16.
  const int64_t T = c.batch_size * c.prefill_chunk_tokens;
  p.activation_tokens = T;
  auto buf = [&](const char* name, int64_t rows, int64_t cols, uint64_t elem, const char* dtype, const char* why) {
    std::string note = fmt::format("{} x {} {}", rows, cols, dtype);
    if (*why) note += fmt::format(": {}", why);
    p.activations.push_back({name, u(rows) * u(cols) * elem, note});
  };
  buf("residual stream", T, m.dim, kFp32, "fp32", "");
  buf("normed input", T, m.dim, kBf16, "bf16", "the QKV and gate/up GEMMs' input");
  buf("q", T, m.q_dim(), kBf16, "bf16", "");
  buf("k", T, m.kv_dim(), kBf16, "bf16", "rotated, then written into the cache");
  buf("v", T, m.kv_dim(), kBf16, "bf16", "");
  buf("attention output", T, m.q_dim(), kBf16, "bf16", "");
  buf("projection output", T, m.dim, kFp32, "fp32", "O and down projections, the FFN's one output");
  buf("FFN gate", T, m.ffn_dim, kBf16, "bf16", "SiLU(gate) x up written in place, no fourth temporary");
  buf("FFN up", T, m.ffn_dim, kBf16, "bf16", "");
  buf("logits", c.batch_size, m.vocab_size, kFp32, "fp32", "one row per sequence");
  buf("lm_head rows", c.batch_size, m.dim, kBf16, "bf16", "the normed rows that want logits, gathered");
  buf("sampled ids", c.batch_size, 1, kInt32, "int32", "");
  buf("sampling rows", c.batch_size, static_cast<int64_t>(sizeof(SampleParams)), 1, "bytes",
      "one SampleParams per sequence");
  {
    // Per row: token id, position, cache slot; per sequence: first row, count, start, logits row;
    // per attention tile: its sequence and first row. The block tables are the KV block table line.
    const int64_t group = m.n_kv_heads > 0 ? m.n_heads / m.n_kv_heads : 1;
    const int64_t tiles = T * group / kAttentionTileRows + c.batch_size;
    p.activations.push_back({"step metadata", u(3 * T + 4 * c.batch_size + 2 * tiles) * kInt32,
                             fmt::format("{} int32: 3 per token, 4 per sequence, 2 per attention tile ({})",
                                         3 * T + 4 * c.batch_size + 2 * tiles, tiles)});
  }
  buf("RoPE frequencies", 1, m.head_dim / 2, kFp32, "fp32", "");
  p.activations.push_back({"attention scratch", 0, "none: the tiled prefill kernel keeps K/V tiles in shared memory"});
  for (const auto& a : p.activations) p.activation_bytes += a.bytes;

  p.workspace_bytes = u(std::min<int64_t>(c.batch_size, kDecodeAttentionSplitSeqs)) * u(kDecodeAttentionSplits) *
                      u(m.n_heads) * u(m.head_dim + 2) * kFp32;
  // Packed weights multiplied by more rows than the GEMV serves are dequantized to bf16 in slices
  // of rows through the workspace: the largest packed matrix, or 64 MiB of it (lm_head in slices).
  for (const GroupEntry& g : man.groups)
    for (const TensorEntry& t : g.tensors)
      if (dtype_packed(t.dtype) && t.shape.size() == 2)
        p.dequant_bytes = std::max(p.dequant_bytes, std::min(u(t.shape[0]) * u(t.shape[1]) * 2, 64 * kMiB));
  p.workspace_bytes = std::max(p.workspace_bytes, p.dequant_bytes);
  p.guard_bytes = u(c.free_guard_mb) * kMiB;

  if (c.gpu_memory_limit > 0) {
    p.budget_bytes = static_cast<uint64_t>(c.gpu_memory_limit * static_cast<double>(in.device_total_bytes));
    p.budget_note = fmt::format("{:.2f} x {}", c.gpu_memory_limit, format_bytes(in.device_total_bytes));
  } else if (in.measured) {
    // Free memory was measured with the context and cuBLAS already made: they come out of it.
    p.budget_bytes = in.device_free_bytes + in.context_bytes + in.cublas_bytes;
    p.budget_note = fmt::format("free {} + context and cuBLAS already made", format_bytes(in.device_free_bytes));
  } else {
    p.budget_bytes = in.device_free_bytes;
    p.budget_note = fmt::format("free {}", format_bytes(in.device_free_bytes));
  }

  const uint64_t kv_table_bytes = u(p.kv_blocks) * kInt32;
  const uint64_t fixed = p.context_bytes + p.cublas_bytes + p.globals_bytes + p.kv_bytes + kv_table_bytes +
                         p.activation_bytes + p.workspace_bytes + p.guard_bytes;
  int64_t attn_buffers = 0, ffn_buffers = 0;
  if (c.gpu_max_groups == kAuto) {
    attn_buffers = ffn_buffers = c.gpu_ahead_layers + 1;
    p.pool_rule = fmt::format("gpu_ahead_layers {} + 1 of each kind", c.gpu_ahead_layers);
  } else {
    // Split evenly; the odd buffer goes to attn, the kind that is fetched first in a layer.
    ffn_buffers = std::max<int64_t>(1, c.gpu_max_groups / 2);
    attn_buffers = std::max<int64_t>(1, c.gpu_max_groups - ffn_buffers);
    p.pool_rule = fmt::format("gpu_max_groups {} split between kinds", c.gpu_max_groups);
  }
  auto with_resident = [&](int64_t r) {
    // More buffers than streamed layers would only hold layers for good: cap at the streamed count.
    const int64_t streamed = m.n_layers - r;
    p.resident_layers = r;
    p.resident_bytes = u(r) * p.layer_bytes;
    p.pool_attn_buffers = std::min(attn_buffers, streamed);
    p.pool_ffn_buffers = std::min(ffn_buffers, streamed);
    p.pool_bytes = u(p.pool_attn_buffers) * p.attn_group_bytes + u(p.pool_ffn_buffers) * p.ffn_group_bytes;
    p.total_bytes = fixed + p.resident_bytes + p.pool_bytes;
  };
  if (c.resident_layers != kAuto) {
    if (c.resident_layers > m.n_layers)
      throw ConfigError(fmt::format("resident_layers {} is more than the model's {} layers", c.resident_layers,
                                    m.n_layers));
    with_resident(c.resident_layers);
  } else if (pinned_resident != kAuto) {
    p.resident_auto = true;
    with_resident(pinned_resident);
  } else {
    // The total grows with r (a resident layer costs what it frees in the pool, or more), so the
    // first count from the top that fits is the most that fits.
    p.resident_auto = true;
    int64_t r = m.n_layers;
    for (; r > 0; --r) {
      with_resident(r);
      if (p.total_bytes <= p.budget_bytes) break;
    }
    with_resident(r);
  }
  p.fits = p.total_bytes <= p.budget_bytes;
  return p;
}

void set_key(Config& c, const std::string& key, int64_t v) {
  if (key == "gpu_ahead_layers") c.gpu_ahead_layers = v;
  else if (key == "gpu_max_groups") c.gpu_max_groups = v;
  else if (key == "batch_size") c.batch_size = v;
  else if (key == "max_context") c.max_context = v;
  else if (key == "prefill_chunk_tokens") c.prefill_chunk_tokens = v;
  else if (key == "resident_layers") c.resident_layers = v;
  else if (key == "kv_block_tokens") c.kv_block_tokens = v;
  else throw Error(fmt::format("planner: no key '{}' to change", key));
}

int64_t get_key(const Config& c, const std::string& key) {
  if (key == "gpu_ahead_layers") return c.gpu_ahead_layers;
  if (key == "gpu_max_groups") return c.gpu_max_groups;
  if (key == "batch_size") return c.batch_size;
  if (key == "max_context") return c.max_context;
  if (key == "prefill_chunk_tokens") return c.prefill_chunk_tokens;
  if (key == "resident_layers") return c.resident_layers;
  if (key == "kv_block_tokens") return c.kv_block_tokens;
  throw Error(fmt::format("planner: no key '{}' to read", key));
}

// Lowering max_context below the prefill chunk takes the chunk down with it (a chunk is never
// longer than a sequence).
Config lowered(Config c, const std::string& key, int64_t v) {
  set_key(c, key, v);
  if (key == "max_context") c.prefill_chunk_tokens = std::min(c.prefill_chunk_tokens, v);
  return c;
}

// Token counts below `current`: multiples of 256, then powers of two, down to `floor`.
std::vector<int64_t> token_candidates(int64_t current, int64_t floor) {
  std::vector<int64_t> v;
  for (int64_t x = (current - 1) / 256 * 256; x >= 256 && x >= floor; x -= 256) v.push_back(x);
  for (int64_t x = 128; x >= floor; x /= 2)
    if (x < current) v.push_back(x);
  if (floor < current && (v.empty() || v.back() != floor)) v.push_back(floor);
  return v;
}

std::vector<int64_t> count_candidates(int64_t current, int64_t floor) {
  std::vector<int64_t> v;
  for (int64_t x = current - 1; x >= floor; --x) v.push_back(x);
  return v;
}

Suggestion suggestion_between(const Config& from, const Config& to, uint64_t total_from, uint64_t total_to,
                              bool fits) {
  Suggestion s;
  for (const char* key : {"resident_layers", "gpu_ahead_layers", "gpu_max_groups", "batch_size", "max_context",
                          "prefill_chunk_tokens", "kv_block_tokens"}) {
    if (get_key(from, key) != get_key(to, key)) s.changes.push_back({key, get_key(from, key), get_key(to, key)});
  }
  s.saves = total_from > total_to ? total_from - total_to : 0;
  s.fits = fits;
  return s;
}

std::vector<Suggestion> suggest(const Manifest& man, const Config& c, const PlanInputs& in, const MemoryPlan& p) {
  const int64_t pin = c.resident_layers == kAuto ? p.resident_layers : kAuto;
  auto total = [&](const Config& x, bool* fits) {
    MemoryPlan q = plan_core(man, x, in, pin);
    *fits = q.fits;
    return q.total_bytes;
  };

  std::vector<std::string> keys;
  if (c.resident_layers != kAuto && c.resident_layers > 0 && !in.all_resident) keys.push_back("resident_layers");
  if (p.pool_bytes > 0) keys.push_back(c.gpu_max_groups == kAuto ? "gpu_ahead_layers" : "gpu_max_groups");
  keys.push_back("batch_size");
  keys.push_back("max_context");
  keys.push_back("prefill_chunk_tokens");
  if (p.kv_waste_bytes > 0) keys.push_back("kv_block_tokens");
  auto candidates = [&](const std::string& key, const Config& x) {
    const int64_t v = get_key(x, key);
    if (key == "resident_layers") return count_candidates(v, 0);
    if (key == "gpu_ahead_layers") return count_candidates(v, 1);
    if (key == "gpu_max_groups") return count_candidates(v, 2);
    if (key == "batch_size") return count_candidates(v, 1);
    if (key == "max_context") return token_candidates(v, x.kv_block_tokens);
    if (key == "prefill_chunk_tokens") return token_candidates(v, std::min<int64_t>(16, v));
    return count_candidates(v, 1);  // kv_block_tokens
  };

  std::vector<Suggestion> out;
  for (const std::string& key : keys) {
    std::optional<Suggestion> best;
    for (int64_t v : candidates(key, c)) {
      const Config x = lowered(c, key, v);
      bool fits = false;
      const uint64_t t = total(x, &fits);
      Suggestion s = suggestion_between(c, x, p.total_bytes, t, fits);
      if (fits) {
        best = s;  // the nearest value that fits: the smallest change
        break;
      }
      if (!best || s.saves > best->saves) best = s;
    }
    if (best && best->saves > 0) out.push_back(*best);
  }

  // Together: one step of each key in turn until it fits, then each raised back as far as it
  // still fits; a milder fix than cutting one key to the bone, and the only one when no key alone
  // is enough.
  {
    Config x = c;
    bool fits = false;
    for (bool moved = true; moved && !fits;) {
      moved = false;
      for (const std::string& key : keys) {
        if (key == "kv_block_tokens") continue;
        const int64_t v = get_key(x, key);
        int64_t next = v - 1;
        if (key == "max_context") next = std::max(x.kv_block_tokens, v / 2);
        if (key == "prefill_chunk_tokens") next = std::max<int64_t>(std::min<int64_t>(16, v), v / 2);
        const std::vector<int64_t> allowed = candidates(key, x);
        if (allowed.empty() || next >= v) continue;
        if (next < allowed.back()) next = allowed.back();
        x = lowered(x, key, next);
        moved = true;
        total(x, &fits);
        if (fits) break;
      }
    }
    if (fits) {
      // The last steps may overshoot: raise each key back toward its value while it still fits.
      for (auto key = keys.rbegin(); key != keys.rend(); ++key) {
        if (*key == "kv_block_tokens") continue;
        const int64_t now = get_key(x, *key);
        std::vector<int64_t> back = {get_key(c, *key)};
        for (int64_t v : candidates(*key, c))
          if (v > now) back.push_back(v);
        for (int64_t v : back) {
          if (*key == "prefill_chunk_tokens" && v > x.max_context) continue;  // a chunk fits a sequence
          bool f = false;
          const Config y = lowered(x, *key, v);
          total(y, &f);
          if (f) {
            x = y;
            break;
          }
        }
      }
      bool f = false;
      const uint64_t t = total(x, &f);
      Suggestion s = suggestion_between(c, x, p.total_bytes, t, true);
      const bool same_as_single = std::any_of(out.begin(), out.end(), [&](const Suggestion& o) {
        return o.changes.size() == s.changes.size() &&
               std::equal(o.changes.begin(), o.changes.end(), s.changes.begin(), [](const auto& a, const auto& b) {
                 return a.key == b.key && a.to == b.to;
               });
      });
      if (!same_as_single) out.push_back(s);
    }
  }
  return out;
}

}  // namespace

std::string format_bytes(uint64_t b) {
  if (b >= kGiB) return fmt::format("{:.1f} GiB", static_cast<double>(b) / kGiB);
  if (b >= kMiB) return fmt::format("{:.1f} MiB", static_cast<double>(b) / kMiB);
  if (b >= 1024) return fmt::format("{:.1f} KiB", static_cast<double>(b) / 1024);
  return fmt::format("{} B", b);
}

PlanInputs estimated_inputs(uint64_t device_bytes) {
  PlanInputs in;
  in.device_total_bytes = device_bytes;
  in.device_free_bytes = device_bytes;
  in.context_bytes = kEstimatedContextBytes;
  in.cublas_bytes = kEstimatedCublasBytes;
  in.measured = false;
  return in;
}

Config Suggestion::apply(Config c) const {
  for (const auto& ch : changes) set_key(c, ch.key, ch.to);
  return c;
}

std::string Suggestion::text() const {
  std::string s;
  for (size_t i = 0; i < changes.size(); ++i) {
    if (i) s += ", ";
    s += fmt::format("{} {} -> {}", changes[i].key, changes[i].from, changes[i].to);
  }
  return s + fmt::format(" saves {}", format_bytes(saves));
}

MemoryPlan plan_memory(const Manifest& manifest, const Config& config, const PlanInputs& inputs) {
  Config c = config;
  if (inputs.all_resident) c.resident_layers = manifest.model.n_layers;
  MemoryPlan p = plan_core(manifest, c, inputs, kAuto);
  if (!p.fits) p.suggestions = suggest(manifest, c, inputs, p);
  return p;
}

std::vector<TableLine> MemoryPlan::lines() const {
  std::vector<TableLine> v;
  const char* est = measured ? "measured at start" : "estimate (--plan-only)";
  v.push_back({"CUDA context", context_bytes, est});
  v.push_back({"cuBLAS", cublas_bytes, fmt::format("{}: handle and GEMM workspace", est)});
  v.push_back({"resident globals", globals_bytes, globals_note});
  std::string rnote = fmt::format("{} of {} layers x {}", resident_layers, n_layers, format_bytes(layer_bytes));
  if (resident_auto) rnote += " (auto: the room left)";
  v.push_back({"resident layers", resident_bytes, rnote});
  if (resident_layers == n_layers) {
    v.push_back({"group pool", 0, "not needed: every layer is resident"});
  } else {
    std::string note = fmt::format("{} attn x {} + {} ffn x {}", pool_attn_buffers, format_bytes(attn_group_bytes),
                                   pool_ffn_buffers, format_bytes(ffn_group_bytes));
    note += fmt::format(" ({}", pool_rule);
    if (pool_attn_buffers == n_layers - resident_layers || pool_ffn_buffers == n_layers - resident_layers)
      note += fmt::format(", capped at the {} streamed layers", n_layers - resident_layers);
    note += ")";
    v.push_back({"group pool", pool_bytes, note});
  }
  v.push_back({"KV cache", kv_bytes,
               fmt::format("{} blocks ({} seqs x {}) x {} a block ({} tokens of bf16 K and V, {} layers)", kv_blocks,
                           batch_size, kv_blocks_per_sequence, format_bytes(kv_block_bytes), kv_block_tokens,
                           n_layers)});
  v.push_back({"KV rounding waste", kv_waste_bytes,
               fmt::format("included above: {} tokens ({} seqs x ({} x {} - {}))", kv_waste_tokens, batch_size,
                           kv_blocks_per_sequence, kv_block_tokens, max_context),
               true});
  v.push_back({"KV block table", static_cast<uint64_t>(kv_blocks) * kInt32, "one int32 block id per block"});
  v.push_back({"activations", activation_bytes,
               fmt::format("one layer at {} tokens (batch {} x prefill chunk {})", activation_tokens, batch_size,
                           prefill_chunk_tokens)});
  for (const auto& a : activations) v.push_back({a.name, a.bytes, a.note, true});
  v.push_back({"workspace", workspace_bytes,
               fmt::format("decode attention: {} seqs x {} splits x (head_dim + 2) fp32 per head; the sampler's "
                           "scratch comes out of it{}",
                           std::min<int64_t>(batch_size, kDecodeAttentionSplitSeqs), kDecodeAttentionSplits,
                           dequant_bytes ? fmt::format("; at least {} for packed weights dequantized in slices",
                                                       format_bytes(dequant_bytes))
                                         : std::string())});
  v.push_back({"free guard", guard_bytes, fmt::format("free_guard_mb {}", guard_bytes / kMiB)});
  return v;
}

std::string MemoryPlan::table() const {
  std::string out = fmt::format("{:<24} {:>14}  {:>10}  {}\n", "component", "bytes", "size", "note");
  for (const auto& l : lines()) {
    const std::string name = l.sub ? "  " + l.component : l.component;
    out += fmt::format("{:<24} {:>14}  {:>10}  {}\n", name, l.bytes, format_bytes(l.bytes), l.note);
  }
  std::string verdict;
  if (fits)
    verdict = fmt::format("fits ({} spare)", format_bytes(budget_bytes - total_bytes));
  else
    verdict = fmt::format("does not fit ({} over)", format_bytes(total_bytes - budget_bytes));
  out += fmt::format("{:<24} {:>14}  {:>10}  budget {} ({}): {}\n", "total", total_bytes, format_bytes(total_bytes),
                     format_bytes(budget_bytes), budget_note, verdict);
  return out;
}

std::string MemoryPlan::refusal() const {
  if (fits) return "";
  std::string out = fmt::format("the plan does not fit: it needs {}, the budget is {} ({}), {} over.\n",
                                format_bytes(total_bytes), format_bytes(budget_bytes), budget_note,
                                format_bytes(total_bytes - budget_bytes));
  std::vector<const Suggestion*> singles, combined;
  for (const auto& s : suggestions) {
    const bool one_key = s.changes.size() == 1 || (s.changes.size() == 2 && s.changes[0].key == "max_context" &&
                                                   s.changes[1].key == "prefill_chunk_tokens");
    (one_key ? singles : combined).push_back(&s);
  }
  if (!singles.empty()) {
    out += fmt::format("lower one of these (each figure is what that change alone saves for this model{}):\n",
                       resident_auto ? ", resident layers held at " + std::to_string(resident_layers) : "");
    for (const Suggestion* s : singles)
      out += fmt::format("  {}: {}\n", s->text(), s->fits ? "fits" : "not enough alone");
  }
  for (const Suggestion* s : combined) out += fmt::format("or all of these together: {}: fits\n", s->text());
  if (suggestions.empty() || (combined.empty() && std::none_of(singles.begin(), singles.end(),
                                                               [](const Suggestion* s) { return s->fits; }))) {
    out += fmt::format(
        "no setting the planner may lower makes it fit: the CUDA context, cuBLAS, the globals and the free guard "
        "alone need {}; use a larger card or a model with smaller globals\n",
        format_bytes(context_bytes + cublas_bytes + globals_bytes + guard_bytes));
  }
  return out;
}

}  // namespace ringllama
