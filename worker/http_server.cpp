#include "worker/http_server.h"

#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <deque>
#include <optional>

#include "common/errors.h"
#include "common/log.h"
#include "worker/metrics.h"
#include "worker/openai_api.h"

namespace ringllama {

namespace {

using json = nlohmann::json;
using openai::ApiError;
using openai::Endpoint;
constexpr const char* kJson = "application/json";
// How often a streaming handler with nothing to send checks that its client is still there.
constexpr auto kStreamPoll = std::chrono::milliseconds(100);

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(openai::dump(openai::error_body(e)), kJson);
}

const char* type_of_status(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable";
    default: return status >= 500 ? "internal_error" : "invalid_request_error";
  }
}

}  // namespace

// The replies of one request, from the socket loop to its handler.
struct HttpServer::Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<ClientReply> replies;

  void push(ClientReply r) {
    {
      std::lock_guard<std::mutex> lk(mu);
      replies.push_back(std::move(r));
    }
    cv.notify_all();
  }
  // Everything queued, waiting at most `wait` for the first.
  std::deque<ClientReply> take(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait_for(lk, wait, [&] { return !replies.empty(); });
    std::deque<ClientReply> out;
    out.swap(replies);
    return out;
  }
};

// One generation as its handler sees it: replies in, text (stop strings applied), log-probs and
// the end out.
class HttpServer::Call {
 public:
  std::string client;
  std::shared_ptr<Channel> channel;
  openai::ApiRequest req;
  openai::ResponseHead head;
  openai::StopMatcher stop;
  openai::Usage usage;
  const Tokenizer* tokenizer = nullptr;
  int64_t text_offset = 0;
  bool ended = false;            // the generation is over for the client
  bool finished = false;         // the response is complete (stream: [DONE] written)
  bool sent_role = false;        // chat streams: the role chunk went out
  const char* finish = nullptr;  // finish_reason once ended without an error
  std::optional<ApiError> error;

  Call(openai::ApiRequest r, std::vector<std::string> stops) : req(std::move(r)), stop(std::move(stops)) {}

  // Takes one reply: appends the text it makes ready to `text` and its log-probs to `lps`. A
  // stop string found ends the call (the caller cancels the sequence).
  void take(const ClientReply& r, std::string& text, std::vector<openai::LogprobEntry>& lps) {
    if (ended) return;
    if (const auto* t = std::get_if<TokenReply>(&r)) {
      ++usage.completion_tokens;
      if (t->logprobs) lps.push_back({static_cast<int32_t>(t->token), *t->logprobs});
      if (t->text) text += stop.push(*t->text);
      if (stop.stopped()) {
        ended = true;
        finish = "stop";
      }
    } else if (const auto* d = std::get_if<DoneReply>(&r)) {
      text += stop.flush();
      ended = true;
      finish = openai::finish_reason(d->reason);
    } else if (const auto* e = std::get_if<ErrorReply>(&r)) {
      ended = true;
      error = openai::from_reply(*e);
    }
  }

  json logprobs(const std::vector<openai::LogprobEntry>& lps) {
    if (req.logprobs < 0 || !tokenizer) return nullptr;
    json j = openai::logprobs_json(req.endpoint, lps, *tokenizer, text_offset);
    if (req.endpoint == Endpoint::Completions)
      for (const json& t : j["tokens"]) text_offset += static_cast<int64_t>(t.get<std::string>().size());
    return j;
  }
};

HttpServer::HttpServer(Scheduler& scheduler, Admission& admission, const ServerOptions& text, HttpOptions options)
    : scheduler_(scheduler), admission_(admission), text_(text), opt_(std::move(options)) {}

HttpServer::~HttpServer() {
  // Leaving early (an error before the scheduler ran): no handler may wait for replies forever.
  close_pending("the worker is stopping");
  stop();
}

