#include "worker/generation.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <deque>

#include "common/errors.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

}  // namespace

void GenRequest::validate(const StepLimits& lim, const std::string& what) const {
  RL_REQUIRE(!prompt.empty(), "{}: the prompt is empty", what);
  RL_REQUIRE(max_tokens >= 1, "{}: max_tokens must be >= 1 (got {})", what, max_tokens);
  const int64_t need = static_cast<int64_t>(prompt.size()) + max_tokens;
  RL_REQUIRE(need <= lim.max_context,
             "{}: the prompt ({} tokens) plus max_tokens ({}) is {} tokens, over max_context ({})", what,
             prompt.size(), max_tokens, need, lim.max_context);
  for (size_t i = 0; i < prompt.size(); ++i)
    RL_REQUIRE(prompt[i] >= 0 && prompt[i] < lim.vocab_size, "{}: prompt token {} = {} is outside the vocabulary [0, {})",
               what, i, prompt[i], lim.vocab_size);
  RL_REQUIRE(logprobs >= -1 && logprobs <= kMaxTopLogprobs, "{}: logprobs must be -1 (none) to {} (got {})", what,
             kMaxTopLogprobs, logprobs);
  sampling.validate();
}

TokenLogprobs token_logprobs(const std::vector<float>& row, int32_t token, int64_t top) {
  RL_REQUIRE(token >= 0 && static_cast<size_t>(token) < row.size(), "token {} outside a logits row of {}", token,
             row.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (float v : row) mx = std::max(mx, static_cast<double>(v));
  double sum = 0;
  for (float v : row) sum += std::exp(static_cast<double>(v) - mx);
  const double log_z = mx + std::log(sum);
  TokenLogprobs out;
  out.logprob = static_cast<double>(row[static_cast<size_t>(token)]) - log_z;
  const size_t k = std::min(row.size(), static_cast<size_t>(std::max<int64_t>(0, top)));
  if (k > 0) {
    std::vector<int32_t> idx(row.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
    std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(k), idx.end(),
                      [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (size_t i = 0; i < k; ++i) out.top.emplace_back(idx[i], static_cast<double>(row[idx[i]]) - log_z);
  }
  return out;
}

RunningBatch::~RunningBatch() {
  for (int64_t seq : order_)
    if (b_.has_sequence(seq)) b_.free_sequence(seq);
}

void RunningBatch::add(int64_t seq, GenRequest r) {
  RL_REQUIRE(!has(seq), "sequence {} is already running", seq);
  b_.add_sequence(seq);
  Seq s;
  s.sampler = std::make_unique<Sampler>(r.sampling);
  s.req = std::move(r);
  running_.emplace(seq, std::move(s));
  order_.push_back(seq);
}

void RunningBatch::remove(int64_t seq) {
  if (!has(seq)) return;
  running_.erase(seq);
  order_.erase(std::find(order_.begin(), order_.end(), seq));
  b_.free_sequence(seq);
}

int64_t RunningBatch::prompt_left(int64_t seq) const {
  auto it = running_.find(seq);
  return it == running_.end() ? 0 : static_cast<int64_t>(it->second.req.prompt.size()) - it->second.fed;
}

std::vector<RunningBatch::Token> RunningBatch::step(GenStats* stats) {
  const StepLimits& lim = b_.limits();
  // One item per running sequence: its next prompt chunk, or its last token; and the sampling
  // row of each item that will draw a token (the sampler's step moves on as the row is made).
  std::vector<StepItem> items;
  std::vector<SampleParams> params;
  int64_t prefill_tokens = 0, decode_tokens = 0;
  for (int64_t seq : order_) {
    Seq& s = running_.at(seq);
    const int64_t P = static_cast<int64_t>(s.req.prompt.size());
    StepItem it;
    it.seq = seq;
    if (s.fed < P) {
      const int64_t n = std::min(lim.max_item_tokens, P - s.fed);
      it.tokens.assign(s.req.prompt.begin() + s.fed, s.req.prompt.begin() + s.fed + n);
      it.want_logits = s.fed + n == P;
      prefill_tokens += n;
    } else {
      it.tokens = {s.out.back()};
      decode_tokens += 1;
    }
    items.push_back(std::move(it));
  }
  // Sampling rows are made only once every item is built: a pass that throws while the items are
  // checked leaves no sampler moved past a draw it did not make.
  for (size_t k = 0; k < items.size(); ++k)
    params.push_back(items[k].want_logits ? running_.at(items[k].seq).sampler->next_row_params() : SampleParams{});
  // Tokens are drawn where the logits are (on the device for the CUDA backend); the rows come
  // back only when they are wanted, and the draws are the same either way.
  const auto ts = Clock::now();
  std::vector<std::vector<float>> rows;
  bool want_rows = with_logits_;
  for (const StepItem& it : items) want_rows = want_rows || (it.want_logits && running_.at(it.seq).req.logprobs >= 0);
  const std::vector<int32_t> picked = b_.step_sample(items, params, want_rows ? &rows : nullptr);
  const double dt = seconds(ts, Clock::now());
  if (stats) {
    (prefill_tokens > 0 ? stats->prefill_s : stats->decode_s) += dt;
    stats->prefill_tokens += prefill_tokens;
    stats->decode_tokens += decode_tokens;
    ++stats->steps;
  }

  std::vector<Token> out;
  std::vector<int64_t> ended;
  for (size_t k = 0; k < items.size(); ++k) {
    const StepItem& it = items[k];
    Seq& s = running_.at(it.seq);
    if (s.fed < static_cast<int64_t>(s.req.prompt.size())) s.fed += static_cast<int64_t>(it.tokens.size());
    if (!it.want_logits) continue;
    Token t;
    t.seq = it.seq;
    t.token = picked[k];
    t.index = static_cast<int64_t>(s.out.size());
    s.out.push_back(t.token);
    if (s.req.stop.count(t.token)) t.end = "stop";
    else if (s.req.eos.count(t.token)) t.end = "eos";
    else if (static_cast<int64_t>(s.out.size()) >= s.req.max_tokens) t.end = "length";
    if (s.req.logprobs >= 0) t.logprobs = token_logprobs(rows[k], t.token, s.req.logprobs);
    if (with_logits_) t.logits = std::move(rows[k]);
    if (t.end) ended.push_back(it.seq);
    out.push_back(std::move(t));
  }
  for (int64_t seq : ended) remove(seq);
  return out;
}

std::vector<GenResult> generate_all(Backend& b, const std::vector<GenRequest>& requests, bool with_logits,
                                    const TokenSink& sink, GenStats* stats) {
  const StepLimits& lim = b.limits();
  for (size_t i = 0; i < requests.size(); ++i) requests[i].validate(lim, fmt::format("request {}", i));
  GenStats st;
  std::vector<GenResult> results(requests.size());
  std::deque<size_t> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(i);
  RunningBatch batch(b, with_logits);
  const auto t0 = Clock::now();
  static const std::vector<float> kNoRow;
  while (!waiting.empty() || !batch.empty()) {
    while (!waiting.empty() && static_cast<int64_t>(batch.size()) < lim.max_items) {
      batch.add(static_cast<int64_t>(waiting.front()), requests[waiting.front()]);
      waiting.pop_front();
    }
    for (const RunningBatch::Token& t : batch.step(&st)) {
      GenResult& res = results[static_cast<size_t>(t.seq)];
      const double now = seconds(t0, Clock::now());
      if (res.tokens.empty()) res.first_token_s = now;
      res.tokens.push_back(t.token);
      if (sink) sink(static_cast<size_t>(t.seq), t.token, with_logits ? t.logits : kNoRow);
      if (t.end) {
        res.reason = t.end;
        res.done_s = now;
      }
    }
  }
  if (stats) *stats = st;
  return results;
}

std::vector<int32_t> parse_id_line(const std::string& line, const std::string& what, int64_t vocab) {
  std::vector<int32_t> ids;
  size_t at = 0;
  const char* seps = ", \t\r";
  bool after_comma = false;
  while (true) {
    size_t b = line.find_first_not_of(" \t\r", at);
    if (b == std::string::npos) {
      if (after_comma) fail("{}: a comma with no id after it in '{}'", what, line);
      break;
    }
    if (line[b] == ',') {
      if (ids.empty() || after_comma) fail("{}: empty id in '{}'", what, line);
      after_comma = true;
      at = b + 1;
      continue;
    }
    size_t e = line.find_first_of(seps, b);
    if (e == std::string::npos) e = line.size();
    const std::string item = line.substr(b, e - b);
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno == ERANGE) fail("{}: '{}' is not a token id", what, item);
    if (v < 0 || v >= vocab) fail("{}: token id {} is outside the vocabulary [0, {})", what, v, vocab);
    ids.push_back(static_cast<int32_t>(v));
    after_comma = false;
    at = e;
  }
  if (ids.empty()) fail("{}: no token ids", what);
  return ids;
}

}  // namespace ringllama
