#include "worker/window_weights.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "common/errors.h"
#include "common/host_plan.h"
#include "common/io_reader.h"
#include "common/log.h"
#include "common/store.h"
#include "common/window_policy.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

constexpr WorkerId kSelf = 1;  // the window's only worker

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

class WindowWeightsImpl final : public WindowWeights {
 public:
  WindowWeightsImpl(const std::string& dir, const Config& config)
      : store_(Store::open(dir)),
        n_layers_(store_.model().n_layers),
        back_margin_(config.back_margin),
        policy_(window_params(store_.manifest(), config, false, &window_why_)) {
    const Manifest& m = store_.manifest();
    auto io = std::make_unique<IoReader>(store_.weights_path(), io_options(config));
    // O_DIRECT wants the buffer aligned to the device's rule; groups are 4 KiB multiples anyway.
    align_ = std::max<uint64_t>(kGroupAlign, io->mem_align());
    globals_bytes_ = align_up(m.globals().size, align_);
    slot_bytes_ = align_up(m.max_layer_size(), align_);
    n_slots_ = policy_.cap();
    total_bytes_ = globals_bytes_ + static_cast<uint64_t>(n_slots_) * slot_bytes_;
    void* p = nullptr;
    const int rc = posix_memalign(&p, align_, total_bytes_);
    if (rc != 0)
      fail("{}: cannot allocate the ring window ({} bytes: globals and {} slots of {} bytes): {}", dir, total_bytes_,
           n_slots_, slot_bytes_, errno_text(rc));
    base_.reset(static_cast<char*>(p));
    // Every page written once now, before anyone registers the memory with CUDA: a read-only
    // registration of pages never touched would pin the kernel's shared zero page, and the reads
    // that fill a slot later would land in fresh copies the device never sees.
    std::memset(base_.get(), 0, total_bytes_);
    read_group_checked(store_, *io, m.globals(), base_.get());
    globals_ = globals_view(m, base_.get());

    slots_.assign(static_cast<size_t>(n_slots_), Slot{});
    held_.assign(static_cast<size_t>(n_layers_), -1);
    done_.assign(static_cast<size_t>(n_layers_), 0);
    stats_.slots = n_slots_;
    stats_.reads_per_layer.assign(static_cast<size_t>(n_layers_), 0);
    policy_.attach(kSelf);
    spdlog::debug("window {}: {} slots of {} bytes ({}; {} pinned), back_margin {}, reads {}", dir, n_slots_,
                  slot_bytes_, window_why_, policy_.pinned_layers(), config.back_margin,
                  io->direct() ? "O_DIRECT" : "buffered");
    // The reader moves to the loader thread, which alone uses it from now on.
    io_ = std::move(io);
    loader_ = std::thread([this] { loader_main(); });
  }

