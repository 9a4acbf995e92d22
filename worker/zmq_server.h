// The worker's client side (DESIGN.md "Wire protocol", client <-> worker): a ROUTER socket on
// `listen`, one JSON object per frame. It checks every request before the scheduler sees it
// (malformed, ids outside the vocabulary, over max_context, over max_request_bytes, a duplicate id,
// a full queue, a draining worker: an `error` reply each), forwards the good ones, and sends the
// scheduler's replies as they come. Sends never block: ZMQ_ROUTER_MANDATORY says when a client is
// gone (and a client that stops reading is counted gone once its send queue is full); its
// requests are dropped and their sequences freed.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "common/chat_template.h"
#include "common/tokenizer.h"
#include "worker/admission.h"
#include "worker/scheduler.h"

namespace zmq {
class context_t;
class socket_t;
}  // namespace zmq

namespace ringllama {

// An eventfd: the engine thread wakes the socket loop with it.
class Waker {
 public:
  Waker();
  ~Waker();
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;
  void wake();
  void clear();
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

// Client ids with this prefix belong to the HTTP API (worker/http_server.h): their replies go to
// ServerOptions::http_replies, and a ZeroMQ peer may not take such a routing id.
inline constexpr const char* kHttpClientPrefix = "http:";
inline bool is_http_client(const std::string& client) { return client.rfind(kHttpClientPrefix, 0) == 0; }

struct ServerOptions {
  std::string listen;                 // endpoint to bind
  int64_t max_request_bytes = 1 << 20;
  int64_t drain_timeout_ms = 30000;
  StepLimits limits;                  // vocabulary and max_context checks
  std::set<int32_t> eos;              // the model's eos ids (unless a request says ignore_eos)
  // Text requests: the model's tokenizer (null: `prompt` and `messages` are refused, with
  // no_tokenizer as the message); chat requests: its chat template (null: refused with
  // no_chat_template). Both outlive the server.
  const Tokenizer* tokenizer = nullptr;
  std::string no_tokenizer = "this model has no tokenizer: send prompt_ids";
  const ChatTemplate* chat = nullptr;
  std::string no_chat_template;
  nlohmann::json info;                // what health reports besides the counts (backend, model)
  // Where the replies of HTTP clients go (called on the socket loop's thread; must not block);
  // null: they are dropped.
  std::function<void(Outgoing&&)> http_replies;
  // Where refused requests are counted (worker/metrics.h), by both front doors; null = nowhere.
  WorkerMetrics* metrics = nullptr;
};

// The scheduler's request for a generate request: the prompt's ids (a text tokenized, a chat
// rendered and tokenized), eos ids (and a chat's end of turn), sampling, stop ids; checked against
// the vocabulary and the limits. Throws Error (a ProtocolError for ids outside the vocabulary)
// with the bad_request message. Shared by both front doors.
GenRequest gen_request_of(const ServerOptions& opt, const GenerateRequest& g);

class ClientServer {
 public:
  // `admission` (capacity and draining) is shared with the HTTP API.
  ClientServer(Scheduler& scheduler, Waker& waker, Admission& admission, ServerOptions options);
  ~ClientServer();
  ClientServer(const ClientServer&) = delete;
  ClientServer& operator=(const ClientServer&) = delete;

  // Binds the ROUTER (an ipc:// endpoint's folder is created). Throws Error.
  void bind();
  // Serves until the scheduler has stopped and its last replies are sent. A readable `stop_fd`
  // (SIGTERM/SIGINT through a signalfd) starts the drain; `on_drain` runs then. `tick` runs at
  // least every tick_ms.
  void run(int stop_fd, int64_t tick_ms, const std::function<void()>& tick, const std::function<void()>& on_drain);

 private:
  void on_frame(const std::string& client, const std::string& frame);
  void on_generate(const std::string& client, GenerateRequest g);
  void send(const std::string& client, const ClientReply& reply);
  void reject(const std::string& client, const std::string& id, ErrorCode code, const std::string& message);
  void flush();
  void client_gone(const std::string& client, const char* why);
  nlohmann::json stats() const;

  Scheduler& scheduler_;
  Waker& waker_;
  Admission& admission_;
  ServerOptions opt_;
  std::unique_ptr<zmq::context_t> ctx_;
  std::unique_ptr<zmq::socket_t> router_;
  std::string ipc_file_;   // the ipc socket file this server made ("" = none)
  uint64_t ipc_inode_ = 0; // its inode: only that file is removed on exit
  std::map<std::string, std::set<std::string>> in_flight_;  // client -> request ids submitted, not ended
  // Counters for stats.
  int64_t received_ = 0, rejected_bad_ = 0, rejected_overloaded_ = 0, rejected_unavailable_ = 0;
  int64_t clients_gone_ = 0;
};

}  // namespace ringllama
