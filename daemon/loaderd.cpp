#include "daemon/loaderd.h"

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "common/errors.h"
#include "common/host_plan.h"
#include "common/log.h"
#include "daemon/loaderd_verify.h"

namespace ringllama {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kGlobalsTag = ~0ull;
constexpr size_t kDetachedKept = 16;

int pidfd_open(int64_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0)); }

bool process_alive(int64_t pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

// ipc://PATH -> PATH, or "" for other transports.
std::string ipc_path(const std::string& endpoint) {
  const std::string prefix = "ipc://";
  return endpoint.compare(0, prefix.size(), prefix) == 0 ? endpoint.substr(prefix.size()) : std::string();
}

void make_ipc_dir(const std::string& endpoint, const char* what) {
  const std::string path = ipc_path(endpoint);
  if (path.empty() || path[0] == '@') return;  // not ipc, or an abstract socket
  const fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    fail("{} endpoint {}: cannot create the directory {}: {} (create it, or pick another endpoint with --control)",
         what, endpoint, dir.string(), ec.message());
}

void bind_socket(zmq::socket_t& s, const std::string& endpoint, const char* what) {
  make_ipc_dir(endpoint, what);
  try {
    s.bind(endpoint);
  } catch (const zmq::error_t& e) {
    std::string hint;
    if (e.num() == EADDRINUSE) hint = ": the address is in use (another loaderd?)";
    else if (e.num() == ENAMETOOLONG) hint = ": the socket path is too long for a unix socket (about 107 bytes at most)";
    else if (e.num() == EACCES) hint = ": permission denied";
    fail("{} endpoint {}: cannot bind: {}{}", what, endpoint, e.what(), hint);
  }
}

const char* fill_name(SlotFill f) {
  switch (f) {
    case SlotFill::Empty: return "empty";
    case SlotFill::Loading: return "loading";
    case SlotFill::Ready: return "ready";
    case SlotFill::Error: return "error";
  }
  return "?";
}

}  // namespace

std::string instance_id_for(const std::string& control) {
  std::string base = control;
  const size_t slash = base.find_last_of("/:");
  if (slash != std::string::npos) base = base.substr(slash + 1);
  std::string clean;
  for (char c : base)
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-') clean += c;
    else if (c == '.') clean += '_';
  if (clean.size() > 24) clean.resize(24);
  if (clean.empty()) clean = "loaderd";
  return fmt::format("{}-{:016x}", clean, XXH3_64bits(control.data(), control.size()));
}

std::string pub_endpoint_for(const std::string& control) {
  const std::string tcp = "tcp://";
  if (control.compare(0, tcp.size(), tcp) == 0) {
    const size_t colon = control.rfind(':');
    if (colon != std::string::npos && colon > tcp.size()) {
      const std::string port = control.substr(colon + 1);
      char* end = nullptr;
      const long p = std::strtol(port.c_str(), &end, 10);
      if (!port.empty() && *end == '\0' && p > 0 && p < 65535)
        return control.substr(0, colon + 1) + std::to_string(p + 1);
    }
    fail("control endpoint {}: a tcp endpoint needs an explicit port below 65535 (the PUB socket takes the next one)",
         control);
  }
  return control + "-pub";
}

namespace {

SegmentOptions segment_options(const LoaderdOptions& opt) {
  SegmentOptions so;
  so.mlock = opt.mlock;
  so.lock_dir = opt.lock_dir;
  return so;
}

}  // namespace

Loaderd::Loaderd(const Config& config, const LoaderdOptions& opt)
    : config_(config),
      opt_(opt),
      store_(Store::open(config.store)),
      store_dir_(fs::absolute(config.store).lexically_normal().string()),
      identity_(store_identity(store_)),
      instance_(opt.instance_id.empty() ? instance_id_for(config.control) : opt.instance_id),
      policy_(window_params(store_.manifest(), config, opt.mlock == MlockMode::Require, &window_why_)),
      segment_(Segment::create(instance_, identity_, SegmentLayout::for_manifest(store_.manifest(), policy_.cap()),
                               segment_options(opt))) {
  started_ = Clock::now();
  const Manifest& m = store_.manifest();
  const int64_t slots = policy_.cap();
  io_ = std::make_unique<IoReader>(store_.weights_path(), io_options(config));
  verify_ = std::make_unique<ChecksumThread>(store_);
  views_.assign(static_cast<size_t>(slots), SlotView{});
  spdlog::info("store {}: {} layers, {} bytes; window of {} slots ({}; {} pinned, {} cycling), back_margin {}; "
               "reads {}",
               store_dir_, m.model.n_layers, m.weights_size, slots, window_why_, policy_.pinned_layers(),
               slots < m.model.n_layers ? policy_.cycling_slots() : 0, config.back_margin,
               io_->direct() ? "O_DIRECT" : "buffered (the file system refuses O_DIRECT)");
}

