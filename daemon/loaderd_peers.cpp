// The loader daemon's side of the control socket: workers attach (hello), report their passes
// (progress), heartbeat and leave (bye, death, silence). Who a peer is comes from its connection,
// never from what it says (DESIGN.md "Trust").
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/errors.h"
#include "common/log.h"
#include "daemon/loaderd.h"

namespace ringllama {

namespace {

constexpr size_t kDetachedKept = 16;

int pidfd_open(int64_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0)); }

bool process_alive(int64_t pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

}  // namespace

int64_t silent_drop_ms(int64_t heartbeat_ms) { return std::max<int64_t>(kSilentBeats * heartbeat_ms, 1000); }

void Loaderd::publish(const Notice& n) {
  if (!pub_) return;
  const std::string s = encode(n);
  try {
    pub_->send(zmq::buffer(s), zmq::send_flags::dontwait);
  } catch (const zmq::error_t& e) {
    spdlog::warn("PUB send: {}", e.what());
  }
}

void Loaderd::reply(const std::string& routing_id, const ControlReply& r) {
  const std::string s = encode(r);
  std::string why;
  try {
    // A full queue (the peer does not read) refuses the first frame: the body must not follow it
    // alone, or it would be taken for the routing frame of another message.
    if (router_->send(zmq::buffer(routing_id), zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      router_->send(zmq::buffer(s), zmq::send_flags::dontwait);
    else
      why = "its queue is full";
  } catch (const zmq::error_t& e) {
    why = e.what();
  }
  if (why.empty()) return;
  // A peer that does not read its replies (or is gone) must not flood the log: one line a second.
  ++replies_dropped_;
  const auto now = Clock::now();
  if (now - reply_warned_ >= std::chrono::seconds(1)) {
    spdlog::warn("reply to a peer that is gone or does not read its replies: {} ({} replies dropped so far)", why,
                 replies_dropped_);
    reply_warned_ = now;
  }
}

Loaderd::Peer* Loaderd::peer_by_routing(const std::string& routing_id) {
  for (auto& [id, p] : peers_)
    if (p.routing_id == routing_id) return &p;
  return nullptr;
}

bool Loaderd::on_control() {
  // Bounded: a peer sending requests in a loop would otherwise keep this loop from the reads, the
  // peers' checks and the watchdog. ROUTER queues fairly between connections, so the workers'
  // messages still come through within a round or two.
  for (int i = 0; i < kMessagesPerRound; ++i) {
    std::vector<zmq::message_t> frames;
    std::optional<size_t> got;
    try {
      got = zmq::recv_multipart(*router_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    } catch (const zmq::error_t& e) {
      spdlog::warn("control socket: {}", e.what());
      return false;
    }
    if (!got) return false;
    if (frames.size() < 2) continue;
    const std::string routing_id = frames.front().to_string();
    const PeerCred cred = peer_credentials(frames.back());
    handle(routing_id, frames.back().to_string(), cred);
  }
  return true;
}

void Loaderd::handle(const std::string& routing_id, const std::string& frame, const PeerCred& cred) {
  ControlRequest req;
  try {
    req = parse_control_request(frame);
  } catch (const ProtocolError& e) {
    spdlog::warn("control: bad request: {}", e.what());
    reply(routing_id, ControlError{e.what()});
    return;
  }
  if (const auto* h = std::get_if<Hello>(&req)) {
    on_hello(routing_id, *h, cred);
    return;
  }
  if (std::holds_alternative<StatsRequest>(req)) {
    if (Peer* p = peer_by_routing(routing_id)) p->last_seen = Clock::now();
    reply(routing_id, StatsReply{stats()});
    return;
  }
  Peer* p = peer_by_routing(routing_id);
  if (!p) {
    // A worker the daemon does not know (it restarted, or the worker was detached): say so, once
    // per message, so that the worker can fail instead of waiting.
    if (std::holds_alternative<Bye>(req)) return;
    for (const auto& [rid, why] : gone_)
      if (rid == routing_id) {
        reply(routing_id, ControlError{"this worker was detached (" + why + "): send hello again"});
        return;
      }
    reply(routing_id, ControlError{"unknown worker: send hello first (the loader daemon may have restarted)"});
    return;
  }
  p->last_seen = Clock::now();
  if (p->silent_logged) {
    spdlog::info("worker {} (pid {}) is heard from again", p->id, p->pid);
    p->silent_logged = false;
  }
  if (const auto* m = std::get_if<Progress>(&req)) {
    try {
      on_progress(*p, *m);
    } catch (const Error& e) {
      spdlog::warn("worker {} (pid {}): progress {{pass {}, copied {}}} refused: {}", p->id, p->pid, m->pass,
                   m->copied, e.what());
    }
    replan();
  } else if (std::holds_alternative<Bye>(req)) {
    detach(p->id, "said bye");
  }
  // Heartbeat: last_seen is all it does.
}

void Loaderd::on_hello(const std::string& routing_id, const Hello& h, const PeerCred& cred) {
  if (Peer* old = peer_by_routing(routing_id)) detach(old->id, "said hello again");
  // The pid comes from the connection where the kernel tells it: a hello may claim any pid (pid 1
  // would never exit, and a pidfd on it would keep a silent peer attached for good).
  int64_t pid = h.pid;
  bool verified = false;
  if (cred.known) {
    if (cred.uid != ::geteuid() && cred.uid != 0 && !access_.group) {
      spdlog::warn("hello from uid {} (pid {}) refused: only uid {} may use this daemon", cred.uid, cred.pid,
                   ::geteuid());
      reply(routing_id, ControlError{fmt::format("uid {} may not use this loader daemon", cred.uid)});
      return;
    }
    if (cred.pid > 0) {
      if (h.pid != cred.pid)
        spdlog::info("hello says pid {}, the connection is pid {}'s (another pid namespace, or a false pid): "
                     "pid {} is the one watched",
                     h.pid, cred.pid, cred.pid);
      pid = cred.pid;
      verified = true;
    }
  }
  int64_t entry = -1;
  for (int64_t i = 0; i < kMaxWorkers; ++i)
    if (segment_.worker_entry(i).pid.load() == 0) {
      entry = i;
      break;
    }
  if (entry < 0) {
    spdlog::warn("worker pid {} refused: {} workers are attached already", pid, kMaxWorkers);
    reply(routing_id, ControlError{fmt::format("the loader daemon serves at most {} workers", kMaxWorkers)});
    return;
  }
  Peer p;
  p.id = next_id_++;
  p.routing_id = routing_id;
  p.pid = pid;
  p.pid_verified = verified;
  p.uid = cred.known ? static_cast<int64_t>(cred.uid) : -1;
  p.name = h.worker;
  p.entry = entry;
  p.last_seen = Clock::now();
  p.pidfd = pid > 0 ? pidfd_open(pid) : -1;
  if (p.pidfd < 0 && pid > 0) {
    if (errno == ESRCH) {
      spdlog::warn("worker pid {} said hello but is not running (another pid namespace?): refused", pid);
      reply(routing_id, ControlError{fmt::format("pid {} is not running on the daemon's host", pid)});
      return;
    }
    spdlog::debug("pidfd_open({}): {}; watching it with kill(pid, 0)", pid, errno_text(errno));
  }
  segment_.worker_entry_rw(entry).position.store(-1);
  segment_.worker_entry_rw(entry).held.store(-1);
  // Non-zero marks the entry taken, also for a peer whose pid is unknown.
  segment_.worker_entry_rw(entry).pid.store(pid > 0 && pid <= INT32_MAX ? static_cast<int32_t>(pid) : -1);
  policy_.attach(p.id);
  spdlog::info("worker {} attached: pid {}{}{}{}", p.id, p.pid, verified ? "" : " (as it says: not verified)",
               p.name.empty() ? "" : ", ", p.name);
  Welcome w;
  w.segment = segment_.name();
  w.layout_version = kSegmentLayoutVersion;
  w.instance_id = instance_;
  w.store = store_dir_;
  w.store_identity = identity_;
  w.n_layers = store_.model().n_layers;
  w.n_slots = segment_.layout().n_slots;
  w.heartbeat_ms = config_.heartbeat_ms;
  w.pub = pub_endpoint_;
  w.worker_id = entry;
  w.hold_max = hold_max();
  peers_.emplace(p.id, p);
  reply(routing_id, w);
  replan();
}

int64_t Loaderd::hold_max() const {
  // Each held layer must stay in the window while the slowest worker's next one does: no more than
  // the cycling slots (the whole ring's) less back_margin; 2 copies in flight keep a PCIe link busy.
  const int64_t cycling = policy_.cycling_slots() > 0 ? policy_.cycling_slots() : policy_.cap();
  return std::clamp<int64_t>(cycling - config_.back_margin, 1, 2);
}

void Loaderd::on_progress(Peer& p, const Progress& m) {
  const int64_t n = store_.model().n_layers;
  WorkerEntry& e = segment_.worker_entry_rw(p.entry);
  if (m.copied == 0 && !(p.active && m.pass == p.pass)) {
    if (p.active) {
      spdlog::warn("worker {} begins pass {} without ending pass {}", p.id, m.pass, p.pass);
      policy_.end_pass(p.id);
      p.active = false;
    }
    if (m.pass <= p.pass) fail("pass {} does not follow pass {}", m.pass, p.pass);
    p.pass_start = policy_.begin_pass(p.id);
    p.pass = m.pass;
    p.copied = 0;
    p.active = true;
  } else {
    if (!p.active || m.pass != p.pass) {
      if (m.pass == p.pass && m.copied == n) return;  // the end of a pass already ended
      fail("no pass {} in flight", m.pass);
    }
    if (m.copied > n) fail("copied {} is over the model's {} layers", m.copied, n);
    if (m.copied < p.copied) fail("copied {} goes back from {}", m.copied, p.copied);
    p.copied = m.copied;
  }
  // Layers being read beyond the next one: protected from reuse by replan() like the next one.
  if (m.held > p.copied + hold_max())
    fail("held {} is more than {} layers past copied {}", m.held, hold_max(), p.copied);
  p.held = std::clamp<int64_t>(m.held, p.copied, n);
  if (p.copied >= n) {
    policy_.end_pass(p.id);
    p.active = false;
    e.position.store(-1);
    e.held.store(-1);
    return;
  }
  const int64_t next = p.pass_start + p.copied;
  if (p.copied > 0) policy_.progress(p.id, next);
  e.position.store(next);
  e.held.store(p.pass_start + p.held);
  // A hit: the layer the worker needs next is in a slot and ready as it asks.
  const int64_t layer = next % n;
  const bool hit = std::any_of(views_.begin(), views_.end(), [&](const SlotView& v) {
    return v.layer == layer && v.fill == SlotFill::Ready;
  });
  ++(hit ? slot_hits_ : slot_misses_);
  republish_error(layer);
}

void Loaderd::republish_error(int64_t layer) {
  auto it = slot_errors_.find(layer);
  if (it == slot_errors_.end()) return;
  for (size_t s = 0; s < views_.size(); ++s)
    if (views_[s].layer == layer && views_[s].fill == SlotFill::Error) {
      publish(SlotErrorNotice{static_cast<int64_t>(s), layer, it->second});
      return;
    }
}

void Loaderd::detach(WorkerId id, const std::string& reason) {
  auto it = peers_.find(id);
  if (it == peers_.end()) return;
  Peer& p = it->second;
  if (p.pidfd >= 0) ::close(p.pidfd);
  gone_.emplace_back(p.routing_id, reason);
  if (gone_.size() > static_cast<size_t>(kMaxWorkers)) gone_.pop_front();
  segment_.worker_entry_rw(p.entry).position.store(-1);
  segment_.worker_entry_rw(p.entry).held.store(-1);
  segment_.worker_entry_rw(p.entry).pid.store(0);
  policy_.detach(id);
  spdlog::info("worker {} (pid {}) detached: {}", id, p.pid, reason);
  detached_.push_back(Detached{p.pid, p.name, reason});
  if (detached_.size() > kDetachedKept) detached_.pop_front();
  ++detached_total_;
  peers_.erase(it);
  replan();
}

void Loaderd::check_peers() {
  const auto now = Clock::now();
  // A daemon that could not look (a long stall of its own) has not heard its peers either: the
  // time it was away does not count as their silence.
  const int64_t check_ms = std::max<int64_t>(10, std::min<int64_t>(config_.heartbeat_ms, 200));
  if (last_check_ != Clock::time_point{} && now - last_check_ > std::chrono::milliseconds(4 * check_ms)) {
    const auto away = now - last_check_;
    for (auto& [id, p] : peers_) p.last_seen += away;
  }
  last_check_ = now;
  const int64_t drop_ms = silent_drop_ms(config_.heartbeat_ms);
  std::vector<std::pair<WorkerId, std::string>> gone;
  for (auto& [id, p] : peers_) {
    if (p.pidfd < 0 && p.pid > 0 && !process_alive(p.pid)) {
      gone.emplace_back(id, "its process is gone");
      continue;
    }
    const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - p.last_seen).count();
    if (silent > drop_ms) {
      // A live worker heartbeats from a thread of its own, even in the middle of a long step: one
      // that stays silent this long is stopped or hostile, and must not hold the window (every
      // other worker would wait on it). Should it still be reading a slot, the generation check
      // at its release fails its pass rather than passing on what was reloaded under it.
      gone.emplace_back(id, fmt::format("silent for {} ms (more than {} heartbeats)", silent, kSilentBeats));
      continue;
    }
    if (!p.silent_logged && silent > 3 * config_.heartbeat_ms) {
      spdlog::warn("worker {} (pid {}) missed its heartbeat: silent for {} ms; detached after {} ms", id, p.pid,
                   silent, drop_ms);
      p.silent_logged = true;
    }
  }
  for (const auto& [id, why] : gone) detach(id, why);
  // A worker that subscribed after a slot failed missed its notice: say it again to whoever waits
  // on a layer in error (wake-ups may be lost; the slot table stays the truth).
  const int64_t n = store_.model().n_layers;
  for (const auto& [id, p] : peers_)
    if (p.active && p.copied < n) republish_error((p.pass_start + p.copied) % n);
}


}  // namespace ringllama
