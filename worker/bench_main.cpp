// ringllama-bench: the CUDA backend on one GPU, against the limits measured in the same run
// (DESIGN.md "Testing": benchmarks print ratios against the physical limit).
//
//   ringllama-bench --store DIR [--decode-steps 64] [--batches 1,8,64] [--prompt-tokens 512]
//   ringllama-bench --store DIR --gpu-budget-gib 4 [--decode-steps 8] ...
//   ringllama-bench --store DIR --batches 1 --long-context 32768
//   ringllama-bench --daemon ENDPOINT [--store DIR] --gpu-budget-gib 16 [--decode-steps 8] ...
//
// With --gpu-budget-gib the planner's budget is that many GiB: the layers that do not fit stream
// through the group pool from a pinned ring window that holds the whole model (the SSD is read
// once). With --daemon as well, that window is a running ringllama-loaderd's (the service's data
// path: its segment mapped read-only, at most its hold_max layers held at once) and the store is
// the one it serves (--store, when given, must be that one). Measures pinned H2D (1 GiB
// cudaMallocHost -> device copies), then decode at each batch size and prefill of --prompt-tokens
// tokens, each on a backend planned for it: tokens/s, bytes streamed per step, the effective rate
// (bytes streamed / step time) against pinned H2D, and for the last step of each, the sum over
// layers of max(copy, compute) next to copy + compute (events).
//
// Measures: device memory bandwidth (a large device-to-device copy moves 2 bytes per byte copied);
// bf16 GEMM throughput (8192^3 through the engine's GEMM wrapper); decode tokens/s at each batch
// size (short prompts, then N greedy decode steps, ids only back to the host), with and without
// decode-step graphs; prefill tokens/s for prompts of --prompt-tokens tokens at batch 1 and 8.
// Floors: a step reads every weight once (layers, final norm, lm_head), so decode at batch b is at
// best b tokens per (weight bytes / bandwidth); prefill is at best the larger of that and its
// FLOPs over the measured GEMM rate. Prints one table, figure / floor / ratio.
#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/errors.h"
#include "common/bf16.h"
#include "common/store.h"
#include "worker/planner.h"
#include "common/host_plan.h"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "kernels/gemm.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"
#include "worker/cuda_memory.h"
#include "worker/daemon_weights.h"
#include "worker/window_weights.h"

namespace ringllama {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Median of `reps` timings (ms) of fn on stream s, timed with events.
template <typename F>
double time_ms(int reps, cudaStream_t s, F&& fn) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a, s));
    fn();
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device-to-device copy of 2 GiB, bytes read + written per second.
double measure_bandwidth() {
  const size_t bytes = size_t{2} << 30;
  DeviceBuffer<char> a(bytes, "bandwidth source"), b(bytes, "bandwidth destination");
  CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
  const double ms = time_ms(11, nullptr, [&] { CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, nullptr)); });
  return 2.0 * bytes / (ms * 1e-3);
}

