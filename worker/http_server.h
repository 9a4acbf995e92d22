// The worker's OpenAI-compatible HTTP API (DESIGN.md "HTTP / OpenAI API"), served by cpp-httplib
// next to the ZeroMQ socket and over the same scheduler: POST /v1/completions and
// /v1/chat/completions (stream or not), GET /v1/models, /health and /metrics.
//
// Threads: httplib's handler threads (a bounded pool) parse, tokenize, pass admission (shared with
// the ZeroMQ side) and submit to the scheduler, which is thread-safe; they never touch the engine.
// Each request is its own scheduler client, "http:<n>", so the socket loop that takes the
// scheduler's replies hands those to deliver(), which queues them for the waiting handler. A
// streaming client that goes away (a write fails) has its sequence dropped at the next step.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "worker/admission.h"
#include "worker/scheduler.h"
#include "worker/zmq_server.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace ringllama {

struct HttpOptions {
  std::string host = "127.0.0.1";     // address to bind
  int port = 0;                       // 0 = any free port
  std::string api_key;                // "" = no authentication
  std::string model;                  // the served model's name (/v1/models; requests must name it)
  int64_t max_request_bytes = 1 << 20;
  int64_t threads = 16;               // handler threads (one per connection being served)
  int64_t read_timeout_s = 30, write_timeout_s = 60;
  std::function<std::string()> metrics;  // the /metrics body (Prometheus text); null = empty
};

class HttpServer {
 public:
  // `text` gives the tokenizer, chat template, eos ids and limits (the ZeroMQ side's options).
  HttpServer(Scheduler& scheduler, Admission& admission, const ServerOptions& text, HttpOptions options);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and serves on a thread of its own; returns the port bound. Throws Error.
  int start();
  // A reply for one of this server's requests (from the socket loop; never blocks for long).
  void deliver(Outgoing&& o);
  // The scheduler has stopped: requests still waiting for replies get `unavailable`, later ones
  // are refused.
  void close_pending(const std::string& why);
  // Stops accepting, lets the handlers finish their responses, joins the threads.
  void stop();

 private:
  struct Channel;
  class Call;

  void handle_generate(const httplib::Request& req, httplib::Response& res, int endpoint);
  // Forgets a request whose client is gone: its sequence is dropped, its place given back.
  void abandon(const std::string& client);

  Scheduler& scheduler_;
  Admission& admission_;
  const ServerOptions& text_;
  HttpOptions opt_;
  std::unique_ptr<httplib::Server> svr_;
  std::thread thread_;
  int64_t created_ = 0;  // Unix seconds at start (the model's `created`)

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Channel>> channels_;  // requests submitted, final reply not yet in
  uint64_t next_client_ = 0;
  bool closed_ = false;  // close_pending() ran: no request is taken any more
};

}  // namespace ringllama
