// The CPU's half of a hybrid layer: bf16 weight rows multiplied on the host's cores, read in place
// from the store's layout (row-major [out][in] bf16, as the daemon's segment holds them), while the
// GPU streams and computes the other rows (DESIGN.md "The CPU's share of a streamed layer").
//
// One kernel per instruction set, picked once at construction: AMX-BF16 tiles from 16 tokens on
// (AVX-512 below that, and for what the tiles do not cover), AVX-512 BF16 (vdpbf16ps), AVX2+FMA and
// a portable scalar loop. All walk the same blocks (a few rows times a few tokens, the token loop
// inside the row loop) so that each weight row comes from DRAM once per call, whatever the token
// count; they differ only in how a block's dot products are formed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "worker/thread_pool.h"

namespace ringllama {

// Ordered: a higher one is faster where the CPU has it.
enum class CpuIsa { scalar = 0, avx2 = 1, avx512 = 2, amx = 3 };

const char* cpu_isa_name(CpuIsa isa);
// "scalar", "avx2", "avx512" or "amx"; anything else is an Error naming the choices.
CpuIsa parse_cpu_isa(const std::string& name);
// Whether this CPU (and the OS, for the wider registers) runs the kernel of `isa`.
bool cpu_isa_supported(CpuIsa isa);
// The fastest kernel this CPU runs, lowered by the environment variable RINGLLAMA_CPU_ISA
// (scalar|avx2|avx512|amx) for tests and comparisons; naming one the CPU lacks is an Error.
CpuIsa default_cpu_isa();

class HybridCpuMatmul {
 public:
  // Most tokens one call takes: a decode batch, or a prefill chunk split by the caller.
  static constexpr int64_t kMaxTokens = 64;

  // threads: the pool's size, the caller included (0 = every core this process may use).
  // pin: each worker thread on its own core (ThreadPool). isa: the kernel (nullopt =
  // default_cpu_isa()); one the CPU lacks is an Error.
  explicit HybridCpuMatmul(int threads = 0, bool pin = false, std::optional<CpuIsa> isa = std::nullopt);
  HybridCpuMatmul(const HybridCpuMatmul&) = delete;
  HybridCpuMatmul& operator=(const HybridCpuMatmul&) = delete;

  const char* isa() const { return cpu_isa_name(isa_); }
  CpuIsa isa_kind() const { return isa_; }
  int threads() const { return pool_.threads(); }

  // y[t*ldy + (r - row_begin)] = sum_k x[t*in + k] * w[r*in + k] for r in [row_begin, row_end) and
  // t in [0, tokens), accumulated in fp32. w is the whole matrix (row 0 first), bf16 [rows][in];
  // x is bf16 [tokens][in]; ldy >= row_end - row_begin. Rows go to the threads in contiguous
  // ranges. Allocates nothing once its scratch (x packed for the AMX tiles) has grown to the
  // largest in x tokens seen. Bad shapes are an Error; the pointers are trusted. One call at a time.
  void matmul(const uint16_t* w_bf16, int64_t in, int64_t row_begin, int64_t row_end, const uint16_t* x_bf16,
              int64_t tokens, float* y, int64_t ldy);

  // Calls fn(part, parts) for part in [0, parts) on the pool's threads, parts = threads(); returns
  // when all are done. fn must not throw. For loops that share the pool (measure_dram_read_gbs).
  void for_each_part(const std::function<void(int, int)>& fn);

 private:
  CpuIsa isa_;
  ThreadPool pool_;
  std::vector<uint32_t> packed_x_;  // amx only: x in the tiles' pair layout
};

// The rate at which the pool's threads read [p, p + bytes) from memory: each thread sums the 64-bit
// words of one contiguous part, the best of `reps` passes, in GB/s (1e9 bytes). Printed next to the
// kernel's rate of the same bytes: the kernel cannot beat it, and should come close at batch 1.
double measure_dram_read_gbs(const void* p, size_t bytes, HybridCpuMatmul& pool, int reps = 3);

}  // namespace ringllama