void HttpServer::deliver(Outgoing&& o) {
  std::shared_ptr<Channel> ch;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = channels_.find(o.client);
    if (it == channels_.end()) return;  // abandoned: nobody to tell
    ch = it->second;
    if (o.final) {
      channels_.erase(it);
      admission_.release();
    }
  }
  ch->push(std::move(o.reply));
}

void HttpServer::close_pending(const std::string& why) {
  std::lock_guard<std::mutex> lk(mu_);
  closed_ = true;
  for (auto& [client, ch] : channels_) {
    ch->push(ErrorReply{"0", ErrorCode::Unavailable, why});
    admission_.release();
  }
  channels_.clear();
}

void HttpServer::abandon(const std::string& client) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!channels_.erase(client)) return;  // its final reply came first
    admission_.release();
  }
  spdlog::info("http: a client went away mid-stream; its request is dropped");
  scheduler_.drop_client(client);
}

void HttpServer::handle_generate(const httplib::Request& http_req, httplib::Response& res, int endpoint) {
  openai::ApiRequest req = openai::parse_request(static_cast<Endpoint>(endpoint), http_req.body);
  if (!req.model.empty() && req.model != opt_.model)
    throw ApiError(404, "invalid_request_error",
                   fmt::format("The model '{}' does not exist: this worker serves '{}'", req.model.substr(0, 256),
                               opt_.model),
                   "model", "model_not_found");
  if (!text_.tokenizer) throw ApiError(400, "invalid_request_error", text_.no_tokenizer + " (the HTTP API needs one)");
  if (admission_.draining() || scheduler_.stopped())
    throw ApiError(503, "service_unavailable", "the worker is stopping", "", "unavailable");

  // The scheduler's request: max_tokens defaults to what the context leaves after the prompt.
  const bool max_given = req.gen.max_tokens > 0;
  if (!max_given) req.gen.max_tokens = 1;
  GenRequest gen;
  try {
    gen = gen_request_of(text_, req.gen);
    if (!max_given) {
      gen.max_tokens = std::max<int64_t>(1, text_.limits.max_context - static_cast<int64_t>(gen.prompt.size()));
      gen.validate(text_.limits, "request");
    }
  } catch (const std::exception& e) {
    throw ApiError(400, "invalid_request_error", e.what());
  }
  gen.logprobs = req.logprobs;

  auto call = std::make_shared<Call>(req, req.stop);
  call->tokenizer = text_.tokenizer;
  call->usage.prompt_tokens = static_cast<int64_t>(gen.prompt.size());
  call->head = {req.endpoint, openai::new_response_id(req.endpoint),
                static_cast<int64_t>(std::time(nullptr)), opt_.model};
  call->channel = std::make_shared<Channel>();
  switch (admission_.try_admit()) {
    case Admission::Verdict::Admitted: break;
    case Admission::Verdict::Draining: throw ApiError(503, "service_unavailable", "the worker is stopping", "", "unavailable");
    case Admission::Verdict::Overloaded:
      throw ApiError(429, "rate_limit_error",
                     fmt::format("{} requests in flight: batch_size + queue_max ({}) reached; retry later",
                                 admission_.in_flight(), admission_.capacity()),
                     "", "overloaded");
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    // The scheduler stopped after the checks above: nobody would answer this request.
    if (closed_) {
      admission_.release();
      throw ApiError(503, "service_unavailable", "the worker is stopping", "", "unavailable");
    }
    call->client = fmt::format("{}{}", kHttpClientPrefix, next_client_++);
    channels_[call->client] = call->channel;
  }
  scheduler_.submit(Submission{call->client, "0", std::move(gen), SteadyClock::now()});

  if (!req.stream) {
    std::string text;
    std::vector<openai::LogprobEntry> lps;
    while (!call->ended)
      for (const ClientReply& r : call->channel->take(std::chrono::milliseconds(1000))) call->take(r, text, lps);
    if (call->stop.stopped()) scheduler_.cancel(call->client, "0");  // a stop string: the rest is not wanted
    if (call->error) return send_error(res, *call->error);
    res.set_content(openai::dump(openai::response_json(call->head, text, call->finish, call->logprobs(lps), call->usage)),
                    kJson);
    return;
  }

  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");  // proxies pass each event on at once
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, call](size_t, httplib::DataSink& sink) {
        std::string out;
        if (call->req.endpoint == Endpoint::Chat && !call->sent_role) {
          call->sent_role = true;
          out += openai::sse_event(openai::chunk_json(call->head, "", nullptr, nullptr, true, call->req.include_usage));
        }
        while (out.empty() && !call->ended) {
          std::deque<ClientReply> got = call->channel->take(kStreamPoll);
          if (got.empty()) {
            if (!sink.is_writable()) return false;
            continue;
          }
          std::string text;
          std::vector<openai::LogprobEntry> lps;
          for (const ClientReply& r : got) call->take(r, text, lps);
          if (!text.empty() || !lps.empty())
            out += openai::sse_event(openai::chunk_json(call->head, text, nullptr, call->logprobs(lps), false,
                                                        call->req.include_usage));
        }
        if (call->ended) {
          if (call->stop.stopped()) scheduler_.cancel(call->client, "0");
          if (call->error) {
            out += openai::sse_event(openai::error_body(*call->error));
          } else {
            out += openai::sse_event(
                openai::chunk_json(call->head, "", call->finish, nullptr, false, call->req.include_usage));
            if (call->req.include_usage) out += openai::sse_event(openai::usage_chunk_json(call->head, call->usage));
          }
          out += openai::kSseDone;
        }
        if (!sink.write(out.data(), out.size())) return false;
        if (call->ended) {
          call->finished = true;
          sink.done();
        }
        return true;
      },
      [this, call](bool) {
        // The response did not run to its end: the client is gone (or a write timed out).
        if (!call->finished) abandon(call->client);
      });
}

