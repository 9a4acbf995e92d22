#include "worker/scheduler.h"

#include <algorithm>

#include "common/errors.h"
#include "common/log.h"
#include "worker/metrics.h"

namespace ringllama {

namespace {

constexpr auto kIdleWait = std::chrono::milliseconds(100);   // idle loop period: liveness of the weights
constexpr auto kAliveEvery = std::chrono::milliseconds(100); // between steps as well

double ms_between(SteadyClock::time_point a, SteadyClock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

DoneReason reason_of(const char* end) {
  const std::string e = end;
  if (e == "stop") return DoneReason::Stop;
  if (e == "eos") return DoneReason::Eos;
  return DoneReason::Length;
}

}  // namespace

Scheduler::Scheduler(Backend& backend, WeightSource& weights, SchedulerOptions options, std::function<void()> wake)
    : backend_(backend),
      weights_(weights),
      options_(std::move(options)),
      wake_(std::move(wake)),
      batch_(backend, false) {
  beat();
  publish_stats();
}

// ---- the socket side ----

void Scheduler::submit(Submission s) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    Command c;
    c.kind = Command::Submit;
    c.sub = std::move(s);
    inbox_.push_back(std::move(c));
  }
  cv_.notify_one();
}

void Scheduler::cancel(const std::string& client, const std::string& id) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    Command c;
    c.kind = Command::Cancel;
    c.sub.client = client;
    c.sub.id = id;
    inbox_.push_back(std::move(c));
  }
  cv_.notify_one();
}

void Scheduler::drop_client(const std::string& client) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    Command c;
    c.kind = Command::Drop;
    c.sub.client = client;
    inbox_.push_back(std::move(c));
  }
  cv_.notify_one();
}

void Scheduler::drain(SteadyClock::time_point deadline) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    deadline_ = draining_ ? std::min(deadline_, deadline) : deadline;
    draining_ = true;
  }
  cv_.notify_one();
}

std::vector<Outgoing> Scheduler::take_replies() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Outgoing> out;
  out.swap(outbox_);
  return out;
}

nlohmann::json Scheduler::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

// ---- the engine thread ----

int64_t Scheduler::blocks_for(const GenRequest& r) const {
  const int64_t bt = backend_.kv().block_tokens();
  return (static_cast<int64_t>(r.prompt.size()) + r.max_tokens + bt - 1) / bt;
}

void Scheduler::emit(Outgoing o) {
  std::lock_guard<std::mutex> lk(mu_);
  outbox_.push_back(std::move(o));
}

DoneReply Scheduler::done_reply(const Live& l, DoneReason reason) const {
  DoneReply d;
  d.id = l.sub.id;
  d.reason = reason;
  d.prompt_tokens = static_cast<int64_t>(l.sub.gen.prompt.size());
  d.completion_tokens = l.tokens;
  if (l.tokens > 0) {
    d.ttft_ms = ms_between(l.sub.arrived, l.first);
    if (l.tokens > 1) d.tpot_ms = ms_between(l.first, l.last) / static_cast<double>(l.tokens - 1);
  }
  if (l.stream) d.text = l.text;
  return d;
}

std::optional<std::string> Scheduler::text_piece(Live& l, int32_t token, bool last) {
  if (!l.stream) return std::nullopt;
  std::string piece;
  try {
    piece = l.stream->push(token);
    if (last) piece += l.stream->flush();
  } catch (const std::exception& e) {
    // A model vocabulary larger than the tokenizer's: an id with no text is sent without any.
    spdlog::debug("request {}: token {} has no text: {}", l.sub.id, token, e.what());
  }
  l.text += piece;
  return piece;
}

void Scheduler::end(int64_t seq, const ClientReply* reply, Outcome outcome) {
  auto it = live_.find(seq);
  if (it == live_.end()) return;
  Live& l = it->second;
  static constexpr const char* kOutcomeNames[] = {"finished", "cancelled", "dropped", "failed"};
  int64_t* const counts[] = {&finished_, &cancelled_, &dropped_, &failed_};
  ++*counts[static_cast<int>(outcome)];
  Ended e{std::nullopt, kOutcomeNames[static_cast<int>(outcome)], WorkerMetrics::api_of(l.sub.client),
          std::chrono::duration<double>(SteadyClock::now() - l.sub.arrived).count(), l.tokens,
          l.tokens > 1 ? std::chrono::duration<double>(l.last - l.first).count() / double(l.tokens - 1) : 0};
  if (l.admitted) {
    batch_.remove(seq);  // nothing when the batch already ended it
    reserved_blocks_ -= l.blocks;
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  }
  if (reply) e.reply = Outgoing{l.sub.client, l.sub.id, *reply, true};
  ended_.push_back(std::move(e));
  by_key_.erase({l.sub.client, l.sub.id});
  live_.erase(it);
}

