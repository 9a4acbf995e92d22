#include "worker/cuda_hybrid.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/log.h"
#include "kernels/check.h"
#include "worker/cuda_memory.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The CPU kernel's GB/s of weights at each token count on a matrix of `bytes` (in = 4096, the
// rows a model's matrices have), the best of two after a warm-up; and a plain read of it.
std::vector<std::pair<int, double>> measure_cpu_gbs(HybridCpuMatmul& cpu, size_t bytes, double* dram_gbs) {
  constexpr int64_t kIn = 4096;
  const int64_t rows = static_cast<int64_t>(bytes / (kIn * 2));
  std::vector<uint16_t> w(static_cast<size_t>(rows * kIn), f32_to_bf16(0.01f));
  std::vector<uint16_t> x(static_cast<size_t>(HybridCpuMatmul::kMaxTokens * kIn), f32_to_bf16(0.5f));
  std::vector<float> y(static_cast<size_t>(HybridCpuMatmul::kMaxTokens * rows));
  *dram_gbs = measure_dram_read_gbs(w.data(), w.size() * 2, cpu, 3);
  std::vector<std::pair<int, double>> table;
  for (int t : {1, 2, 4, 8, 16, 32, 64}) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = Clock::now();
      cpu.matmul(w.data(), kIn, 0, rows, x.data(), t, y.data(), rows);
      const double s = seconds_since(t0);
      if (rep > 0 && s > 0) best = std::max(best, double(w.size() * 2) / s * 1e-9);
    }
    table.emplace_back(t, best);
  }
  return table;
}

}  // namespace

CudaHybrid::CudaHybrid(const ModelConfig& m, const CudaHybridOptions& o, void* dev_scratch, size_t dev_bytes)
    : cpu_(o.threads, o.pin) {
  matrices_ = hybrid_layer_matrices(m);
  for (const HybridMatrix& x : matrices_) {
    max_in_ = std::max(max_in_, x.in);
    max_out_ = std::max(max_out_, x.rows);
  }
  const auto t0 = Clock::now();
  RL_REQUIRE(dev_scratch && dev_bytes >= (1u << 20), "the hybrid's H2D measurement needs a device scratch of 1 MiB");
  rates_.h2d_gbs = measure_pinned_h2d(std::min<size_t>(dev_bytes, size_t(64) << 20), 5, dev_scratch) * 1e-9;
  if (o.cpu_share) {
    rates_.cpu_share = *o.cpu_share;
  } else {
    rates_.cpu_gbs_by_tokens = measure_cpu_gbs(cpu_, size_t(256) << 20, &dram_gbs_);
  }
  validate(rates_);
  spdlog::info("hybrid: {} CPU threads ({}), pinned H2D {:.1f} GB/s{}; measured in {:.0f} ms", cpu_.threads(),
               cpu_.isa(), rates_.h2d_gbs,
               o.cpu_share ? fmt::format(", CPU share forced to {}", *o.cpu_share)
                           : fmt::format(", plain DRAM read {:.1f} GB/s", dram_gbs_),
               seconds_since(t0) * 1e3);

  CUDA_CHECK(cudaStreamCreateWithFlags(&h_, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&ex_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&ey_, cudaEventDisableTiming));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&hx_), size_t(kMaxTokens * max_in_) * 2));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&hyf_), size_t(kMaxTokens * max_out_) * 4));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&hyb_), size_t(kMaxTokens * max_out_) * 2));
  jobs_.resize(static_cast<size_t>(8 * std::max<int64_t>(1, m.n_layers) * kHybridMatrices));
  for (int64_t i = 0; i < std::max<int64_t>(1, m.n_layers) * kHybridMatrices; ++i) {
    gpu_done_.push_back(nullptr);
    cpu_in_.push_back(nullptr);
    CUDA_CHECK(cudaEventCreate(&gpu_done_.back()));
    CUDA_CHECK(cudaEventCreate(&cpu_in_.back()));
  }
}