int HttpServer::start() {
  svr_ = std::make_unique<httplib::Server>();
  httplib::Server& s = *svr_;
  const size_t threads = static_cast<size_t>(std::max<int64_t>(2, opt_.threads));
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_read_timeout(opt_.read_timeout_s, 0);
  s.set_write_timeout(opt_.write_timeout_s, 0);
  s.set_payload_max_length(static_cast<size_t>(opt_.max_request_bytes));
  s.set_tcp_nodelay(true);  // each streamed event goes out at once
  created_ = static_cast<int64_t>(std::time(nullptr));

  s.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
    if (!opt_.api_key.empty()) {
      const std::string auth = req.get_header_value("Authorization");
      const std::string bearer = "Bearer ";
      if (auth.compare(0, bearer.size(), bearer) != 0 ||
          !openai::equal_secret(std::string_view(auth).substr(bearer.size()), opt_.api_key)) {
        res.set_header("WWW-Authenticate", "Bearer");
        send_error(res, ApiError(401, "invalid_request_error",
                                 auth.empty() ? "no API key: send the header Authorization: Bearer <key>"
                                              : "incorrect API key",
                                 "", "invalid_api_key"));
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    // Refused before the body is read: the client said how much it would send.
    if (req.has_header("Content-Length")) {
      const std::string v = req.get_header_value("Content-Length");
      char* end = nullptr;
      const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n > static_cast<unsigned long long>(opt_.max_request_bytes)) {
        res.set_header("Connection", "close");
        send_error(res, ApiError(413, "invalid_request_error",
                                 fmt::format("the body ({} bytes) is over max_request_bytes ({})", v.substr(0, 32),
                                             opt_.max_request_bytes)));
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Statuses httplib sets itself (unknown path, a body over the limit) get OpenAI's error object.
  s.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg = res.status == 404   ? fmt::format("no such path: {} {}", req.method, req.path.substr(0, 256))
                      : res.status == 413 ? "the body is over max_request_bytes"
                                          : fmt::format("HTTP status {}", res.status);
    send_error(res, ApiError(res.status, type_of_status(res.status), msg, "", res.status == 404 ? "not_found" : ""));
    return httplib::Server::HandlerResponse::Handled;
  }));
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    try {
      std::rethrow_exception(ep);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const std::exception& e) {
      spdlog::error("http: {}", e.what());
      send_error(res, ApiError(500, "internal_error", e.what()));
    } catch (...) {
      send_error(res, ApiError(500, "internal_error", "unknown error"));
    }
  });

  // A generation refused before the scheduler saw it counts in the metrics as the ZeroMQ side's
  // refusals do: 429 overloaded, 503 unavailable, any other status a bad request.
  auto generate = [this](Endpoint endpoint) {
    return [this, endpoint](const httplib::Request& req, httplib::Response& res) {
      try {
        handle_generate(req, res, static_cast<int>(endpoint));
      } catch (const ApiError& e) {
        if (text_.metrics)
          text_.metrics->request_rejected(e.status == 429   ? ErrorCode::Overloaded
                                          : e.status == 503 ? ErrorCode::Unavailable
                                                            : ErrorCode::BadRequest,
                                          "http");
        throw;
      }
    };
  };
  s.Post("/v1/completions", generate(Endpoint::Completions));
  s.Post("/v1/chat/completions", generate(Endpoint::Chat));
  auto model_json = [this] {
    return json{{"id", opt_.model}, {"object", "model"}, {"created", created_}, {"owned_by", "ringllama"}};
  };
  s.Get("/v1/models", [model_json](const httplib::Request&, httplib::Response& res) {
    res.set_content(openai::dump({{"object", "list"}, {"data", json::array({model_json()})}}), kJson);
  });
  s.Get(R"(/v1/models/(.+))", [this, model_json](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] != opt_.model)
      throw ApiError(404, "invalid_request_error", fmt::format("The model '{}' does not exist", req.matches[1].str().substr(0, 256)),
                     "model", "model_not_found");
    res.set_content(openai::dump(model_json()), kJson);
  });
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool draining = admission_.draining(), stopped = scheduler_.stopped();
    res.status = draining || stopped ? 503 : 200;
    res.set_content(openai::dump({{"status", draining ? "draining" : stopped ? "unavailable" : "ok"}}), kJson);
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(opt_.metrics ? opt_.metrics() : std::string(), "text/plain; version=0.0.4");
  });
  // A known path with the wrong method: 405 and what it takes.
  auto wrong_method = [](const char* allow) {
    return [allow](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", allow);
      send_error(res, ApiError(405, "invalid_request_error", fmt::format("{} takes {}, not {}", req.path, allow, req.method)));
    };
  };
  for (const char* p : {"/v1/completions", "/v1/chat/completions"}) {
    s.Get(p, wrong_method("POST"));
    s.Put(p, wrong_method("POST"));
    s.Delete(p, wrong_method("POST"));
  }
  for (const char* p : {"/v1/models", "/health", "/metrics"}) {
    s.Post(p, wrong_method("GET"));
    s.Put(p, wrong_method("GET"));
    s.Delete(p, wrong_method("GET"));
  }

  int port = opt_.port;
  if (port == 0) {
    port = s.bind_to_any_port(opt_.host);
    if (port <= 0) fail("http_listen {}:0: cannot bind", opt_.host);
  } else if (!s.bind_to_port(opt_.host, port)) {
    fail("http_listen {}:{}: cannot bind (address in use, or not an address of this host)", opt_.host, port);
  }
  thread_ = std::thread([this] {
    if (!svr_->listen_after_bind()) spdlog::error("http: the server stopped serving");
  });
  // stop() before listen_after_bind has started would be missed: wait for it.
  for (int i = 0; i < 5000 && !svr_->is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!svr_->is_running()) fail("http_listen {}:{}: the server did not start", opt_.host, port);
  return port;
}

void HttpServer::stop() {
  if (svr_) svr_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace ringllama
