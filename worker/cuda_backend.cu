#include "worker/cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/log.h"
#include "kernels/add_rms_norm.cuh"
#include "kernels/argmax.cuh"
#include "kernels/attention_paged.cuh"
#include "kernels/device_info.h"
#include "kernels/check.h"
#include "kernels/embedding.cuh"
#include "kernels/gather_rows.cuh"
#include "kernels/gemm.h"
#include "kernels/gemv_packed.cuh"
#include "kernels/kv_store.cuh"
#include "kernels/rope.cuh"
#include "kernels/sample.cuh"
#include "kernels/silu_mul.cuh"
#include "worker/cuda_hybrid.h"
#include "worker/cuda_memory.h"
#include "worker/gpu_weights.h"
#include "worker/window_weights.h"

namespace ringllama {

namespace {

using bf16 = __nv_bfloat16;

static_assert(kAttentionTileRows == kAttentionPagedRows, "the planner counts attention tiles as the kernel makes them");

// Page-locked host memory, so that the small per-step copies are true async DMA.
template <typename T>
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t count) : count_(count) {
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&ptr_), std::max<size_t>(count, 1) * sizeof(T)));
  }
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  T* get() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// Checks the device index and makes it current; runs before any other member is built.
int select_device(int64_t gpu) {
  const int n = cuda_device_count();
  RL_REQUIRE(n > 0, "the CUDA backend needs a CUDA GPU, and none is visible (no device or no driver)");
  RL_REQUIRE(gpu >= 0 && gpu < n, "gpu {} does not exist: {} CUDA device(s) visible", gpu, n);
  CUDA_CHECK(cudaSetDevice(static_cast<int>(gpu)));
  return static_cast<int>(gpu);
}

// One layer's weights on the device, wherever the group pool put them (a resident layer or a
// pool buffer: the same group layout, the store's). Where the store packs wq|wk|wv (w1|w3) back
// to back, as it does whenever their sizes are multiples of 256 bytes (every real Llama), each
// triple (pair) is one GEMM: one pass over x, one launch; otherwise one GEMM per tensor. The
// choice depends on the manifest only, so a streamed run launches exactly what a resident one does.
// A linear layer's weight [out, in] on the device: bf16 for cuBLASLt, or packed (fp8, int4) for
// kernels/gemv_packed.cuh.
struct Linear {
  const bf16* w = nullptr;  // bf16 values; null when packed
  PackedWeight p;           // packed: p.data set
  bool packed() const { return p.data != nullptr; }
};

const bf16* dev(const bf16_t* p) { return reinterpret_cast<const bf16*>(p); }

// Rows of a step up to which a packed matrix goes through the GEMV (each kGemvPackedTokens rows
// read the packed bytes once more); past it, dequantizing to bf16 for cuBLASLt reads less.
constexpr int64_t kPackedGemvRows = 2 * kGemvPackedTokens;

Linear linear_of(const MatrixView& v) {
  Linear l;
  if (!v.packed()) {
    l.w = dev(v.bf16());
    return l;
  }
  l.p.format = v.dtype == DType::FP8_E4M3 ? PackedFormat::FP8_E4M3 : PackedFormat::INT4;
  l.p.data = v.data;
  l.p.scales = v.scales;
  l.p.rows = v.rows;
  l.p.cols = v.cols;
  l.p.group = v.group;
  return l;
}

struct LayerPtrs {
  const bf16* attn_norm = nullptr;  // [dim]
  Linear wq;                        // [q_dim, dim]; with qkv_fused, [q_dim + 2 kv_dim, dim]: wq, wk, wv
  Linear wk;                        // [kv_dim, dim]
  Linear wv;                        // [kv_dim, dim]
  Linear wo;                        // [dim, q_dim]
  const bf16* ffn_norm = nullptr;   // [dim]
  Linear w1;                        // gate [ffn, dim]; with gu_fused, [2 ffn, dim]: gate, then up
  Linear w3;                        // up [ffn, dim]
  Linear w2;                        // down [dim, ffn]
  bool qkv_fused = false;           // bf16 only: packed values have their scales between them
  bool gu_fused = false;
};

// A streamed layer's split (the hybrid): per HybridPart, the host copy of the matrix (q|k|v and
// gate|up fused) and the GPU's rows; the CPU computes the others.
struct HybridLayer {
  std::array<const bf16_t*, kHybridMatrices> w{};
  std::array<int64_t, kHybridMatrices> g{};
};

// True when the tensors named follow each other in their group with no padding between them.
bool adjacent(const GroupEntry& g, std::initializer_list<const char*> names) {
  const TensorEntry* prev = nullptr;
  for (const char* n : names) {
    const TensorEntry& t = g.tensor(n);
    if (prev && t.offset != prev->offset + prev->size) return false;
    prev = &t;
  }
  return true;
}

