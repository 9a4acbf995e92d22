// ringllama-cpu-bench: the hybrid layer's CPU kernels (worker/hybrid_cpu.h) on one layer's weights,
// next to a plain multithreaded read of the same bytes, and the GPU share that the measured rates
// imply (worker/hybrid_cpu_split.h).
//
//   ringllama-cpu-bench [--threads N] [--pin] [--isa amx,avx512,avx2,scalar] [--tokens 1,2,4,...]
//                       [--reps R] [--h2d-gbs X] [--dim D --kv-dim K --ffn-dim F]
//
// The layer is an anonymous buffer of random bf16 in the store's order and shapes (Llama 3 8B by
// default: wq, wk, wv, wo, w1, w3, w2; 416 MiB, far beyond any cache). For each kernel the CPU runs
// and each token count it prints the weights' GB/s and the GFLOP/s of the best of R passes over all
// seven matrices, the read rate of the same bytes on the same threads (measured just before) and
// the ratio, then the share f of each matrix's rows the GPU would stream at --h2d-gbs, and the
// layer's time at that split.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <vector>

#include "common/errors.h"
#include "worker/hybrid_cpu.h"
#include "worker/hybrid_cpu_split.h"

namespace ringllama {
namespace {

struct Options {
  int threads = 0;
  bool pin = false;
  std::vector<std::string> isas;
  std::vector<int> tokens{1, 2, 4, 8, 16, 32, 64};
  int reps = 3;
  double h2d_gbs = 55;  // the H200 machine's pinned host-to-device rate
  int64_t dim = 4096, kv_dim = 1024, ffn_dim = 14336;
};

// Random bf16 in ±[2^-8, 2): a sign, an exponent in [119, 127] and 7 random mantissa bits; no zeros,
// denormals or infinities, so every kernel does the same work on them.
void fill_random(uint16_t* p, size_t n, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const uint16_t sign = static_cast<uint16_t>((s >> 20) & 1) << 15;
    const uint16_t exp = static_cast<uint16_t>(119 + (s >> 24) % 9) << 7;
    p[i] = static_cast<uint16_t>(sign | exp | (s & 0x7F));
  }
}

int run(int argc, char** argv) {
  Options o;
  CLI::App app{"CPU kernels of the hybrid layer against a plain read of the same bytes"};
  app.add_option("--threads", o.threads, "threads, the caller included (0: every core this process may use)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--pin", o.pin, "pin each worker thread to its own core");
  app.add_option("--isa", o.isas, "kernels to measure (scalar, avx2, avx512, amx; default: every one this CPU runs)")
      ->delimiter(',');
  app.add_option("--tokens", o.tokens, "token counts (1 to 64)")->delimiter(',')->check(CLI::Range(1, 64));
  app.add_option("--reps", o.reps, "passes per figure, the best counts")->check(CLI::Range(1, 1000));
  app.add_option("--h2d-gbs", o.h2d_gbs, "host-to-device rate for the split, GB/s")->check(CLI::PositiveNumber);
  app.add_option("--dim", o.dim, "model dimension")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--kv-dim", o.kv_dim, "rows of wk and wv")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--ffn-dim", o.ffn_dim, "rows of w1 and w3")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "ringllama-cpu-bench: error: %s\n", e.what());
    return 1;
  }
  std::vector<CpuIsa> isas;
  if (o.isas.empty()) {
    // Every kernel up to the one a worker would pick (RINGLLAMA_CPU_ISA lowers it).
    const CpuIsa top = default_cpu_isa();
    for (CpuIsa isa : {CpuIsa::amx, CpuIsa::avx512, CpuIsa::avx2, CpuIsa::scalar})
      if (isa <= top) isas.push_back(isa);
  } else {
    for (const std::string& name : o.isas) {
      const CpuIsa isa = parse_cpu_isa(name);
      RL_REQUIRE(cpu_isa_supported(isa), "--isa {}: this CPU lacks it", name);
      isas.push_back(isa);
    }
  }

  // The layer in the store's order: the attention group, then the FFN group.
  const std::vector<HybridMatrix> mats{{o.dim, o.dim},    {o.kv_dim, o.dim},  {o.kv_dim, o.dim}, {o.dim, o.dim},
                                       {o.ffn_dim, o.dim}, {o.ffn_dim, o.dim}, {o.dim, o.ffn_dim}};
  std::vector<size_t> offset;
  size_t elems = 0, max_in = 0, max_rows = 0;
  for (const HybridMatrix& m : mats) {
    offset.push_back(elems);
    elems += static_cast<size_t>(m.rows * m.in);
    max_in = std::max(max_in, static_cast<size_t>(m.in));
    max_rows = std::max(max_rows, static_cast<size_t>(m.rows));
  }
  const double bytes = 2.0 * static_cast<double>(elems);
  std::unique_ptr<uint16_t[]> w(new uint16_t[elems]);
  std::vector<uint16_t> x(static_cast<size_t>(HybridCpuMatmul::kMaxTokens) * max_in);
  std::vector<float> y(static_cast<size_t>(HybridCpuMatmul::kMaxTokens) * max_rows);
  fill_random(x.data(), x.size(), 1);
  {
    // Filled by the threads that will read it, so that pages land near them (first touch).
    HybridCpuMatmul fill_pool(o.threads, o.pin, CpuIsa::scalar);
    fill_pool.for_each_part([&](int part, int parts) {
      const size_t b = elems * static_cast<size_t>(part) / static_cast<size_t>(parts);
      const size_t e = elems * static_cast<size_t>(part + 1) / static_cast<size_t>(parts);
      fill_random(w.get() + b, e - b, 2 + static_cast<uint64_t>(part));
    });
  }
  std::cout << fmt::format("layer: {} matrices, {:.1f} MiB of bf16 weights (dim {}, kv {}, ffn {})\n", mats.size(),
                           bytes / (1 << 20), o.dim, o.kv_dim, o.ffn_dim);

  for (CpuIsa isa : isas) {
    HybridCpuMatmul mm(o.threads, o.pin, isa);
    // What a call costs beyond its rows: waking the pool and waiting for the last thread, measured
    // on a matrix of 64 inputs and 64 rows per thread (a layer makes one call per matrix, or one
    // per back-to-back pair such as q|k|v).
    double call_us = 1e30;
    {
      const int64_t in = std::min<int64_t>(64, o.dim);  // within the buffers however small the layer
      const int64_t rows = std::min<int64_t>({64 * mm.threads(), static_cast<int64_t>(elems) / in,
                                              static_cast<int64_t>(y.size())});
      for (int rep = 0; rep < 200; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        mm.matmul(w.get(), in, 0, rows, x.data(), 1, y.data(), rows);
        call_us = std::min(call_us, 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    std::cout << fmt::format("\nkernel {} on {} threads{}: a near-empty call takes {:.1f} us\n", mm.isa(),
                             mm.threads(), o.pin ? " (pinned)" : "", call_us);
    std::cout << fmt::format("{:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}\n", "tokens", "GB/s", "GFLOP/s", "read GB/s",
                             "vs read", "GPU f", "layer ms");
    HybridRates rates;
    rates.h2d_gbs = o.h2d_gbs;
    for (int tokens : o.tokens) {
      auto pass = [&] {
        for (size_t i = 0; i < mats.size(); ++i)
          mm.matmul(w.get() + offset[i], mats[i].in, 0, mats[i].rows, x.data(), tokens, y.data(), mats[i].rows);
      };
      // The read right before the kernel, so that a machine whose load drifts compares like with like.
      const double dram = measure_dram_read_gbs(w.get(), static_cast<size_t>(bytes), mm, o.reps);
      double best = 1e30;
      for (int rep = 0; rep < o.reps; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        pass();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      const double gbs = bytes / best / 1e9;
      const double gflops = 2.0 * tokens * static_cast<double>(elems) / best / 1e9;
      // The split from this one measured rate (the table's only point: the CPU's rate at this batch).
      rates.cpu_gbs_by_tokens = {{tokens, gbs}};
      const HybridSplit split = split_layer(mats, tokens, rates);
      std::cout << fmt::format("{:>6} {:>9.1f} {:>9.1f} {:>9.1f} {:>7.0f}% {:>8.3f} {:>10.2f}\n", tokens, gbs,
                               gflops, dram, 100 * gbs / dram, split.f, 1e3 * split.seconds())
                << std::flush;
    }
  }
  std::cout << fmt::format("\nGPU f: the share of each matrix's rows streamed at {} GB/s while the CPU computes the "
                           "rest; layer ms: the longer side at that split (all on the GPU: {:.2f} ms).\n",
                           o.h2d_gbs, 1e3 * bytes / (o.h2d_gbs * 1e9));
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-cpu-bench", ringllama::run, argc, argv); }
