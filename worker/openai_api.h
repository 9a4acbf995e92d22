// The OpenAI-compatible HTTP API's messages (DESIGN.md "HTTP / OpenAI API") as pure functions:
// request bodies in, checked requests out; the scheduler's replies in, OpenAI's JSON out. No
// sockets here, so that all of it is tested alone (tests/test_openai_api.cpp);
// worker/http_server.cpp serves it.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/errors.h"
#include "common/protocol.h"
#include "common/tokenizer.h"

namespace ringllama::openai {

// A request refused with an HTTP status and OpenAI's error object.
class ApiError : public Error {
 public:
  ApiError(int status, std::string type, const std::string& message, std::string param = {}, std::string code = {})
      : Error(message), status(status), type(std::move(type)), param(std::move(param)), code(std::move(code)) {}
  int status;
  std::string type;   // invalid_request_error, authentication_error, ...
  std::string param;  // the field at fault ("" = null)
  std::string code;   // model_not_found, ... ("" = null)
};

// 400 invalid_request_error naming `param`.
ApiError bad_param(const std::string& param, const std::string& message);
// {"error": {"message", "type", "param", "code"}}, param and code null when empty.
nlohmann::json error_body(const ApiError& e);
// The status and error type of a scheduler's error reply (bad_request 400, overloaded 429,
// unavailable 503, internal 500).
ApiError from_reply(const ErrorReply& e);

enum class Endpoint { Completions, Chat };

struct ApiRequest {
  Endpoint endpoint = Endpoint::Completions;
  std::string model;                 // "" = not given
  GenerateRequest gen;               // prompt (Text, Ids or Chat), sampling, ignore_eos; max_tokens 0 = not given
  std::vector<std::string> stop;     // stop strings (at most 4, none empty)
  int64_t logprobs = -1;             // -1 = none; else how many top log-probabilities per token
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage
};

inline constexpr size_t kMaxStops = 4;

// Parses a request body. Unknown fields are ignored; a field of the wrong type or out of range,
// several prompts, n other than 1, malformed JSON: ApiError 400 naming the field.
ApiRequest parse_request(Endpoint endpoint, std::string_view body);

// The served model's name, from the manifest's source ("hf:DIR" -> DIR's name, "gguf:FILE" -> the
// file's name without .gguf) or else the store directory's name.
std::string model_name(const std::string& manifest_source, const std::string& store_dir);

// "cmpl-..." or "chatcmpl-..." with 24 random hex digits.
std::string new_response_id(Endpoint endpoint);

// OpenAI's finish_reason of a done reply: length, else stop (eos, a stop id, a stop string).
const char* finish_reason(DoneReason r);

// Stop strings over streamed text. push() takes each piece and returns the text that can go out
// now: what could still be the start of a stop string is held back. Once a stop string is found,
// stopped() holds, and the text before it is the last ever returned (the stop string and what
// follows are dropped). flush() returns what is held at the end of the generation.
class StopMatcher {
 public:
  // Empty stop strings are ignored (one would match at once).
  explicit StopMatcher(std::vector<std::string> stops);
  std::string push(const std::string& piece);
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

// One generated token's log-probabilities, with the token's id.
struct LogprobEntry {
  int32_t token = 0;
  TokenLogprobs lp;
};

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// What every response and chunk carries.
struct ResponseHead {
  Endpoint endpoint = Endpoint::Completions;
  std::string id;
  int64_t created = 0;  // Unix seconds
  std::string model;
};

// The `logprobs` object of a choice: completions' {tokens, token_logprobs, top_logprobs,
// text_offset} (offsets from `text_offset`), chat's {content: [{token, logprob, bytes,
// top_logprobs}]}. Token strings are the tokenizer's decoding of each id alone.
nlohmann::json logprobs_json(Endpoint endpoint, const std::vector<LogprobEntry>& entries, const Tokenizer& tok,
                             int64_t text_offset = 0);

// The whole response of a request without stream. `logprobs`: null when not asked for.
nlohmann::json response_json(const ResponseHead& h, const std::string& text, const char* finish_reason,
                             const nlohmann::json& logprobs, const Usage& usage);
// A streamed chunk: chat's first chunk says the role (role_only); `finish` null until the last;
// `usage_null`: the chunk carries "usage": null (stream_options.include_usage).
nlohmann::json chunk_json(const ResponseHead& h, const std::string& text, const char* finish,
                          const nlohmann::json& logprobs, bool role_only = false, bool usage_null = false);
// The last chunk with include_usage: no choices, the usage.
nlohmann::json usage_chunk_json(const ResponseHead& h, const Usage& usage);
// "data: <json>\n\n" (invalid UTF-8 replaced).
std::string sse_event(const nlohmann::json& j);
inline constexpr const char* kSseDone = "data: [DONE]\n\n";
// Compact JSON text, invalid UTF-8 replaced rather than thrown.
std::string dump(const nlohmann::json& j);

// Compares a secret in a time that does not depend on where the texts differ.
bool equal_secret(std::string_view a, std::string_view b);

}  // namespace ringllama::openai