Loaderd::~Loaderd() {
  // Reads still in flight write into the segment: let them land before it is unmapped.
  try {
    drain_io();
  } catch (const std::exception& e) {
    spdlog::error("draining the reads: {}", e.what());
  }
  for (auto& [id, p] : peers_)
    if (p.pidfd >= 0) ::close(p.pidfd);
  pub_.reset();
  router_.reset();
  ctx_.reset();
  // A socket file left behind would make a client wait for a reply instead of failing at once.
  if (bound_)
    for (const std::string& ep : {config_.control, pub_endpoint_}) {
      const std::string path = ipc_path(ep);
      if (!path.empty() && path[0] != '@') ::unlink(path.c_str());
    }
}

// ---------------------------------------------------------------- I/O

void Loaderd::start_load(int64_t slot, int64_t layer) {
  const Manifest& m = store_.manifest();
  segment_.slot_rw(slot).begin_load(layer);
  views_[static_cast<size_t>(slot)] = SlotView{layer, SlotFill::Loading};
  ReadRequest r;
  r.offset = m.layer_offset(layer);
  r.len = m.layer_size(layer);
  r.dst = segment_.slot_data_rw(slot);
  r.tag = static_cast<uint64_t>(slot);
  io_->submit(r);
  ++loads_;
  ++layer_loads_[layer];
  spdlog::debug("slot {}: loading layer {} ({} bytes at offset {})", slot, layer, r.len, r.offset);
}

void Loaderd::on_read(const ReadCompletion& c) {
  const Manifest& m = store_.manifest();
  const uint64_t tag = c.request.tag;
  if (!c.ok()) {
    if (tag == kGlobalsTag) {
      finish_slot(-1, -1, c.error);
    } else {
      const int64_t slot = static_cast<int64_t>(tag);
      finish_slot(slot, views_[tag].layer, c.error);
    }
    return;
  }
  ChecksumThread::Job job;
  job.tag = tag;
  job.data = static_cast<const uint8_t*>(c.request.dst);
  job.base = c.request.offset;
  if (tag == kGlobalsTag) {
    job.groups = {&m.globals()};
  } else {
    const int64_t layer = views_[tag].layer;
    job.groups = {&m.attn(layer), &m.ffn(layer)};
  }
  verify_->post(std::move(job));
}

void Loaderd::on_verified(uint64_t tag, const std::string& error) {
  if (tag == kGlobalsTag) finish_slot(-1, -1, error);
  else finish_slot(static_cast<int64_t>(tag), views_[tag].layer, error);
}

void Loaderd::finish_slot(int64_t slot, int64_t layer, const std::string& error) {
  const Manifest& m = store_.manifest();
  const bool ok = error.empty();
  if (slot < 0) {
    segment_.globals_entry_rw().finish_load(ok);
    globals_ready_ = ok;
    globals_error_ = error;
    if (ok) {
      bytes_loaded_ += m.globals().size;
      publish(SlotReady{-1, -1, segment_.globals_entry().generation.load()});
    } else {
      spdlog::error("globals (offset {}, {} bytes): {}", m.globals().offset, m.globals().size, error);
      publish(SlotErrorNotice{-1, -1, "globals: " + error});
    }
    return;
  }
  SlotEntry& e = segment_.slot_rw(slot);
  e.finish_load(ok);
  views_[static_cast<size_t>(slot)].fill = ok ? SlotFill::Ready : SlotFill::Error;
  if (ok) {
    bytes_loaded_ += m.layer_size(layer);
    spdlog::debug("slot {}: layer {} ready (generation {})", slot, layer, e.generation.load());
    publish(SlotReady{slot, layer, e.generation.load()});
  } else {
    ++load_errors_;
    const std::string msg = fmt::format("layer {} (offset {}, {} bytes) could not be loaded: {}", layer,
                                        m.layer_offset(layer), m.layer_size(layer), error);
    spdlog::error("slot {}: {}", slot, msg);
    slot_errors_[layer] = msg;
    publish(SlotErrorNotice{slot, layer, msg});
  }
}

