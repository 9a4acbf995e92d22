// Wire messages (DESIGN.md "Wire protocol"): one JSON object per ZeroMQ frame.
//
//   daemon <-> worker, DEALER -> ROUTER on `control`:
//     {"op":"hello","pid":123,"worker":"gpu0"}      -> welcome | error
//     {"op":"progress","pass":7,"copied":12}        layers [0, copied) of pass 7 are copied: 0 begins
//                                                   the pass, n_layers ends it (also when it stops early)
//     {"op":"heartbeat"}  {"op":"bye"}  {"op":"stats"} -> stats
//   daemon -> workers on PUB (wake-ups only; the slot table in the segment is the truth):
//     {"type":"slot_ready","slot":3,"layer":17,"generation":42}   slot -1 is the globals
//     {"type":"slot_error","slot":3,"layer":17,"message":"..."}
//   client <-> worker, DEALER -> ROUTER on `listen`:
//     {"op":"generate","id":"r1","prompt_ids":[1,2,3],"max_tokens":16, optional "temperature",
//      "top_k", "top_p", "seed", "stop_ids", "ignore_eos"}   {"op":"cancel","id":"r1"}
//     instead of "prompt_ids" (exactly one): "prompt":"text" or "messages":[{"role","content"}, ...]
//     {"op":"stats"}  {"op":"health"}
//     <- token | done | error | stats | health
//   token and done carry "text" (the token's piece, the whole reply) where the model has a tokenizer.
//   A generate gets its tokens, then one done (reason length, stop, eos, or cancelled after a
//   cancel) or one error. A cancel of an id not in flight (already done, never sent) is ignored.
//
// Messages from the daemon carry "type", requests carry "op". Parsing is total: any bytes give a
// message or a ProtocolError whose text says what is wrong, never a crash. Unknown keys are
// refused, so that a misspelt option does not pass silently.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "common/chat_template.h"
#include "common/errors.h"

namespace ringllama {

inline constexpr int kMaxJsonDepth = 32;        // nesting refused beyond this, before parsing
inline constexpr size_t kMaxIdBytes = 256;      // request ids
inline constexpr int64_t kMaxTokenId = 0x7fffffff;

// A frame that is not a valid message. `id` is the request's id when it could be read, so that
// the reply can name it.
class ProtocolError : public Error {
 public:
  explicit ProtocolError(const std::string& msg, std::string id = {}) : Error(msg), id_(std::move(id)) {}
  const std::string& id() const { return id_; }

 private:
  std::string id_;
};

// ---- daemon <-> worker ----

struct Hello {
  int64_t pid = 0;               // for logs: the daemon watches the pid its connection gives (SO_PEERCRED)
  std::string worker;            // a name for logs and stats, e.g. "gpu0"
};
struct Progress {
  int64_t pass = 0;              // the worker's pass counter, >= 0, increasing
  int64_t copied = 0;            // layers [0, copied) of the pass are copied
  int64_t held = 0;              // layers [copied, held) are being read (a copy in flight); <= copied: none
};
struct Heartbeat {};
struct Bye {};
struct StatsRequest {};
using ControlRequest = std::variant<Hello, Progress, Heartbeat, Bye, StatsRequest>;

struct Welcome {
  std::string segment;           // shm name, "/ringllama-<instance>"
  uint32_t layout_version = 0;
  std::string instance_id;
  std::string store;             // the store's directory (its manifest.yaml is the manifest)
  uint64_t store_identity = 0;   // store_identity() of that store, checked against the segment
  int64_t n_layers = 0;
  int64_t n_slots = 0;
  int64_t heartbeat_ms = 0;
  std::string pub;               // the daemon's PUB endpoint for slot_ready / slot_error ("" = none)
  int64_t worker_id = -1;        // the worker's entry in the segment's worker table (-1 = none)
  int64_t hold_max = 1;          // layers a worker may hold at once (copies in flight) without stalling the window
};
struct StatsReply {
  nlohmann::json stats = nlohmann::json::object();
};
struct ControlError {
  std::string message;
};
using ControlReply = std::variant<Welcome, StatsReply, ControlError>;

struct SlotReady {
  int64_t slot = 0;              // -1: the globals
  int64_t layer = 0;             // -1 for the globals
  uint64_t generation = 0;
};
struct SlotErrorNotice {
  int64_t slot = 0;
  int64_t layer = 0;
  std::string message;
};
using Notice = std::variant<SlotReady, SlotErrorNotice>;

// ---- client <-> worker ----

struct GenerateRequest {
  // The prompt comes in one of three forms: ids used as they are, text the worker tokenizes, or a
  // chat the worker renders with the model's chat template and tokenizes.
  enum class Form { Ids, Text, Chat };
  std::string id;
  Form form = Form::Ids;
  std::vector<int64_t> prompt_ids;   // Ids: non-empty token ids
  std::string prompt;                // Text: non-empty
  std::vector<ChatMessage> messages; // Chat: non-empty, roles system/user/assistant
  int64_t max_tokens = 0;            // >= 1
  double temperature = 0.0;          // 0 = greedy; [0, 100]
  int64_t top_k = 0;                 // 0 = off
  double top_p = 1.0;                // (0, 1]
  uint64_t seed = 0;
  std::vector<int64_t> stop_ids;
  bool ignore_eos = false;