  ~WindowWeightsImpl() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    loader_.join();  // a read in flight finishes first: it writes into base_
  }

  const Manifest& manifest() const override { return store_.manifest(); }
  GlobalWeights globals() override { return globals_; }

  void begin_pass() override {
    std::lock_guard<std::mutex> lk(mu_);
    begin_pass_locked();
  }

  void end_pass() override {
    std::lock_guard<std::mutex> lk(mu_);
    end_pass_locked();
  }

  LayerWeights acquire_layer(int64_t layer) override {
    std::unique_lock<std::mutex> lk(mu_);
    if (layer < 0 || layer >= n_layers_)
      fail("layer {} does not exist (the model has {})", layer, n_layers_);
    if (!in_pass_) begin_pass_locked();
    if (layer < streamed_from_)
      fail("layer {} is not read by this window: layers below {} are resident on the GPU", layer, streamed_from_);
    if (layer < next_acquire_)
      fail("layer {} asked for after layer {}: a pass reads the layers in increasing order", layer, next_acquire_ - 1);
    // Layers jumped over are done: the window may move past them. `layer` itself counts as
    // acquired only once it is returned, so that a failed acquire can be tried again.
    for (int64_t j = next_acquire_; j < layer; ++j) done_[static_cast<size_t>(j)] = 1;
    next_acquire_ = layer;
    advance_locked();

    const int64_t position = pass_start_ + layer;
    if (!policy_.in_window(position)) {
      // Only this thread's releases move the window: waiting here would never end.
      fail("layer {} cannot be loaded while {} layer(s) from layer {} on are held: the window has {} slots "
           "(cpu_cap_layers, back_margin {}); release layers before acquiring more than {} at once",
           layer, held_count_, low_, n_slots_, back_margin_, max_held_layers());
    }
    const auto t0 = Clock::now();
    bool stalled = false;
    int64_t slot = -1;
    for (;;) {
      if (!fatal_.empty()) fail("layer {}: the window's loader stopped: {}", layer, fatal_);
      slot = slot_of(layer);
      if (slot >= 0 && slots_[static_cast<size_t>(slot)].fill == SlotFill::Ready) break;
      if (slot >= 0 && slots_[static_cast<size_t>(slot)].fill == SlotFill::Error) {
        Slot& s = slots_[static_cast<size_t>(slot)];
        const std::string why = s.error;
        // Emptied: the layer is read again when it is next in the window (the next pass), once.
        s = Slot{};
        cv_.notify_all();
        fail("layer {} could not be loaded from {}: {}", layer, store_.dir(), why);
      }
      stalled = true;
      cv_.wait(lk);
    }
    if (stalled) {
      ++stats_.stalls;
      stats_.stall_seconds += seconds_since(t0);
    }
    ++stats_.acquires;
    next_acquire_ = layer + 1;
    held_[static_cast<size_t>(layer)] = slot;
    ++slots_[static_cast<size_t>(slot)].holds;
    ++held_count_;
    stats_.max_held = std::max(stats_.max_held, held_count_);
    return layer_view(store_.manifest(), layer, slot_data(slot));
  }

  void release_layer(int64_t layer) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (layer < 0 || layer >= n_layers_ || held_[static_cast<size_t>(layer)] < 0)
      fail("release of layer {}, which is not held", layer);
    unhold_locked(layer);
    done_[static_cast<size_t>(layer)] = 1;
    advance_locked();
    cv_.notify_all();
  }

  std::vector<HostRange> host_ranges() const override { return {HostRange{base_.get(), total_bytes_}}; }

  // Held layers may all be cycling ones: at most the cycling slots less back_margin (the whole
  // ring's when nothing is pinned).
  int64_t max_held_layers() const override {
    const int64_t cycling = policy_.cycling_slots() > 0 ? policy_.cycling_slots() : n_slots_;
    return cycling - back_margin_;
  }

  uint64_t slot_token(int64_t layer) const override {
    std::lock_guard<std::mutex> lk(mu_);
    if (layer < 0 || layer >= n_layers_ || held_[static_cast<size_t>(layer)] < 0)
      fail("slot token of layer {}, which is not held", layer);
    return slots_[static_cast<size_t>(held_[static_cast<size_t>(layer)])].generation;
  }

  bool still_valid(int64_t layer, uint64_t token) const override {
    std::lock_guard<std::mutex> lk(mu_);
    for (const Slot& s : slots_)
      if (s.generation == token) return s.layer == layer && s.fill == SlotFill::Ready;
    return false;
  }

  void set_streamed_from(int64_t first) override {
    std::lock_guard<std::mutex> lk(mu_);
    streamed_from_ = std::clamp<int64_t>(first, 0, n_layers_);
    // Resident layers take no slot: more of the streamed ones are pinned.
    policy_.set_first_layer(streamed_from_);
    cv_.notify_all();
  }

  WindowStats stats() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return stats_;
  }

 private:
  struct Slot {
    int64_t layer = -1;
    SlotFill fill = SlotFill::Empty;
    uint64_t generation = 0;  // of the last load begun; unique over the ring
    int holds = 0;            // acquired and not released
    std::string error;        // fill == Error: why
  };

  char* slot_data(int64_t slot) const {
    return base_.get() + globals_bytes_ + static_cast<uint64_t>(slot) * slot_bytes_;
  }

  // The slot the policy counts as holding `layer` (the first that is not empty), or -1.
  int64_t slot_of(int64_t layer) const {
    for (size_t s = 0; s < slots_.size(); ++s)
      if (slots_[s].layer == layer && slots_[s].fill != SlotFill::Empty) return static_cast<int64_t>(s);
    return -1;
  }

  void begin_pass_locked() {
    if (in_pass_) end_pass_locked();
    pass_start_ = policy_.begin_pass(kSelf);
    in_pass_ = true;
    ++stats_.passes;
    next_acquire_ = streamed_from_;
    std::fill(done_.begin(), done_.end(), 0);
    for (int64_t l = 0; l < streamed_from_; ++l) done_[static_cast<size_t>(l)] = 1;
    low_ = 0;
    advance_locked();
    cv_.notify_all();
  }

  void end_pass_locked() {
    if (!in_pass_) return;
    for (int64_t l = 0; l < n_layers_; ++l)
      if (held_[static_cast<size_t>(l)] >= 0) unhold_locked(l);
    policy_.end_pass(kSelf);
    in_pass_ = false;
    cv_.notify_all();
  }

  void unhold_locked(int64_t layer) {
    int64_t& s = held_[static_cast<size_t>(layer)];
    --slots_[static_cast<size_t>(s)].holds;
    s = -1;
    --held_count_;
  }

  // Moves the worker's progress to the lowest layer not done; the pass ends after the last.
  void advance_locked() {
    const int64_t before = low_;
    while (low_ < n_layers_ && done_[static_cast<size_t>(low_)]) ++low_;
    if (low_ == n_layers_) {
      policy_.end_pass(kSelf);
      in_pass_ = false;
    } else if (low_ > before) {
      policy_.progress(kSelf, pass_start_ + low_);
    }
  }

  // The most urgent load the policy asks for, leaving out layers the consumer does not read.
  std::optional<SlotLoad> next_load() const {
    std::vector<SlotView> views(slots_.size());
    for (size_t s = 0; s < slots_.size(); ++s) {
      views[s] = SlotView{slots_[s].layer, slots_[s].fill};
      // A held slot must not be reloaded: shown as busy (the policy never picks a loading slot).
      if (slots_[s].holds > 0) views[s].fill = SlotFill::Loading;
    }
    const WindowPlan plan = policy_.plan(views);
    for (const SlotLoad& l : plan.loads)
      if (l.layer >= streamed_from_) return l;
    return std::nullopt;
  }

  void loader_main() {
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
      std::optional<SlotLoad> load;
      try {
        load = next_load();
      } catch (const std::exception& e) {
        fatal_ = e.what();
        spdlog::error("window loader: {}", fatal_);
        cv_.notify_all();
        return;
      }
      if (!load) {
        cv_.wait(lk);  // woken by every change of the consumer's state and by stop
        continue;
      }
      Slot& s = slots_[static_cast<size_t>(load->slot)];
      s.layer = load->layer;
      s.fill = SlotFill::Loading;
      s.generation = ++generations_;
      s.error.clear();
      int64_t loaded = 0;
      for (const Slot& o : slots_) loaded += o.fill != SlotFill::Empty ? 1 : 0;
      stats_.max_loaded = std::max(stats_.max_loaded, loaded);
      char* dst = slot_data(load->slot);
      const int64_t layer = load->layer;
      lk.unlock();
      // Outside the lock: nobody else touches a Loading slot (the consumer waits for Ready, the
      // policy never picks a loading slot).
      const auto t0 = Clock::now();
      std::string error;
      try {
        read_layer_checked(store_, *io_, layer, dst);
      } catch (const std::exception& e) {
        error = e.what();
      }
      const double took = seconds_since(t0);
      lk.lock();
      stats_.read_seconds += took;
      if (error.empty()) {
        s.fill = SlotFill::Ready;
        ++stats_.layer_reads;
        ++stats_.reads_per_layer[static_cast<size_t>(layer)];
        stats_.read_bytes += store_.manifest().layer_size(layer);
        spdlog::debug("window: slot {} holds layer {} (generation {})", load->slot, layer, s.generation);
      } else {
        s.fill = SlotFill::Error;
        s.error = error;
        ++stats_.read_errors;
        spdlog::error("window: layer {} could not be loaded: {}", layer, error);
      }
      cv_.notify_all();
    }
  }

  const Store store_;
  const int64_t n_layers_;
  const int64_t back_margin_;
  std::string window_why_;  // how cpu_cap_layers was chosen
  WindowPolicy policy_;
  std::unique_ptr<IoReader> io_;  // the loader thread's
  uint64_t align_ = kGroupAlign;
  uint64_t globals_bytes_ = 0;    // the globals region, rounded up to the alignment
  uint64_t slot_bytes_ = 0;       // one slot: the largest layer, rounded up
  int64_t n_slots_ = 0;
  uint64_t total_bytes_ = 0;
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> base_;  // globals, then the slots
  GlobalWeights globals_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  uint64_t generations_ = 0;
  bool stop_ = false;
  std::string fatal_;              // the loader thread stopped on this

  // The consumer's pass.
  bool in_pass_ = false;
  int64_t pass_start_ = 0;         // position of layer 0
  int64_t next_acquire_ = 0;       // layers below were acquired or jumped over
  std::vector<char> done_;         // per layer: released, jumped over or resident
  int64_t low_ = 0;                // lowest layer not done: the worker's progress
  std::vector<int64_t> held_;      // per layer: the slot it is held in, -1 none
  int64_t held_count_ = 0;
  int64_t streamed_from_ = 0;

  WindowStats stats_;
  std::thread loader_;             // last: started when everything above exists
};

}  // namespace

std::unique_ptr<WindowWeights> open_window_weights(const std::string& store_dir, const Config& config) {
  return std::make_unique<WindowWeightsImpl>(store_dir, config);
}

}  // namespace ringllama