void Loaderd::replan() {
  if (stopping_) return;
  // A worker reads its next layer straight from the slot that holds it, even when it runs ahead
  // of the window: such a slot is shown to the policy as busy, so that it is not reloaded under it.
  std::vector<SlotView> views = views_;
  const int64_t n = store_.model().n_layers;
  for (const auto& [id, p] : peers_) {
    if (!p.active || p.copied >= n) continue;
    for (int64_t l = p.copied; l < std::max(p.held, p.copied + 1) && l < n; ++l) {
      const int64_t layer = (p.pass_start + l) % n;
      for (SlotView& v : views)
        if (v.layer == layer && v.fill == SlotFill::Ready) v.fill = SlotFill::Loading;
    }
  }
  const WindowPlan plan = policy_.plan(views);
  for (const SlotLoad& l : plan.loads) start_load(l.slot, l.layer);
}

void Loaderd::pump_io(bool wait) {
  if (io_->pending() > 0) {
    io_->poll([this](const ReadCompletion& c) { on_read(c); }, wait && verify_->busy() == 0);
  }
  for (const auto& r : verify_->take()) on_verified(r.tag, r.error);
}

void Loaderd::drain_io() {
  if (!io_ || !verify_) return;
  while (io_->pending() > 0 || verify_->busy() > 0) {
    if (io_->pending() > 0) io_->poll([this](const ReadCompletion& c) { on_read(c); }, true);
    if (io_->pending() == 0 && verify_->busy() > 0) {
      pollfd p{verify_->event_fd(), POLLIN, 0};
      ::poll(&p, 1, 100);
    }
    for (const auto& r : verify_->take()) on_verified(r.tag, r.error);
  }
}

