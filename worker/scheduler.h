// The worker's scheduler (DESIGN.md "Scheduling"): continuous batching of client requests on one
// backend. The socket side (worker/zmq_server.h) hands requests, cancels and vanished clients in
// through a queue; the engine thread (run()) admits them, runs the steps and hands the replies out
// through an outbox that never blocks, waking the socket side with `wake`. The engine never waits
// on a client.
//
// Admission: waiting requests join in arrival order while the batch has fewer than batch_size
// sequences and the KV pool can reserve the blocks of prompt + max_tokens (no preemption, so an
// admitted request always finishes). Each step carries every running sequence's next prompt chunk
// (prefill_chunk_tokens at most) or decode token; a request that arrives mid-generation joins at
// the next step, and a finished, cancelled or abandoned sequence gives its blocks back at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/protocol.h"
#include "common/tokenizer.h"
#include "worker/backend.h"
#include "worker/generation.h"
#include "worker/weights.h"

namespace ringllama {

using SteadyClock = std::chrono::steady_clock;
class WorkerMetrics;

// A request, checked by the socket side.
struct Submission {
  std::string client;           // the connection's routing id
  std::string id;               // the client's request id (unique per connection while in flight)
  GenRequest gen;               // valid for the backend's limits
  SteadyClock::time_point arrived;
};

// A reply for one connection.
struct Outgoing {
  std::string client;
  std::string id;               // the request's id
  ClientReply reply;
  bool final = false;           // the request's last reply (done or error)
};

struct SchedulerOptions {
  // Extra figures for stats, computed on the engine thread after each step (the CUDA backend's
  // streaming report); null = none.
  std::function<nlohmann::json(const Backend&)> backend_stats;
  // The model's tokenizer (null: none): token and done replies then carry text, decoded as a
  // stream so that no piece splits a UTF-8 character. It outlives the scheduler.
  const Tokenizer* tokenizer = nullptr;
  // Where the engine reports requests' ends, tokens and steps as they happen (worker/metrics.h);
  // null = nowhere. It outlives the scheduler.
  WorkerMetrics* metrics = nullptr;
};

class Scheduler {
 public:
  // `wake` is called (from the engine thread) whenever the outbox gains replies or the engine
  // stops; it must not block.
  Scheduler(Backend& backend, WeightSource& weights, SchedulerOptions options, std::function<void()> wake);

  // ---- the socket side ----
  void submit(Submission s);
  // Stops the request at the next step: `done` with reason cancelled.
  void cancel(const std::string& client, const std::string& id);
  // The client is gone: its requests end without a reply.
  void drop_client(const std::string& client);
  // Admits nothing new after the requests already submitted; those run until `deadline`, then the
  // rest get `unavailable`; run() returns 0 once none is left. A second call can only bring the
  // deadline closer.
  void drain(SteadyClock::time_point deadline);
  // The replies since the last call, in order.
  std::vector<Outgoing> take_replies();
  // Counts, KV blocks, steps (and backend_stats under "stream"), as of the last step.
  nlohmann::json stats() const;
  // run() has returned.
  bool stopped() const { return stopped_.load(); }
  // When the engine last went round its loop (for the watchdog: a hung step stops the pings).
  SteadyClock::time_point last_beat() const { return SteadyClock::time_point(SteadyClock::duration(beat_.load())); }

  // ---- the engine thread ----
  // Runs until drained (returns 0) or until the weights can no longer be had, e.g. the daemon
  // died (every request in flight gets `unavailable`; returns 1).
  int run();

 private:
  struct Live {
    Submission sub;
    int64_t seq = 0;
    int64_t blocks = 0;          // KV blocks reserved (prompt + max_tokens)
    bool admitted = false;       // running (else waiting)
    int64_t tokens = 0;          // generated so far
    SteadyClock::time_point first, last;
    std::optional<Tokenizer::Stream> stream;  // with a tokenizer: the text decoded so far
    std::string text;            // the pieces sent
  };
  struct Command {
    enum Kind { Submit, Cancel, Drop } kind = Submit;
    Submission sub;              // Submit; client and id for the others
  };

  void apply(std::vector<Command>& cmds);
  // How a request ended: counted in stats, and in the metrics as "finished", "cancelled",
  // "dropped" or "failed".
  enum class Outcome { Finished, Cancelled, Dropped, Failed };
  // Ends the request: counted under `outcome`, its final reply (none for a vanished client), its
  // sequence and blocks freed. The final reply and the metrics' count wait in ended_ for the next
  // publish_stats, so that a client holding its final reply, or a scrape counting it ended, finds
  // the stats without it.
  void end(int64_t seq, const ClientReply* reply, Outcome outcome);
  DoneReply done_reply(const Live& l, DoneReason reason) const;
  // The text `token` completes (all that is held back too when it is the last); nullopt without a
  // tokenizer.
  std::optional<std::string> text_piece(Live& l, int32_t token, bool last);
  void fail_all(ErrorCode code, const std::string& message);
  void admit();
  void run_step();
  void emit(Outgoing o);
  void publish_stats();
  int64_t blocks_for(const GenRequest& r) const;
  void beat() { beat_.store(SteadyClock::now().time_since_epoch().count()); }

  Backend& backend_;
  WeightSource& weights_;
  SchedulerOptions options_;
  std::function<void()> wake_;
  RunningBatch batch_;

  // Engine thread only.
  std::map<int64_t, Live> live_;             // running and waiting, by sequence id
  std::deque<int64_t> waiting_;              // sequence ids in arrival order
  std::map<std::pair<std::string, std::string>, int64_t> by_key_;  // (client, id) -> sequence
  int64_t next_seq_ = 0;
  int64_t reserved_blocks_ = 0;
  bool fatal_ = false;                       // the weights are gone: stop
  GenStats gen_stats_;
  int64_t finished_ = 0, cancelled_ = 0, dropped_ = 0, failed_ = 0;
  int64_t prompt_tokens_ = 0, generated_tokens_ = 0;
  nlohmann::json backend_json_;
  nlohmann::json weights_json_;              // the daemon window's report (WeightSource::report)
  struct Ended {
    std::optional<Outgoing> reply;
    const char* outcome;
    const char* api;
    double e2e_seconds;
    int64_t tokens;
    double tpot_seconds;
  };
  std::vector<Ended> ended_;                 // since the last publish_stats

  // Shared with the socket side.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Command> inbox_;
  std::vector<Outgoing> outbox_;
  bool draining_ = false;
  SteadyClock::time_point deadline_;
  nlohmann::json stats_;
  std::atomic<bool> stopped_{false};
  std::atomic<SteadyClock::rep> beat_{0};
  const SteadyClock::time_point started_ = SteadyClock::now();
};

}  // namespace ringllama
