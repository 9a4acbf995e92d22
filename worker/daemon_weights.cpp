#include "worker/daemon_weights.h"

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/errors.h"
#include "common/log.h"
#include "common/protocol.h"
#include "common/runtime_dir.h"
#include "common/segment.h"
#include "common/store.h"

namespace ringllama {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int kWelcomeTimeoutMs = 5000;     // a daemon that is up answers hello at once
constexpr int kRecheckMs = 50;              // longest sleep between two looks at the slot table
constexpr int kErrorMessageWaitMs = 2000;   // a slot in error: how long to wait for its notice's text

int pidfd_open(int64_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0)); }

std::string ipc_path(const std::string& endpoint) {
  const std::string prefix = "ipc://";
  return endpoint.compare(0, prefix.size(), prefix) == 0 ? endpoint.substr(prefix.size()) : std::string();
}

// A PUB endpoint bound on every interface is reached through the host of the control endpoint.
std::string connectable_pub(const std::string& pub, const std::string& control) {
  const std::string tcp = "tcp://";
  if (pub.compare(0, tcp.size(), tcp) != 0 || control.compare(0, tcp.size(), tcp) != 0) return pub;
  const size_t pc = pub.rfind(':'), cc = control.rfind(':');
  const std::string host = pub.substr(tcp.size(), pc - tcp.size());
  if (host != "*" && host != "0.0.0.0") return pub;
  return control.substr(0, cc) + pub.substr(pc);
}