void Scheduler::fail_all(ErrorCode code, const std::string& message) {
  std::vector<int64_t> seqs;
  for (const auto& [seq, l] : live_) seqs.push_back(seq);
  for (int64_t seq : seqs) {
    const ClientReply r = ErrorReply{live_.at(seq).sub.id, code, message};
    end(seq, &r, Outcome::Failed);
  }
}

void Scheduler::apply(std::vector<Command>& cmds) {
  for (Command& c : cmds) {
    if (c.kind == Command::Submit) {
      const int64_t seq = next_seq_++;
      by_key_[{c.sub.client, c.sub.id}] = seq;
      Live l;
      l.seq = seq;
      l.blocks = blocks_for(c.sub.gen);
      l.sub = std::move(c.sub);
      // Special tokens (end of turn, eos) have no text in a reply.
      if (options_.tokenizer) l.stream.emplace(options_.tokenizer->stream(true));
      live_.emplace(seq, std::move(l));
      waiting_.push_back(seq);
    } else if (c.kind == Command::Cancel) {
      auto it = by_key_.find({c.sub.client, c.sub.id});
      if (it == by_key_.end()) continue;  // already ended: its final reply is on its way
      const int64_t seq = it->second;
      const ClientReply r = done_reply(live_.at(seq), DoneReason::Cancelled);
      end(seq, &r, Outcome::Cancelled);
    } else {
      std::vector<int64_t> seqs;
      for (const auto& [seq, l] : live_)
        if (l.sub.client == c.sub.client) seqs.push_back(seq);
      for (int64_t seq : seqs) end(seq, nullptr, Outcome::Dropped);
    }
  }
}

void Scheduler::admit() {
  const int64_t max_items = backend_.limits().max_items;
  const int64_t n_blocks = backend_.kv().n_blocks();
  // In arrival order, and the head waits rather than being overtaken: a long request is never
  // starved by short ones behind it.
  while (!waiting_.empty() && static_cast<int64_t>(batch_.size()) < max_items) {
    Live& l = live_.at(waiting_.front());
    if (reserved_blocks_ + l.blocks > n_blocks) break;
    batch_.add(l.seq, l.sub.gen);
    l.admitted = true;
    reserved_blocks_ += l.blocks;
    prompt_tokens_ += static_cast<int64_t>(l.sub.gen.prompt.size());
    if (options_.metrics) options_.metrics->prompt_tokens(static_cast<int64_t>(l.sub.gen.prompt.size()));
    waiting_.pop_front();
  }
}

void Scheduler::run_step() {
  std::vector<RunningBatch::Token> tokens;
  const auto t0 = SteadyClock::now();
  const int64_t ran_before = gen_stats_.prefill_tokens + gen_stats_.decode_tokens;
  try {
    tokens = batch_.step(&gen_stats_);
  } catch (const std::exception& e) {
    // A source that is gone fails everything; any other failure fails the requests of the pass.
    try {
      weights_.keep_alive();
    } catch (const std::exception& gone) {
      spdlog::error("{}", gone.what());
      fail_all(ErrorCode::Unavailable, gone.what());
      fatal_ = true;
      return;
    }
    spdlog::error("a step failed: {}", e.what());
    std::vector<int64_t> running;
    for (const auto& [seq, l] : live_)
      if (l.admitted) running.push_back(seq);
    for (int64_t seq : running) {
      const ClientReply r = ErrorReply{live_.at(seq).sub.id, ErrorCode::Internal, e.what()};
      end(seq, &r, Outcome::Failed);
    }
    return;
  }
  const auto now = SteadyClock::now();
  if (options_.metrics)
    options_.metrics->step(std::chrono::duration<double>(now - t0).count(),
                           gen_stats_.prefill_tokens + gen_stats_.decode_tokens - ran_before,
                           static_cast<int64_t>(tokens.size()));
  for (const RunningBatch::Token& t : tokens) {
    Live& l = live_.at(t.seq);
    if (l.tokens == 0) {
      l.first = now;
      if (options_.metrics) options_.metrics->first_token(std::chrono::duration<double>(now - l.sub.arrived).count());
    }
    l.last = now;
    ++l.tokens;
    ++generated_tokens_;
    TokenReply reply{l.sub.id, t.index, t.token, text_piece(l, t.token, t.end != nullptr), t.logprobs};
    emit(Outgoing{l.sub.client, l.sub.id, std::move(reply), false});
    if (t.end) {
      const ClientReply r = done_reply(l, reason_of(t.end));
      end(t.seq, &r, Outcome::Finished);
    }
  }
  if (options_.backend_stats) backend_json_ = options_.backend_stats(backend_);
  const WeightSource::Report w = weights_.report();
  if (w.window)
    weights_json_ = {{"pass", w.pass}, {"position", w.position}, {"waits", w.waits}, {"wait_seconds", w.wait_seconds}};
}