std::unique_ptr<CudaHybrid> CudaHybrid::start(const Manifest& man, int64_t first_streamed, int64_t held_layers,
                                               const Config& config, void* dev_scratch, size_t dev_bytes,
                                               int64_t max_tokens) {
  if (config.cpu_share == 0.0) return nullptr;
  const bool forced = config.cpu_share > 0.0;
  const std::string why = hybrid_refusal(man, first_streamed, held_layers);
  if (!why.empty()) {
    if (forced) throw ConfigError(fmt::format("cpu_share {} cannot apply: {}", config.cpu_share, why));
    spdlog::info("hybrid: off ({}); every streamed row crosses PCIe", why);
    return nullptr;
  }
  CudaHybridOptions o;
  if (forced) o.cpu_share = config.cpu_share;
  o.threads = config.cpu_threads == kAuto ? 0 : static_cast<int>(config.cpu_threads);
  std::unique_ptr<CudaHybrid> h;
  try {
    h = std::make_unique<CudaHybrid>(man.model, o, dev_scratch, dev_bytes);
  } catch (const Error& e) {
    // A rate that could not be measured (zero, not finite): auto falls back to streaming alone.
    if (forced) throw;
    spdlog::warn("hybrid: off ({}); every streamed row crosses PCIe", e.what());
    return nullptr;
  }
  fmt::print(stderr, "{}", h->plan_text(man.model.n_layers - first_streamed, std::min(max_tokens, kMaxTokens)));
  return h;
}

std::vector<std::vector<SkippedBytes>> CudaHybrid::skipped_bytes(const Manifest& man, int64_t first_streamed,
                                                                 const HybridSplit& split) {
  std::vector<std::vector<SkippedBytes>> skipped(static_cast<size_t>(man.model.n_layers));
  for (int64_t l = std::max<int64_t>(0, first_streamed); l < man.model.n_layers; ++l)
    for (const HybridHostRange& r : hybrid_cpu_ranges(man, l, split.gpu_rows))
      skipped[static_cast<size_t>(l)].push_back({r.ffn, r.begin, r.end});
  return skipped;
}

CudaHybrid::~CudaHybrid() {
  if (h_) cudaStreamSynchronize(h_);
  if (hx_) cudaFreeHost(hx_);
  if (hyf_) cudaFreeHost(hyf_);
  if (hyb_) cudaFreeHost(hyb_);
  for (cudaEvent_t e : gpu_done_)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : cpu_in_)
    if (e) cudaEventDestroy(e);
  if (ex_) cudaEventDestroy(ex_);
  if (ey_) cudaEventDestroy(ey_);
  if (h_) cudaStreamDestroy(h_);
}

const HybridSplit& CudaHybrid::split(int64_t tokens) {
  auto it = splits_.find(tokens);
  if (it != splits_.end()) return it->second;
  const HybridSplit sp = tokens > kMaxTokens || tokens < 1 ? gpu_alone(1)
                                                           : split_layer(matrices_, static_cast<int>(tokens), rates_);
  return splits_.emplace(tokens, sp).first->second;
}

HybridSplit CudaHybrid::gpu_alone(int tokens) const {
  HybridRates off = rates_;
  off.cpu_share = 0.0;  // f = 1: every row of every matrix
  return split_layer(matrices_, tokens, off);
}

std::string CudaHybrid::plan_text(int64_t streamed_layers, int64_t max_tokens) const {
  std::string out = fmt::format("hybrid: each streamed layer's matrices split by rows, the GPU's share f copied over "
                                "PCIe ({:.1f} GB/s), the rest computed by {} CPU threads ({}) from host memory\n",
                                rates_.h2d_gbs, cpu_.threads(), cpu_.isa());
  for (int t : {1, 2, 4, 8, 16, 32, 64}) {
    if (t > max_tokens) break;
    const HybridSplit sp = split_layer(matrices_, t, rates_);
    const HybridSplit gpu_only = gpu_alone(t);
    out += fmt::format("  {:>2} tokens: CPU {:6.1f} GB/s, f {:.3f}: layer {:.2f} ms (GPU alone {:.2f}), bound {:.2f} "
                       "tokens/s (GPU alone {:.2f})\n",
                       t, rates_.cpu_share ? 0.0 : cpu_rate_gbs(rates_, t), sp.f, sp.seconds() * 1e3,
                       gpu_only.seconds() * 1e3, hybrid_tokens_per_s_bound(sp, streamed_layers, t),
                       hybrid_tokens_per_s_bound(gpu_only, streamed_layers, t));
  }
  return out;
}

