// The hybrid on the CUDA side (DESIGN.md "The CPU's share of a streamed layer (hybrid)"): for a
// streamed bf16 layer, each of its four matrices (q|k|v, o, gate|up, down) is split by output rows;
// the GPU copies and multiplies the first rows, CPU threads (worker/hybrid_cpu.h) multiply the
// others from the host copy the pool holds, at the same time, and their rows join the GPU's
// before the next op.
//
// One matrix, in stream order (s: the compute stream, h: this object's stream):
//   s: ... x ready; record ex                       h: wait ex; x -> pinned (D2H, n x in bf16)
//   s: GEMM over the GPU's rows into y[:, 0:g)      h: host function: the CPU's rows into pinned
//   s: wait ey                                      h: pinned -> y[:, g:out) (one 2D H2D); record ey
// so the CPU's rows overlap the GPU's copy and GEMM of the same matrix, and nothing on s reads y
// or overwrites x before both halves are in. The host function runs on the driver's callback
// thread and hands the rows to the pool; the h operations run in order, so one pinned x and one
// pinned y buffer serve every matrix.
//
// The split comes from rates measured at construction: pinned H2D (64 MiB copies) and the CPU
// kernel's GB/s at 1 ... 64 tokens on a scratch matrix (worker/hybrid_cpu_split.h: f = h2d / (h2d
// + cpu(T))). Steps of more than HybridCpuMatmul::kMaxTokens tokens run on the GPU alone.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/model_config.h"
#include "worker/gpu_weights.h"
#include "worker/hybrid_cpu.h"
#include "worker/hybrid_cpu_split.h"

namespace ringllama {

// The matrices of a layer the hybrid splits, in forward order; q|k|v and gate|up are the fused
// (adjacent) tensors, so each is one row range on either side.
enum HybridPart : int { kHybridQkv = 0, kHybridWo = 1, kHybridGateUp = 2, kHybridDown = 3, kHybridMatrices = 4 };

struct CudaHybridOptions {
  std::optional<double> cpu_share;  // forced CPU share of each matrix's rows; nullopt: from the rates
  int threads = 0;                  // CPU threads (0: every core the process may use)
  bool pin = true;                  // one core per thread
};

struct CudaHybridStats {
  uint64_t calls = 0;         // CPU row ranges computed
  uint64_t cpu_bytes = 0;     // weight bytes the CPU read
  double cpu_seconds = 0;     // time in the CPU kernel (the pool's wall time per call, summed)
  double callback_seconds = 0;  // time in the host functions, conversions and bookkeeping included
  // The joins (events: the GPU's part done on the compute stream, the CPU's rows in on the
  // hybrid's), per matrix: the time the compute stream waited for the CPU's rows, and the time the
  // CPU's rows were in before the GPU's part was done (the GPU the slower half).
  uint64_t joins = 0;
  double join_wait_seconds = 0;
  double cpu_ahead_seconds = 0;
  double gbs() const { return cpu_seconds > 0 ? double(cpu_bytes) / cpu_seconds * 1e-9 : 0.0; }
};

class CudaHybrid {
 public:
  // Measures the rates (the CPU's only when the share is not forced; H2D into dev_scratch, device
  // memory whose contents do not matter yet) and allocates the pinned buffers for steps of up to
  // kMaxTokens tokens. The current device is the one to use.
  CudaHybrid(const ModelConfig& m, const CudaHybridOptions& options, void* dev_scratch, size_t dev_bytes);
  ~CudaHybrid();
  CudaHybrid(const CudaHybrid&) = delete;
  CudaHybrid& operator=(const CudaHybrid&) = delete;

  static constexpr int64_t kMaxTokens = HybridCpuMatmul::kMaxTokens;

