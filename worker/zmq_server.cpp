#include "worker/zmq_server.h"

#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/errors.h"
#include "common/log.h"
#include "worker/metrics.h"

namespace ringllama {

namespace {

// A client that does not read its replies is treated as gone once this many wait for it.
constexpr int kSendQueueMax = 1 << 17;
// Frames read per round, so that a flood of requests cannot hold the replies back.
constexpr int kFramesPerRound = 256;

}  // namespace

Waker::Waker() {
  fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd_ < 0) fail("eventfd: {}", errno_text(errno));
}

Waker::~Waker() {
  if (fd_ >= 0) ::close(fd_);
}

void Waker::wake() {
  const uint64_t one = 1;
  (void)!::write(fd_, &one, sizeof one);  // EAGAIN: already readable, which is all that matters
}

void Waker::clear() {
  uint64_t v = 0;
  (void)!::read(fd_, &v, sizeof v);
}

ClientServer::ClientServer(Scheduler& scheduler, Waker& waker, Admission& admission, ServerOptions options)
    : scheduler_(scheduler), waker_(waker), admission_(admission), opt_(std::move(options)) {}

ClientServer::~ClientServer() {
  if (router_) router_->set(zmq::sockopt::linger, 2000);  // the last replies go out
  router_.reset();
  ctx_.reset();
  // A socket file left behind would make a client wait for a worker that is gone instead of
  // failing at once; remove it, unless another process has bound the path since.
  struct stat st {};
  if (!ipc_file_.empty() && ::stat(ipc_file_.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_ino) == ipc_inode_)
    ::unlink(ipc_file_.c_str());
}

void ClientServer::bind() {
  const std::string ipc = "ipc://";
  if (opt_.listen.compare(0, ipc.size(), ipc) == 0) {
    const std::filesystem::path dir = std::filesystem::path(opt_.listen.substr(ipc.size())).parent_path();
    std::error_code ec;
    if (!dir.empty() && dir.string()[0] != '@') std::filesystem::create_directories(dir, ec);
    if (ec) fail("listen {}: cannot create {}: {}", opt_.listen, dir.string(), ec.message());
  }
  ctx_ = std::make_unique<zmq::context_t>(1);
  router_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::router);
  router_->set(zmq::sockopt::router_mandatory, 1);
  router_->set(zmq::sockopt::sndhwm, kSendQueueMax);
  router_->set(zmq::sockopt::linger, 0);
  // The socket's own limit sits well above max_request_bytes, so that a frame just over it still
  // arrives and gets its error reply; a frame over this one drops the connection.
  router_->set(zmq::sockopt::maxmsgsize, 2 * opt_.max_request_bytes + 65536);
  try {
    router_->bind(opt_.listen);
  } catch (const zmq::error_t& e) {
    fail("listen {}: {}", opt_.listen, e.what());
  }
  struct stat st {};
  if (opt_.listen.compare(0, ipc.size(), ipc) == 0 && opt_.listen[ipc.size()] != '@') {
    const std::string file = opt_.listen.substr(ipc.size());
    if (::stat(file.c_str(), &st) == 0) {
      ipc_file_ = file;
      ipc_inode_ = static_cast<uint64_t>(st.st_ino);
    }
  }
}