void Scheduler::publish_stats() {
  nlohmann::json j;
  const KvBlockPool& kv = backend_.kv();
  j["backend"] = backend_.name();
  j["requests"] = {{"running", batch_.size()},
                   {"waiting", waiting_.size()},
                   {"finished", finished_},
                   {"cancelled", cancelled_},
                   {"abandoned", dropped_},
                   {"failed", failed_}};
  j["tokens"] = {{"prompt", prompt_tokens_}, {"generated", generated_tokens_}};
  j["steps"] = gen_stats_.steps;
  j["step_seconds"] = {{"prefill", gen_stats_.prefill_s}, {"decode", gen_stats_.decode_s}};
  j["kv_blocks"] = {{"free", kv.free_blocks()},
                    {"total", kv.n_blocks()},
                    {"reserved", reserved_blocks_},
                    {"block_tokens", kv.block_tokens()}};
  j["batch_size"] = backend_.limits().max_items;
  j["max_context"] = backend_.limits().max_context;
  j["uptime_s"] = std::chrono::duration<double>(SteadyClock::now() - started_).count();
  if (!backend_json_.is_null()) j["stream"] = backend_json_;
  if (!weights_json_.is_null()) j["weights"] = weights_json_;
  std::vector<Ended> ended;
  ended.swap(ended_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    j["draining"] = draining_;
    stats_ = std::move(j);
    for (Ended& e : ended)
      if (e.reply) outbox_.push_back(std::move(*e.reply));
  }
  if (options_.metrics)
    for (const Ended& e : ended)
      options_.metrics->request_ended(e.outcome, e.api, e.e2e_seconds, e.tokens, e.tpot_seconds);
}

int Scheduler::run() {
  int code = 0;
  auto alive_at = SteadyClock::now();
  for (;;) {
    beat();
    std::vector<Command> cmds;
    bool draining = false;
    SteadyClock::time_point deadline;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (inbox_.empty() && live_.empty() && !draining_)
        cv_.wait_for(lk, kIdleWait, [&] { return !inbox_.empty() || draining_; });
      cmds.swap(inbox_);
      draining = draining_;
      deadline = deadline_;
    }
    const size_t had = live_.size();
    apply(cmds);
    const auto now = SteadyClock::now();
    if (draining && live_.empty()) break;
    if (draining && now >= deadline) {
      spdlog::warn("drain: {} requests still in flight at the deadline get unavailable", live_.size());
      fail_all(ErrorCode::Unavailable, "the worker is stopping: drain_timeout_ms passed");
      break;
    }
    if (batch_.empty() || now - alive_at >= kAliveEvery) {
      try {
        weights_.keep_alive();
        alive_at = now;
      } catch (const std::exception& e) {
        spdlog::error("{}", e.what());
        fail_all(ErrorCode::Unavailable, e.what());
        code = 1;
        break;
      }
    }
    admit();
    if (!batch_.empty()) run_step();
    if (fatal_) {
      code = 1;
      break;
    }
    publish_stats();
    if (!cmds.empty() || had != live_.size() || !batch_.empty()) wake_();
  }
  publish_stats();
  stopped_.store(true);
  wake_();
  return code;
}

}  // namespace ringllama