// bf16 GEMM 8192^3 with random inputs (not zeros: they run faster than real data), FLOP/s.
double measure_gemm() {
  const int64_t n = 8192;
  std::vector<uint16_t> h(static_cast<size_t>(n * n));
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& x : h) x = f32_to_bf16(d(rng));
  DeviceBuffer<__nv_bfloat16> x(h.size(), "gemm x"), w(h.size(), "gemm w"), y(h.size(), "gemm y");
  CUDA_CHECK(cudaMemcpy(x.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  std::shuffle(h.begin(), h.end(), rng);
  CUDA_CHECK(cudaMemcpy(w.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  Gemm gemm;
  auto run = [&] { gemm.matmul(x.get(), n, n, w.get(), n, y.get(), ElemType::BF16, n, nullptr); };
  run();
  const double ms = time_ms(9, nullptr, run);
  return 2.0 * n * n * n / (ms * 1e-3);
}

struct Row {
  std::string figure, unit;
  double value = 0, floor = 0;
};

std::vector<int32_t> prompt(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& t : v) t = static_cast<int32_t>(rng() % vocab);
  return v;
}

// b sequences with short prompts, then `steps` greedy decode steps: tokens/s of the decode steps.
double decode_rate(Backend& be, int64_t b, int64_t prompt_len, int64_t steps) {
  const int64_t vocab = be.model().vocab_size;
  std::vector<StepItem> items;
  for (int64_t s = 0; s < b; ++s) {
    be.add_sequence(s);
    items.push_back({s, prompt(prompt_len, vocab, 100 + s), true});
  }
  std::vector<int32_t> ids = be.step_greedy(items);
  auto next = [&] {
    for (int64_t s = 0; s < b; ++s) items[s].tokens = {ids[s]};
    ids = be.step_greedy(items);
  };
  for (int i = 0; i < 3; ++i) next();  // warm-up: graph capture, cuBLAS heuristics
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < steps; ++i) next();
  const double dt = seconds_since(t0);
  for (int64_t s = 0; s < b; ++s) be.free_sequence(s);
  return static_cast<double>(b * steps) / dt;
}

// b prompts of n tokens (one chunk each) in one step: prompt tokens/s, median of 5.
double prefill_rate(Backend& be, int64_t b, int64_t n) {
  const int64_t vocab = be.model().vocab_size;
  std::vector<double> t;
  for (int rep = 0; rep < 6; ++rep) {
    std::vector<StepItem> items;
    for (int64_t s = 0; s < b; ++s) {
      be.add_sequence(s);
      items.push_back({s, prompt(n, vocab, 200 + s), true});
    }
    const auto t0 = Clock::now();
    be.step_greedy(items);
    if (rep > 0) t.push_back(seconds_since(t0));  // the first run warms up
    for (int64_t s = 0; s < b; ++s) be.free_sequence(s);
  }
  std::sort(t.begin(), t.end());
  return static_cast<double>(b * n) / t[t.size() / 2];
}

// One sequence of `context` prompt tokens (prefilled in chunks of `chunk`), then `steps` greedy
// decode steps: seconds per decode step.
double long_decode_step_s(Backend& be, int64_t context, int64_t chunk, int64_t steps) {
  const int64_t vocab = be.model().vocab_size;
  const std::vector<int32_t> p = prompt(context, vocab, 300);
  be.add_sequence(0);
  std::vector<int32_t> ids;
  for (int64_t at = 0; at < context; at += chunk) {
    const int64_t n = std::min(chunk, context - at);
    const bool last = at + n == context;
    ids = be.step_greedy({{0, std::vector<int32_t>(p.begin() + at, p.begin() + at + n), last}});
  }
  std::vector<StepItem> items{{0, {ids.at(0)}, true}};
  auto next = [&] {
    ids = be.step_greedy(items);
    items[0].tokens = {ids.at(0)};
  };
  for (int i = 0; i < 3; ++i) next();
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < steps; ++i) next();
  const double dt = seconds_since(t0) / static_cast<double>(steps);
  be.free_sequence(0);
  return dt;
}

struct StreamRow {
  std::string figure;
  double tok_s = 0;
  double bytes_per_step = 0;
  double step_s = 0;           // wall time of one step
  double effective = 0;        // bytes streamed per step / step time
  double copy_rate = 0;        // bytes / copy time on the copy stream
  double sum_max = 0, sum_add = 0, gpu_step = 0;  // last step: sum max(copy, compute), sum copy + compute, span
  int64_t resident = 0, ahead = 0, attn = 0, ffn = 0;
  uint64_t stalls = 0;
  double stall_s = 0;
  // The hybrid (cpu_share): the CPU's bytes per step, its rate (bytes over the kernel's time), a
  // plain read by the same threads at the backend's start, and the GPU share f.
  std::string share = "0";
  bool hybrid = false;
  double cpu_bytes_per_step = 0, cpu_rate = 0, cpu_read = 0, f = 1;
  // Per streamed layer and step: the compute stream waiting for the CPU's rows (the join's cost),
  // and the CPU's rows in before the GPU's half was done.
  double join_wait_layer = 0, cpu_ahead_layer = 0;
  std::string cpu_isa;
};