void ClientServer::send(const std::string& client, const ClientReply& reply) {
  const std::string body = encode(reply);
  try {
    if (!router_->send(zmq::buffer(client), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
      client_gone(client, "its send queue is full (it does not read its replies)");
      return;
    }
    (void)router_->send(zmq::buffer(body), zmq::send_flags::dontwait);
  } catch (const zmq::error_t& e) {
    if (e.num() == EHOSTUNREACH) client_gone(client, "disconnected");
    else spdlog::warn("send to a client: {}", e.what());
  }
}

void ClientServer::client_gone(const std::string& client, const char* why) {
  auto it = in_flight_.find(client);
  if (it == in_flight_.end()) return;
  spdlog::info("a client is gone ({}): {} requests dropped", why, it->second.size());
  admission_.release(static_cast<int64_t>(it->second.size()));
  in_flight_.erase(it);
  ++clients_gone_;
  scheduler_.drop_client(client);
}

void ClientServer::reject(const std::string& client, const std::string& id, ErrorCode code,
                          const std::string& message) {
  switch (code) {
    case ErrorCode::Overloaded: ++rejected_overloaded_; break;
    case ErrorCode::Unavailable: ++rejected_unavailable_; break;
    default: ++rejected_bad_; break;
  }
  if (opt_.metrics) opt_.metrics->request_rejected(code, "zmq");
  send(client, ErrorReply{id, code, message});
}

void ClientServer::flush() {
  for (Outgoing& o : scheduler_.take_replies()) {
    if (is_http_client(o.client)) {
      if (opt_.http_replies) opt_.http_replies(std::move(o));
      continue;
    }
    auto it = in_flight_.find(o.client);
    // A request of a client already gone: nobody to tell.
    if (it == in_flight_.end() || !it->second.count(o.id)) continue;
    if (o.final) {
      it->second.erase(o.id);
      admission_.release();
      if (it->second.empty()) in_flight_.erase(it);
    }
    send(o.client, o.reply);
  }
}

nlohmann::json ClientServer::stats() const {
  nlohmann::json j = scheduler_.stats();
  j["server"] = {{"received", received_},
                 {"in_flight", admission_.in_flight()},
                 {"capacity", admission_.capacity()},
                 {"rejected", {{"bad_request", rejected_bad_},
                               {"overloaded", rejected_overloaded_},
                               {"unavailable", rejected_unavailable_}}},
                 {"clients_gone", clients_gone_}};
  j["draining"] = admission_.draining();
  return j;
}

namespace {

// The prompt's ids and, for a chat, the end of turn id into r.eos. Throws Error.
void prompt_of(const ServerOptions& opt, const GenerateRequest& g, GenRequest& r) {
  if (g.form == GenerateRequest::Form::Ids) {
    r.prompt.assign(g.prompt_ids.begin(), g.prompt_ids.end());
    return;
  }
  if (!opt.tokenizer) fail("generate: {}", opt.no_tokenizer);
  if (g.form == GenerateRequest::Form::Text) {
    // As a tokenizer encodes a text by default: with the special tokens it adds (Llama's bos).
    r.prompt = opt.tokenizer->encode(g.prompt, true);
    return;
  }
  if (!opt.chat) fail("generate: {}", opt.no_chat_template);
  // The template writes bos itself; the tokenizer adds nothing more, as transformers tokenizes a
  // rendered chat.
  r.prompt = opt.tokenizer->encode(opt.chat->render(g.messages, true), false);
  if (!g.ignore_eos)
    if (const std::optional<int32_t> eot = opt.tokenizer->token_id(opt.chat->end_of_turn())) r.eos.insert(*eot);
}

}  // namespace

GenRequest gen_request_of(const ServerOptions& opt, const GenerateRequest& g) {
  g.check_vocab(opt.limits.vocab_size);
  GenRequest r;
  if (!g.ignore_eos) r.eos = opt.eos;
  try {
    prompt_of(opt, g, r);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {  // whatever the text does to the tokenizer, the worker goes on
    fail("{}", e.what());
  }
  r.max_tokens = g.max_tokens;
  r.sampling.temperature = g.temperature;
  r.sampling.top_k = g.top_k;
  r.sampling.top_p = g.top_p;
  r.sampling.seed = g.seed;
  for (int64_t s : g.stop_ids) r.stop.insert(static_cast<int32_t>(s));
  r.validate(opt.limits, "generate");
  return r;
}

void ClientServer::on_generate(const std::string& client, GenerateRequest g) {
  if (admission_.draining() || scheduler_.stopped())
    return reject(client, g.id, ErrorCode::Unavailable, "the worker is stopping");
  if (is_http_client(client))
    return reject(client, g.id, ErrorCode::BadRequest,
                  fmt::format("routing ids starting with '{}' are reserved", kHttpClientPrefix));
  GenRequest r;
  try {
    r = gen_request_of(opt_, g);
  } catch (const std::exception& e) {
    return reject(client, g.id, ErrorCode::BadRequest, e.what());
  }
  auto it = in_flight_.find(client);
  if (it != in_flight_.end() && it->second.count(g.id))
    return reject(client, g.id, ErrorCode::BadRequest,
                  fmt::format("generate: a request with id '{}' is already in flight on this connection", g.id));
  switch (admission_.try_admit()) {
    case Admission::Verdict::Admitted: break;
    case Admission::Verdict::Draining: return reject(client, g.id, ErrorCode::Unavailable, "the worker is stopping");
    case Admission::Verdict::Overloaded:
      return reject(client, g.id, ErrorCode::Overloaded,
                    fmt::format("{} requests in flight: batch_size + queue_max ({}) reached", admission_.in_flight(),
                                admission_.capacity()));
  }
  in_flight_[client].insert(g.id);
  scheduler_.submit(Submission{client, g.id, std::move(r), SteadyClock::now()});
}

void ClientServer::on_frame(const std::string& client, const std::string& frame) {
  ++received_;
  ClientRequest req;
  try {
    req = parse_client_request(frame, static_cast<size_t>(opt_.max_request_bytes));
  } catch (const ProtocolError& e) {
    const ErrorReply r = bad_request(e);
    return reject(client, r.id, r.code, r.message);
  }
  if (auto* g = std::get_if<GenerateRequest>(&req)) return on_generate(client, std::move(*g));
  if (const auto* c = std::get_if<CancelRequest>(&req)) {
    auto it = in_flight_.find(client);
    if (it != in_flight_.end() && it->second.count(c->id)) scheduler_.cancel(client, c->id);
    return;
  }
  if (std::holds_alternative<ClientStatsRequest>(req)) return send(client, StatsReply{stats()});
  HealthReply h;
  const bool up = !admission_.draining() && !scheduler_.stopped();
  h.status = up ? "ok" : "unavailable";
  h.detail = opt_.info;
  const nlohmann::json s = scheduler_.stats();
  h.detail["running"] = s["requests"]["running"];
  h.detail["waiting"] = s["requests"]["waiting"];
  h.detail["draining"] = admission_.draining();
  send(client, h);
}

void ClientServer::run(int stop_fd, int64_t tick_ms, const std::function<void()>& tick,
                       const std::function<void()>& on_drain) {
  std::vector<zmq::pollitem_t> items = {{static_cast<void*>(*router_), 0, ZMQ_POLLIN, 0},
                                        {nullptr, waker_.fd(), ZMQ_POLLIN, 0},
                                        {nullptr, stop_fd, ZMQ_POLLIN, 0}};
  auto next_tick = SteadyClock::now();
  for (;;) {
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(std::max<int64_t>(1, tick_ms)));
    if (items[2].revents & ZMQ_POLLIN) {
      signalfd_siginfo si{};
      (void)!::read(stop_fd, &si, sizeof si);
      if (!admission_.draining()) {
        admission_.start_draining();
        spdlog::info("signal {}: draining ({} requests in flight, at most {} ms)", si.ssi_signo, admission_.in_flight(),
                     opt_.drain_timeout_ms);
        scheduler_.drain(SteadyClock::now() + std::chrono::milliseconds(opt_.drain_timeout_ms));
        if (on_drain) on_drain();
      } else {
        // A second signal (Ctrl-C again): stop now, the requests in flight get unavailable.
        spdlog::info("signal {} while draining: stopping now", si.ssi_signo);
        scheduler_.drain(SteadyClock::now());
      }
    }
    if (items[1].revents & ZMQ_POLLIN) waker_.clear();
    for (int n = 0; n < kFramesPerRound; ++n) {
      std::vector<zmq::message_t> parts;
      if (!zmq::recv_multipart(*router_, std::back_inserter(parts), zmq::recv_flags::dontwait)) break;
      if (parts.size() < 2) continue;
      const std::string client = parts[0].to_string();
      if (parts.size() != 2) {
        reject(client, "", ErrorCode::BadRequest, "a request is one frame (DEALER socket), got several");
        continue;
      }
      on_frame(client, parts[1].to_string());
    }
    // Stopped is read before the replies are taken: the replies of a stopped scheduler are all
    // in the outbox by then.
    const bool stopped = scheduler_.stopped();
    flush();
    if (stopped) break;
    const auto now = SteadyClock::now();
    if (now >= next_tick) {
      if (tick) tick();
      next_tick = now + std::chrono::milliseconds(tick_ms);
    }
  }
}

}  // namespace ringllama
