#include "worker/hybrid_cpu.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "common/errors.h"
#include "worker/hybrid_cpu_kernels.h"

namespace ringllama {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar:
      return "scalar";
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::amx:
      return "amx";
  }
  return "?";
}

CpuIsa parse_cpu_isa(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx})
    if (name == cpu_isa_name(isa)) return isa;
  fail("unknown CPU kernel \"{}\" (scalar, avx2, avx512 or amx)", name);
}

bool cpu_isa_supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar:
      return true;
#if defined(__x86_64__)
    // __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0).
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::amx:  // the AVX-512 kernel takes what the tiles do not
      return cpu_isa_supported(CpuIsa::avx512) && hybrid::amx_usable();
#else
    default:
      return false;
#endif
  }
  return false;
}

CpuIsa default_cpu_isa() {
  CpuIsa best = CpuIsa::scalar;
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx})
    if (cpu_isa_supported(isa)) best = isa;
  const char* forced = std::getenv("RINGLLAMA_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  const CpuIsa want = parse_cpu_isa(forced);
  RL_REQUIRE(cpu_isa_supported(want), "RINGLLAMA_CPU_ISA={}: this CPU lacks it (it runs {} at most)", forced,
             cpu_isa_name(best));
  return want;
}

namespace {

CpuIsa checked_isa(std::optional<CpuIsa> isa) {
  if (!isa) return default_cpu_isa();
  RL_REQUIRE(cpu_isa_supported(*isa), "the {} CPU kernel does not run on this CPU", cpu_isa_name(*isa));
  return *isa;
}

}  // namespace

HybridCpuMatmul::HybridCpuMatmul(int threads, bool pin, std::optional<CpuIsa> isa)
    : isa_(checked_isa(isa)), pool_(threads, pin) {}

void HybridCpuMatmul::for_each_part(const std::function<void(int, int)>& fn) {
  const int parts = threads();
  pool_.parallel_for(parts, [&fn, parts](int64_t part, int) { fn(static_cast<int>(part), parts); });
}

void HybridCpuMatmul::matmul(const uint16_t* w_bf16, int64_t in, int64_t row_begin, int64_t row_end,
                             const uint16_t* x_bf16, int64_t tokens, float* y, int64_t ldy) {
  RL_REQUIRE(in >= 1, "hybrid matmul: {} inputs per row", in);
  RL_REQUIRE(row_begin >= 0 && row_end >= row_begin, "hybrid matmul: rows [{}, {}) is not a range", row_begin,
             row_end);
  RL_REQUIRE(tokens >= 1 && tokens <= kMaxTokens, "hybrid matmul: {} tokens (1 to {})", tokens, kMaxTokens);
  const int64_t rows = row_end - row_begin;
  RL_REQUIRE(ldy >= rows, "hybrid matmul: ldy {} is less than the {} rows", ldy, rows);
  if (rows == 0) return;
  RL_REQUIRE(w_bf16 != nullptr && x_bf16 != nullptr && y != nullptr, "hybrid matmul: a null buffer");

  const hybrid::Kernel& k = hybrid::kernel_for(isa_);
  const bool amx = isa_ == CpuIsa::amx && hybrid::amx_fits(in, tokens);
  if (amx) {
    const size_t need = hybrid::amx_packed_x_size(in, tokens);
    if (packed_x_.size() < need) packed_x_.resize(need);
    hybrid::amx_pack_x(x_bf16, in, tokens, packed_x_.data());
  }
  // Each part is one contiguous run of whole row blocks: a thread streams its rows from DRAM in
  // order (the prefetchers see one stream per row of a block), and never shares a cache line of w
  // with another. The tiles' block is 32 rows.
  const int64_t block_rows = amx ? 2 * hybrid::kAmxRows : k.rows;
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  const int64_t parts = std::min<int64_t>(threads(), blocks);
  struct Call {
    const hybrid::Kernel& k;
    const uint16_t *w, *x;
    const uint32_t* xp;  // packed x when the tiles run, else null
    int64_t in, rows, tokens, block_rows, blocks, parts, ldy;
    float* y;
  } c{k, w_bf16 + row_begin * in, x_bf16, amx ? packed_x_.data() : nullptr, in, rows, tokens, block_rows, blocks,
      parts, ldy, y};
  // One captured pointer: std::function keeps it in place, so a call allocates nothing.
  const Call* cp = &c;
  pool_.parallel_for(parts, [cp](int64_t part, int) {
    const Call& c = *cp;
    int64_t r = part * c.blocks / c.parts * c.block_rows;
    const int64_t r_end = std::min(c.rows, (part + 1) * c.blocks / c.parts * c.block_rows);
    if (c.xp != nullptr) {
      const int64_t tiled = (r_end - r) / hybrid::kAmxRows * hybrid::kAmxRows;
      if (tiled > 0) hybrid::amx_rows(c.w + r * c.in, c.in, tiled, c.xp, c.tokens, c.y + r, c.ldy);
      r += tiled;  // the last rows of the matrix, fewer than a tile, go to the vector blocks
    }
    for (; r < r_end; r += c.k.rows) {
      const int rb = static_cast<int>(std::min<int64_t>(c.k.rows, r_end - r));
      // The tokens inside the rows: the block's weight rows stay in L1/L2 for every token block.
      for (int64_t t = 0; t < c.tokens; t += c.k.tokens) {
        const int tb = static_cast<int>(std::min<int64_t>(c.k.tokens, c.tokens - t));
        c.k.block[rb - 1][tb - 1](c.w + r * c.in, c.x + t * c.in, c.in, c.y + t * c.ldy + r, c.ldy);
      }
    }
  });
}

namespace {

// Sums 64-bit words with eight independent sums, which the compiler turns into vector adds at any
// target level (integer adds may be reordered) and which keep enough loads in flight.
uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t s[8] = {};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += p[i + j];
  for (; i < n; ++i) s[0] += p[i];
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

}  // namespace

double measure_dram_read_gbs(const void* p, size_t bytes, HybridCpuMatmul& pool, int reps) {
  RL_REQUIRE(p != nullptr && bytes >= sizeof(uint64_t), "measure_dram_read_gbs: {} bytes to read", bytes);
  RL_REQUIRE(reps >= 1, "measure_dram_read_gbs: {} passes", reps);
  const auto* words = static_cast<const uint64_t*>(p);
  const size_t n = bytes / sizeof(uint64_t);
  std::vector<uint64_t> sums(static_cast<size_t>(pool.threads()), 0);
  double best = 0;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.for_each_part([&](int part, int parts) {
      // Parts end on 64-byte lines, like the kernel's row ranges of a large matrix.
      const size_t lines = n / 8;
      const size_t begin = lines * static_cast<size_t>(part) / static_cast<size_t>(parts) * 8;
      const size_t end = part + 1 == parts ? n : lines * static_cast<size_t>(part + 1) / static_cast<size_t>(parts) * 8;
      sums[static_cast<size_t>(part)] += sum_words(words + begin, end - begin);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / s / 1e9);
  }
  // The sums are used, so the reads cannot be optimized away.
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  volatile uint64_t sink = total;
  (void)sink;
  return best;
}

}  // namespace ringllama