// A streamed step's layer timing: an event after the layer's copy was waited for and one after
// its last kernel, on the compute stream.
class TimingEvent {
 public:
  TimingEvent() { CUDA_CHECK(cudaEventCreate(&e_)); }
  ~TimingEvent() {
    if (e_) cudaEventDestroy(e_);
  }
  TimingEvent(TimingEvent&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

// Where each array of a step's metadata sits in the one int32 buffer copied to the device per
// step. The offsets depend only on (rows, items, tiles, logit rows), so every decode step of one
// batch size has the same layout, and a graph captured for it stays valid.
struct MetaLayout {
  int64_t rows = 0, items = 0, tiles = 0, logit_rows = 0, table_stride = 0;
  int64_t ids = 0, pos = 0, slot = 0, row0 = 0, count = 0, start = 0, tile_item = 0, tile_row0 = 0, logit = 0,
          tables = 0, total = 0;
  MetaLayout(int64_t R, int64_t I, int64_t T, int64_t L, int64_t stride)
      : rows(R), items(I), tiles(T), logit_rows(L), table_stride(stride) {
    int64_t at = 0;
    auto take = [&](int64_t n) {
      const int64_t here = at;
      at += n;
      return here;
    };
    ids = take(R), pos = take(R), slot = take(R);
    row0 = take(I), count = take(I), start = take(I);
    tile_item = take(T), tile_row0 = take(T), logit = take(L);
    tables = take(I * stride);
    total = at;
  }
};

class CudaBackend : public Backend {
 public:
  // In the order of DESIGN.md "The memory planner": the context and cuBLAS first, measured; then
  // the plan from those figures (refused when it does not fit); then every allocation the plan
  // lists, the decode graphs included, so that nothing is allocated on the device after this.
  CudaBackend(WeightSource& ws, const Config& config, const CudaBackendOptions& options)
      : Backend(ws.manifest().model, config),
        m_(ws.manifest().model),
        device_(select_device(config.gpu)),
        options_(options),
        max_rows_(limits_.max_items * limits_.max_item_tokens),
        group_(m_.n_kv_heads > 0 ? m_.n_heads / m_.n_kv_heads : 1),
        max_tiles_(max_rows_ * group_ / kAttentionPagedRows + limits_.max_items),
        max_meta_(MetaLayout(max_rows_, limits_.max_items, max_tiles_, limits_.max_items,
                             kv_.max_blocks_per_sequence())
                      .total),
        sm_count_(cuda_sm_count(device_)),
        decode_blocks_per_sm_(attention_paged_decode_blocks_per_sm(m_.n_heads, m_.n_kv_heads, m_.head_dim)),
        host_meta_(static_cast<size_t>(max_meta_)),
        host_logits_(static_cast<size_t>(limits_.max_items * m_.vocab_size)),
        host_picked_(static_cast<size_t>(limits_.max_items)),
        host_params_(static_cast<size_t>(limits_.max_items)) {
    RL_REQUIRE(m_.head_dim % 2 == 0 && m_.head_dim <= 256, "the CUDA backend supports even head_dim up to 256, not {}",
               m_.head_dim);
    // Each start phase timed: a worker restart is these plus the process's own start.
    using PhaseClock = std::chrono::steady_clock;
    auto mark = PhaseClock::now();
    std::string phases;
    auto phase = [&](const char* what) {
      const auto now = PhaseClock::now();
      phases += fmt::format("{}{} {:.0f} ms", phases.empty() ? "" : ", ", what,
                            std::chrono::duration<double, std::milli>(now - mark).count());
      mark = now;
    };
    // The host memory of a source without HostSlots (the daemon's segment: ~13 GiB for an 8B)
    // starts registering now, on a thread, so that its pinning (~0.6 s) overlaps cuBLAS, the plan
    // and the allocations instead of following them: a restarted worker's first pass waits for it.
    // Those calls wait at most for one piece (a slot, ~20 ms) while the driver pins it.
    if (!dynamic_cast<HostSlots*>(&ws)) {
      registration_ = std::make_unique<BackgroundRegistration>(ws.host_memory(), device_);
      registration_->start();
      phase("host registration started (first piece)");
    }
    report_.context_bytes = process_context_bytes(device_);
    phase("CUDA context");
    const uint64_t used_before = device_memory().used();
    gemm_ = std::make_unique<Gemm>();
    phase("cuBLAS");
    const DeviceMemory after_cublas = device_memory();
    report_.cublas_bytes = after_cublas.used() > used_before ? after_cublas.used() - used_before : 0;

    // Planned for the step the backend runs: a chunk is never longer than max_context.
    Config planned = config;
    planned.prefill_chunk_tokens = limits_.max_item_tokens;
    report_.plan = plan_backend(ws.manifest(), planned, after_cublas, report_.context_bytes, report_.cublas_bytes);
    phase("plan");

    upload_weights(ws, config);
    phase("weights (globals, resident layers, pool)");
    allocate_state();
    phase("KV cache and activations");
    setup_hybrid(config);
    if (hybrid_) phase("hybrid rates");
    // One decode step run eagerly first: cuBLAS and the kernels are loaded (their memory counted
    // below) before any graph is captured, and no capture ever has to load one. Not when layers
    // stream from the daemon: a step is then a whole pass, which would wait for the host memory
    // still to register (worker/host_registration.h); the first request's step does the loading
    // while that goes on, which puts a restarted worker's first token ~a pass earlier.
    if (!streaming_ || !gw_->registers_in_background()) {
      warm_up();
      phase("warm-up step");
    } else {
      phase("warm-up step (none: streamed, host memory registering)");
    }
    // A streamed step reads each layer from whichever pool buffer the pass gave it, and the copies
    // are enqueued from the host as the pass goes: a captured step could not follow. Graphs only
    // when every layer is resident.
    if (options_.graphs && !streaming_) {
      for (int64_t n = 1; n <= limits_.max_items; ++n) graphs_.push_back(capture(decode_layout(n)));
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    phase("graphs");
    spdlog::info("CUDA backend start phases: {}", phases);
    // Every device allocation is made: the host memory left to register goes on in the background.
    gw_->start_background_registration();

    const MemoryPlan& p = report_.plan;
    report_.planned_allocations = p.globals_bytes + p.resident_bytes + p.pool_bytes + p.kv_bytes +
                                  static_cast<uint64_t>(p.kv_blocks) * sizeof(int32_t) + p.activation_bytes +
                                  p.workspace_bytes;
    // This process's own use where NVML tells it: another worker on the same GPU allocating at the
    // same time would otherwise count as ours.
    if (const std::optional<uint64_t> own = process_device_bytes(device_)) {
      report_.measured_bytes = *own;
    } else {
      const uint64_t used_after = device_memory().used();
      report_.measured_bytes = report_.context_bytes + (used_after > used_before ? used_after - used_before : 0);
    }
    report_.planned_bytes = p.total_bytes - p.guard_bytes;
    log_memory_report(device_, report_);
  }

  ~CudaBackend() override {
    // Buffers are freed next; let queued work finish first (errors here cannot be acted on).
    if (stream_.get()) cudaStreamSynchronize(stream_.get());
    for (cudaGraphExec_t exec : graphs_) cudaGraphExecDestroy(exec);
  }

  const CudaMemoryReport& memory_report() const { return report_; }

  CudaStreamReport stream_report() const {
    CudaStreamReport r;
    const GpuWeightsStats st = gw_->stats();
    r.n_layers = m_.n_layers;
    r.resident_layers = gw_->resident_layers();
    r.attn_buffers = gw_->attn_buffers();
    r.ffn_buffers = gw_->ffn_buffers();
    r.graphs = !graphs_.empty();
    r.passes = st.passes;
    r.bytes = st.bytes;
    r.copy_seconds = st.copy_seconds;
    r.source_stalls = st.source_stalls;
    r.source_wait_seconds = st.source_wait_seconds;
    r.registration_waits = st.registration_waits;
    r.registration_wait_seconds = st.registration_wait_seconds;
    r.event_syncs = st.event_syncs;
    r.layer_copy_seconds = st.layer_copy_seconds;
    r.layer_compute_seconds = layer_compute_;
    r.step_seconds = step_seconds_;
    r.skipped_bytes = st.skipped_bytes;
    if (hybrid_) {
      const CudaHybridStats h = hybrid_->stats();
      r.hybrid = true;
      r.cpu_calls = h.calls;
      r.cpu_bytes = h.cpu_bytes;
      r.cpu_seconds = h.cpu_seconds;
      r.cpu_callback_seconds = h.callback_seconds;
      r.cpu_joins = h.joins;
      r.cpu_join_wait_seconds = h.join_wait_seconds;
      r.cpu_ahead_seconds = h.cpu_ahead_seconds;
      r.h2d_gbs_measured = hybrid_->rates().h2d_gbs;
      r.cpu_dram_read_gbs = hybrid_->dram_read_gbs();
      r.cpu_isa = hybrid_->isa();
      r.cpu_threads = hybrid_->threads();
      r.gpu_fraction = last_f_;
    }
    return r;
  }

  const char* name() const override { return "cuda"; }

 protected:
  void run_step(const StepLayout& L, const StepOutput& out) override {
    // --verbose: which link held the step up, from the pool's own counters around it.
    const bool trace = spdlog::should_log(spdlog::level::debug) && gw_->resident_layers() < m_.n_layers;
    GpuWeightsStats before;
    const auto t0 = std::chrono::steady_clock::now();
    if (trace) before = gw_->stats();
    run_step_inner(L, out);
    if (trace) log_step_bound(before, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                              L.rows());
  }

  // One line per step: the time waiting for host layers (the window's reads: disk), the copies'
  // time on the copy stream (PCIe) and the rest (compute), and which of them bound the step.
  void log_step_bound(const GpuWeightsStats& before, double wall, int64_t tokens) const {
    const GpuWeightsStats now = gw_->stats();
    const double wait = now.source_wait_seconds - before.source_wait_seconds;
    const double copy = now.copy_seconds - before.copy_seconds;
    const double bytes = static_cast<double>(now.bytes - before.bytes);
    const char* bound = wait > 0.5 * wall ? "disk (waiting for host layers)"
                        : copy > 0.8 * (wall - wait) ? "PCIe (copies back to back)"
                                                     : "compute";
    spdlog::debug("step {}: {} tokens in {:.1f} ms; host-layer waits {:.1f} ms, copies {:.1f} ms ({:.2f} GB, {:.1f} "
                  "GB/s), other {:.1f} ms: bound by {}",
                  ++traced_steps_, tokens, wall * 1e3, wait * 1e3, copy * 1e3, bytes * 1e-9,
                  copy > 0 ? bytes / copy * 1e-9 : 0.0, std::max(0.0, wall - wait - copy) * 1e3, bound);
  }

  void run_step_inner(const StepLayout& L, const StepOutput& out) {
    CUDA_CHECK(cudaSetDevice(device_));
    cudaStream_t s = stream_.get();
    const int64_t R = L.rows(), I = L.items(), NL = static_cast<int64_t>(L.logit_rows.size());
    std::vector<int32_t> tile_item, tile_row0;
    attention_paged_tiles(L.count, group_, &tile_item, &tile_row0);
    const MetaLayout ml(R, I, static_cast<int64_t>(tile_item.size()), NL, kv_.max_blocks_per_sequence());
    RL_REQUIRE(R <= max_rows_ && ml.total <= max_meta_, "a step of {} tokens exceeds the {} the backend sized for", R,
               max_rows_);
    RL_REQUIRE(!out.sample || static_cast<int64_t>(out.sample->size()) == NL, "{} sampling rows for {} logits rows",
               out.sample ? out.sample->size() : size_t{0}, NL);

    // The host staging buffer is reused: the previous step's copy out of it must be done (each
    // step ends with a synchronize, so it is).
    int32_t* h = host_meta_.get();
    std::copy(L.ids.begin(), L.ids.end(), h + ml.ids);
    std::copy(L.pos.begin(), L.pos.end(), h + ml.pos);
    std::copy(L.slot.begin(), L.slot.end(), h + ml.slot);
    for (int64_t i = 0; i < I; ++i) {
      h[ml.row0 + i] = static_cast<int32_t>(L.row0[i]);
      h[ml.count + i] = static_cast<int32_t>(L.count[i]);
      h[ml.start + i] = static_cast<int32_t>(L.start[i]);
      const std::vector<int32_t>& table = kv_.table(L.seq[i]);
      std::copy(table.begin(), table.end(), h + ml.tables + i * ml.table_stride);
    }
    std::copy(tile_item.begin(), tile_item.end(), h + ml.tile_item);
    std::copy(tile_row0.begin(), tile_row0.end(), h + ml.tile_row0);
    for (int64_t r = 0; r < NL; ++r) h[ml.logit + r] = static_cast<int32_t>(L.logit_rows[r]);
    CUDA_CHECK(cudaMemcpyAsync(meta_.get(), h, static_cast<size_t>(ml.total) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, s));

    // A decode step: one token per sequence, every one wanting logits. Its shape is the batch size,
    // and its graph was captured at construction.
    const bool decode = R == I && NL == I;
    if (decode && !graphs_.empty()) {
      CUDA_CHECK(cudaGraphLaunch(graphs_.at(static_cast<size_t>(I - 1)), s));
    } else {
      forward_pass(ml);
    }

    if (NL > 0 && out.ids) {
      if (out.sample) {
        // Each row with its sequence's parameters and draw counter: the CPU sampler's rule.
        std::copy(out.sample->begin(), out.sample->end(), host_params_.get());
        CUDA_CHECK(cudaMemcpyAsync(params_.get(), host_params_.get(), NL * sizeof(SampleParams),
                                   cudaMemcpyHostToDevice, s));
        launch_sample(logits_.get(), static_cast<int>(NL), static_cast<int>(m_.vocab_size), m_.vocab_size,
                      params_.get(), picked_.get(), workspace_.get(), workspace_.bytes(), s);
      } else {
        launch_argmax(logits_.get(), ElemType::F32, NL, m_.vocab_size, m_.vocab_size, picked_.get(), s);
      }
      CUDA_CHECK(cudaMemcpyAsync(host_picked_.get(), picked_.get(), NL * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    }
    if (NL > 0 && out.logits) {
      CUDA_CHECK(cudaMemcpyAsync(host_logits_.get(), logits_.get(), NL * m_.vocab_size * sizeof(float),
                                 cudaMemcpyDeviceToHost, s));
    }
    CUDA_CHECK(cudaStreamSynchronize(s));
    // The CPU's rows of this step are in (the compute stream waited for each): a failure there
    // fails the step before its outputs are handed out.
    if (hybrid_) {
      hybrid_->check();
      hybrid_->end_step();
    }
    if (profiled_) read_layer_times();
    if (out.ids) out.ids->assign(host_picked_.get(), host_picked_.get() + NL);
    if (out.logits) out.logits->assign(host_logits_.get(), host_logits_.get() + NL * m_.vocab_size);
  }

 private:
  // ------------------------------------------------------------------------------------------
  // Construction

  // The globals and the resident layers go to the device once; the others stream through the
  // group pool each pass (worker/gpu_weights.h). A source with slots (the window) is handed over as
  // such: its ranges are registered and it skips the resident layers.
  void upload_weights(WeightSource& ws, const Config& config) {
    const Manifest& man = ws.manifest();
    manifest_ = &man;
    gw_ = std::make_unique<GpuWeights>(ws, pool_plan(report_.plan, config), stream_.get(),
                                       dynamic_cast<HostSlots*>(&ws), std::move(registration_));
    report_.allocated_bytes += gw_->device_bytes();
    streaming_ = gw_->resident_layers() < m_.n_layers;
    const GlobalWeights& g = gw_->globals();
    RL_REQUIRE(g.tok_embeddings && g.norm && g.output.data, "the weight source lacks a global tensor");
    tok_embeddings_ = dev(g.tok_embeddings);
    norm_ = dev(g.norm);
    output_ = linear_of(g.output);
    qkv_fused_.resize(static_cast<size_t>(m_.n_layers));
    gu_fused_.resize(static_cast<size_t>(m_.n_layers));
    for (int64_t l = 0; l < m_.n_layers; ++l) {
      qkv_fused_[static_cast<size_t>(l)] = adjacent(man.attn(l), {"wq", "wk", "wv"});
      gu_fused_[static_cast<size_t>(l)] = adjacent(man.ffn(l), {"w1", "w3"});
    }
    if (options_.profile_layers) {
      for (int64_t i = 0; i < 2 * m_.n_layers; ++i) layer_events_.emplace_back();
      layer_compute_.assign(static_cast<size_t>(m_.n_layers), 0.0);
    }
  }

  // The hybrid (DESIGN.md "The CPU's share of a streamed layer (hybrid)"), when layers stream and
  // config.cpu_share asks for it (CudaHybrid::start says when it cannot apply). Its rates are
  // measured now, every device allocation made: H2D into the KV cache, unused yet.
  void setup_hybrid(const Config& config) {
    if (!streaming_) return;
    hybrid_ = CudaHybrid::start(*manifest_, gw_->resident_layers(), gw_->held_layers_max(), config, k_cache_.get(),
                                k_cache_.bytes(), max_rows_);
  }

  // The pool copies each streamed layer less the CPU's rows of the split (set between passes,
  // when the split changes with the step's token count).
  void set_hybrid_split(const HybridSplit& split) {
    if (split.gpu_rows == skipped_rows_) return;
    gw_->set_skipped_bytes(CudaHybrid::skipped_bytes(*manifest_, gw_->resident_layers(), split));
    skipped_rows_ = split.gpu_rows;
  }

  LayerPtrs layer_ptrs(int64_t l, const DeviceLayer& d) const {
    LayerPtrs w;
    w.attn_norm = dev(d.w.attn_norm);
    w.wq = linear_of(d.w.wq);
    w.wk = linear_of(d.w.wk);
    w.wv = linear_of(d.w.wv);
    w.wo = linear_of(d.w.wo);
    w.ffn_norm = dev(d.w.ffn_norm);
    w.w1 = linear_of(d.w.w1);
    w.w3 = linear_of(d.w.w3);
    w.w2 = linear_of(d.w.w2);
    w.qkv_fused = qkv_fused_[static_cast<size_t>(l)] && !w.wq.packed() && !w.wk.packed() && !w.wv.packed();
    w.gu_fused = gu_fused_[static_cast<size_t>(l)] && !w.w1.packed() && !w.w3.packed();
    return w;
  }

  // Each layer's compute time of the step just synchronized (profile_layers, eager steps only).
  void read_layer_times() {
    profiled_ = false;
    for (int64_t l = 0; l < m_.n_layers; ++l) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, layer_events_[static_cast<size_t>(2 * l)].get(),
                                      layer_events_[static_cast<size_t>(2 * l + 1)].get()));
      layer_compute_[static_cast<size_t>(l)] = ms * 1e-3;
    }
    float span = 0;
    CUDA_CHECK(cudaEventElapsedTime(&span, layer_events_.front().get(), layer_events_.back().get()));
    step_seconds_ = span * 1e-3;
  }

  void allocate_state() {
    const size_t R = static_cast<size_t>(max_rows_), I = static_cast<size_t>(limits_.max_items);
    const size_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim(), ffn = m_.ffn_dim;
    pool_rows_ = static_cast<size_t>(kv_.n_blocks()) * static_cast<size_t>(kv_.block_tokens());
    const size_t cache = static_cast<size_t>(m_.n_layers) * pool_rows_ * kv_dim;
    k_cache_ = alloc<bf16>(cache, "the key cache (n_layers x kv blocks x kv_block_tokens x kv_dim)");
    v_cache_ = alloc<bf16>(cache, "the value cache (n_layers x kv blocks x kv_block_tokens x kv_dim)");
    x_ = alloc<float>(R * dim, "the residual stream");
    xn_ = alloc<bf16>(R * dim, "normed activations");
    qkv_ = alloc<bf16>(R * (q_dim + 2 * kv_dim), "queries, keys and values");
    att_ = alloc<bf16>(R * q_dim, "attention output");
    proj_ = alloc<float>(R * dim, "projection output");
    gu_ = alloc<bf16>(R * 2 * ffn, "FFN gate and up");
    xg_ = alloc<bf16>(I * dim, "normed rows for lm_head");
    logits_ = alloc<float>(I * static_cast<size_t>(m_.vocab_size), "logits");
    picked_ = alloc<int32_t>(I, "sampled ids");
    params_ = alloc<SampleParams>(I, "sampling rows");
    meta_ = alloc<int32_t>(static_cast<size_t>(max_meta_), "step metadata");
    // The plan's workspace line; launch_sample's scratch comes out of it.
    const size_t ws_bytes = std::max<size_t>(report_.plan.workspace_bytes, 1);
    const size_t sample_ws = sample_workspace_bytes(static_cast<int>(I), static_cast<int>(m_.vocab_size));
    RL_REQUIRE(sample_ws <= ws_bytes, "the planned workspace of {} bytes is less than launch_sample needs ({} bytes)",
               ws_bytes, sample_ws);
    workspace_ = alloc<unsigned char>(ws_bytes, "workspace");

    const std::vector<double> inv = rope_inv_freq(m_);
    const std::vector<float> inv_f(inv.begin(), inv.end());  // rounded to float once, as transformers keeps it
    inv_freq_ = alloc<float>(inv_f.size(), "RoPE frequencies");
    CUDA_CHECK(cudaMemcpy(inv_freq_.get(), inv_f.data(), inv_f.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  // Every device allocation of the backend goes through here, so that the report can hold their sum
  // against the plan's lines.
  template <typename T>
  DeviceBuffer<T> alloc(size_t count, const char* what) {
    DeviceBuffer<T> b(count, what);
    report_.allocated_bytes += b.bytes();
    return b;
  }

  // A decode step of batch_size sequences, each one token (id 0) at position 0 in block 0, then
  // both ways of picking a token. It writes cache row 0 of every layer, which holds nothing yet: a
  // sequence writes each of its rows before any read of it.
  void warm_up() {
    cudaStream_t s = stream_.get();
    const int64_t n = limits_.max_items;
    std::vector<int32_t> tile_item, tile_row0;
    attention_paged_tiles(std::vector<int64_t>(static_cast<size_t>(n), 1), group_, &tile_item, &tile_row0);
    const MetaLayout ml(n, n, static_cast<int64_t>(tile_item.size()), n, kv_.max_blocks_per_sequence());
    int32_t* h = host_meta_.get();
    std::fill(h, h + ml.total, 0);
    for (int64_t i = 0; i < n; ++i) {
      h[ml.row0 + i] = static_cast<int32_t>(i);
      h[ml.count + i] = 1;
      h[ml.logit + i] = static_cast<int32_t>(i);
    }
    std::copy(tile_item.begin(), tile_item.end(), h + ml.tile_item);
    std::copy(tile_row0.begin(), tile_row0.end(), h + ml.tile_row0);
    CUDA_CHECK(cudaMemcpyAsync(meta_.get(), h, static_cast<size_t>(ml.total) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, s));
    forward_pass(ml);
    std::fill(host_params_.get(), host_params_.get() + n, SampleParams{});  // temperature 0
    CUDA_CHECK(cudaMemcpyAsync(params_.get(), host_params_.get(), n * sizeof(SampleParams), cudaMemcpyHostToDevice, s));
    launch_sample(logits_.get(), static_cast<int>(n), static_cast<int>(m_.vocab_size), m_.vocab_size, params_.get(),
                  picked_.get(), workspace_.get(), workspace_.bytes(), s);
    launch_argmax(logits_.get(), ElemType::F32, n, m_.vocab_size, m_.vocab_size, picked_.get(), s);
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

  // The metadata layout of a decode step of n sequences (one token each, every one wanting logits).
  MetaLayout decode_layout(int64_t n) const {
    std::vector<int32_t> tile_item, tile_row0;
    attention_paged_tiles(std::vector<int64_t>(static_cast<size_t>(n), 1), group_, &tile_item, &tile_row0);
    return MetaLayout(n, n, static_cast<int64_t>(tile_item.size()), n, kv_.max_blocks_per_sequence());
  }

  cudaGraphExec_t capture(const MetaLayout& ml) {
    cudaStream_t s = stream_.get();
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    try {
      forward_pass(ml);
    } catch (...) {
      cudaStreamEndCapture(s, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_CHECK(err);
    return exec;
  }

  // ------------------------------------------------------------------------------------------
  // The forward, top to bottom: every kernel of one step, reading its metadata from meta_.

  void forward_pass(const MetaLayout& ml) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim, n = ml.rows;
    const float eps = static_cast<float>(m_.norm_eps);
    const int32_t* meta = meta_.get();
    PagedAttentionBatch batch;
    batch.item_row0 = meta + ml.row0;
    batch.item_count = meta + ml.count;
    batch.item_start = meta + ml.start;
    batch.block_tables = meta + ml.tables;
    batch.table_stride = ml.table_stride;
    batch.tile_item = meta + ml.tile_item;
    batch.tile_row0 = meta + ml.tile_row0;
    batch.n_tiles = ml.tiles;
    batch.decode_only = ml.rows == ml.items;  // one token per item: a decode step (graphs and warm-up too)

    launch_embedding(meta + ml.ids, n, tok_embeddings_, m_.vocab_size, dim, x_.get(), ElemType::F32, s);
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(s, &capturing));
    const bool profile = !layer_events_.empty() && capturing == cudaStreamCaptureStatusNone;
    // The hybrid's split for a step of this many tokens: the pool leaves the CPU's rows on the host.
    const HybridSplit* split = nullptr;
    if (hybrid_ && capturing == cudaStreamCaptureStatusNone) {
      split = &hybrid_->split(n);
      set_hybrid_split(*split);
      hybrid_->begin_step();
      last_f_ = split->f;
    }
    // The pool enqueues each streamed layer's copy ahead on its own stream; acquire makes this
    // stream wait for the layer's bytes, release lets the copy that reuses its buffers go.
    gw_->begin_pass();
    for (int64_t l = 0; l < m_.n_layers; ++l) {
      const DeviceLayer d = gw_->acquire(l);
      const LayerPtrs w = layer_ptrs(l, d);
      HybridLayer hl;
      const HybridLayer* hp = nullptr;
      if (split && d.host_held) {
        hl.w = {d.host.wq.bf16(), d.host.wo.bf16(), d.host.w1.bf16(), d.host.w2.bf16()};
        std::copy(split->gpu_rows.begin(), split->gpu_rows.end(), hl.g.begin());
        hp = &hl;
      }
      if (profile) CUDA_CHECK(cudaEventRecord(layer_events_[static_cast<size_t>(2 * l)].get(), s));
      // x += the previous layer's FFN output (layer 0 starts from the embeddings); xn = norm(x).
      launch_add_rms_norm(x_.get(), l == 0 ? nullptr : proj_.get(), ElemType::F32, w.attn_norm, eps, xn_.get(), n,
                          dim, s);
      attention_block(l, w, ml, batch, hp);
      // x += attention output; xn = norm(x).
      launch_add_rms_norm(x_.get(), proj_.get(), ElemType::F32, w.ffn_norm, eps, xn_.get(), n, dim, s);
      ffn_block(w, n, hp);
      if (profile) CUDA_CHECK(cudaEventRecord(layer_events_[static_cast<size_t>(2 * l + 1)].get(), s));
      gw_->release(l);
    }
    gw_->end_pass();
    profiled_ = profile;
    if (ml.logit_rows == 0) return;  // early prompt chunks only: their cache rows are what counts

    // Final norm over the step's rows (cheap), then lm_head on the rows that want logits only.
    launch_add_rms_norm(x_.get(), proj_.get(), ElemType::F32, norm_, eps, xn_.get(), n, dim, s);
    const bf16* rows = xn_.get();
    if (ml.logit_rows != n) {  // a decode step wants every row, in order; otherwise gather them
      launch_gather_rows(xn_.get(), dim, meta + ml.logit, ml.logit_rows, dim, xg_.get(), s);
      rows = xg_.get();
    }
    linear(rows, ml.logit_rows, dim, output_, m_.vocab_size, logits_.get(), ElemType::F32, m_.vocab_size, s);
  }

  // y[n, out] = x[n, in] · Lᵀ (ldx: x's row stride, 0 = in). bf16 weights: one cuBLASLt GEMM.
  // Packed ones: up to kPackedGemvRows rows the GEMV, which reads the packed bytes once per
  // kGemvPackedTokens rows and dequantizes in registers; past that the matrix is dequantized to
  // bf16 in slices of rows through the workspace (it is free here: attention's split partials are
  // consumed before any linear layer runs), each slice one GEMM into its columns of y.
  void linear(const bf16* x, int64_t n, int64_t in, const Linear& l, int64_t out, void* y, ElemType y_type,
              int64_t ldy, cudaStream_t s, int64_t ldx = 0) {
    if (!l.packed()) {
      gemm_->matmul(x, n, in, l.w, out, y, y_type, ldy, s, 0.0f, ldx);
      return;
    }
    if (n <= kPackedGemvRows && in % 32 == 0) {
      launch_gemv_packed(x, n, ldx ? ldx : in, l.p, y, y_type, ldy, s);
      return;
    }
    const int64_t esize = y_type == ElemType::F32 ? 4 : 2;
    const int64_t slice = std::max<int64_t>(8, static_cast<int64_t>(workspace_.bytes()) / (in * 2) / 8 * 8);
    RL_REQUIRE(static_cast<size_t>(std::min(slice, out) * in * 2) <= workspace_.bytes(),
               "the workspace ({} bytes) holds no slice of a packed [{}, {}] matrix", workspace_.bytes(), out, in);
    auto* ws = reinterpret_cast<bf16*>(workspace_.get());
    for (int64_t r0 = 0; r0 < out; r0 += slice) {
      const int64_t rows = std::min(slice, out - r0);
      launch_dequant_packed(l.p, r0, rows, ws, in, s);
      gemm_->matmul(x, n, in, ws, rows, static_cast<char*>(y) + r0 * esize, y_type, ldy, s, 0.0f, ldx);
    }
  }

  // The same as linear() for a bf16 matrix whose rows [g, out) the CPU computes from host_w (the
  // hybrid), when hl splits it; else linear().
  void linear_or_split(const HybridLayer* hl, int part, const bf16* x, int64_t n, int64_t in, const Linear& l,
                       int64_t out, void* y, ElemType y_type, int64_t ldy, cudaStream_t s, int64_t ldx = 0) {
    const int64_t g = hl ? hl->g[static_cast<size_t>(part)] : out;
    if (g >= out) {
      linear(x, n, in, l, out, y, y_type, ldy, s, ldx);
      return;
    }
    hybrid_->linear(x, n, in, ldx ? ldx : in, hl->w[static_cast<size_t>(part)], out, g, y, y_type == ElemType::F32,
                    ldy, s, [&] {
                      if (g > 0) linear(x, n, in, l, g, y, y_type, ldy, s, ldx);
                    });
  }

  // xn → q|k|v (one GEMM) → RoPE on q and k → k, v into their cache rows → attention over the
  // paged cache → O projection into proj_ (fp32).
  void attention_block(int64_t l, const LayerPtrs& w, const MetaLayout& ml, const PagedAttentionBatch& batch,
                       const HybridLayer* hl) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim(), qkv_dim = q_dim + 2 * kv_dim, n = ml.rows;
    bf16* kc = k_cache_.get() + static_cast<size_t>(l) * pool_rows_ * kv_dim;
    bf16* vc = v_cache_.get() + static_cast<size_t>(l) * pool_rows_ * kv_dim;
    bf16* q = qkv_.get();
    bf16* k = q + q_dim;
    bf16* v = k + kv_dim;
    if (w.qkv_fused) {
      linear_or_split(hl, kHybridQkv, xn_.get(), n, dim, w.wq, qkv_dim, q, ElemType::BF16, qkv_dim, s);
    } else {
      linear(xn_.get(), n, dim, w.wq, q_dim, q, ElemType::BF16, qkv_dim, s);
      linear(xn_.get(), n, dim, w.wk, kv_dim, k, ElemType::BF16, qkv_dim, s);
      linear(xn_.get(), n, dim, w.wv, kv_dim, v, ElemType::BF16, qkv_dim, s);
    }
    launch_rope(q, qkv_dim, m_.n_heads, k, qkv_dim, m_.n_kv_heads, m_.head_dim, meta_.get() + ml.pos, inv_freq_.get(),
                n, s);
    launch_kv_store(k, v, qkv_dim, n, kv_dim, meta_.get() + ml.slot, kc, vc, kv_dim, s);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m_.head_dim)));
    launch_attention_paged(q, qkv_dim, kc, vc, kv_dim, kv_.block_tokens(), att_.get(), q_dim, batch, m_.n_heads,
                           m_.n_kv_heads, m_.head_dim, scale, s, attention_split(ml));
    linear_or_split(hl, kHybridWo, att_.get(), n, q_dim, w.wo, dim, proj_.get(), ElemType::F32, dim, s);
  }

  // Flash-decoding's split of the keys for a step of ml's shape. It is sized for the longest context
  // a sequence may reach, not the step's own: a decode step then splits the same way whether it
  // replays a graph (resident) or runs its kernels (streamed), so both give the same bits, and the
  // kernel's spans follow each tile's own context (a short one uses fewer of them).
  PagedAttentionSplit attention_split(const MetaLayout& ml) const {
    PagedAttentionSplit split;
    split.n_tokens = ml.rows;
    split.workspace = workspace_.get();
    split.workspace_bytes = workspace_.bytes();
    split.splits = ml.rows == ml.items && decode_blocks_per_sm_ > 0
                       ? attention_paged_decode_splits(ml.items, m_.n_kv_heads, limits_.max_context, sm_count_,
                                                       decode_blocks_per_sm_, m_.n_heads, m_.head_dim,
                                                       workspace_.bytes())
                       : attention_paged_splits(ml.tiles, m_.n_kv_heads, limits_.max_context, sm_count_, ml.rows,
                                                m_.n_heads, m_.head_dim, workspace_.bytes());
    return split;
  }

  // xn → gate|up (one GEMM) → SiLU(gate)·up over the gate half → down projection into proj_.
  void ffn_block(const LayerPtrs& w, int64_t n, const HybridLayer* hl) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim, ffn = m_.ffn_dim;
    if (w.gu_fused) {
      linear_or_split(hl, kHybridGateUp, xn_.get(), n, dim, w.w1, 2 * ffn, gu_.get(), ElemType::BF16, 2 * ffn, s);
    } else {
      linear(xn_.get(), n, dim, w.w1, ffn, gu_.get(), ElemType::BF16, 2 * ffn, s);
      linear(xn_.get(), n, dim, w.w3, ffn, gu_.get() + ffn, ElemType::BF16, 2 * ffn, s);
    }
    launch_silu_mul_rows(gu_.get(), n, ffn, s);
    linear_or_split(hl, kHybridDown, gu_.get(), n, ffn, w.w2, dim, proj_.get(), ElemType::F32, dim, s, 2 * ffn);
  }

  // ------------------------------------------------------------------------------------------

  const ModelConfig m_;
  const int device_;  // set current before any member below is built
  const CudaBackendOptions options_;
  const int64_t max_rows_;   // tokens of one step (activations are sized for it)
  const int64_t group_;      // query heads per kv head
  const int64_t max_tiles_;  // attention work tiles of one step, at most
  const int64_t max_meta_;   // int32s of one step's metadata, at most
  const int sm_count_;       // the device's multiprocessors (the attention split fills them)
  const int decode_blocks_per_sm_;  // the decode attention kernel's blocks per SM (0: not used)
  Stream stream_;
  CudaMemoryReport report_;     // the plan and what was measured
  std::unique_ptr<Gemm> gemm_;  // made after the context is measured, before the plan

  std::unique_ptr<BackgroundRegistration> registration_;  // from the start until gw_ takes it
  std::unique_ptr<GpuWeights> gw_;  // the globals, the resident layers and the group pool
  bool streaming_ = false;          // some layers stream through the pool
  const Manifest* manifest_ = nullptr;  // the weight source's
  std::unique_ptr<CudaHybrid> hybrid_;  // the CPU's share of streamed layers (null: off)
  std::vector<int64_t> skipped_rows_;   // the GPU rows the pool's skipped bytes were set for
  double last_f_ = 1;                   // the last hybrid step's GPU share
  const bf16* tok_embeddings_ = nullptr;
  const bf16* norm_ = nullptr;
  Linear output_;  // lm_head; the embedding (bf16) when tied
  std::vector<bool> qkv_fused_, gu_fused_;  // per layer: see LayerPtrs
  std::vector<TimingEvent> layer_events_;   // profile_layers: [2 l] after the wait, [2 l + 1] after the last kernel
  std::vector<double> layer_compute_;       // the last profiled step, seconds per layer
  double step_seconds_ = 0;                 // the last profiled step: first layer's start to last layer's end
  bool profiled_ = false;                   // the step in flight recorded the layer events
  mutable int64_t traced_steps_ = 0;        // --verbose step lines so far

  // The paged cache: [layer][pool row][kv_dim], pool row = block * kv_block_tokens + offset; keys rotated.
  DeviceBuffer<bf16> k_cache_, v_cache_;
  size_t pool_rows_ = 0;

  // Activations of one step, [tokens][width].
  DeviceBuffer<float> x_;     // residual stream (fp32: see add_rms_norm.cuh)
  DeviceBuffer<bf16> xn_;     // normed x, the GEMMs' input
  DeviceBuffer<bf16> qkv_;    // [tokens][q_dim + 2 kv_dim]
  DeviceBuffer<bf16> att_;    // attention output
  DeviceBuffer<float> proj_;  // O or down projection, added into x by the next norm
  DeviceBuffer<bf16> gu_;     // [tokens][2 ffn]: gate (then SiLU(gate)·up) | up
  DeviceBuffer<bf16> xg_;     // [items][dim] the normed rows that want logits, when gathered
  DeviceBuffer<float> logits_;  // [items][vocab]
  DeviceBuffer<int32_t> picked_;       // [items] greedy or sampled ids
  DeviceBuffer<SampleParams> params_;  // [items] sampling rows
  DeviceBuffer<int32_t> meta_;  // MetaLayout
  DeviceBuffer<float> inv_freq_;  // [head_dim / 2]
  DeviceBuffer<unsigned char> workspace_;  // the plan's workspace line
  std::vector<cudaGraphExec_t> graphs_;    // decode step graphs, [batch size - 1]

  PinnedBuffer<int32_t> host_meta_;
  PinnedBuffer<float> host_logits_;
  PinnedBuffer<int32_t> host_picked_;
  PinnedBuffer<SampleParams> host_params_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config,
                                           const CudaBackendOptions& options) {
  // The device's primary context first, timed on its own: the backend's start phases follow it.
  const auto t0 = std::chrono::steady_clock::now();
  select_device(config.gpu);
  CUDA_CHECK(cudaFree(nullptr));
  spdlog::info("CUDA context on GPU {}: {:.0f} ms", config.gpu,
               std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return std::make_unique<CudaBackend>(weights, config, options);
}

const CudaMemoryReport* cuda_memory_report(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda ? &cuda->memory_report() : nullptr;
}

bool cuda_stream_report(const Backend& backend, CudaStreamReport* out) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  if (!cuda) return false;
  *out = cuda->stream_report();
  return true;
}

int64_t cuda_planned_resident_layers(const Manifest& manifest, const Config& config) {
  const int device = select_device(config.gpu);
  const uint64_t context = process_context_bytes(device);
  const DeviceMemory now = device_memory();
  PlanInputs in;
  in.device_total_bytes = now.total;
  in.device_free_bytes = now.free > kEstimatedCublasBytes ? now.free - kEstimatedCublasBytes : 0;
  in.context_bytes = context;
  in.cublas_bytes = kEstimatedCublasBytes;
  in.measured = true;
  return plan_memory(manifest, config, in).resident_layers;
}

}  // namespace ringllama