// A backend under the budget: the largest gpu_ahead_layers from 4 down that the planner accepts.
std::unique_ptr<Backend> budget_backend(WeightSource& ws, Config c, int64_t* ahead) {
  std::string last;
  for (int64_t a = 4; a >= 1; --a) {
    c.gpu_ahead_layers = a;
    try {
      auto be = make_cuda_backend(ws, c, CudaBackendOptions{true, true});
      *ahead = a;
      return be;
    } catch (const Error& e) {
      last = e.what();
    }
  }
  fail("the budget does not fit even with gpu_ahead_layers 1: {}", last);
}

void fill_stream_row(StreamRow* row, const Backend& be, const CudaStreamReport& before, int64_t steps, double seconds,
                     int64_t tokens) {
  CudaStreamReport r;
  cuda_stream_report(be, &r);
  row->tok_s = tokens / seconds;
  row->step_s = seconds / steps;
  row->bytes_per_step = double(r.bytes - before.bytes) / steps;
  row->effective = row->bytes_per_step / row->step_s;
  const double copy_s = r.copy_seconds - before.copy_seconds;
  row->copy_rate = copy_s > 0 ? double(r.bytes - before.bytes) / copy_s : 0;
  row->sum_max = row->sum_add = 0;
  for (int64_t l = 0; l < r.n_layers; ++l) {
    const double cp = r.layer_copy_seconds.empty() ? 0 : r.layer_copy_seconds[static_cast<size_t>(l)];
    const double cm = r.layer_compute_seconds.empty() ? 0 : r.layer_compute_seconds[static_cast<size_t>(l)];
    row->sum_max += std::max(cp, cm);
    row->sum_add += cp + cm;
  }
  row->gpu_step = r.step_seconds;
  row->resident = r.resident_layers;
  row->attn = r.attn_buffers;
  row->ffn = r.ffn_buffers;
  row->stalls = r.source_stalls - before.source_stalls;
  row->stall_s = r.source_wait_seconds - before.source_wait_seconds;
  row->hybrid = r.hybrid;
  if (r.hybrid) {
    row->cpu_bytes_per_step = double(r.cpu_bytes - before.cpu_bytes) / steps;
    const double cpu_s = r.cpu_seconds - before.cpu_seconds;
    row->cpu_rate = cpu_s > 0 ? double(r.cpu_bytes - before.cpu_bytes) / cpu_s : 0;
    row->cpu_read = r.cpu_dram_read_gbs * 1e9;
    row->f = r.gpu_fraction;
    row->cpu_isa = fmt::format("{} x{}", r.cpu_isa, r.cpu_threads);
    const double per = double(steps) * double(std::max<int64_t>(1, r.n_layers - r.resident_layers));
    row->join_wait_layer = (r.cpu_join_wait_seconds - before.cpu_join_wait_seconds) / per;
    row->cpu_ahead_layer = (r.cpu_ahead_seconds - before.cpu_ahead_seconds) / per;
  }
}

// "auto" (kAutoShare) or a share in [0, 1].
double parse_share(const std::string& text) {
  if (text == "auto") return kAutoShare;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !(v >= 0 && v <= 1))
    fail("--cpu-shares: '{}' is not a CPU share (auto, or a number from 0 to 1)", text);
  return v;
}