  // The hybrid for a backend whose layers [first_streamed, n) stream through a pool that may hold
  // `held_layers` host layers, as config.cpu_share asks: null when it is 0, or when it is auto and
  // the hybrid cannot apply (hybrid_refusal, or a rate that cannot be measured: logged). A forced
  // share that cannot apply is a ConfigError naming why. Prints the plan (hybrid_plan) to stderr.
  static std::unique_ptr<CudaHybrid> start(const Manifest& man, int64_t first_streamed, int64_t held_layers,
                                           const Config& config, void* dev_scratch, size_t dev_bytes,
                                           int64_t max_tokens);

  // The pool's skipped bytes for `split`: per layer, the CPU's row ranges of the streamed layers
  // [first_streamed, n) (hybrid_cpu_ranges), none for the others.
  static std::vector<std::vector<SkippedBytes>> skipped_bytes(const Manifest& man, int64_t first_streamed,
                                                              const HybridSplit& split);

  // The GPU's rows of each matrix for a step of `tokens` (all rows past kMaxTokens or with the
  // share at 0), and the layer split behind them; cached per token count.
  const HybridSplit& split(int64_t tokens);
  const HybridRates& rates() const { return rates_; }
  const char* isa() const { return cpu_.isa(); }
  int threads() const { return cpu_.threads(); }
  double dram_read_gbs() const { return dram_gbs_; }
  // The matrices' shapes (rows, in) in HybridPart order.
  const std::vector<HybridMatrix>& matrices() const { return matrices_; }
  // One line per batch size: the share, the bound it implies for `streamed_layers` layers.
  std::string plan_text(int64_t streamed_layers, int64_t max_tokens) const;

  // y[t, 0:out) = x[t, 0:in] · Wᵀ for t < n: rows [0, g) by gpu_part() (launched on s here), rows
  // [g, out) by the CPU from host_w (bf16 [out][in], the whole matrix), as above. x and y are
  // device pointers with row strides ldx and ldy (elements); y is fp32 (y_f32) or bf16.
  void linear(const void* x, int64_t n, int64_t in, int64_t ldx, const uint16_t* host_w, int64_t out, int64_t g,
              void* y, bool y_f32, int64_t ldy, cudaStream_t s, const std::function<void()>& gpu_part);

  // Around a step's forward (begin_step before its first linear, end_step after the compute
  // stream synchronized): end_step adds the step's join times to the stats.
  void begin_step() { slot_ = 0; }
  void end_step();

  // After the compute stream synchronized: the CPU side's failure, if any, as an Error (the
  // step's outputs are then not to be used).
  void check();
  CudaHybridStats stats() const;

 private:
  struct Job {
    CudaHybrid* self = nullptr;
    const uint16_t* w = nullptr;
    int64_t in = 0, g = 0, out = 0, n = 0;
    bool y_f32 = false;
  };
  // The split with the CPU off (f = 1, every row on the GPU) at a batch of `tokens`.
  HybridSplit gpu_alone(int tokens) const;
  static void CUDART_CB run_job(void* job);
  void run(const Job& j);

  std::vector<HybridMatrix> matrices_;
  HybridCpuMatmul cpu_;
  HybridRates rates_;
  double dram_gbs_ = 0;
  std::map<int64_t, HybridSplit> splits_;
  cudaStream_t h_ = nullptr;
  cudaEvent_t ex_ = nullptr, ey_ = nullptr;
  uint16_t* hx_ = nullptr;   // pinned: x, kMaxTokens x max in, bf16
  float* hyf_ = nullptr;     // pinned: the CPU's rows, kMaxTokens x max out, fp32
  uint16_t* hyb_ = nullptr;  // pinned: the same as bf16 (for bf16 outputs)
  int64_t max_in_ = 0, max_out_ = 0;
  std::vector<Job> jobs_;    // a ring: a job lives until its host function ran
  size_t next_job_ = 0;
  std::vector<cudaEvent_t> gpu_done_, cpu_in_;  // timing, per matrix of a step (4 per layer)
  size_t slot_ = 0;                             // matrices of this step so far
  mutable std::mutex mu_;    // the stats and the error, written by the callback thread
  CudaHybridStats stats_;
  std::string error_;
};

}  // namespace ringllama
