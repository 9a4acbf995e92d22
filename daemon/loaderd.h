// ringllama-loaderd's engine (DESIGN.md "The ring window"): owns the shared-memory segment, fills
// its slots from the store through io_uring as the window policy asks, and serves the workers over
// ZeroMQ (ROUTER on `control`, PUB beside it for slot_ready / slot_error wake-ups).
//
// One thread runs everything that touches the segment, the policy and the sockets; a second one
// only computes checksums (loaderd_verify.h), so that the reads keep the queue full while a
// finished layer is checked. A slot goes Loading before its read is submitted and Ready (or
// Error) only after both of its groups' checksums matched.
//
// A worker reads a slot straight from the segment. The policy protects the positions inside the
// window; a worker running ahead of the window (a convoy) may find its layer still in a slot that
// the policy would reuse. So the daemon (a) writes each worker's next position into the segment's
// worker table once its progress is applied, (b) never reloads a slot that holds the next layer of
// an active worker, and the worker uses layer l only after its table entry shows that position:
// the slot it reads is then never overwritten under it.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/io_reader.h"
#include "common/protocol.h"
#include "common/segment.h"
#include "common/store.h"
#include "common/window_policy.h"
#include "daemon/loaderd_sockets.h"

namespace zmq {
class context_t;
class socket_t;
}  // namespace zmq

namespace ringllama {

class ChecksumThread;

// Settings of the daemon that are not config keys (command-line only).
struct LoaderdOptions {
  std::string instance_id;                 // segment name's instance; "" = derived from `control`
  MlockMode mlock = MlockMode::Require;    // DESIGN.md wants the window pinned
  std::string lock_dir;                    // where the segment's lock file lives; "" = default_runtime_dir()
  bool serve = true;                       // false (--bench): no sockets, so the endpoint is not checked
};

// The instance id used when none is given: the control endpoint's file name (or port) and a hash
// of the whole endpoint, so that two daemons on two endpoints never share a segment, and a daemon
// restarted on the same endpoint finds (and replaces) the segment of the one that died. The daemon
// passes the canonical endpoint (canonical_endpoint()), so that two spellings of one socket path
// meet at one lock.
std::string instance_id_for(const std::string& control);
// The PUB endpoint beside `control`: "<control>-pub" for ipc://, port + 1 for tcp://.
std::string pub_endpoint_for(const std::string& control);

// A peer silent for more than kSilentBeats heartbeats (and at least 1 s) is detached: a worker
// heartbeats from a thread of its own, so only a stopped or hostile peer stays silent that long.
inline constexpr int64_t kSilentBeats = 5;
int64_t silent_drop_ms(int64_t heartbeat_ms);

class Loaderd {
  using Clock = std::chrono::steady_clock;

 public:
  // Opens the store and its reader, creates the segment (slots: cpu_cap_layers, already clamped to
  // the layers by ConfigLoader::adapt_to_model). Throws Error.
  Loaderd(const Config& config, const LoaderdOptions& opt);
  ~Loaderd();
  Loaderd(const Loaderd&) = delete;
  Loaderd& operator=(const Loaderd&) = delete;

  // Reads the globals and the first window (layer 0..), checksums checked. Returns false when
  // `stop_fd` became readable first (the reads in flight are drained). Throws Error when the
  // globals cannot be read: nothing can be served without them.
  bool fill(int stop_fd);
  // Binds the control ROUTER and the PUB socket.
  void bind();
  // Serves until `stop_fd` is readable, then drains the reads in flight. `tick` runs at least
  // every `tick_ms` (the watchdog), however many requests arrive: a round handles at most
  // kMessagesPerRound of them before the reads, the peers' checks and the tick get their turn.
  void run(int stop_fd, int64_t tick_ms, const std::function<void()>& tick);
  static constexpr int kMessagesPerRound = 64;

  // A slot in error, as "layer L (slot S): <the load error>", "" when none (the globals are loaded
  // by fill() or it throws). systemd hears READY=1 only once this is empty; failed slots are read
  // again with a backoff (retry_failed()).
  std::string window_error() const;

  nlohmann::json stats() const;
  const Segment& segment() const { return segment_; }
  const Store& store() const { return store_; }
  const std::string& instance_id() const { return instance_; }
  const std::string& control() const { return control_; }  // canonical
  uint64_t bytes_loaded() const { return bytes_loaded_; }   // bytes of verified loads (globals included)