// `daemon`: the weights from the loader daemon at `endpoint` (opened by the caller); null: from a
// window of this process's own over store_dir.
int run_streamed(const std::string& store_dir, double budget_gib, const std::vector<int64_t>& batches, int64_t steps,
                 int64_t prompt_tokens, int64_t decode_prompt, std::unique_ptr<WeightSource> daemon,
                 const std::string& endpoint, const std::vector<std::string>& shares) {
  CUDA_CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double h2d = measure_pinned_h2d(size_t{1} << 30, 7);
  const Store store = Store::open(store_dir);
  const ModelConfig& m = store.model();
  std::fprintf(stderr, "%s: pinned H2D %.1f GB/s (1 GiB copies); budget %.1f GiB; %lld layers, %.2f GB of weights\n",
               prop.name, h2d / 1e9, budget_gib, static_cast<long long>(m.n_layers),
               store.manifest().weights_size / 1e9);

  Config c;
  c.store = store_dir;
  c.cpu_cap_layers = m.n_layers;  // the whole model in the pinned window: the SSD is read once
  c.gpu_memory_limit = budget_gib * double(kGiB) / double(prop.totalGlobalMem);
  // The budget is an explicit cap on everything the process uses; within it a small guard is enough.
  c.free_guard_mb = 64;
  c.kv_block_tokens = 16;
  auto t0 = Clock::now();
  std::unique_ptr<WindowWeights> window;
  WeightSource* ws = daemon.get();
  std::string weights_from;
  if (daemon) {
    // The window is the daemon's (its log has its host plan). What bounds the pool from this side is
    // how many layers the daemon lets a worker hold at once: the pool keeps at most that many copies
    // in flight (worker/gpu_weights.h), below h2d_backlog_max. One copy on the copy stream saturates
    // the link; with one in flight, though, each next copy waits on the host for the last to land.
    const int64_t hold = daemon->layers_held_at_once();
    const int64_t in_flight = std::max<int64_t>(1, std::min(c.h2d_backlog_max, hold));
    weights_from = fmt::format("the loader daemon at {} (hold_max {}: at most {} copies in flight, h2d_backlog_max {})",
                               endpoint, hold, in_flight, c.h2d_backlog_max);
    std::fprintf(stderr, "weights: %s, store %s%s\n", weights_from.c_str(), store_dir.c_str(),
                 in_flight < 2 ? "; one copy at a time: each waits on the host for the one before to land" : "");
  } else {
    weights_from = fmt::format("this process's own pinned window of {} layers", m.n_layers);
    // The host part of the plan: the window holds every layer, so the disk is read once and PCIe
    // alone bounds the streamed figures below.
    Config hc = c;  // as the batch-1 decode below plans it
    hc.batch_size = 1;
    hc.prefill_chunk_tokens = decode_prompt;
    hc.max_context = decode_prompt + steps + 8;
    const HostPlan host = host_plan_at_start(store.manifest(), hc, HostOverrides{}, false, h2d / 1e9,
                                             "measured: pinned, 1 GiB copies",
                                             cuda_planned_resident_layers(store.manifest(), hc), true);
    std::fprintf(stderr, "%s", host.table().c_str());
    window = open_window_weights(store_dir, c);
    ws = window.get();
  }

  std::vector<StreamRow> rows;
  for (const std::string& share : shares) {
    c.cpu_share = parse_share(share);
    const std::string suffix = share == "0" ? "" : " cpu " + share;
    for (int64_t b : batches) {
      Config d = c;
      d.batch_size = b;
      d.prefill_chunk_tokens = decode_prompt;
      d.max_context = decode_prompt + steps + 8;
      StreamRow row;
      row.figure = fmt::format("decode b{}{}", b, suffix);
      row.share = share;
      try {
        auto be = budget_backend(*ws, d, &row.ahead);
        const int64_t vocab = m.vocab_size;
        std::vector<StepItem> items;
        for (int64_t i = 0; i < b; ++i) {
          be->add_sequence(i);
          items.push_back({i, prompt(decode_prompt, vocab, 100 + i), true});
        }
        std::vector<int32_t> ids = be->step_greedy(items);  // the prompts (the first pass also fills the window)
        auto next = [&] {
          for (int64_t i = 0; i < b; ++i) items[static_cast<size_t>(i)].tokens = {ids[static_cast<size_t>(i)]};
          ids = be->step_greedy(items);
        };
        next();
        CudaStreamReport before;
        cuda_stream_report(*be, &before);
        const auto t1 = Clock::now();
        for (int64_t i = 0; i < steps; ++i) next();
        fill_stream_row(&row, *be, before, steps, seconds_since(t1), b * steps);
      } catch (const Error& e) {
        std::fprintf(stderr, "%s: %s\n", row.figure.c_str(), e.what());
        continue;
      }
      std::fprintf(stderr, "%s: %.2f tok/s\n", row.figure.c_str(), row.tok_s);
      rows.push_back(row);
    }
    {
      Config d = c;
      d.batch_size = 1;
      d.prefill_chunk_tokens = prompt_tokens;
      d.max_context = prompt_tokens + 16;
      StreamRow row;
      row.figure = fmt::format("prefill 1x{}{}", prompt_tokens, suffix);
      row.share = share;
      try {
        auto be = budget_backend(*ws, d, &row.ahead);
        const int reps = 3;
        std::vector<double> t;
        CudaStreamReport before;
        for (int rep = 0; rep <= reps; ++rep) {
          be->add_sequence(0);
          std::vector<StepItem> items = {{0, prompt(prompt_tokens, m.vocab_size, 200 + rep), true}};
          if (rep == 1) cuda_stream_report(*be, &before);
          const auto t1 = Clock::now();
          be->step_greedy(items);
          if (rep > 0) t.push_back(seconds_since(t1));  // the first run warms up
          be->free_sequence(0);
        }
        double sum = 0;
        for (double x : t) sum += x;
        fill_stream_row(&row, *be, before, reps, sum, reps * prompt_tokens);
        std::fprintf(stderr, "%s: %.1f tok/s\n", row.figure.c_str(), row.tok_s);
        rows.push_back(row);
      } catch (const Error& e) {
        std::fprintf(stderr, "%s: %s\n", row.figure.c_str(), e.what());
      }
    }
  }
  if (daemon) {
    // What the worker's metrics show as "weights": this process's passes through the daemon's
    // window and its waits on the daemon (a layer not ready yet, a progress not applied yet). The
    // daemon's own figures (reads, loads, misses) come from `ringllama-loaderd --stats`.
    const WeightSource::Report r = daemon->report();
    std::fprintf(stderr, "daemon window: pass %lld, position %lld; %llu waits on the daemon (%.2f s); run %.1f s\n",
                 static_cast<long long>(r.pass), static_cast<long long>(r.position),
                 static_cast<unsigned long long>(r.waits), r.wait_seconds, seconds_since(t0));
  } else {
    const WindowStats wst = window->stats();
    std::fprintf(stderr, "window: %llu layer reads (%.2f GB from the store in %.1f s), %llu stalls; run %.1f s\n",
                 static_cast<unsigned long long>(wst.layer_reads), wst.read_bytes / 1e9, wst.read_seconds,
                 static_cast<unsigned long long>(wst.stalls), seconds_since(t0));
  }

  std::printf("\nstreamed, GPU budget %.1f GiB, pinned H2D %.2f GB/s measured in this run\n", budget_gib, h2d / 1e9);
  std::printf("weights from %s\n", weights_from.c_str());
  std::printf("%-14s %9s %9s %8s %9s %6s %9s %9s %9s %9s %6s %9s %s\n", "figure", "tok/s", "GB/step", "step ms",
              "eff GB/s", "ratio", "copy GB/s", "sum max", "sum c+c", "gpu ms", "stalls", "stall ms",
              "resident/ahead/pool");
  for (const StreamRow& r : rows)
    std::printf("%-14s %9.2f %9.3f %8.1f %9.2f %6.3f %9.2f %9.1f %9.1f %9.1f %6llu %9.1f %lld/%lld/%lld+%lld\n",
                r.figure.c_str(), r.tok_s, r.bytes_per_step / 1e9, r.step_s * 1e3, r.effective / 1e9,
                r.effective / h2d, r.copy_rate / 1e9, r.sum_max * 1e3, r.sum_add * 1e3, r.gpu_step * 1e3,
                static_cast<unsigned long long>(r.stalls), r.stall_s * 1e3, static_cast<long long>(r.resident),
                static_cast<long long>(r.ahead), static_cast<long long>(r.attn), static_cast<long long>(r.ffn));
  std::printf("eff GB/s: bytes streamed per step / step time (ratio: of pinned H2D); copy GB/s: bytes / the copies' "
              "own time; sum max / sum c+c: the last step's sum over layers of max(copy, compute) and of copy + "
              "compute (ms); gpu ms: that step's span on the compute stream\n");
  if (std::any_of(rows.begin(), rows.end(), [](const StreamRow& r) { return r.hybrid; })) {
    // The hybrid next to pure streaming of the same figure, each link's bytes per step and rate.
    std::printf("\nhybrid: each link's bytes per step and achieved rate (PCIe against pinned H2D %.2f GB/s, the CPU "
                "against a plain read of the same size by the same threads)\n",
                h2d / 1e9);
    std::printf("%-22s %9s %9s %7s %10s %9s %6s %10s %9s %9s %6s %6s %8s %8s %s\n", "figure", "tok/s", "pure",
                "x pure", "PCIe GB/st", "copy GB/s", "of H2D", "CPU GB/st", "CPU GB/s", "read GB/s", "of rd", "f",
                "wait ms", "ahead ms", "cpu");
    for (const StreamRow& r : rows) {
      if (!r.hybrid) continue;
      const std::string base = r.figure.substr(0, r.figure.find(" cpu "));
      double pure = 0;
      for (const StreamRow& q : rows)
        if (q.figure == base) pure = q.tok_s;
      std::printf("%-22s %9.2f %9.2f %7.2f %10.3f %9.2f %6.3f %10.3f %9.2f %9.2f %6.3f %6.3f %8.3f %8.3f %s\n",
                  r.figure.c_str(), r.tok_s, pure, pure > 0 ? r.tok_s / pure : 0.0, r.bytes_per_step / 1e9,
                  r.copy_rate / 1e9, r.copy_rate / h2d, r.cpu_bytes_per_step / 1e9, r.cpu_rate / 1e9,
                  r.cpu_read / 1e9, r.cpu_read > 0 ? r.cpu_rate / r.cpu_read : 0.0, r.f, r.join_wait_layer * 1e3,
                  r.cpu_ahead_layer * 1e3, r.cpu_isa.c_str());
    }
    std::printf("CPU GB/s: the CPU's weight bytes over the time in its kernel; f: the GPU's share of each matrix's "
                "rows (the last step's, before rounding to 64 rows); wait ms / ahead ms: per streamed layer and step, "
                "the compute stream waiting for the CPU's rows (the joins' cost), and the CPU's rows in before the "
                "GPU's half was done\n");
  }
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{"Benchmark the resident CUDA backend against measured limits", "ringllama-bench"};
  std::string store_dir, batches_text = "1,8,64";
  int64_t steps = 64, prompt_tokens = 512, decode_prompt = 16;
  bool h2d_only = false;
  std::string daemon;
  auto* store_opt = app.add_option("--store", store_dir, "packed store (with --daemon: optional, the daemon's)");
  auto* daemon_opt =
      app.add_option("--daemon", daemon,
                     "with --gpu-budget-gib: stream from the window of the ringllama-loaderd at this control "
                     "endpoint instead of a window of this process's own");
  app.add_flag("--h2d-only", h2d_only,
               "print the pinned host-to-device rate of the visible GPU 0 (1 GiB copies) and exit: the limit a "
               "script puts next to a worker's achieved GB/s")
      ->excludes(store_opt)
      ->excludes(daemon_opt);
  app.add_option("--decode-steps", steps, "timed decode steps per batch size")->capture_default_str();
  app.add_option("--batches", batches_text, "decode batch sizes, comma separated")->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens, "prefill prompt length")->capture_default_str();
  app.add_option("--decode-prompt", decode_prompt, "prompt tokens of each sequence before the timed decode steps")
      ->capture_default_str();
  int64_t long_context = 0;
  app.add_option("--long-context", long_context,
                 "also decode one sequence after this many tokens of context (resident run): the step time against "
                 "weights + KV over the bandwidth, and the attention's extra time against the KV's bytes over it");
  std::string shares_text = "0";
  app.add_option("--cpu-shares", shares_text,
                 "with --gpu-budget-gib: the CPU shares to run the streamed figures with, comma separated (0: pure "
                 "streaming; auto: the split from the rates measured at start; a number: forced)")
      ->capture_default_str();
  double budget_gib = 0;
  app.add_option("--gpu-budget-gib", budget_gib,
                 "plan for this many GiB of device memory: the layers that do not fit are streamed (0: resident run)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  std::vector<int64_t> batches;
  for (size_t at = 0; at < batches_text.size();) {
    size_t c = batches_text.find(',', at);
    if (c == std::string::npos) c = batches_text.size();
    const std::string item = batches_text.substr(at, c - at);
    char* end = nullptr;
    errno = 0;
    const long long b = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno == ERANGE || b < 1 || b > 65536)
      fail("--batches '{}': '{}' is not a batch size (1 to 65536, comma separated)", batches_text, item);
    batches.push_back(b);
    at = c + 1;
  }
  if (batches.empty()) fail("--batches is empty");
  std::vector<std::string> shares;
  for (size_t at = 0; at <= shares_text.size();) {
    size_t c = shares_text.find(',', at);
    if (c == std::string::npos) c = shares_text.size();
    shares.push_back(shares_text.substr(at, c - at));
    parse_share(shares.back());
    at = c + 1;
  }
  std::unique_ptr<WeightSource> daemon_weights;
  if (!daemon.empty()) {
    if (budget_gib <= 0) fail("--daemon measures the streamed mode: give --gpu-budget-gib too");
    if (long_context > 0) fail("--long-context is a resident run's: not with --daemon");
    // Before the GPU: a daemon that is not there, or serves another store, is said at once. The
    // store read is the one the daemon serves; --store, when given, must be it.
    Config dc;
    dc.store = store_dir;
    daemon_weights = open_daemon_weights(daemon, dc, &store_dir, fmt::format("bench-{}", ::getpid()));
  }
  RL_REQUIRE(cuda_device_count() > 0, "ringllama-bench needs a CUDA GPU");
  if (h2d_only) {
    CUDA_CHECK(cudaSetDevice(0));
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s (PCI %04x:%02x:%02x): pinned H2D %.2f GB/s (1 GiB copies)\n", prop.name, prop.pciDomainID,
                prop.pciBusID, prop.pciDeviceID, measure_pinned_h2d(size_t{1} << 30, 7) / 1e9);
    return 0;
  }
  if (store_dir.empty()) fail("--store is required (or --daemon, or --h2d-only)");
  if (budget_gib > 0)
    return run_streamed(store_dir, budget_gib, batches, steps, prompt_tokens, decode_prompt, std::move(daemon_weights),
                        daemon, shares);
  const int64_t max_batch = std::max<int64_t>(8, *std::max_element(batches.begin(), batches.end()));

  const Store store = Store::open(store_dir);
  const ModelConfig& m = store.model();
  // What one step reads: every layer, the final norm and lm_head (the embedding rows are few), as
  // stored (packed weights count their packed bytes and scales).
  const Manifest& man = store.manifest();
  double step_bytes = 0;
  for (int64_t l = 0; l < m.n_layers; ++l) step_bytes += double(man.layer_size(l));
  const TensorEntry* head = man.globals().find("output");
  if (!head) head = &man.globals().tensor("tok_embeddings");
  step_bytes += double(head->end() - head->offset) + double(man.globals().tensor("norm").size);
  // 2 FLOPs per weight of the layers.
  const double flops_per_token = 2.0 * m.n_layers *
                                 (2.0 * m.dim + (m.q_dim() + 2.0 * m.kv_dim()) * m.dim + m.dim * m.q_dim() +
                                  3.0 * m.ffn_dim * m.dim);

  CUDA_CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double bw = measure_bandwidth();
  const double gemm_flops = measure_gemm();
  std::fprintf(stderr, "%s: D2D %.0f GB/s, bf16 GEMM %.0f TFLOP/s; a step reads %.2f GB of weights\n", prop.name,
               bw / 1e9, gemm_flops / 1e12, step_bytes / 1e9);

  Config c;
  c.batch_size = max_batch;
  c.max_context = std::max<int64_t>(prompt_tokens, decode_prompt + steps + 8) + 16;
  c.prefill_chunk_tokens = prompt_tokens;
  c.kv_block_tokens = 16;
  auto t0 = Clock::now();
  std::unique_ptr<WeightSource> ws = open_store_weights(store_dir);
  std::fprintf(stderr, "store read and checked in %.1f s\n", seconds_since(t0));

  std::vector<Row> rows;
  rows.push_back({"D2D bandwidth", "GB/s", bw / 1e9, 0});
  rows.push_back({"bf16 GEMM 8192^3", "TFLOP/s", gemm_flops / 1e12, 0});
  for (bool graphs : {true, false}) {
    t0 = Clock::now();
    auto be = make_cuda_backend(*ws, c, CudaBackendOptions{graphs});
    std::fprintf(stderr, "backend (graphs %s) up in %.1f s\n", graphs ? "on" : "off", seconds_since(t0));
    for (int64_t b : batches) {
      if (!graphs && b > 8) continue;
      const double r = decode_rate(*be, b, decode_prompt, steps);
      rows.push_back({fmt::format("decode b{}{}", b, graphs ? "" : " no graphs"), "tok/s", r, b * bw / step_bytes});
      std::fprintf(stderr, "%s: %.1f tok/s\n", rows.back().figure.c_str(), r);
    }
    if (!graphs) break;
    for (int64_t b : {int64_t{1}, int64_t{8}}) {
      const double r = prefill_rate(*be, b, prompt_tokens);
      const double tokens = static_cast<double>(b * prompt_tokens);
      const double attn_flops = 2.0 * 2.0 * m.n_layers * m.q_dim() * prompt_tokens * prompt_tokens / 2.0 * b;
      const double t_mem = step_bytes / bw, t_flop = (tokens * flops_per_token + attn_flops) / gemm_flops;
      rows.push_back({fmt::format("prefill {}x{}", b, prompt_tokens), "tok/s", r, tokens / std::max(t_mem, t_flop)});
      std::fprintf(stderr, "%s: %.1f tok/s\n", rows.back().figure.c_str(), r);
    }
  }

  if (long_context > 0) {
    // Decode at a long context: the step reads every weight and the sequence's K and V rows of
    // every layer. Its extra time over a short context's step is the attention's, held against the
    // time the KV's bytes take at the measured bandwidth (flash-decoding's target).
    const int64_t chunk = std::min<int64_t>(long_context, 2048);
    Config lc = c;
    lc.batch_size = 1;
    lc.max_context = long_context + steps + 16;
    lc.prefill_chunk_tokens = chunk;
    t0 = Clock::now();
    auto be = make_cuda_backend(*ws, lc, CudaBackendOptions{true});
    const double short_s = long_decode_step_s(*be, 16, chunk, steps);
    const double long_s = long_decode_step_s(*be, long_context, chunk, steps);
    std::fprintf(stderr, "long context %lld: %.1f s; step %.3f ms at 16 tokens, %.3f ms at %lld\n",
                 static_cast<long long>(long_context), seconds_since(t0), short_s * 1e3, long_s * 1e3,
                 static_cast<long long>(long_context));
    const double kv_bytes = 2.0 * m.n_layers * static_cast<double>(long_context) * m.kv_dim() * 2.0;
    rows.push_back({fmt::format("decode b1 @{}", long_context), "tok/s", 1.0 / long_s, bw / (step_bytes + kv_bytes)});
    rows.push_back({fmt::format("attention KV @{}", long_context), "GB/s", kv_bytes / (long_s - short_s) / 1e9,
                    bw / 1e9});
  }

  std::printf("\n%-24s %12s %12s %7s  %s\n", "figure", "measured", "floor", "ratio", "unit");
  for (const Row& r : rows) {
    if (r.floor > 0)
      std::printf("%-24s %12.1f %12.1f %7.3f  %s\n", r.figure.c_str(), r.value, r.floor, r.value / r.floor, r.unit.c_str());
    else
      std::printf("%-24s %12.1f %12s %7s  %s\n", r.figure.c_str(), r.value, "-", "-", r.unit.c_str());
  }
  std::printf("floors: decode = b x bandwidth / %.2f GB per step; prefill = tokens / max(weights / bandwidth, FLOPs / GEMM rate)\n",
              step_bytes / 1e9);
  if (long_context > 0)
    std::printf("at a long context the step also reads the KV (2 x layers x context x kv_dim bf16); its attention's "
                "rate is that KV over (step - a 16-token context's step), against the bandwidth\n");
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-bench", ringllama::run, argc, argv); }