  // Token ids against the model's vocabulary; throws ProtocolError naming the first bad one.
  void check_vocab(int64_t vocab_size) const;
};
struct CancelRequest {
  std::string id;
};
struct ClientStatsRequest {};
struct HealthRequest {};
using ClientRequest = std::variant<GenerateRequest, CancelRequest, ClientStatsRequest, HealthRequest>;

// A token's log-probability under its logits row, and the most likely ids of that row.
struct TokenLogprobs {
  double logprob = 0;
  std::vector<std::pair<int32_t, double>> top;  // (id, log-probability), most likely first, ties by id
};
struct TokenReply {
  std::string id;
  int64_t index = 0;                 // 0, 1, ... within the request
  int64_t token = 0;
  std::optional<std::string> text;   // the text this token completes (never half a UTF-8 character)
  std::optional<TokenLogprobs> logprobs;  // where the request asked for them (HTTP API: "logprob", "top_logprobs")
};
enum class DoneReason { Length, Stop, Eos, Cancelled };
const char* done_reason_name(DoneReason r);
struct DoneReply {
  std::string id;
  DoneReason reason = DoneReason::Length;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double ttft_ms = 0;                // time to first token
  double tpot_ms = 0;                // mean time per output token after the first
  std::optional<std::string> text;   // the whole generated text (special tokens left out)
};
enum class ErrorCode { BadRequest, Overloaded, Internal, Unavailable };
const char* error_code_name(ErrorCode c);
struct ErrorReply {
  std::string id;                    // empty when the request's id could not be read (null on the wire)
  ErrorCode code = ErrorCode::BadRequest;
  std::string message;
};
struct HealthReply {
  std::string status = "ok";         // ok | unavailable
  nlohmann::json detail = nlohmann::json::object();
};
using ClientReply = std::variant<TokenReply, DoneReply, ErrorReply, StatsReply, HealthReply>;

// ---- encoding: one compact JSON object; strings that are not UTF-8 are repaired, never thrown ----

std::string encode(const ControlRequest& m);
std::string encode(const ControlReply& m);
std::string encode(const Notice& m);
std::string encode(const ClientRequest& m);
std::string encode(const ClientReply& m);

// ---- decoding: throws ProtocolError only ----

ControlRequest parse_control_request(std::string_view frame);
ControlReply parse_control_reply(std::string_view frame);
Notice parse_notice(std::string_view frame);
// A frame over max_bytes is refused before parsing (0: no limit).
ClientRequest parse_client_request(std::string_view frame, size_t max_bytes = 0);
ClientReply parse_client_reply(std::string_view frame);

// The error reply for a request that failed to parse (its id when known).
ErrorReply bad_request(const ProtocolError& e);

}  // namespace ringllama
