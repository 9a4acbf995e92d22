// Generation for many requests on one backend: a queue of prompts, up to limits().max_items of them
// running at once; each step carries every running sequence's next prompt chunk or decode token,
// and a finished sequence's place goes to the next waiting prompt (DESIGN.md "A step").
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "worker/backend.h"
#include "worker/sampler.h"

namespace ringllama {

struct GenRequest {
  std::vector<int32_t> prompt;  // token ids, used as given
  int64_t max_tokens = 16;      // most tokens to generate (>= 1)
  SamplingParams sampling;
  std::set<int32_t> stop;       // ids that end the generation (kept in the output): stop ids, eos
};

struct GenResult {
  std::vector<int32_t> tokens;  // generated ids
  std::string reason;           // "length" or "stop"
  double first_token_s = 0;     // from the start of the run to the first generated token
  double done_s = 0;            // from the start of the run to the last
};

struct GenStats {
  int64_t steps = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;  // prompt tokens and decode tokens run
  double prefill_s = 0, decode_s = 0;  // time of steps that carried prompt chunks / only decode tokens
};

// Called for every generated token, in order per request: (request index, token id, its logits row;
// empty unless the run was asked for logits).
using TokenSink = std::function<void(size_t, int32_t, const std::vector<float>&)>;

// Runs every request to its end. Sequence ids are the request indices; each is freed when its
// request ends. Every token is drawn by the backend (Backend::step_sample with each sequence's
// Sampler::next_row_params()), on the device for the CUDA backend, so only ids come back from it;
// with_logits: the logits rows come back too and the sink gets them. Throws Error on a request that
// cannot fit (prompt + max_tokens over max_context) before running anything.
std::vector<GenResult> generate_all(Backend& b, const std::vector<GenRequest>& requests, bool with_logits,
                                    const TokenSink& sink, GenStats* stats = nullptr);

// A line of token ids separated by commas and/or blanks ("1,2 3"); each in [0, vocab).
// `what` names the line in errors.
std::vector<int32_t> parse_id_line(const std::string& line, const std::string& what, int64_t vocab);

}  // namespace ringllama
