#include "worker/generation.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <memory>

#include "common/errors.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

struct Running {
  size_t req = 0;
  int64_t fed = 0;  // prompt tokens in the cache
  std::unique_ptr<Sampler> sampler;
};

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

}  // namespace

std::vector<GenResult> generate_all(Backend& b, const std::vector<GenRequest>& requests, bool with_logits,
                                    const TokenSink& sink, GenStats* stats) {
  const StepLimits& lim = b.limits();
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenRequest& r = requests[i];
    RL_REQUIRE(!r.prompt.empty(), "request {}: the prompt is empty", i);
    RL_REQUIRE(r.max_tokens >= 1, "request {}: max_tokens must be >= 1 (got {})", i, r.max_tokens);
    const int64_t need = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
    RL_REQUIRE(need <= lim.max_context,
               "request {}: the prompt ({} tokens) plus max_tokens ({}) is {} tokens, over max_context ({})", i,
               r.prompt.size(), r.max_tokens, need, lim.max_context);
    r.sampling.validate();
  }
  GenStats st;
  std::vector<GenResult> results(requests.size());
  std::deque<size_t> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(i);
  std::vector<Running> running;
  const auto t0 = Clock::now();

  auto finish = [&](size_t k, const char* reason) {
    const size_t req = running[k].req;
    results[req].reason = reason;
    results[req].done_s = seconds(t0, Clock::now());
    b.free_sequence(static_cast<int64_t>(req));
    running.erase(running.begin() + static_cast<std::ptrdiff_t>(k));
  };

  while (!waiting.empty() || !running.empty()) {
    while (!waiting.empty() && static_cast<int64_t>(running.size()) < lim.max_items) {
      Running r;
      r.req = waiting.front();
      waiting.pop_front();
      r.sampler = std::make_unique<Sampler>(requests[r.req].sampling);
      b.add_sequence(static_cast<int64_t>(r.req));
      running.push_back(std::move(r));
    }
    // One item per running sequence: its next prompt chunk, or its last token; and the sampling
    // row of each item that will draw a token (the sampler's step moves on as the row is made).
    std::vector<StepItem> items;
    std::vector<SampleParams> params;
    bool prefill = false;
    for (Running& r : running) {
      const GenRequest& q = requests[r.req];
      const int64_t P = static_cast<int64_t>(q.prompt.size());
      StepItem it;
      it.seq = static_cast<int64_t>(r.req);
      if (r.fed < P) {
        const int64_t n = std::min(lim.max_item_tokens, P - r.fed);
        it.tokens.assign(q.prompt.begin() + r.fed, q.prompt.begin() + r.fed + n);
        it.want_logits = r.fed + n == P;
        prefill = true;
        st.prefill_tokens += n;
      } else {
        it.tokens = {results[r.req].tokens.back()};
        st.decode_tokens += 1;
      }
      params.push_back(it.want_logits ? r.sampler->next_row_params() : SampleParams{});
      items.push_back(std::move(it));
    }
    // Tokens are drawn where the logits are (on the device for the CUDA backend); the rows come
    // back only when the sink wants them, and the draws are the same either way.
    const auto ts = Clock::now();
    std::vector<std::vector<float>> rows;
    const std::vector<int32_t> picked = b.step_sample(items, params, with_logits ? &rows : nullptr);
    const double dt = seconds(ts, Clock::now());
    (prefill ? st.prefill_s : st.decode_s) += dt;
    ++st.steps;

    static const std::vector<float> kNoRow;
    for (size_t k = running.size(); k-- > 0;) {  // backwards: finish() erases
      Running& r = running[k];
      const StepItem& it = items[k];
      const GenRequest& q = requests[r.req];
      if (r.fed < static_cast<int64_t>(q.prompt.size())) r.fed += static_cast<int64_t>(it.tokens.size());
      if (!it.want_logits) continue;
      const int32_t tok = picked[k];
      GenResult& res = results[r.req];
      if (res.tokens.empty()) res.first_token_s = seconds(t0, Clock::now());
      res.tokens.push_back(tok);
      if (sink) sink(r.req, tok, with_logits ? rows[k] : kNoRow);
      if (q.stop.count(tok)) finish(k, "stop");
      else if (static_cast<int64_t>(res.tokens.size()) >= q.max_tokens) finish(k, "length");
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