 private:
  struct Peer {
    WorkerId id = 0;
    std::string routing_id;    // the DEALER's identity frame
    int64_t pid = 0;           // the connection's (SO_PEERCRED) where known, else the one hello gave
    bool pid_verified = false; // from the connection: a pidfd on it proves the worker's death
    int64_t uid = -1;          // the connection's, -1 unknown
    std::string name;
    int pidfd = -1;            // -1: watched with kill(pid, 0) on each tick instead
    int64_t entry = -1;        // index in the segment's worker table
    bool active = false;       // a pass in flight
    int64_t pass = -1;         // the worker's pass counter of the pass in flight (or the last)
    int64_t pass_start = 0;    // its first position
    int64_t copied = 0;        // layers of the pass copied
    int64_t held = 0;          // layers [copied, held) of the pass are being read (copies in flight)
    Clock::time_point last_seen;
    bool silent_logged = false;
  };
  struct Detached {
    int64_t pid = 0;
    std::string name;
    std::string reason;
  };

  // I/O
  void start_load(int64_t slot, int64_t layer);
  void on_read(const ReadCompletion& c);
  void on_verified(uint64_t tag, const std::string& error);
  void finish_slot(int64_t slot, int64_t layer, const std::string& error);
  void replan();
  void pump_io(bool wait);       // io completions and checksum results
  void drain_io();
  void retry_failed();           // reloads the slots in error whose backoff has passed
  // Control (loaderd_peers.cpp)
  bool on_control();             // true: messages are left for the next round
  void handle(const std::string& routing_id, const std::string& frame, const PeerCred& cred);
  void on_hello(const std::string& routing_id, const Hello& h, const PeerCred& cred);
  void on_progress(Peer& p, const Progress& m);
  void detach(WorkerId id, const std::string& reason);
  void reply(const std::string& routing_id, const ControlReply& r);
  void publish(const Notice& n);
  void check_peers();
  void republish_error(int64_t layer);
  int64_t hold_max() const;  // layers a worker may hold at once (the welcome's hold_max)
  Peer* peer_by_routing(const std::string& routing_id);

  Config config_;
  LoaderdOptions opt_;
  FileAccess access_;            // who besides the daemon's user may read the segment and connect
  std::string control_;          // config_.control, canonical
  Store store_;
  std::string store_dir_;        // absolute
  uint64_t identity_ = 0;
  std::string instance_;
  std::string window_why_;  // how cpu_cap_layers was chosen, for the log
  WindowPolicy policy_;     // before the segment: it sizes the segment's slots
  Segment segment_;
  std::unique_ptr<IoReader> io_;
  std::unique_ptr<ChecksumThread> verify_;
  std::vector<SlotView> views_;  // what each slot holds, as the daemon set it
  bool globals_ready_ = false;
  std::string globals_error_;
  bool stopping_ = false;

  std::unique_ptr<zmq::context_t> ctx_;
  std::unique_ptr<zmq::socket_t> router_;
  std::unique_ptr<zmq::socket_t> pub_;
  std::string pub_endpoint_;
  BoundEndpoint pub_bound_;      // their files, removed at exit when still ours
  BoundEndpoint control_bound_;
  uint64_t replies_dropped_ = 0; // replies a peer did not read (its queue full, or gone)
  Clock::time_point reply_warned_{};

  std::map<WorkerId, Peer> peers_;
  WorkerId next_id_ = 1;
  std::deque<Detached> detached_;   // the latest, for stats
  uint64_t detached_total_ = 0;
  // Why a connection was detached, so that a worker that speaks again hears why (the latest only).
  std::deque<std::pair<std::string, std::string>> gone_;
  Clock::time_point last_check_{};  // the last check_peers(): a daemon that stalled does not blame peers

  // Slots in error: attempts so far and when the next read may start.
  struct Retry {
    int64_t layer = -1;
    int attempts = 0;
    Clock::time_point next;
  };
  std::map<int64_t, Retry> retries_;

  // Stats
  std::chrono::steady_clock::time_point started_;
  uint64_t bytes_loaded_ = 0;
  uint64_t loads_ = 0;
  uint64_t load_errors_ = 0;
  uint64_t slot_hits_ = 0;
  uint64_t slot_misses_ = 0;
  std::map<int64_t, uint64_t> layer_loads_;   // layer -> times read
  std::map<int64_t, std::string> slot_errors_;  // layer -> the last load error's text
};

}  // namespace ringllama
