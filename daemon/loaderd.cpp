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
// Reads of a slot in error are retried after 250 ms, then twice as long each time, at most 30 s
// apart: a file repaired in place (or a disk error that passes) is picked up without a restart.
constexpr int64_t kRetryFirstMs = 250;
constexpr int64_t kRetryMaxMs = 30000;

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

SegmentOptions segment_options(const LoaderdOptions& opt, const FileAccess& access) {
  SegmentOptions so;
  so.mlock = opt.mlock;
  so.lock_dir = opt.lock_dir;
  so.access = access;
  return so;
}

// The control endpoint checked (its directory private, nobody answering there; the default runtime
// directory made) and in canonical form: the instance id, and so the lock, follow the socket file,
// not the spelling of its path.
std::string prepare_control(const std::string& control, const FileAccess& access, bool serve) {
  if (!serve) return control;
  // The one socket directory the daemon makes is its default runtime directory; any other must
  // exist (it is checked where it really is: a symlinked path is resolved first).
  const std::string path = ipc_socket_path(control);
  const std::string dir = path.empty() ? std::string() : fs::path(path).parent_path().string();
  if (!dir.empty() && dir == default_runtime_dir()) ensure_private_dir(dir, true, access, "runtime");
  const std::string canonical = canonical_endpoint(control);
  check_endpoint(canonical, access, "control");
  if (canonical != control) spdlog::info("control endpoint {} is {}", control, canonical);
  check_endpoint(pub_endpoint_for(canonical), access, "PUB");
  return canonical;
}

}  // namespace

Loaderd::Loaderd(const Config& config, const LoaderdOptions& opt)
    : config_(config),
      opt_(opt),
      access_(file_access(config.access_group)),
      control_(prepare_control(config.control, access_, opt.serve)),
      store_(Store::open(config.store)),
      store_dir_(fs::absolute(config.store).lexically_normal().string()),
      identity_(store_identity(store_)),
      instance_(opt.instance_id.empty() ? instance_id_for(control_) : opt.instance_id),
      policy_(window_params(store_.manifest(), config, opt.mlock == MlockMode::Require, &window_why_)),
      segment_(Segment::create(instance_, identity_, SegmentLayout::for_manifest(store_.manifest(), policy_.cap()),
                               segment_options(opt, access_))) {
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
  // The socket files (pub_bound_, control_bound_) go with the members, when they are still ours.
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
  auto retry = retries_.find(slot);
  if (ok) {
    bytes_loaded_ += m.layer_size(layer);
    spdlog::debug("slot {}: layer {} ready (generation {})", slot, layer, e.generation.load());
    if (retry != retries_.end()) {
      spdlog::info("slot {}: layer {} loaded after {} retries", slot, layer, retry->second.attempts);
      retries_.erase(retry);
    }
    slot_errors_.erase(layer);
    publish(SlotReady{slot, layer, e.generation.load()});
  } else {
    ++load_errors_;
    const std::string msg = fmt::format("layer {} (offset {}, {} bytes) could not be loaded: {}", layer,
                                        m.layer_offset(layer), m.layer_size(layer), error);
    if (retry == retries_.end() || retry->second.layer != layer)
      retry = retries_.insert_or_assign(slot, Retry{layer, 0, Clock::now()}).first;
    Retry& r = retry->second;
    const int64_t wait_ms = std::min<int64_t>(kRetryMaxMs, kRetryFirstMs << std::min(r.attempts, 20));
    r.next = Clock::now() + std::chrono::milliseconds(wait_ms);
    spdlog::error("slot {}: {}; read again in {} ms", slot, msg, wait_ms);
    slot_errors_[layer] = msg;
    publish(SlotErrorNotice{slot, layer, msg});
  }
}

void Loaderd::retry_failed() {
  const auto now = Clock::now();
  for (auto it = retries_.begin(); it != retries_.end();) {
    const int64_t slot = it->first;
    Retry& r = it->second;
    const SlotView& v = views_[static_cast<size_t>(slot)];
    // The policy gave the slot to another layer since (the failed one left the window): nothing to
    // retry there; the layer is read again when the window asks for it.
    if (v.layer != r.layer || v.fill == SlotFill::Ready) {
      it = retries_.erase(it);
      continue;
    }
    if (v.fill == SlotFill::Error && now >= r.next) {
      ++r.attempts;
      spdlog::info("slot {}: reading layer {} again (retry {})", slot, r.layer, r.attempts);
      start_load(slot, r.layer);
    }
    ++it;
  }
}

std::string Loaderd::window_error() const {
  for (size_t s = 0; s < views_.size(); ++s)
    if (views_[s].fill == SlotFill::Error) {
      auto it = slot_errors_.find(views_[s].layer);
      return fmt::format("slot {}: {}", s,
                         it != slot_errors_.end() ? it->second : fmt::format("layer {} in error", views_[s].layer));
    }
  return {};
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
  pub_endpoint_ = pub_endpoint_for(control_);
  // Checked again: another daemon (with another lock directory) may have bound since the start.
  // A failure after the PUB socket is bound leaves its file to pub_bound_, which removes it.
  check_endpoint(pub_endpoint_, access_, "PUB");
  pub_bound_ = BoundEndpoint(*pub_, pub_endpoint_, access_, "PUB");
  check_endpoint(control_, access_, "control");
  control_bound_ = BoundEndpoint(*router_, control_, access_, "control");
  if (control_.rfind("tcp://", 0) == 0)
    spdlog::warn("control on tcp: peers cannot be identified (no SO_PEERCRED) and anyone who reaches the port "
                 "may attach; prefer an ipc:// endpoint, or bind to 127.0.0.1 on a trusted host");
  spdlog::info("serving on {} (wake-ups on {}), segment {}", control_, pub_endpoint_, segment_.name());
}

void Loaderd::run(int stop_fd, int64_t tick_ms, const std::function<void()>& tick) {
  const int io_fd = io_->event_fd();
  auto last_tick = Clock::now();
  auto last_check = Clock::now();
  const int64_t check_ms = std::max<int64_t>(10, std::min<int64_t>(config_.heartbeat_ms, 200));
  bool backlog = false;  // the last round left control messages unread: look again at once
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
    const int64_t timeout = backlog ? 0 : std::max<int64_t>(1, std::min(tick_ms, check_ms));
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(timeout));

    if (items[3].revents & ZMQ_POLLIN) {
      spdlog::info("stop requested: draining {} reads in flight", io_->pending());
      stopping_ = true;
      drain_io();
      return;
    }
    pump_io(false);
    // Read the control socket every round, whatever revents says: a zmq socket's readiness is
    // edge-like, and a message that arrived during the last round is not signalled again. At most
    // kMessagesPerRound per round, so that the reads, the checks and the tick below keep their pace.
    backlog = on_control();
    for (size_t i = 0; i < watched.size(); ++i)
      if (items[4 + i].revents & ZMQ_POLLIN) detach(watched[i], "its process exited");
    retry_failed();
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
                       {"pid_verified", p.pid_verified},
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
              {"detached_total", detached_total_},
              {"replies_dropped", replies_dropped_},
              {"retrying", retries_.size()}};
}

}  // namespace ringllama
