#include "worker/backend.h"

#include <algorithm>

#include "common/errors.h"
#include "worker/sampler.h"

namespace ringllama {

namespace {

StepLimits make_limits(const ModelConfig& m, const Config& c) {
  RL_REQUIRE(c.max_context > 0, "max_context must be > 0 (got {})", c.max_context);
  RL_REQUIRE(c.batch_size > 0, "batch_size must be > 0 (got {})", c.batch_size);
  StepLimits l;
  l.max_items = c.batch_size;
  l.max_item_tokens = std::max<int64_t>(1, std::min(c.prefill_chunk_tokens, c.max_context));
  l.max_context = c.max_context;
  l.vocab_size = m.vocab_size;
  return l;
}

}  // namespace

Backend::Backend(const ModelConfig& m, const Config& config)
    : model_(m),
      limits_(make_limits(m, config)),
      kv_(config.kv_block_tokens,
          config.batch_size * ((config.max_context + config.kv_block_tokens - 1) / std::max<int64_t>(1, config.kv_block_tokens)),
          config.max_context) {}

namespace {

// The rows of a pass, one per logits row, given back to the items they came from (empty rows for
// the items that want no logits).
std::vector<std::vector<float>> rows_by_item(const StepLayout& layout, const std::vector<float>& logits, size_t vocab) {
  std::vector<std::vector<float>> rows(static_cast<size_t>(layout.items()));
  for (size_t r = 0; r < layout.logit_item.size(); ++r)
    rows[layout.logit_item[r]].assign(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
  return rows;
}

std::vector<int32_t> ids_by_item(const StepLayout& layout, const std::vector<int32_t>& picked) {
  std::vector<int32_t> ids(static_cast<size_t>(layout.items()), -1);
  for (size_t r = 0; r < layout.logit_item.size(); ++r) ids[layout.logit_item[r]] = picked[r];
  return ids;
}

}  // namespace

std::vector<std::vector<float>> Backend::step(const std::vector<StepItem>& items) {
  const StepLayout layout = kv_.prepare(items, limits_);
  std::vector<float> logits;
  StepOutput out;
  out.logits = &logits;
  run_step(layout, out);
  kv_.commit(layout);
  return rows_by_item(layout, logits, static_cast<size_t>(model_.vocab_size));
}

std::vector<int32_t> Backend::step_greedy(const std::vector<StepItem>& items) {
  const StepLayout layout = kv_.prepare(items, limits_);
  std::vector<int32_t> picked;
  StepOutput out;
  out.ids = &picked;
  run_step(layout, out);
  kv_.commit(layout);
  return ids_by_item(layout, picked);
}

std::vector<int32_t> Backend::step_sample(const std::vector<StepItem>& items, const std::vector<SampleParams>& params,
                                          std::vector<std::vector<float>>* logits) {
  RL_REQUIRE(params.size() == items.size(), "step_sample: {} sampling rows for {} items", params.size(),
             items.size());
  const StepLayout layout = kv_.prepare(items, limits_);
  std::vector<SampleParams> rows(layout.logit_item.size());
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = params[layout.logit_item[r]];
  std::vector<int32_t> picked;
  std::vector<float> flat;
  StepOutput out;
  out.ids = &picked;
  out.sample = &rows;
  if (logits) out.logits = &flat;
  run_step(layout, out);
  kv_.commit(layout);
  if (logits) *logits = rows_by_item(layout, flat, static_cast<size_t>(model_.vocab_size));
  return ids_by_item(layout, picked);
}

std::vector<float> Backend::forward(const std::vector<int32_t>& tokens, int64_t start_pos) {
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (!has_sequence(0)) add_sequence(0);
  RL_REQUIRE(T > 0, "forward needs at least one token");
  RL_REQUIRE(start_pos == cached_tokens(0), "forward at position {}, but the sequence has {} cached positions",
             start_pos, cached_tokens(0));
  RL_REQUIRE(start_pos + T <= limits_.max_context, "a context of {} tokens exceeds max_context ({})", start_pos + T,
             limits_.max_context);
  // All checked before the first chunk, so that a bad id late in a long prompt caches nothing.
  for (int64_t t = 0; t < T; ++t)
    RL_REQUIRE(tokens[t] >= 0 && tokens[t] < model_.vocab_size,
               "token {} at position {} is outside the vocabulary [0, {})", tokens[t], start_pos + t,
               model_.vocab_size);
  std::vector<float> last;
  for (int64_t c0 = 0; c0 < T; c0 += limits_.max_item_tokens) {
    const int64_t n = std::min(limits_.max_item_tokens, T - c0);
    StepItem it{0, std::vector<int32_t>(tokens.begin() + c0, tokens.begin() + c0 + n), c0 + n == T};
    auto rows = step({it});
    if (c0 + n == T) last = std::move(rows[0]);
  }
  return last;
}

void Backend::score(const std::vector<int32_t>& tokens, int64_t start_pos,
                    const std::function<void(int64_t, const float*)>& row) {
  RL_REQUIRE(scores_every_row(), "the {} backend returns no logits for every position", name());
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (!has_sequence(0)) add_sequence(0);
  RL_REQUIRE(start_pos == cached_tokens(0), "score at position {}, but the sequence has {} cached positions",
             start_pos, cached_tokens(0));
  const size_t vocab = static_cast<size_t>(model_.vocab_size);
  for (int64_t c0 = 0; c0 < T; c0 += limits_.max_item_tokens) {
    const int64_t n = std::min(limits_.max_item_tokens, T - c0);
    StepLayout layout = kv_.prepare({StepItem{0, std::vector<int32_t>(tokens.begin() + c0, tokens.begin() + c0 + n),
                                              true}},
                                    limits_);
    // Every row of the one item, not only its last.
    layout.logit_rows.clear();
    layout.logit_item.clear();
    for (int64_t r = 0; r < layout.rows(); ++r) {
      layout.logit_rows.push_back(layout.row0[0] + r);
      layout.logit_item.push_back(0);
    }
    std::vector<float> logits;
    StepOutput out;
    out.logits = &logits;
    run_step(layout, out);
    kv_.commit(layout);
    for (int64_t r = 0; r < n; ++r) row(start_pos + c0 + r, logits.data() + static_cast<size_t>(r) * vocab);
  }
}

void Backend::reset() {
  if (has_sequence(0)) free_sequence(0);
}

}  // namespace ringllama