class DaemonWeights : public WeightSource {
 public:
  DaemonWeights(const std::string& endpoint, const Config& config, const std::string& name) : endpoint_(endpoint) {
    const std::string path = ipc_path(endpoint);
    if (!path.empty() && path[0] != '@' && !fs::exists(path))
      fail("no loader daemon at {}: {} does not exist (is ringllama-loaderd running?)", endpoint, path);
    ctx_ = std::make_unique<zmq::context_t>(1);
    dealer_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::dealer);
    dealer_->set(zmq::sockopt::linger, 0);
    try {
      dealer_->connect(endpoint);
    } catch (const zmq::error_t& e) {
      fail("loader daemon endpoint {}: {}", endpoint, e.what());
    }
    send(ControlRequest{Hello{static_cast<int64_t>(::getpid()), name.empty() ? fmt::format("generate-{}", ::getpid()) : name}});
    zmq::pollitem_t item{static_cast<void*>(*dealer_), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(kWelcomeTimeoutMs)) == 0)
      fail("no answer from the loader daemon at {} within {} s: is ringllama-loaderd running?", endpoint,
           kWelcomeTimeoutMs / 1000);
    zmq::message_t msg;
    (void)dealer_->recv(msg, zmq::recv_flags::none);
    // Who answered, as the kernel says (ipc): the segment must be that user's file.
    const char* peer = ::zmq_msg_gets(msg.handle(), "Peer-Address");
    const PeerCred daemon = peer ? parse_peer_address(peer) : PeerCred{};
    const ControlReply reply = parse_control_reply(msg.to_string());
    if (const auto* e = std::get_if<ControlError>(&reply))
      fail("the loader daemon at {} refused this worker: {}", endpoint, e->message);
    const auto* w = std::get_if<Welcome>(&reply);
    if (!w) fail("the loader daemon at {} answered hello with something else than a welcome", endpoint);
    welcome_ = *w;
    if (welcome_.layout_version != kSegmentLayoutVersion)
      fail("the loader daemon uses segment layout {}, this build reads {}: run both from the same build",
           welcome_.layout_version, kSegmentLayoutVersion);

    store_dir_ = config.store.empty() ? welcome_.store : config.store;
    store_ = std::make_unique<Store>(Store::open(store_dir_));
    const uint64_t identity = store_identity(*store_);
    if (identity != welcome_.store_identity)
      fail("{} is not the store the loader daemon at {} serves ({}): their manifests differ", store_dir_, endpoint,
           welcome_.store);
    segment_ = std::make_unique<Segment>(Segment::open(
        welcome_.segment, identity, daemon.known ? std::optional<uid_t>(daemon.uid) : std::nullopt));
    const Manifest& m = store_->manifest();
    n_layers_ = m.model.n_layers;
    check_segment_sizes(m);
    if (welcome_.worker_id < 0 || welcome_.worker_id >= kMaxWorkers)
      fail("the loader daemon gave worker entry {}, outside [0, {})", welcome_.worker_id, kMaxWorkers);
    // The pid the connection names where known: the header is the daemon's word only.
    daemon_pid_ = daemon.known && daemon.pid > 0 ? daemon.pid : segment_->header().daemon_pid;
    daemon_fd_ = pidfd_open(daemon_pid_);
    if (daemon_fd_ < 0 && errno == ESRCH) fail("loader daemon died (pid {} is gone)", daemon_pid_);
    heartbeat_ = std::chrono::milliseconds(std::max<int64_t>(10, welcome_.heartbeat_ms));

    sub_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::sub);
    sub_->set(zmq::sockopt::linger, 0);
    sub_->set(zmq::sockopt::subscribe, "");
    if (!welcome_.pub.empty()) sub_->connect(connectable_pub(welcome_.pub, endpoint));

    spdlog::debug("loader daemon {} (pid {}): segment {}, {} slots, store {}, worker entry {}", endpoint, daemon_pid_,
                  welcome_.segment, welcome_.n_slots, store_dir_, welcome_.worker_id);
    wait_for("the globals", [&] {
      const SlotSnapshot s = segment_->globals_entry().snapshot();
      if (s.state == SlotState::Error) throw Error(error_text(-1, "the globals could not be loaded"));
      return s.state == SlotState::Ready;
    });
    globals_ = globals_view(m, segment_->globals_data());
    heartbeat_thread_ = std::thread([this] { heartbeat_loop(); });
  }

  ~DaemonWeights() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_heartbeat_ = true;
    }
    stop_cv_.notify_all();
    if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
    stop_prefault_ = true;
    if (prefault_thread_.joinable()) prefault_thread_.join();
    try {
      if (daemon_alive()) {
        send(ControlRequest{Bye{}});
        dealer_->set(zmq::sockopt::linger, 1000);  // let the bye go out before the socket closes
      }
    } catch (const std::exception& e) {
      spdlog::debug("bye: {}", e.what());
    }
    sub_.reset();
    dealer_.reset();
    ctx_.reset();
    if (daemon_fd_ >= 0) ::close(daemon_fd_);
  }

  const Manifest& manifest() const override { return store_->manifest(); }
  GlobalWeights globals() override { return globals_; }
  const std::string& store_dir() const { return store_dir_; }
  // Fills this process's page tables for the globals and the slots, from the first host_memory()
  // call on (the GPU side's, as it starts registering them) ahead of the registration:
  // cudaHostRegister then pins mapped pages instead of faulting each of ~4 million in first, about
  // a third faster (measured: 16 GiB in 0.54 s against 0.81 s). Not earlier: while it runs it
  // holds the mmap lock against the CUDA driver's own mappings, and a context created meanwhile
  // took 0.7 s instead of 0.1 s (H200). Only the page tables change; the pages are the daemon's.
  void prefault() const {
    constexpr uint64_t kChunk = uint64_t{64} << 20;
    constexpr int kPopulateRead = 22;  // MADV_POPULATE_READ, Linux 5.14
    bool madvise_works = true;
    for (const HostRange& r : ranges()) {
      const auto* p = static_cast<const volatile char*>(r.data);
      for (uint64_t at = 0; at < r.bytes && !stop_prefault_; at += kChunk) {
        const uint64_t n = std::min(kChunk, r.bytes - at);
        if (madvise_works &&
            ::madvise(const_cast<char*>(static_cast<const char*>(r.data)) + at, n, kPopulateRead) == 0)
          continue;
        madvise_works = false;  // an older kernel: one read per page does the same
        for (uint64_t b = 0; b < n; b += 4096) (void)p[at + b];
      }
    }
  }

  // The globals, then each slot: the pieces a copy reads from (never two at once), registered
  // read-only where the device supports it; the header and the tables are never copied.
  std::vector<HostRange> host_memory() const override {
    std::call_once(prefault_started_, [this] { prefault_thread_ = std::thread([this] { prefault(); }); });
    return ranges();
  }
  std::vector<HostRange> ranges() const {
    const SegmentLayout& l = segment_->layout();
    std::vector<HostRange> r{HostRange{segment_->globals_data(), l.globals_bytes}};
    for (int64_t i = 0; i < l.n_slots; ++i) r.push_back(HostRange{segment_->slot_data(i), l.slot_bytes});
    return r;
  }

  void begin_pass() override {
    if (in_pass_) end_pass();
    ++pass_;
    copied_ = 0;
    pass_start_ = -1;
    in_pass_ = true;
    send(ControlRequest{Progress{pass_, 0}});
  }

  void end_pass() override {
    if (!in_pass_) return;
    in_pass_ = false;
    holds_.clear();
    if (copied_ < n_layers_) send(ControlRequest{Progress{pass_, n_layers_}});
    if (pass_start_ >= 0) {
      floor_ = pass_start_ + n_layers_;
    } else {
      // The pass start was never seen: wait until the daemon has ended the pass, so that the next
      // pass cannot take this one's start for its own.
      try {
        wait_for("the end of the pass", [&] { return entry().position.load() < 0; }, std::chrono::seconds(2));
      } catch (const std::exception& e) {
        spdlog::debug("end of pass {}: {}", pass_, e.what());
      }
    }
  }

  Report report() const override {
    Report r;
    r.window = true;
    r.pass = pass_;
    r.position = entry().position.load();
    r.waits = waits_;
    r.wait_seconds = wait_seconds_;
    return r;
  }

  void keep_alive() override {
    drain_sockets();
    if (!daemon_alive()) throw Error(fmt::format("loader daemon died (pid {})", daemon_pid_));
    heartbeat_if_due();
  }

  LayerWeights acquire_layer(int64_t layer) override {
    if (layer < 0 || layer >= n_layers_)
      throw Error(fmt::format("layer {} does not exist (the model has {})", layer, n_layers_));
    if (!in_pass_) begin_pass();
    const int64_t expected = copied_ + static_cast<int64_t>(holds_.size());
    if (layer != expected)
      throw Error(fmt::format("layer {} asked for while layer {} is next: a pass reads the layers in order", layer,
                              expected));
    if (static_cast<int64_t>(holds_.size()) >= welcome_.hold_max)
      throw Error(fmt::format("layer {} asked for while {} layers are held, the most the daemon allows (hold_max); "
                              "release one first",
                              layer, holds_.size()));
    if (holds_.empty()) {
      // 1. The daemon has applied our progress up to this layer: from then on it keeps the slot
      //    holding it, even if we run ahead of the window.
      wait_for(fmt::format("the loader daemon to apply progress to layer {}", layer).c_str(), [&] {
        const int64_t p = entry().position.load();
        if (p < 0 || p < floor_ || p % n_layers_ != layer) return false;
        if (layer == 0) pass_start_ = p;
        return p == pass_start_ + layer;
      });
    } else {
      // 1'. A layer ahead of the one still being copied: the daemon protects [copied, held) once
      //     it has applied the hold, so the copy of this layer can go out behind the other.
      send(ControlRequest{Progress{pass_, copied_, layer + 1}});
      wait_for(fmt::format("the loader daemon to apply the hold of layer {}", layer).c_str(), [&] {
        return entry().position.load() == pass_start_ + copied_ && entry().held.load() >= pass_start_ + layer + 1;
      });
    }
    // 2. A slot holds the layer, ready.
    std::optional<Hold> got;
    wait_for(fmt::format("layer {}", layer).c_str(), [&] {
      for (int64_t s = 0; s < segment_->layout().n_slots; ++s) {
        const SlotSnapshot snap = segment_->slot(s).snapshot();
        if (snap.layer != layer) continue;
        if (snap.state == SlotState::Ready) {
          got = Hold{layer, s, snap};
          return true;
        }
        if (snap.state == SlotState::Error) throw Error(error_text(layer, ""));
      }
      error_seen_ = Clock::time_point{};
      return false;
    });
    holds_.push_back(*got);
    return layer_view(store_->manifest(), layer, segment_->slot_data(got->slot));
  }

  int64_t layers_held_at_once() const override { return welcome_.hold_max; }

  // In the order they were acquired.
  void release_layer(int64_t layer) override {
    if (holds_.empty() || holds_.front().layer != layer)
      throw Error(fmt::format("release of layer {}, which is not the oldest held", layer));
    const Hold h = holds_.front();
    holds_.pop_front();
    if (!segment_->slot(h.slot).unchanged(h.snap)) {
      const SlotSnapshot now = segment_->slot(h.slot).snapshot();
      throw Error(fmt::format("slot {} changed while layer {} was read from it (generation {} -> {}, now layer {} {}): "
                              "the data read may be garbage",
                              h.slot, layer, h.snap.generation, now.generation, now.layer, slot_state_name(now.state)));
    }
    copied_ = layer + 1;
    send(ControlRequest{Progress{pass_, copied_, copied_ + static_cast<int64_t>(holds_.size())}});
    if (copied_ == n_layers_) {
      in_pass_ = false;
      floor_ = pass_start_ + n_layers_;
    }
  }

 private:
  struct Hold {
    int64_t layer = -1;
    int64_t slot = -1;
    SlotSnapshot snap;
  };

  const WorkerEntry& entry() const { return segment_->worker_entry(welcome_.worker_id); }

  // Every slot must hold the largest layer and the globals region the globals, as this manifest
  // has them: a segment sized for another model would be read past its slots.
  void check_segment_sizes(const Manifest& m) const {
    const SegmentHeader& h = segment_->header();
    const SegmentLayout& l = segment_->layout();
    if (h.n_layers != n_layers_)
      fail("shared memory segment {} has {} layers, the manifest {}", welcome_.segment, h.n_layers, n_layers_);
    if (l.n_slots != welcome_.n_slots)
      fail("shared memory segment {} has {} slots, the loader daemon's welcome says {}", welcome_.segment, l.n_slots,
           welcome_.n_slots);
    if (l.slot_payload < m.max_layer_size())
      fail("shared memory segment {} has slots of {} bytes, but the manifest's largest layer has {}: the segment "
           "was made for another model",
           welcome_.segment, l.slot_payload, m.max_layer_size());
    if (l.globals_bytes < m.globals().size)
      fail("shared memory segment {} has {} bytes for the globals, the manifest's need {}: the segment was made "
           "for another model",
           welcome_.segment, l.globals_bytes, m.globals().size);
  }

  // Heartbeats from a thread of their own: a step may keep the engine away from this object for
  // longer than the daemon waits before it detaches a silent peer.
  void heartbeat_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    const auto period = std::max(heartbeat_ / 2, std::chrono::milliseconds(5));
    while (!stop_cv_.wait_for(lock, period, [&] { return stop_heartbeat_; })) {
      if (Clock::now() - last_sent_ < period) continue;
      try {
        send_locked(ControlRequest{Heartbeat{}});
      } catch (const std::exception& e) {
        spdlog::debug("heartbeat: {}", e.what());
      }
    }
  }

  void heartbeat_if_due() {
    std::lock_guard<std::mutex> lock(mu_);
    if (Clock::now() - last_sent_ >= heartbeat_) send_locked(ControlRequest{Heartbeat{}});
  }

  // The DEALER is shared with the heartbeat thread: every use holds mu_.
  void send(const ControlRequest& r) {
    std::lock_guard<std::mutex> lock(mu_);
    send_locked(r);
  }

  void send_locked(const ControlRequest& r) {
    const std::string s = encode(r);
    try {
      if (!dealer_->send(zmq::buffer(s), zmq::send_flags::dontwait))
        spdlog::warn("loader daemon {}: send queue full, a message was dropped", endpoint_);
    } catch (const zmq::error_t& e) {
      fail("loader daemon {}: send: {}", endpoint_, e.what());
    }
    last_sent_ = Clock::now();
  }

  bool daemon_alive() const {
    if (daemon_fd_ >= 0) {
      pollfd p{daemon_fd_, POLLIN, 0};
      return ::poll(&p, 1, 0) == 0;
    }
    return ::kill(static_cast<pid_t>(daemon_pid_), 0) == 0 || errno == EPERM;
  }

  // The daemon's text for a slot error of `layer` (-1: globals), from its notice; a generic text
  // when the notice does not come (wake-ups may be lost).
  std::string error_text(int64_t layer, const std::string& fallback) {
    auto it = errors_.find(layer);
    if (it != errors_.end()) return "loader daemon: " + it->second;
    if (error_seen_ == Clock::time_point{}) error_seen_ = Clock::now();
    if (Clock::now() - error_seen_ < std::chrono::milliseconds(kErrorMessageWaitMs)) throw NotYet{};
    return fallback.empty()
               ? fmt::format("loader daemon: layer {} could not be loaded (its slot is in error; see the daemon's log)",
                             layer)
               : "loader daemon: " + fallback;
  }
  struct NotYet {};

  void drain_sockets() {
    for (;;) {
      zmq::message_t msg;
      if (!sub_->recv(msg, zmq::recv_flags::dontwait)) break;
      try {
        const Notice n = parse_notice(msg.to_string());
        if (const auto* e = std::get_if<SlotErrorNotice>(&n)) errors_[e->layer] = e->message;
      } catch (const ProtocolError& e) {
        spdlog::warn("loader daemon {}: bad notice: {}", endpoint_, e.what());
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (;;) {
      zmq::message_t msg;
      if (!dealer_->recv(msg, zmq::recv_flags::dontwait)) break;
      ControlReply r;
      try {
        r = parse_control_reply(msg.to_string());
      } catch (const ProtocolError& e) {
        spdlog::warn("loader daemon {}: bad reply: {}", endpoint_, e.what());
        continue;
      }
      if (const auto* e = std::get_if<ControlError>(&r)) fail("loader daemon {}: {}", endpoint_, e->message);
    }
  }

  // Waits until ready() (which may throw) holds: re-checked after every wake-up and at least every
  // kRecheckMs, with a heartbeat when due; throws when the daemon dies or `limit` passes.
  template <typename Ready>
  void wait_for(const char* what, Ready ready, std::chrono::milliseconds limit = std::chrono::milliseconds(0)) {
    const auto t0 = Clock::now();
    auto next_log = t0 + std::chrono::seconds(10);
    for (int round = 0;; ++round) {
      drain_sockets();
      try {
        if (ready()) {
          if (round > 0) {  // counted only when it had to wait
            ++waits_;
            wait_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
          }
          return;
        }
      } catch (const NotYet&) {
      }
      if (!daemon_alive()) throw Error(fmt::format("loader daemon died (pid {}) while waiting for {}", daemon_pid_, what));
      const auto now = Clock::now();
      heartbeat_if_due();
      if (limit.count() > 0 && now - t0 > limit) fail("timed out waiting for {}", what);
      if (now > next_log) {
        spdlog::info("still waiting for {} ({:.0f} s)", what, std::chrono::duration<double>(now - t0).count());
        next_log = now + std::chrono::seconds(10);
      }
      // The daemon answers within microseconds when it is idle: look often at first, then sleep
      // on the wake-ups with a timed re-check.
      if (round < 200) {
        std::this_thread::sleep_for(std::chrono::microseconds(25));
        continue;
      }
      std::vector<zmq::pollitem_t> items = {{static_cast<void*>(*sub_), 0, ZMQ_POLLIN, 0},
                                            {static_cast<void*>(*dealer_), 0, ZMQ_POLLIN, 0}};
      if (daemon_fd_ >= 0) items.push_back({nullptr, daemon_fd_, ZMQ_POLLIN, 0});
      std::lock_guard<std::mutex> lock(mu_);
      zmq::poll(items.data(), items.size(), std::chrono::milliseconds(round < 300 ? 1 : kRecheckMs));
    }
  }

  std::string endpoint_;
  Welcome welcome_;
  std::string store_dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Segment> segment_;
  std::atomic<bool> stop_prefault_{false};
  mutable std::once_flag prefault_started_;
  mutable std::thread prefault_thread_;
  GlobalWeights globals_;
  int64_t n_layers_ = 0;
  int64_t daemon_pid_ = 0;
  int daemon_fd_ = -1;
  std::unique_ptr<zmq::context_t> ctx_;
  std::unique_ptr<zmq::socket_t> dealer_;
  std::unique_ptr<zmq::socket_t> sub_;
  std::chrono::milliseconds heartbeat_{1000};
  Clock::time_point last_sent_;  // under mu_
  std::mutex mu_;                 // the DEALER socket and last_sent_: the heartbeat thread sends too
  std::condition_variable stop_cv_;
  bool stop_heartbeat_ = false;
  std::thread heartbeat_thread_;
  std::map<int64_t, std::string> errors_;   // layer (-1 globals) -> the daemon's message
  Clock::time_point error_seen_{};

  // The pass: the daemon places it; we learn its first position from our worker table entry.
  int64_t pass_ = -1;
  bool in_pass_ = false;
  int64_t copied_ = 0;
  int64_t pass_start_ = -1;
  int64_t floor_ = 0;            // the next pass starts at or after this position
  std::deque<Hold> holds_;  // acquired and not released, oldest first (at most welcome_.hold_max)
  uint64_t waits_ = 0;      // wait_for calls that had to wait, and their time (report())
  double wait_seconds_ = 0;
};

}  // namespace

std::unique_ptr<WeightSource> open_daemon_weights(const std::string& endpoint, const Config& config,
                                                  std::string* store_dir, const std::string& name) {
  auto w = std::make_unique<DaemonWeights>(endpoint, config, name);
  if (store_dir) *store_dir = w->store_dir();
  return w;
}

}  // namespace ringllama