bool Loaderd::fill(int stop_fd) {
  const Manifest& m = store_.manifest();
  const auto t0 = Clock::now();
  SlotEntry& g = segment_.globals_entry_rw();
  g.begin_load(-1);
  ReadRequest r;
  r.offset = m.globals().offset;
  r.len = m.globals().size;
  r.dst = segment_.globals_data_rw();
  r.tag = kGlobalsTag;
  io_->submit(r);
  replan();
  const int io_fd = io_->event_fd();
  while (io_->pending() > 0 || verify_->busy() > 0) {
    pollfd fds[3] = {{io_fd, POLLIN, 0}, {verify_->event_fd(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
    // The reader's eventfd tells of completions; poll() also submits what is queued.
    pump_io(false);
    if (io_->pending() == 0 && verify_->busy() == 0) break;
    ::poll(fds, stop_fd >= 0 ? 3 : 2, 100);
    if (stop_fd >= 0 && (fds[2].revents & POLLIN)) {
      spdlog::info("stop requested while filling the window: draining the reads in flight");
      stopping_ = true;
      drain_io();
      return false;
    }
  }
  if (!globals_ready_) fail("the globals could not be loaded: {}", globals_error_);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  spdlog::info("globals and the first window loaded: {} bytes in {:.3f} s ({:.2f} GB/s)", bytes_loaded_, s,
               s > 0 ? double(bytes_loaded_) / s / 1e9 : 0.0);
  return true;
}

// ---------------------------------------------------------------- control

void Loaderd::bind() {
  ctx_ = std::make_unique<zmq::context_t>(1);
  router_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::router);
  router_->set(zmq::sockopt::linger, 0);
  router_->set(zmq::sockopt::router_mandatory, 1);
  router_->set(zmq::sockopt::maxmsgsize, int64_t(1) << 20);
  pub_ = std::make_unique<zmq::socket_t>(*ctx_, zmq::socket_type::pub);
  pub_->set(zmq::sockopt::linger, 0);
  pub_endpoint_ = pub_endpoint_for(config_.control);
  bind_socket(*pub_, pub_endpoint_, "PUB");
  bind_socket(*router_, config_.control, "control");
  bound_ = true;
  spdlog::info("serving on {} (wake-ups on {}), segment {}", config_.control, pub_endpoint_, segment_.name());
}

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
  try {
    router_->send(zmq::buffer(routing_id), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
    router_->send(zmq::buffer(s), zmq::send_flags::dontwait);
  } catch (const zmq::error_t& e) {
    spdlog::warn("reply to a peer that is gone: {}", e.what());
  }
}

Loaderd::Peer* Loaderd::peer_by_routing(const std::string& routing_id) {
  for (auto& [id, p] : peers_)
    if (p.routing_id == routing_id) return &p;
  return nullptr;
}

void Loaderd::on_control() {
  for (;;) {
    std::vector<zmq::message_t> frames;
    std::optional<size_t> got;
    try {
      got = zmq::recv_multipart(*router_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    } catch (const zmq::error_t& e) {
      spdlog::warn("control socket: {}", e.what());
      return;
    }
    if (!got) return;
    if (frames.size() < 2) continue;
    const std::string routing_id = frames.front().to_string();
    handle(routing_id, frames.back().to_string());
  }
}

void Loaderd::handle(const std::string& routing_id, const std::string& frame) {
  ControlRequest req;
  try {
    req = parse_control_request(frame);
  } catch (const ProtocolError& e) {
    spdlog::warn("control: bad request: {}", e.what());
    reply(routing_id, ControlError{e.what()});
    return;
  }
  if (const auto* h = std::get_if<Hello>(&req)) {
    on_hello(routing_id, *h);
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
    if (!std::holds_alternative<Bye>(req))
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

void Loaderd::on_hello(const std::string& routing_id, const Hello& h) {
  if (Peer* old = peer_by_routing(routing_id)) detach(old->id, "said hello again");
  int64_t entry = -1;
  for (int64_t i = 0; i < kMaxWorkers; ++i)
    if (segment_.worker_entry(i).pid.load() == 0) {
      entry = i;
      break;
    }
  if (entry < 0) {
    spdlog::warn("worker pid {} refused: {} workers are attached already", h.pid, kMaxWorkers);
    reply(routing_id, ControlError{fmt::format("the loader daemon serves at most {} workers", kMaxWorkers)});
    return;
  }
  Peer p;
  p.id = next_id_++;
  p.routing_id = routing_id;
  p.pid = h.pid;
  p.name = h.worker;
  p.entry = entry;
  p.last_seen = Clock::now();
  p.pidfd = pidfd_open(h.pid);
  if (p.pidfd < 0) {
    if (errno == ESRCH) {
      spdlog::warn("worker pid {} said hello but is not running (another pid namespace?): refused", h.pid);
      reply(routing_id, ControlError{fmt::format("pid {} is not running on the daemon's host", h.pid)});
      return;
    }
    spdlog::debug("pidfd_open({}): {}; watching it with kill(pid, 0)", h.pid, errno_text(errno));
  }
  segment_.worker_entry_rw(entry).position.store(-1);
  segment_.worker_entry_rw(entry).held.store(-1);
  segment_.worker_entry_rw(entry).pid.store(static_cast<int32_t>(h.pid));
  policy_.attach(p.id);
  spdlog::info("worker {} attached: pid {}{}{}", p.id, p.pid, p.name.empty() ? "" : ", ", p.name);
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
  std::vector<WorkerId> dead;
  for (auto& [id, p] : peers_) {
    if (p.pidfd < 0 && !process_alive(p.pid)) dead.push_back(id);
    const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - p.last_seen).count();
    if (!p.silent_logged && silent > 3 * config_.heartbeat_ms) {
      // Only a log: a slow worker may still be reading a slot, and reusing it would feed it garbage.
      spdlog::warn("worker {} (pid {}) missed its heartbeat: silent for {} ms; kept attached until it exits or "
                   "says bye",
                   id, p.pid, silent);
      p.silent_logged = true;
    }
  }
  for (WorkerId id : dead) detach(id, "its process is gone");
  // A worker that subscribed after a slot failed missed its notice: say it again to whoever waits
  // on a layer in error (wake-ups may be lost; the slot table stays the truth).
  const int64_t n = store_.model().n_layers;
  for (const auto& [id, p] : peers_)
    if (p.active && p.copied < n) republish_error((p.pass_start + p.copied) % n);
}

void Loaderd::run(int stop_fd, int64_t tick_ms, const std::function<void()>& tick) {
  const int io_fd = io_->event_fd();
  auto last_tick = Clock::now();
  auto last_check = Clock::now();
  const int64_t check_ms = std::max<int64_t>(10, std::min<int64_t>(config_.heartbeat_ms, 200));
  while (true) {
    std::vector<zmq::pollitem_t> items;
    items.push_back({static_cast<void*>(*router_), 0, ZMQ_POLLIN, 0});
    items.push_back({nullptr, io_fd, ZMQ_POLLIN, 0});
    items.push_back({nullptr, verify_->event_fd(), ZMQ_POLLIN, 0});
    items.push_back({nullptr, stop_fd, ZMQ_POLLIN, 0});
    std::vector<WorkerId> watched;
    for (const auto& [id, p] : peers_)
      if (p.pidfd >= 0) {
        items.push_back({nullptr, p.pidfd, ZMQ_POLLIN, 0});
        watched.push_back(id);
      }
    const int64_t timeout = std::max<int64_t>(1, std::min(tick_ms, check_ms));
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(timeout));

    if (items[3].revents & ZMQ_POLLIN) {
      spdlog::info("stop requested: draining {} reads in flight", io_->pending());
      stopping_ = true;
      drain_io();
      return;
    }
    pump_io(false);
    // Read the control socket until empty every round, whatever revents says: a zmq socket's
    // readiness is edge-like, and a message that arrived during the last round is not signalled again.
    on_control();
    for (size_t i = 0; i < watched.size(); ++i)
      if (items[4 + i].revents & ZMQ_POLLIN) detach(watched[i], "its process exited");
    replan();
    pump_io(false);

    const auto now = Clock::now();
    if (now - last_check >= std::chrono::milliseconds(check_ms)) {
      check_peers();
      last_check = now;
    }
    if (now - last_tick >= std::chrono::milliseconds(tick_ms)) {
      if (tick) tick();
      last_tick = now;
    }
  }
}

json Loaderd::stats() const {
  const IoStats io = io_->stats();
  const int64_t n = store_.model().n_layers;
  json workers = json::array();
  for (const auto& [id, p] : peers_) {
    workers.push_back({{"id", id},
                       {"pid", p.pid},
                       {"name", p.name},
                       {"active", p.active},
                       {"pass", p.pass},
                       {"position", p.active ? p.pass_start + p.copied : -1},
                       {"layer", p.active ? (p.pass_start + p.copied) % n : -1},
                       {"silent_ms", std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - p.last_seen)
                                         .count()}});
  }
  json detached = json::array();
  for (const auto& d : detached_) detached.push_back({{"pid", d.pid}, {"name", d.name}, {"reason", d.reason}});
  json slots = json::array();
  for (size_t s = 0; s < views_.size(); ++s) {
    const SlotSnapshot snap = segment_.slot(static_cast<int64_t>(s)).snapshot();
    slots.push_back({{"slot", s}, {"layer", views_[s].layer}, {"state", fill_name(views_[s].fill)},
                     {"generation", snap.generation}});
  }
  json loads = json::object();
  for (const auto& [layer, count] : layer_loads_) loads[std::to_string(layer)] = count;
  const double busy_s = double(io.busy_ns) * 1e-9;
  return json{{"instance", instance_},
              {"segment", segment_.name()},
              {"store", store_dir_},
              {"uptime_s", std::chrono::duration<double>(Clock::now() - started_).count()},
              {"bytes_read", io.bytes},
              {"bytes_direct", io.direct_bytes},
              {"read_gb_per_s", busy_s > 0 ? double(io.bytes) / busy_s / 1e9 : 0.0},
              {"read_errors", io.errors},
              {"loads", loads_},
              {"load_errors", load_errors_},
              {"layer_loads", loads},
              {"slot_hits", slot_hits_},
              {"slot_misses", slot_misses_},
              {"stalls", slot_misses_},
              {"convoy_events", policy_.convoy_events()},
              {"window",
               {{"start", policy_.window_start()},
                {"end", policy_.window_end()},
                {"slots", policy_.cap()},
                {"pinned_layers", policy_.pinned_layers()},
                {"cycling_slots", policy_.cycling_slots()}}},
              {"slots", slots},
              {"workers", workers},
              {"detached", detached},
              {"detached_total", detached_total_}};
}

}  // namespace ringllama