void CUDART_CB CudaHybrid::run_job(void* job) {
  const Job* j = static_cast<const Job*>(job);
  j->self->run(*j);
}

void CudaHybrid::run(const Job& j) {
  const auto t0 = Clock::now();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!error_.empty()) return;  // the step fails anyway: do no more work
  }
  try {
    const int64_t rows = j.out - j.g;
    cpu_.matmul(j.w, j.in, j.g, j.out, hx_, j.n, hyf_, rows);
    const double kernel = seconds_since(t0);
    if (!j.y_f32) {
      const int64_t count = j.n * rows;
      for (int64_t i = 0; i < count; ++i) hyb_[i] = f32_to_bf16(hyf_[i]);
    }
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.calls;
    stats_.cpu_bytes += static_cast<uint64_t>(rows * j.in * 2);
    stats_.cpu_seconds += kernel;
    stats_.callback_seconds += seconds_since(t0);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lk(mu_);
    error_ = e.what();
  }
}

void CudaHybrid::linear(const void* x, int64_t n, int64_t in, int64_t ldx, const uint16_t* host_w, int64_t out,
                        int64_t g, void* y, bool y_f32, int64_t ldy, cudaStream_t s,
                        const std::function<void()>& gpu_part) {
  RL_REQUIRE(n >= 1 && n <= kMaxTokens && in <= max_in_ && out <= max_out_ && g >= 0 && g < out && host_w,
             "hybrid linear: {} tokens, [{}, {}] split at row {} is outside what was planned", n, out, in, g);
  Job& j = jobs_[next_job_];
  next_job_ = (next_job_ + 1) % jobs_.size();
  j = Job{this, host_w, in, g, out, n, y_f32};
  const int64_t esize = y_f32 ? 4 : 2;
  const int64_t rows = out - g;
  CUDA_CHECK(cudaEventRecord(ex_, s));
  CUDA_CHECK(cudaStreamWaitEvent(h_, ex_, 0));
  CUDA_CHECK(cudaMemcpy2DAsync(hx_, in * 2, x, (ldx ? ldx : in) * 2, in * 2, n, cudaMemcpyDeviceToHost, h_));
  CUDA_CHECK(cudaLaunchHostFunc(h_, &CudaHybrid::run_job, &j));
  CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(y) + g * esize, ldy * esize,
                               y_f32 ? static_cast<const void*>(hyf_) : static_cast<const void*>(hyb_),
                               rows * esize, rows * esize, n, cudaMemcpyHostToDevice, h_));
  const bool timed = slot_ < cpu_in_.size();
  if (timed) CUDA_CHECK(cudaEventRecord(cpu_in_[slot_], h_));
  CUDA_CHECK(cudaEventRecord(ey_, h_));
  gpu_part();
  if (timed) CUDA_CHECK(cudaEventRecord(gpu_done_[slot_++], s));
  CUDA_CHECK(cudaStreamWaitEvent(s, ey_, 0));
}

void CudaHybrid::end_step() {
  double wait = 0, ahead = 0;
  for (size_t k = 0; k < slot_; ++k) {
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, gpu_done_[k], cpu_in_[k]));
    if (ms > 0) wait += ms * 1e-3;
    else ahead -= ms * 1e-3;
  }
  std::lock_guard<std::mutex> lk(mu_);
  stats_.joins += slot_;
  stats_.join_wait_seconds += wait;
  stats_.cpu_ahead_seconds += ahead;
  slot_ = 0;
}

void CudaHybrid::check() {
  std::lock_guard<std::mutex> lk(mu_);
  if (!error_.empty()) {
    const std::string e = error_;
    error_.clear();
    throw Error("the CPU's share of a streamed layer failed: " + e);
  }
}

CudaHybridStats CudaHybrid::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

}  // namespace ringllama
