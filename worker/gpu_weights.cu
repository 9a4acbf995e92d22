#include "worker/gpu_weights.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/log.h"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "worker/host_registration.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

constexpr double kStallSeconds = 100e-6;  // a source acquire slower than this waited for its data

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// True when the work before the event's last record is done. "Not ready" is no error: it is
// cleared where the runtime kept it as the thread's last error, so that a later launch check does
// not take it for a failed launch.
bool event_done(cudaEvent_t e) {
  const cudaError_t q = cudaEventQuery(e);
  if (q == cudaSuccess) return true;
  if (q == cudaErrorNotReady) {
    if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
    return false;
  }
  CUDA_CHECK(q);
  return false;
}

class Event {
 public:
  explicit Event(bool timing) {
    CUDA_CHECK(cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event& operator=(Event&&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class OwnedStream {
 public:
  OwnedStream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~OwnedStream() {
    if (s_) cudaStreamDestroy(s_);
  }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// Where a host group starts, from the view of its first tensor.
const char* host_group(const void* tensor, const GroupEntry& g, const char* name) {
  return static_cast<const char*>(tensor) - g.tensor(name).offset;
}

const bf16_t* at(const GroupEntry& g, const char* name, const char* base) {
  return reinterpret_cast<const bf16_t*>(base + g.tensor(name).offset);
}

// Device views of a layer whose attn and ffn groups sit at `attn` and `ffn`.
DeviceLayer device_layer(const Manifest& m, int64_t layer, const char* attn, const char* ffn, bool resident) {
  const GroupEntry& ga = m.attn(layer);
  const GroupEntry& gf = m.ffn(layer);
  DeviceLayer d;
  d.attn = attn;
  d.ffn = ffn;
  d.resident = resident;
  d.w.attn_norm = at(ga, "attn_norm", attn);
  d.w.wq = matrix_view(ga, "wq", attn);
  d.w.wk = matrix_view(ga, "wk", attn);
  d.w.wv = matrix_view(ga, "wv", attn);
  d.w.wo = matrix_view(ga, "wo", attn);
  d.w.ffn_norm = at(gf, "ffn_norm", ffn);
  d.w.w1 = matrix_view(gf, "w1", ffn);
  d.w.w3 = matrix_view(gf, "w3", ffn);
  d.w.w2 = matrix_view(gf, "w2", ffn);
  return d;
}

}  // namespace

GpuPoolPlan pool_plan(const MemoryPlan& plan, const Config& config) {
  GpuPoolPlan p;
  p.resident_layers = plan.resident_layers;
  p.attn_buffers = plan.pool_attn_buffers;
  p.ffn_buffers = plan.pool_ffn_buffers;
  p.gpu_ahead_layers = config.gpu_ahead_layers;
  p.h2d_backlog_max = config.h2d_backlog_max;
  return p;
}

struct GpuWeights::Impl {
  // A streamed layer copy enqueued and not yet seen complete; its host layer is held.
  struct Copy {
    int64_t layer = 0;
    int64_t record = 0;   // index of its start/end timing events
    uint64_t token = 0;   // HostSlots slot token at acquire
    uint64_t bytes = 0;
    LayerWeights host;    // the host views (set_skipped_bytes: the CPU reads them)
    // Copied in part: the host layer goes back once the compute released the layer (free_recorded:
    // rec_free[record] is recorded after it), not when the copy lands.
    bool hold = false;
    bool free_recorded = false;
  };

  WeightSource& source;
  HostSlots* slots;
  const Manifest& m;
  cudaStream_t compute;
  int device = 0;
  int64_t n = 0;          // layers
  int64_t r = 0;          // resident layers [0, r)
  int64_t n_attn = 0;     // pool buffers per kind (0 when every layer is resident)
  int64_t n_ffn = 0;
  int64_t ahead = 0;
  int64_t limit = 1;      // copies in flight
  int64_t hold_limit = 1; // host layers in flight in a pass that holds them through the compute
  bool pass_holds = false;  // this pass copies layers in part (skipped bytes)
  bool touch_resident = false;  // the source expects every layer of a pass (no HostSlots)

  // Declared in destruction order's reverse: registrations outlive the stream and the buffers.
  std::vector<HostRegistration> registrations;
  std::unique_ptr<BackgroundRegistration> background;  // sources without HostSlots
  OwnedStream copy;
  DeviceBuffer<char> globals_buf;
  DeviceBuffer<char> resident_buf;
  std::vector<uint64_t> resident_off;   // per resident layer: its span's offset in resident_buf
  DeviceBuffer<char> attn_pool;
  DeviceBuffer<char> ffn_pool;
  uint64_t attn_stride = 0;             // one attn buffer: the largest streamed attn group
  uint64_t ffn_stride = 0;
  std::vector<Event> ready_attn, done_attn, ready_ffn, done_ffn;  // per buffer, no timing
  std::vector<bool> attn_used, ffn_used;                          // recorded done at least once
  std::vector<Event> rec_start, rec_end;                          // per in-flight copy, timing
  std::vector<Event> rec_free;  // per in-flight copy: its layer's compute is done (held copies)
  std::vector<std::vector<SkippedBytes>> skipped;                 // per layer (set_skipped_bytes)
  GlobalWeights globals;

  // The pass.
  bool in_pass = false;
  int64_t next_enqueue = 0;   // next layer to copy (or touch) for this pass
  int64_t next_acquire = 0;   // next layer acquire() accepts
  int64_t released = 0;       // layers [0, released) are released
  std::deque<Copy> in_flight;
  uint64_t copies_total = 0;  // over every pass: picks the timing record
  int64_t pass_copies = 0;
  uint64_t pass_bytes = 0;
  double pass_copy_seconds = 0;
  GpuWeightsStats st;

  Impl(WeightSource& src, const GpuPoolPlan& plan, cudaStream_t compute_stream, HostSlots* host_slots,
       std::unique_ptr<BackgroundRegistration> registration)
      : source(src), slots(host_slots), m(src.manifest()), compute(compute_stream) {
    n = m.model.n_layers;
    st.layer_copy_seconds.assign(static_cast<size_t>(n), 0.0);
    r = plan.resident_layers;
    ahead = plan.gpu_ahead_layers;
    if (r < 0 || r > n)
      throw ConfigError(fmt::format("resident_layers {} must be within [0, {}] (the model's layers)", r, n));
    if (ahead < 0) throw ConfigError(fmt::format("gpu_ahead_layers {} must be >= 0", ahead));
    if (plan.h2d_backlog_max < 1)
      throw ConfigError(fmt::format("h2d_backlog_max {} must be >= 1", plan.h2d_backlog_max));
    if (r < n) {
      n_attn = plan.attn_buffers > 0 ? plan.attn_buffers : ahead + 1;
      n_ffn = plan.ffn_buffers > 0 ? plan.ffn_buffers : ahead + 1;
    }
    int64_t held = slots ? slots->max_held_layers() : source.layers_held_at_once();
    if (plan.source_held_max > 0) held = slots ? std::min(held, plan.source_held_max) : plan.source_held_max;
    limit = std::max<int64_t>(1, std::min(plan.h2d_backlog_max, held));
    // A pass that holds host layers through their compute (set_skipped_bytes) counts the layers
    // computing as well: room for them besides the copies, as far as the source allows.
    hold_limit = std::max<int64_t>(limit, std::min(plan.h2d_backlog_max + std::max(n_attn, n_ffn), held));
    // Sources without HostSlots expect every layer of a pass in order (the daemon's does); with
    // every layer resident no pass reaches the source at all.
    touch_resident = slots == nullptr && r < n;

    CUDA_CHECK(cudaGetDevice(&device));
    if (slots) {
      for (const HostRange& hr : slots->host_ranges()) registrations.emplace_back(hr, device);
    } else {
      // The whole store, or the daemon's globals and slots (read-only where supported): page-locked,
      // the copies are true async DMA; a refusal leaves them pageable. The first range now, the
      // others on a thread while the start goes on (worker/host_registration.h says why).
      background = registration ? std::move(registration)
                                : std::make_unique<BackgroundRegistration>(source.host_memory(), device);
    }

    // Device memory, all of it now: nothing is allocated per pass.
    const GroupEntry& gg = m.globals();
    globals_buf = DeviceBuffer<char>(gg.size, "the globals");
    uint64_t resident_bytes = 0;
    for (int64_t l = 0; l < r; ++l) {
      resident_off.push_back(resident_bytes);
      resident_bytes += m.layer_size(l);
    }
    if (resident_bytes > 0) resident_buf = DeviceBuffer<char>(resident_bytes, "the resident layers");
    for (int64_t l = r; l < n; ++l) {
      attn_stride = std::max(attn_stride, m.attn(l).size);
      ffn_stride = std::max(ffn_stride, m.ffn(l).size);
    }
    if (n_attn > 0) {
      attn_pool = DeviceBuffer<char>(static_cast<size_t>(n_attn) * attn_stride, "the attn group buffers");
      ffn_pool = DeviceBuffer<char>(static_cast<size_t>(n_ffn) * ffn_stride, "the ffn group buffers");
    }
    for (int64_t i = 0; i < n_attn; ++i) {
      ready_attn.emplace_back(false);
      done_attn.emplace_back(false);
    }
    for (int64_t i = 0; i < n_ffn; ++i) {
      ready_ffn.emplace_back(false);
      done_ffn.emplace_back(false);
    }
    attn_used.assign(static_cast<size_t>(n_attn), false);
    ffn_used.assign(static_cast<size_t>(n_ffn), false);
    for (int64_t i = 0; i < hold_limit; ++i) {
      rec_start.emplace_back(true);
      rec_end.emplace_back(true);
      rec_free.emplace_back(false);
    }

    // A window that served another pool before (a benchmark's next batch size) may have been told
    // that fewer or more layers were resident: it serves every layer while this one uploads its own.
    if (slots) slots->set_streamed_from(0);
    upload_resident(gg);
    if (slots) slots->set_streamed_from(r);
    spdlog::debug("gpu pool: {} resident layers, {} streamed through {} attn + {} ffn buffers ({} + {} bytes each), "
                  "{} ahead, {} copies in flight, host memory {}",
                  r, n - r, n_attn, n_ffn, attn_stride, ffn_stride, ahead, limit,
                  slots ? "registered" : "registered in the background");
  }

  ~Impl() {
    // The registration thread first: its pinning would hold up the driver calls below.
    if (background) background->stop();
    // Kernels and copies still queued read or write the buffers freed next: let them finish
    // (errors cannot be acted on here).
    cudaStreamSynchronize(copy.get());
    cudaStreamSynchronize(compute);
    try {
      while (!in_flight.empty()) {
        const int64_t layer = in_flight.front().layer;
        in_flight.pop_front();
        source.release_layer(layer);
      }
      if (in_pass) source.end_pass();
    } catch (const std::exception& e) {
      spdlog::debug("gpu pool: releasing the host layers: {}", e.what());
    }
  }

  // The globals and the resident layers, once, blocking (construction, not a pass).
  void upload_resident(const GroupEntry& gg) {
    const GlobalWeights hg = source.globals();
    const char* host = host_group(hg.tok_embeddings, gg, "tok_embeddings");
    host_ready(host, gg.size);
    CUDA_CHECK(cudaMemcpyAsync(globals_buf.get(), host, gg.size, cudaMemcpyHostToDevice, copy.get()));
    CUDA_CHECK(cudaStreamSynchronize(copy.get()));
    globals = globals_view(m, globals_buf.get());
    st.resident_bytes += gg.size;
    if (r == 0) return;
    source.begin_pass();
    for (int64_t l = 0; l < r; ++l) {
      const LayerWeights hw = source.acquire_layer(l);
      const GroupEntry& ga = m.attn(l);
      const GroupEntry& gf = m.ffn(l);
      char* dst = resident_buf.get() + resident_off[static_cast<size_t>(l)];
      const char* host_attn = host_group(hw.attn_norm, ga, "attn_norm");
      const char* host_ffn = host_group(hw.ffn_norm, gf, "ffn_norm");
      host_ready(host_attn, ga.size);
      host_ready(host_ffn, gf.size);
      CUDA_CHECK(cudaMemcpyAsync(dst, host_attn, ga.size, cudaMemcpyHostToDevice, copy.get()));
      CUDA_CHECK(cudaMemcpyAsync(dst + (gf.offset - ga.offset), host_ffn, gf.size, cudaMemcpyHostToDevice,
                                 copy.get()));
      CUDA_CHECK(cudaStreamSynchronize(copy.get()));
      source.release_layer(l);
      st.resident_bytes += ga.size + gf.size;
    }
    source.end_pass();
  }

  // The host bytes a copy is about to read are page-locked (or refused): registered in the
  // background, the first pass may get here first.
  void host_ready(const void* p, uint64_t bytes) {
    if (background) background->wait_for(p, bytes);
  }

  char* attn_buffer(int64_t a) const { return attn_pool.get() + static_cast<uint64_t>(a) * attn_stride; }
  char* ffn_buffer(int64_t f) const { return ffn_pool.get() + static_cast<uint64_t>(f) * ffn_stride; }

  // The oldest copy in flight is done (or, with `wait`, waited for): its host layer goes back.
  void complete_oldest(bool wait) {
    const Copy c = in_flight.front();
    const cudaEvent_t end = rec_end[static_cast<size_t>(c.record)].get();
    if (c.hold && !c.free_recorded)
      fail("layer {}: its host layer is needed until its compute is done, and that is not enqueued yet: the "
           "layers held at once ({}) are too few for the CPU's share",
           c.layer, hold_limit);
    if (wait) {
      ++st.event_syncs;
      if (c.hold) CUDA_CHECK(cudaEventSynchronize(rec_free[static_cast<size_t>(c.record)].get()));
      CUDA_CHECK(cudaEventSynchronize(end));
    }
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, rec_start[static_cast<size_t>(c.record)].get(), end));
    in_flight.pop_front();
    st.copy_seconds += ms * 1e-3;
    pass_copy_seconds += ms * 1e-3;
    st.layer_copy_seconds[static_cast<size_t>(c.layer)] = ms * 1e-3;
    if (slots && !slots->still_valid(c.layer, c.token)) {
      ++st.slot_changes;
      fail("layer {}: its host slot was reused while the copy to the GPU read it (token {}); the copied bytes may "
           "be wrong",
           c.layer, c.token);
    }
    source.release_layer(c.layer);
  }

  // The copy in flight of `layer` whose host layer is held through its compute; null if none.
  Copy* held_copy(int64_t layer) {
    for (Copy& c : in_flight)
      if (c.layer == layer && c.hold) return &c;
    return nullptr;
  }

  // The copy landed and, for a held one, its layer's compute is done.
  bool done(const Copy& c) const {
    if (c.hold && (!c.free_recorded || !event_done(rec_free[static_cast<size_t>(c.record)].get()))) return false;
    return event_done(rec_end[static_cast<size_t>(c.record)].get());
  }

  // Hands back the host layers of every copy found complete, without waiting.
  void reclaim() {
    while (!in_flight.empty() && done(in_flight.front())) complete_oldest(false);
  }

  // Room for one more host layer: true when there is; with `force`, waits for the oldest copy.
  bool make_room(bool force) {
    reclaim();
    if (static_cast<int64_t>(in_flight.size()) < (pass_holds ? hold_limit : limit)) return true;
    if (!force) return false;
    complete_oldest(true);
    return true;
  }

  void enqueue_copy(int64_t j) {
    const int64_t k = j - r;
    const int64_t a = k % n_attn, f = k % n_ffn;
    const GroupEntry& ga = m.attn(j);
    const GroupEntry& gf = m.ffn(j);
    const auto t0 = Clock::now();
    const LayerWeights hw = source.acquire_layer(j);
    const double waited = seconds_since(t0);
    st.source_wait_seconds += waited;
    if (waited > kStallSeconds) ++st.source_stalls;
    Copy c;
    c.layer = j;
    c.record = static_cast<int64_t>(copies_total % rec_end.size());
    c.token = slots ? slots->slot_token(j) : 0;
    const std::vector<SkippedBytes>* skip =
        static_cast<size_t>(j) < skipped.size() && !skipped[static_cast<size_t>(j)].empty()
            ? &skipped[static_cast<size_t>(j)]
            : nullptr;
    c.hold = skip != nullptr;
    c.host = hw;
    const char* host_attn = host_group(hw.attn_norm, ga, "attn_norm");
    const char* host_ffn = host_group(hw.ffn_norm, gf, "ffn_norm");
    host_ready(host_attn, ga.size);
    host_ready(host_ffn, gf.size);
    const cudaStream_t s = copy.get();
    // The compute that read these buffers last (released: checked by the caller) ends first.
    if (attn_used[static_cast<size_t>(a)]) CUDA_CHECK(cudaStreamWaitEvent(s, done_attn[static_cast<size_t>(a)].get(), 0));
    if (ffn_used[static_cast<size_t>(f)]) CUDA_CHECK(cudaStreamWaitEvent(s, done_ffn[static_cast<size_t>(f)].get(), 0));
    CUDA_CHECK(cudaEventRecord(rec_start[static_cast<size_t>(c.record)].get(), s));
    c.bytes = copy_group(attn_buffer(a), host_attn, ga.size, skip, false, s);
    CUDA_CHECK(cudaEventRecord(ready_attn[static_cast<size_t>(a)].get(), s));
    c.bytes += copy_group(ffn_buffer(f), host_ffn, gf.size, skip, true, s);
    st.skipped_bytes += ga.size + gf.size - c.bytes;
    CUDA_CHECK(cudaEventRecord(ready_ffn[static_cast<size_t>(f)].get(), s));
    CUDA_CHECK(cudaEventRecord(rec_end[static_cast<size_t>(c.record)].get(), s));
    in_flight.push_back(c);
    ++copies_total;
    ++pass_copies;
    pass_bytes += c.bytes;
    ++st.copies;
    st.bytes += c.bytes;
    if (spdlog::should_log(spdlog::level::debug)) {
      // A buffer's previous user in this pass (or the last pass's, when there is none here).
      auto prev_user = [&](int64_t buffers) {
        return k >= buffers ? fmt::format("layer {}", j - buffers) : std::string("the last pass");
      };
      spdlog::debug("layer {}: prefetch into attn {} (reused after {}) / ffn {} (reused after {})", j, a,
                    prev_user(n_attn), f, prev_user(n_ffn));
    }
  }

  // One group's copy on stream s, less the skipped ranges of that group (sorted, disjoint: checked
  // by set_skipped_bytes): the bytes copied.
  uint64_t copy_group(char* dst, const char* src, uint64_t size, const std::vector<SkippedBytes>* skip, bool ffn,
                      cudaStream_t s) {
    uint64_t at = 0, copied = 0;
    auto copy_to = [&](uint64_t end) {
      if (end > at) {
        CUDA_CHECK(cudaMemcpyAsync(dst + at, src + at, end - at, cudaMemcpyHostToDevice, s));
        copied += end - at;
      }
    };
    if (skip) {
      for (const SkippedBytes& k : *skip) {
        if (k.ffn != ffn) continue;
        copy_to(k.begin);
        at = k.end;
      }
    }
    copy_to(size);
    return copied;
  }

  void set_skipped_bytes(std::vector<std::vector<SkippedBytes>> sk) {
    if (in_pass) fail("the skipped bytes change between passes, not during one");
    if (static_cast<int64_t>(sk.size()) > n) fail("skipped bytes for {} layers; the model has {}", sk.size(), n);
    for (size_t l = 0; l < sk.size(); ++l) {
      std::vector<SkippedBytes>& v = sk[l];
      std::sort(v.begin(), v.end(), [](const SkippedBytes& x, const SkippedBytes& y) {
        return x.ffn != y.ffn ? !x.ffn : x.begin < y.begin;
      });
      for (size_t i = 0; i < v.size(); ++i) {
        const uint64_t size = v[i].ffn ? m.ffn(static_cast<int64_t>(l)).size : m.attn(static_cast<int64_t>(l)).size;
        const bool overlaps = i > 0 && v[i - 1].ffn == v[i].ffn && v[i - 1].end > v[i].begin;
        if (v[i].begin >= v[i].end || v[i].end > size || overlaps)
          fail("layer {}: skipped bytes [{}, {}) of its {} group ({} bytes) are empty, past it or overlap another "
               "range",
               l, v[i].begin, v[i].end, v[i].ffn ? "ffn" : "attn", size);
      }
    }
    skipped = std::move(sk);
  }

  // Enqueues, in layer order, the copies (or touches) of layers up to `target`; layers up to
  // `needed` must be enqueued, the others wait for a later call when they cannot start yet.
  void enqueue_upto(int64_t target, int64_t needed) {
    target = std::min(target, n - 1);
    while (next_enqueue <= target) {
      const int64_t j = next_enqueue;
      const bool force = j <= needed;
      if (j < r) {
        if (touch_resident) {
          // The source expects every layer of a pass, in order: acquire and release at once.
          if (!make_room(force)) {
            ++st.backlog_deferrals;
            return;
          }
          source.acquire_layer(j);
          source.release_layer(j);
        }
        ++next_enqueue;
        continue;
      }
      // The buffers' previous user is stream index k - n_attn (k - n_ffn), layer that + r.
      const int64_t k = j - r;
      const int64_t prev = std::max(k - n_attn, k - n_ffn);
      if (prev >= 0 && prev + r >= released) {
        if (force)
          fail("layer {} needs the group buffers of layer {}, which is not released: with {} attn and {} ffn buffers "
               "at most {} streamed layers can be held at once",
               j, prev + r, n_attn, n_ffn, std::min(n_attn, n_ffn));
        ++st.buffer_deferrals;
        spdlog::debug("layer {}: prefetch waits for layer {} to release its buffers", j, prev + r);
        return;
      }
      if (!make_room(force)) {
        ++st.backlog_deferrals;
        spdlog::debug("layer {}: prefetch waits: {} copies in flight", j, in_flight.size());
        return;
      }
      enqueue_copy(j);
      ++next_enqueue;
    }
  }

  void begin_pass() {
    if (in_pass) end_pass();
    in_pass = true;
    next_enqueue = next_acquire = released = 0;
    pass_copies = 0;
    pass_bytes = 0;
    pass_copy_seconds = 0;
    st.layer_copy_seconds.assign(static_cast<size_t>(n), 0.0);
    ++st.passes;
    pass_holds = std::any_of(skipped.begin(), skipped.end(), [](const auto& v) { return !v.empty(); });
    // Every layer resident: the source has nothing to give.
    if (r == n) return;
    source.begin_pass();
    enqueue_upto(ahead, -1);
  }

  DeviceLayer acquire(int64_t layer) {
    if (layer < 0 || layer >= n) fail("layer {} does not exist (the model has {})", layer, n);
    if (!in_pass) begin_pass();
    if (layer != next_acquire)
      fail("layer {} acquired while layer {} is next: a pass acquires every layer once, in order", layer,
           next_acquire);
    // Only this layer's copy is forced here; the prefetches happen in release(), after the
    // caller has launched the previous layer's kernels, so that waiting for the source overlaps
    // the GPU's work instead of holding the launch of this layer back.
    enqueue_upto(layer, layer);
    ++next_acquire;
    if (layer < r) {
      spdlog::debug("layer {}: resident", layer);
      char* base = resident_buf.get() + resident_off[static_cast<size_t>(layer)];
      return device_layer(m, layer, base, base + (m.ffn(layer).offset - m.attn(layer).offset), true);
    }
    const int64_t k = layer - r;
    const int64_t a = k % n_attn, f = k % n_ffn;
    // The copy of this layer recorded ready_*[a|f] in enqueue_upto above or earlier, and nothing
    // records them again before release(layer): these waits are for this layer's bytes.
    CUDA_CHECK(cudaStreamWaitEvent(compute, ready_attn[static_cast<size_t>(a)].get(), 0));
    CUDA_CHECK(cudaStreamWaitEvent(compute, ready_ffn[static_cast<size_t>(f)].get(), 0));
    spdlog::debug("layer {}: compute waits for its copy in attn {} / ffn {}", layer, a, f);
    DeviceLayer d = device_layer(m, layer, attn_buffer(a), ffn_buffer(f), false);
    if (const Copy* c = held_copy(layer)) {
      d.host = c->host;
      d.host_held = true;
    }
    return d;
  }

  void release(int64_t layer) {
    if (!in_pass || layer != released || layer >= next_acquire)
      fail("release of layer {}: layers are released once each, in order, after acquire (next to release: {})",
           layer, in_pass ? released : -1);
    record_done(layer);
    // Host layers of landed copies go back at once (the window can read further ahead), then the
    // prefetches up to the next layer + gpu_ahead_layers, the released buffers among them.
    reclaim();
    enqueue_upto(layer + 1 + ahead, -1);
  }

  // The layer's compute is enqueued: the copies that refill its buffers wait for it.
  void record_done(int64_t layer) {
    if (layer >= r) {
      const int64_t k = layer - r;
      const int64_t a = k % n_attn, f = k % n_ffn;
      // After every kernel that reads the buffers: the copy that refills them waits for these.
      CUDA_CHECK(cudaEventRecord(done_attn[static_cast<size_t>(a)].get(), compute));
      CUDA_CHECK(cudaEventRecord(done_ffn[static_cast<size_t>(f)].get(), compute));
      attn_used[static_cast<size_t>(a)] = true;
      ffn_used[static_cast<size_t>(f)] = true;
      if (Copy* c = held_copy(layer)) {
        CUDA_CHECK(cudaEventRecord(rec_free[static_cast<size_t>(c->record)].get(), compute));
        c->free_recorded = true;
      }
    }
    ++released;
  }

  void end_pass() {
    if (!in_pass) return;
    // Layers acquired and not released (a pass cut short): their compute is enqueued; the next
    // copies into their buffers must wait for it like any other.
    while (released < next_acquire) record_done(released);
    // Copies prefetched for layers never acquired: no compute reads their host layers.
    for (Copy& c : in_flight)
      if (c.layer >= next_acquire) c.hold = false;
    // The copies of this pass land (the compute is not waited for; for held host layers, it is),
    // then their host layers go back.
    while (!in_flight.empty()) complete_oldest(!done(in_flight.front()));
    in_pass = false;
    if (r < n) source.end_pass();
    const int64_t streamed = pass_copies;
    const int64_t attn_used_now = std::min<int64_t>(streamed, n_attn), ffn_used_now = std::min<int64_t>(streamed, n_ffn);
    spdlog::debug("pass {}: groups {}/{} used, attn {}, ffn {}; {} copies, {} bytes in {:.3f} ms of copy time ({:.2f} "
                  "GB/s); {} resident layers",
                  st.passes, attn_used_now + ffn_used_now, n_attn + n_ffn, attn_used_now, ffn_used_now, streamed,
                  pass_bytes, pass_copy_seconds * 1e3,
                  pass_copy_seconds > 0 ? double(pass_bytes) / pass_copy_seconds * 1e-9 : 0.0, r);
  }
};

GpuWeights::GpuWeights(WeightSource& source, const GpuPoolPlan& plan, cudaStream_t compute, HostSlots* slots,
                       std::unique_ptr<BackgroundRegistration> registration)
    : impl_(std::make_unique<Impl>(source, plan, compute, slots, std::move(registration))) {}

GpuWeights::~GpuWeights() = default;

const GlobalWeights& GpuWeights::globals() const { return impl_->globals; }
void GpuWeights::begin_pass() { impl_->begin_pass(); }
DeviceLayer GpuWeights::acquire(int64_t layer) { return impl_->acquire(layer); }
void GpuWeights::release(int64_t layer) { impl_->release(layer); }
void GpuWeights::end_pass() { impl_->end_pass(); }
int64_t GpuWeights::resident_layers() const { return impl_->r; }
int64_t GpuWeights::attn_buffers() const { return impl_->n_attn; }
int64_t GpuWeights::ffn_buffers() const { return impl_->n_ffn; }
int64_t GpuWeights::copies_in_flight_max() const { return impl_->limit; }
int64_t GpuWeights::held_layers_max() const { return impl_->hold_limit; }
uint64_t GpuWeights::device_bytes() const {
  return impl_->globals_buf.bytes() + impl_->resident_buf.bytes() + impl_->attn_pool.bytes() + impl_->ffn_pool.bytes();
}
cudaStream_t GpuWeights::copy_stream() const { return impl_->copy.get(); }
void GpuWeights::set_skipped_bytes(std::vector<std::vector<SkippedBytes>> skipped) {
  impl_->set_skipped_bytes(std::move(skipped));
}
void GpuWeights::start_background_registration() {
  if (impl_->background) impl_->background->start();
}
bool GpuWeights::registers_in_background() const {
  return impl_->background && impl_->background->in_background();
}
GpuWeightsStats GpuWeights::stats() const {
  GpuWeightsStats s = impl_->st;
  if (impl_->background) {
    s.registration_waits = impl_->background->waits();
    s.registration_wait_seconds = impl_->background->wait_seconds();
  }
  return s;
}

}  // namespace ringllama
