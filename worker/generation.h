// Generation for many requests on one backend (DESIGN.md "A step"). RunningBatch is the piece
// every caller shares: the sequences running together, one item each per step (the next prompt
// chunk, or the last token), each token drawn by the backend with its sequence's sampler.
// generate_all runs a fixed list of requests through it; the worker's scheduler
// (worker/scheduler.h) feeds it requests as they arrive.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/protocol.h"
#include "worker/backend.h"
#include "worker/sampler.h"

namespace ringllama {

struct GenRequest {
  std::vector<int32_t> prompt;  // token ids, used as given
  int64_t max_tokens = 16;      // most tokens to generate (>= 1)
  SamplingParams sampling;
  std::set<int32_t> stop;       // ids that end the generation (kept in the output): reason "stop"
  std::set<int32_t> eos = {};   // the model's eos ids when they end it: reason "eos" (stop wins)
  int64_t logprobs = -1;        // >= 0: each token's log-probability and this many top ones; -1 = none

  // Throws Error naming `what`: an empty prompt, max_tokens < 1, prompt + max_tokens over
  // max_context, ids outside the vocabulary, bad sampling parameters.
  void validate(const StepLimits& lim, const std::string& what) const;
};

inline constexpr int64_t kMaxTopLogprobs = 20;  // the most top log-probabilities a request may ask for

// A drawn token's log-probability and the `top` most likely of its row (TokenLogprobs,
// common/protocol.h): the log-softmax of the logits row it was drawn from, before temperature,
// computed in double.
TokenLogprobs token_logprobs(const std::vector<float>& row, int32_t token, int64_t top);

struct GenResult {
  std::vector<int32_t> tokens;  // generated ids
  std::string reason;           // "length", "stop" or "eos"
  double first_token_s = 0;     // from the start of the run to the first generated token
  double done_s = 0;            // from the start of the run to the last
};

struct GenStats {
  int64_t steps = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;  // prompt tokens and decode tokens run
  double prefill_s = 0, decode_s = 0;  // time of steps that carried prompt chunks / only decode tokens
};

// The sequences that share each step. Sequence ids are the caller's; each is a backend sequence
// from add() until it ends (its last token, or remove()), when its KV blocks go back to the pool.
class RunningBatch {
 public:
  // with_logits: step() also hands back each token's logits row. Without it, the rows of a pass
  // come back from the backend only when one of its sequences wants log-probabilities.
  RunningBatch(Backend& b, bool with_logits) : b_(b), with_logits_(with_logits) {}
  ~RunningBatch();
  RunningBatch(const RunningBatch&) = delete;
  RunningBatch& operator=(const RunningBatch&) = delete;

  // Starts `seq` (a new backend sequence) for `r`, which must be valid (GenRequest::validate).
  void add(int64_t seq, GenRequest r);
  // Ends `seq` before its end (cancelled, client gone); nothing when it is not running.
  void remove(int64_t seq);
  bool has(int64_t seq) const { return running_.count(seq) != 0; }
  size_t size() const { return running_.size(); }
  bool empty() const { return running_.empty(); }
  // Prompt tokens of `seq` not yet in the cache.
  int64_t prompt_left(int64_t seq) const;

  struct Token {
    int64_t seq = 0;
    int32_t token = 0;
    int64_t index = 0;           // 0, 1, ... within the sequence
    const char* end = nullptr;   // "length", "stop" or "eos" when this token ends the sequence
    std::vector<float> logits;   // with_logits only
    std::optional<TokenLogprobs> logprobs;  // where the request asked for them (GenRequest::logprobs)
  };
  // One pass: every running sequence's next prompt chunk (at most limits().max_item_tokens) or
  // decode token, in the order they were added. Returns the tokens drawn, in that order; the
  // sequences they end are freed. When the pass throws, nothing is freed and the error goes on
  // (the caches are unchanged; the caller decides what the sequences become).
  std::vector<Token> step(GenStats* stats = nullptr);

 private:
  struct Seq {
    GenRequest req;
    int64_t fed = 0;  // prompt tokens in the cache
    std::vector<int32_t> out;
    std::unique_ptr<Sampler> sampler;
  };
  Backend& b_;
  bool with_logits_;
  std::map<int64_t, Seq> running_;
  std::vector<int64_t> order_;  // sequence ids in the order they were added
};

// Called for every generated token, in order per request: (request index, token id, its logits row;
// empty unless the run was asked for logits).
using TokenSink = std::function<void(size_t, int32_t, const std::vector<float>&)>;

// Runs every request to its end, up to limits().max_items at once: a finished sequence's place
// goes to the next waiting request. Sequence ids are the request indices. Every token is drawn by
// the backend (Backend::step_sample), on the device for the CUDA backend, so only ids come back
// from it; with_logits: the logits rows come back too and the sink gets them. Throws Error on a
// request that cannot fit (prompt + max_tokens over max_context) before running anything.
std::vector<GenResult> generate_all(Backend& b, const std::vector<GenRequest>& requests, bool with_logits,
                                    const TokenSink& sink, GenStats* stats = nullptr);

// A line of token ids separated by commas and/or blanks ("1,2 3"); each in [0, vocab).
// `what` names the line in errors.
std::vector<int32_t> parse_id_line(const std::string& line, const std::string& what, int64_t vocab);

}  // namespace ringllama
