// The hybrid layer's CPU kernels (worker/hybrid_cpu.h) against a double-precision reference, on
// every kernel this CPU runs, and the choice of the GPU's share (worker/hybrid_cpu_split.h).
#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/manifest.h"
#include "tests/tiny_model.h"
#include "worker/hybrid_cpu.h"
#include "worker/hybrid_cpu_kernels.h"
#include "worker/hybrid_cpu_split.h"

// Every operator new of the process counted, so that a test can see a call allocate nothing.
static std::atomic<int64_t> g_allocations{0};
void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// GCC does not see that these pair with the malloc above (-Wmismatched-new-delete).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace ringllama {
namespace {

// Random bf16 of mixed magnitudes (about 2^-7 to 2^3, both signs): the sums cancel partly, so the
// error bound relative to sum |x||w| is exercised, and no product is a denormal.
std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> exp(-7, 2), sign(0, 1);
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = f32_to_bf16((sign(rng) ? -1.0f : 1.0f) * std::ldexp(mant(rng), exp(rng)));
  return v;
}

struct Reference {
  std::vector<double> y, bound;  // [t][r]: the exact sum and sum |x||w|
};

Reference reference(const std::vector<uint16_t>& w, int64_t in, int64_t row_begin, int64_t rows,
                    const std::vector<uint16_t>& x, int64_t tokens) {
  Reference ref;
  ref.y.resize(static_cast<size_t>(tokens * rows));
  ref.bound.resize(ref.y.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < in; ++k) {
        const double p = double(bf16_to_f32(w[size_t((row_begin + r) * in + k)])) * bf16_to_f32(x[size_t(t * in + k)]);
        s += p;
        a += std::fabs(p);
      }
      ref.y[size_t(t * rows + r)] = s;
      ref.bound[size_t(t * rows + r)] = a;
    }
  return ref;
}

// The fp32 accumulation bound: the products of two bf16 are exact in fp32, and any order of n - 1
// additions (plus the kernels' final lane sums, at most 16 more) errs by at most (n + 16) * u *
// sum |x||w|, u = 2^-24.
double tolerance(int64_t in, double abs_sum) { return double(in + 16) * std::ldexp(1.0, -24) * abs_sum; }

}  // namespace

// Names the kernel in gtest's output instead of its bytes.
void PrintTo(CpuIsa isa, std::ostream* os) { *os << cpu_isa_name(isa); }

namespace {

class HybridCpuIsa : public ::testing::TestWithParam<CpuIsa> {
 protected:
  void SetUp() override {
    if (!cpu_isa_supported(GetParam()))
      GTEST_SKIP() << "this CPU does not run the " << cpu_isa_name(GetParam()) << " kernel";
  }
};

TEST_P(HybridCpuIsa, MatchesDoubleReferenceAtOddSizes) {
  const CpuIsa isa = GetParam();
  std::vector<std::unique_ptr<HybridCpuMatmul>> pools;
  for (int threads : {1, 2, 3, 8}) pools.push_back(std::make_unique<HybridCpuMatmul>(threads, false, isa));
  EXPECT_STREQ(pools[0]->isa(), cpu_isa_name(isa));
  EXPECT_EQ(pools[3]->threads(), 8);
  const float sentinel = -12345.0f;
  int cases = 0;
  uint32_t seed = 1;
  for (int64_t in : {1, 7, 64, 576, 4097})
    for (int64_t rows : {1, 3, 129})
      for (int64_t tokens : {1, 2, 5, 16, 33}) {
        // The range starts inside the matrix and stops short of its end: the rows around it must
        // be neither read into y nor written.
        const int64_t row_begin = (seed % 2) ? 5 : 0, total_rows = row_begin + rows + 2, ldy = rows + 3;
        const auto w = random_bf16(size_t(total_rows * in), seed++);
        const auto x = random_bf16(size_t(tokens * in), seed++);
        const Reference ref = reference(w, in, row_begin, rows, x, tokens);
        for (auto& pool : pools) {
          std::vector<float> y(size_t(tokens * ldy), sentinel);
          pool->matmul(w.data(), in, row_begin, row_begin + rows, x.data(), tokens, y.data(), ldy);
          for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t r = 0; r < rows; ++r) {
              const size_t i = size_t(t * rows + r);
              ASSERT_NEAR(y[size_t(t * ldy + r)], ref.y[i], tolerance(in, ref.bound[i]))
                  << cpu_isa_name(isa) << " in " << in << " rows " << rows << " tokens " << tokens << " threads "
                  << pool->threads() << " at t " << t << " r " << r;
            }
            for (int64_t r = rows; r < ldy; ++r) ASSERT_EQ(y[size_t(t * ldy + r)], sentinel) << "padding written";
          }
          ++cases;
        }
      }
  EXPECT_EQ(cases, 5 * 3 * 5 * 4);
}

TEST_P(HybridCpuIsa, EveryBlockShapeAtLargerBatches) {
  // Rows that leave every remainder of the blocks (32-row tile pairs, a single 16-row tile, then
  // fewer than a tile; 4-, 2- and 1-row vector blocks) and token counts that leave every remainder
  // of the token blocks (two 16-token tiles, one, a partial one; 4-token vector blocks).
  const int64_t in = 96, total_rows = 60, row_begin = 3, rows = 53;  // 53 = 32 + 16 + 5
  const CpuIsa isa = GetParam();
  HybridCpuMatmul one(1, false, isa), three(3, false, isa);
  uint32_t seed = 100;
  for (int64_t tokens : {15, 16, 17, 31, 32, 40, 64}) {
    const auto w = random_bf16(size_t(total_rows * in), seed++), x = random_bf16(size_t(tokens * in), seed++);
    const Reference ref = reference(w, in, row_begin, rows, x, tokens);
    for (HybridCpuMatmul* pool : {&one, &three}) {
      std::vector<float> y(size_t(tokens * rows));
      pool->matmul(w.data(), in, row_begin, row_begin + rows, x.data(), tokens, y.data(), rows);
      for (size_t i = 0; i < y.size(); ++i)
        ASSERT_NEAR(y[i], ref.y[i], tolerance(in, ref.bound[i]))
            << cpu_isa_name(isa) << " tokens " << tokens << " threads " << pool->threads() << " at " << i;
    }
  }
}

TEST_P(HybridCpuIsa, SplitRangesAddUpToTheWholeMatrix) {
  // Two calls over [0, s) and [s, rows) give what one call over [0, rows) gives, bit for bit: a
  // row's sum does not depend on the range or the thread that computes it.
  HybridCpuMatmul pool(3, false, GetParam());
  const int64_t in = 300, rows = 200, tokens = 9, s = 64;
  const auto w = random_bf16(size_t(rows * in), 7), x = random_bf16(size_t(tokens * in), 8);
  std::vector<float> whole(size_t(tokens * rows)), parts(size_t(tokens * rows));
  pool.matmul(w.data(), in, 0, rows, x.data(), tokens, whole.data(), rows);
  pool.matmul(w.data(), in, 0, s, x.data(), tokens, parts.data(), rows);
  pool.matmul(w.data(), in, s, rows, x.data(), tokens, parts.data() + s, rows);
  EXPECT_EQ(std::memcmp(whole.data(), parts.data(), whole.size() * sizeof(float)), 0);
}

TEST_P(HybridCpuIsa, CallAllocatesNothing) {
  HybridCpuMatmul pool(4, false, GetParam());
  const int64_t in = 1024, rows = 300, tokens = 64;  // the tiles take it where the CPU has them
  const auto w = random_bf16(size_t(rows * in), 3), x = random_bf16(size_t(tokens * in), 4);
  std::vector<float> y(size_t(tokens * rows));
  pool.matmul(w.data(), in, 0, rows, x.data(), tokens, y.data(), rows);  // the first call may warm up
  const int64_t before = g_allocations.load();
  for (int i = 0; i < 3; ++i) pool.matmul(w.data(), in, 0, rows, x.data(), tokens, y.data(), rows);
  EXPECT_EQ(g_allocations.load(), before);
}

INSTANTIATE_TEST_SUITE_P(Kernels, HybridCpuIsa,
                         ::testing::Values(CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx),
                         [](const auto& info) { return std::string(cpu_isa_name(info.param)); });

// x packed for the AMX tiles, multiplied as tdpbf16ps is documented to multiply (C[m][n] += over
// pairs i: A[m][2i]*B[i][2n] + A[m][2i+1]*B[i][2n+1], A = 16 weight rows of 32 inputs as they lie,
// B = one packed tile read as bf16), gives W x: the layout is right on any CPU, tiles or not.
TEST(HybridCpu, AmxPackedXFeedsTheTilesAsDocumented) {
  const int64_t in = 96, rows = 16, tokens = 40, tts = 3;  // the third token tile is half padding
  const auto w = random_bf16(size_t(rows * in), 21), x = random_bf16(size_t(tokens * in), 22);
  std::vector<uint32_t> xp(hybrid::amx_packed_x_size(in, tokens), 0xDEADBEEF);
  ASSERT_EQ(xp.size(), size_t(in / 32 * tts * 256));
  hybrid::amx_pack_x(x.data(), in, tokens, xp.data());
  const Reference ref = reference(w, in, 0, rows, x, tokens);
  for (int64_t tt = 0; tt < tts; ++tt) {
    double c[16][16] = {};
    for (int64_t kb = 0; kb < in / 32; ++kb) {
      const uint32_t* tile = xp.data() + (kb * tts + tt) * 256;
      for (int m = 0; m < 16; ++m)
        for (int i = 0; i < 16; ++i)
          for (int n = 0; n < 16; ++n) {
            const uint32_t pair = tile[i * 16 + n];
            const float b0 = bf16_to_f32(uint16_t(pair & 0xFFFF)), b1 = bf16_to_f32(uint16_t(pair >> 16));
            c[m][n] += double(bf16_to_f32(w[size_t(m * in + kb * 32 + 2 * i)])) * b0 +
                       double(bf16_to_f32(w[size_t(m * in + kb * 32 + 2 * i + 1)])) * b1;
          }
    }
    for (int n = 0; n < 16; ++n) {
      const int64_t t = tt * 16 + n;
      for (int m = 0; m < 16; ++m) {
        if (t < tokens)
          ASSERT_NEAR(c[m][n], ref.y[size_t(t * rows + m)], 1e-9 * ref.bound[size_t(t * rows + m)]) << t << " " << m;
        else
          ASSERT_EQ(c[m][n], 0.0) << "padding token " << t;
      }
    }
  }
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(HybridCpu, BadShapesAreRefused) {
  HybridCpuMatmul pool(2, false, CpuIsa::scalar);
  std::vector<uint16_t> w(64 * 8, 0x3f80), x(65 * 8, 0x3f80);
  std::vector<float> y(65 * 64);
  EXPECT_NE(error_of([&] { pool.matmul(w.data(), 8, 0, 4, x.data(), 0, y.data(), 4); }).find("0 tokens"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.matmul(w.data(), 8, 0, 4, x.data(), 65, y.data(), 4); }).find("1 to 64"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.matmul(w.data(), 8, 0, 4, x.data(), 1, y.data(), 3); }).find("ldy 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.matmul(w.data(), 0, 0, 4, x.data(), 1, y.data(), 4); }).find("0 inputs"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.matmul(w.data(), 8, 5, 4, x.data(), 1, y.data(), 4); }).find("not a range"),
            std::string::npos);
  EXPECT_NE(error_of([&] { pool.matmul(nullptr, 8, 0, 4, x.data(), 1, y.data(), 4); }).find("null"),
            std::string::npos);
  // An empty range is no work, not an error.
  pool.matmul(w.data(), 8, 3, 3, x.data(), 1, y.data(), 0);
}

TEST(HybridCpu, EnvironmentLowersTheKernel) {
  ASSERT_EQ(setenv("RINGLLAMA_CPU_ISA", "scalar", 1), 0);
  EXPECT_STREQ(HybridCpuMatmul(1).isa(), "scalar");
  ASSERT_EQ(setenv("RINGLLAMA_CPU_ISA", "sse9", 1), 0);
  EXPECT_NE(error_of([] { HybridCpuMatmul m(1); }).find("unknown CPU kernel \"sse9\""), std::string::npos);
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx}) {
    ASSERT_EQ(setenv("RINGLLAMA_CPU_ISA", cpu_isa_name(isa), 1), 0);
    if (cpu_isa_supported(isa))
      EXPECT_STREQ(HybridCpuMatmul(1).isa(), cpu_isa_name(isa));
    else
      EXPECT_NE(error_of([] { HybridCpuMatmul m(1); }).find("lacks"), std::string::npos);
  }
  ASSERT_EQ(unsetenv("RINGLLAMA_CPU_ISA"), 0);
  // Unforced, the fastest kernel this CPU runs.
  CpuIsa best = CpuIsa::scalar;
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512, CpuIsa::amx})
    if (cpu_isa_supported(isa)) best = isa;
  EXPECT_EQ(HybridCpuMatmul(1).isa_kind(), best);
}

// Affinity of the threads that run a pool's parts: (caller's thread?, cores allowed) per part. Each
// part waits until all have started, so that every part runs on its own thread.
std::vector<std::pair<bool, int>> part_affinity(HybridCpuMatmul& pool) {
  std::vector<std::pair<bool, int>> seen(size_t(pool.threads()));
  std::atomic<int> started{0};
  const auto caller = std::this_thread::get_id();
  pool.for_each_part([&](int part, int parts) {
    started.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < parts && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    cpu_set_t set;
    CPU_ZERO(&set);
    sched_getaffinity(0, sizeof set, &set);
    seen[size_t(part)] = {std::this_thread::get_id() == caller, CPU_COUNT(&set)};
  });
  return seen;
}

TEST(HybridCpu, PinnedWorkersRunOnOneCoreEach) {
  if (usable_cores() < 2) GTEST_SKIP() << "one core: pinning changes nothing";
  HybridCpuMatmul pinned(2, true, CpuIsa::scalar), free(2, false, CpuIsa::scalar);
  int workers = 0;
  for (auto [on_caller, cores] : part_affinity(pinned))
    if (!on_caller) {
      ++workers;
      EXPECT_EQ(cores, 1);
    }
  EXPECT_EQ(workers, 1);
  for (auto [on_caller, cores] : part_affinity(free)) EXPECT_EQ(cores, usable_cores());
}

TEST(HybridCpu, DramReadRate) {
  HybridCpuMatmul pool(2, false, CpuIsa::scalar);
  std::vector<uint64_t> buf((32u << 20) / 8, 1);
  const double gbs = measure_dram_read_gbs(buf.data(), buf.size() * 8, pool, 2);
  EXPECT_TRUE(std::isfinite(gbs) && gbs > 0.1 && gbs < 10000) << gbs;
  EXPECT_NE(error_of([&] { measure_dram_read_gbs(buf.data(), 0, pool); }).find("0 bytes"), std::string::npos);
}

// ---- the split -------------------------------------------------------------------------------------

// Llama 3 8B's layer: wq, wk, wv, wo, w1, w3, w2.
const std::vector<HybridMatrix> kLayer8B{{4096, 4096},  {1024, 4096},  {1024, 4096}, {4096, 4096},
                                         {14336, 4096}, {14336, 4096}, {4096, 14336}};
constexpr int64_t kLayer8BBytes = 2 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096);

// The GPU machine: 55 GB/s pinned H2D, 80 GB/s of weights through the CPU kernel at batch 1.
HybridRates gpu_machine() {
  HybridRates r;
  r.h2d_gbs = 55;
  r.cpu_mem_gbs = 80;
  r.cpu_gflops = 1000;
  return r;
}

TEST(HybridSplit, CpuOffStreamsEverything) {
  HybridRates r = gpu_machine();
  r.cpu_share = 0.0;
  EXPECT_EQ(choose_gpu_fraction(kLayer8BBytes, 1, r), 1.0);
  // The CPU's rates play no part once it is off, even unusable ones.
  r.cpu_mem_gbs = 0;
  r.cpu_gflops = std::nan("");
  const HybridSplit s = split_layer(kLayer8B, 1, r);
  EXPECT_EQ(s.f, 1.0);
  for (size_t i = 0; i < kLayer8B.size(); ++i) EXPECT_EQ(s.gpu_rows[i], kLayer8B[i].rows);
  EXPECT_EQ(s.gpu_bytes, kLayer8BBytes);
  EXPECT_EQ(s.cpu_bytes, 0);
  // The bound is the plain streaming bound: one token per 32 layers' bytes over 55 GB/s.
  EXPECT_NEAR(hybrid_tokens_per_s_bound(s, 32, 1), 55e9 / (32.0 * kLayer8BBytes), 1e-9);
}

TEST(HybridSplit, BatchOneSharesByRates) {
  const HybridRates r = gpu_machine();
  const double f = choose_gpu_fraction(kLayer8BBytes, 1, r);
  EXPECT_NEAR(f, 55.0 / 135.0, 1e-12);  // ~0.41
  EXPECT_GT(f, 0.40);
  EXPECT_LT(f, 0.42);
  for (int64_t g : {64, 16}) {
    HybridRates rg = r;
    rg.row_granularity = g;
    const HybridSplit s = split_layer(kLayer8B, 1, rg);
    int64_t gpu = 0, cpu = 0;
    for (size_t i = 0; i < kLayer8B.size(); ++i) {
      EXPECT_EQ(s.gpu_rows[i] % g, 0) << "matrix " << i;
      const double exact = f * double(kLayer8B[i].rows);  // rounded up to the next block
      EXPECT_GE(double(s.gpu_rows[i]), exact) << "matrix " << i;
      EXPECT_LT(double(s.gpu_rows[i]), exact + double(g)) << "matrix " << i;
      gpu += s.gpu_rows[i] * kLayer8B[i].in * 2;
      cpu += (kLayer8B[i].rows - s.gpu_rows[i]) * kLayer8B[i].in * 2;
    }
    EXPECT_EQ(s.gpu_bytes, gpu);
    EXPECT_EQ(s.cpu_bytes, cpu);
    EXPECT_EQ(gpu + cpu, kLayer8BBytes);
    // Balanced up to the rounding, which only ever moves rows to the GPU: at most one block of
    // each matrix (under 3% of the layer).
    EXPECT_GE(s.gpu_seconds, s.cpu_seconds);
    EXPECT_LT(s.gpu_seconds / s.cpu_seconds, 1.06);
    // Faster than streaming everything, by the CPU's share.
    HybridRates off = rg;
    off.cpu_share = 0.0;
    const double alone = hybrid_tokens_per_s_bound(split_layer(kLayer8B, 1, off), 32, 1);
    // (55 + 80) / 55 at best, a little less for the blocks the rounding gives the GPU.
    const double speedup = hybrid_tokens_per_s_bound(s, 32, 1) / alone;
    EXPECT_LE(speedup, 135.0 / 55.0 + 1e-9);
    EXPECT_GT(speedup, 0.97 * 135.0 / 55.0);
  }
}

TEST(HybridSplit, LargeBatchesGoToTheGpu) {
  const HybridRates r = gpu_machine();
  double last = 0;
  HybridRates off = r;
  off.cpu_share = 0.0;
  const double alone = split_layer(kLayer8B, 1, off).seconds();
  for (int tokens : {1, 2, 8, 16, 64, 256, 4096}) {
    const double f = choose_gpu_fraction(kLayer8BBytes, tokens, r);
    EXPECT_GE(f, last) << tokens;
    last = f;
    // Rounded, a split is never slower than streaming everything.
    EXPECT_LE(split_layer(kLayer8B, tokens, r).seconds(), alone) << tokens;
  }
  // At 4096 tokens the CPU gets through 1000/4096 GB/s: its share of the largest matrix (14336
  // rows) is 63 rows, less than one 64-row block, so every row stays on the GPU.
  const HybridSplit s = split_layer(kLayer8B, 4096, r);
  for (size_t i = 0; i < kLayer8B.size(); ++i) EXPECT_EQ(s.gpu_rows[i], kLayer8B[i].rows);
  EXPECT_EQ(s.cpu_bytes, 0);
}

TEST(HybridSplit, RatesFromAMeasuredTable) {
  HybridRates r;
  r.h2d_gbs = 55;
  r.cpu_gbs_by_tokens = {{1, 80}, {16, 60}, {64, 20}};
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(r, 1), 80);
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(r, 16), 60);
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(r, 64), 20);
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(r, 128), 10);  // past the table: compute-bound
  // Between points, linear in seconds per byte: halfway from 16 to 64 tokens is 1 / (0.5/60 + 0.5/20).
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(r, 40), 1.0 / (0.5 / 60 + 0.5 / 20));
  for (int t = 1; t < 200; ++t) EXPECT_GE(cpu_rate_gbs(r, t), cpu_rate_gbs(r, t + 1)) << t;
  EXPECT_DOUBLE_EQ(choose_gpu_fraction(kLayer8BBytes, 64, r), 55.0 / 75.0);
  // Without a table: the roofline, min(memory, compute / tokens).
  const HybridRates m = gpu_machine();
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(m, 1), 80);
  EXPECT_DOUBLE_EQ(cpu_rate_gbs(m, 50), 20);
}

TEST(HybridSplit, ForcedShareAndRounding) {
  HybridRates r = gpu_machine();
  r.cpu_share = 1.0;
  const HybridSplit all_cpu = split_layer(kLayer8B, 1, r);
  EXPECT_EQ(all_cpu.f, 0.0);
  EXPECT_EQ(all_cpu.gpu_bytes, 0);
  EXPECT_NEAR(all_cpu.seconds(), kLayer8BBytes / 80e9, 1e-12);
  r.cpu_share = 0.25;
  EXPECT_EQ(choose_gpu_fraction(kLayer8BBytes, 1, r), 0.75);
  EXPECT_EQ(gpu_rows(4096, 0.75, 64), 3072);
  EXPECT_EQ(gpu_rows(4096, 0.75, 16), 3072);
  EXPECT_EQ(gpu_rows(1000, 0.45, 64), 512);   // 7.03 blocks round up to 8
  EXPECT_EQ(gpu_rows(1000, 0.97, 64), 1000);  // 16 blocks would pass the end: all rows
  EXPECT_EQ(gpu_rows(40, 0.1, 64), 40);       // smaller than a block: the GPU takes it whole
  EXPECT_EQ(gpu_rows(4096, 1.0, 64), 4096);
  EXPECT_EQ(gpu_rows(4096, 0.0, 64), 0);
}

TEST(HybridSplit, BadRatesAreRefused) {
  const double nan = std::nan(""), inf = std::numeric_limits<double>::infinity();
  auto refused = [](const HybridRates& r, const std::string& field) {
    const std::string e = error_of([&] { choose_gpu_fraction(kLayer8BBytes, 1, r); });
    EXPECT_NE(e.find(field), std::string::npos) << e;
  };
  for (double bad : {0.0, -1.0, nan, inf}) {
    HybridRates r = gpu_machine();
    r.h2d_gbs = bad;
    refused(r, "h2d_gbs");
    r = gpu_machine();
    r.cpu_mem_gbs = bad;
    refused(r, "cpu_mem_gbs");
    r = gpu_machine();
    r.cpu_gflops = bad;
    refused(r, "cpu_gflops");
    r = gpu_machine();
    r.cpu_gbs_by_tokens = {{1, 80}, {8, bad}};
    refused(r, "cpu_gbs_by_tokens");
  }
  for (double bad : {-0.1, 1.5, nan}) {
    HybridRates r = gpu_machine();
    r.cpu_share = bad;
    refused(r, "cpu_share");
  }
  HybridRates r = gpu_machine();
  r.cpu_gbs_by_tokens = {{4, 80}, {2, 60}};
  refused(r, "ascending");
  r = gpu_machine();
  r.row_granularity = 0;
  refused(r, "row_granularity");
  EXPECT_NE(error_of([] { choose_gpu_fraction(0, 1, gpu_machine()); }).find("0 bytes"), std::string::npos);
  EXPECT_NE(error_of([] { choose_gpu_fraction(kLayer8BBytes, 0, gpu_machine()); }).find("0 tokens"),
            std::string::npos);
  EXPECT_NE(error_of([nan] { gpu_rows(100, nan, 64); }).find("not in [0, 1]"), std::string::npos);
  EXPECT_NE(error_of([] { split_layer({{0, 4096}}, 1, gpu_machine()); }).find("0x4096"), std::string::npos);
}


// ---- Where the CPU's rows lie in the store (what the CUDA pool leaves on the host) ----

// A store layout of the wide test shape (q|k|v [384, 256], o [256, 256], gate|up [688, 256], down
// [256, 344]), bf16 or with its linear weights in `linear`.
Manifest wide_manifest(TensorFormat linear = {}) {
  return Manifest::plan(test::wide_config(), "random:test", [&](const GroupEntry&, const TensorSpec& t) {
    return tensor_packable(t.name) ? linear : TensorFormat{};
  });
}

TEST(HybridLayout, MatricesAreTheFusedOnesInForwardOrder) {
  const ModelConfig m = test::wide_config();
  const std::vector<HybridMatrix> mats = hybrid_layer_matrices(m);
  ASSERT_EQ(mats.size(), 4u);
  EXPECT_EQ(mats[0].rows, m.q_dim() + 2 * m.kv_dim());
  EXPECT_EQ(mats[0].in, m.dim);
  EXPECT_EQ(mats[1].rows, m.dim);
  EXPECT_EQ(mats[1].in, m.q_dim());
  EXPECT_EQ(mats[2].rows, 2 * m.ffn_dim);
  EXPECT_EQ(mats[2].in, m.dim);
  EXPECT_EQ(mats[3].rows, m.dim);
  EXPECT_EQ(mats[3].in, m.ffn_dim);
}

TEST(HybridLayout, CpuRangesAreTheLastRowsOfEachMatrix) {
  const Manifest man = wide_manifest();
  const std::vector<HybridMatrix> mats = hybrid_layer_matrices(man.model);
  for (int64_t l = 0; l < man.model.n_layers; ++l) {
    EXPECT_EQ(hybrid_layer_refusal(man, l), "");
    // All rows on the GPU: nothing stays on the host.
    EXPECT_TRUE(hybrid_cpu_ranges(man, l, {mats[0].rows, mats[1].rows, mats[2].rows, mats[3].rows}).empty());
    const std::vector<int64_t> g = {128, 0, 64, 192};
    const std::vector<HybridHostRange> r = hybrid_cpu_ranges(man, l, g);
    ASSERT_EQ(r.size(), 4u);
    const GroupEntry& ga = man.attn(l);
    const GroupEntry& gf = man.ffn(l);
    // q|k|v: from row 128 of the fused matrix to the end of wv.
    EXPECT_FALSE(r[0].ffn);
    EXPECT_EQ(r[0].begin, ga.tensor("wq").offset + 128u * 256u * 2u);
    EXPECT_EQ(r[0].end, ga.tensor("wv").offset + ga.tensor("wv").size);
    // o: every row on the CPU, the whole tensor.
    EXPECT_EQ(r[1].begin, ga.tensor("wo").offset);
    EXPECT_EQ(r[1].end, ga.tensor("wo").offset + ga.tensor("wo").size);
    // gate|up: past the gate's first 64 rows to the end of up; down: its last 64 rows.
    EXPECT_TRUE(r[2].ffn && r[3].ffn);
    EXPECT_EQ(r[2].begin, gf.tensor("w1").offset + 64u * 256u * 2u);
    EXPECT_EQ(r[2].end, gf.tensor("w3").offset + gf.tensor("w3").size);
    EXPECT_EQ(r[3].begin, gf.tensor("w2").offset + 192u * 344u * 2u);
    EXPECT_EQ(r[3].end, gf.tensor("w2").offset + gf.tensor("w2").size);
    // What stays on the host is the CPU's rows' bytes, and no norm is among them.
    uint64_t bytes = 0;
    for (size_t i = 0; i < r.size(); ++i) {
      bytes += r[i].end - r[i].begin;
      EXPECT_EQ(r[i].end - r[i].begin, static_cast<uint64_t>((mats[i].rows - g[i]) * mats[i].in * 2)) << i;
      const TensorEntry& norm = r[i].ffn ? gf.tensor("ffn_norm") : ga.tensor("attn_norm");
      EXPECT_TRUE(norm.offset + norm.size <= r[i].begin || norm.offset >= r[i].end) << i;
      EXPECT_LE(r[i].end, r[i].ffn ? gf.size : ga.size) << i;
    }
    EXPECT_GT(bytes, 0u);
  }
}

TEST(HybridLayout, PackedLayersAndBadRowsAreRefused) {
  const Manifest packed = wide_manifest(TensorFormat{DType::FP8_E4M3, 0});
  const std::string why = hybrid_layer_refusal(packed, 0);
  EXPECT_NE(why.find("fp8"), std::string::npos) << why;
  EXPECT_NE(why.find("bf16"), std::string::npos) << why;
  EXPECT_THROW(hybrid_cpu_ranges(packed, 0, {0, 0, 0, 0}), Error);
  const Manifest man = wide_manifest();
  EXPECT_THROW(hybrid_cpu_ranges(man, 0, {0, 0, 0}), Error);         // three counts for four matrices
  EXPECT_THROW(hybrid_cpu_ranges(man, 0, {385, 0, 0, 0}), Error);    // more rows than q|k|v has
  EXPECT_THROW(hybrid_cpu_ranges(man, 0, {-1, 0, 0, 0}), Error);
  EXPECT_THROW(hybrid_layer_refusal(man, man.model.n_layers), Error);  // no such layer
}

TEST(HybridLayout, RefusalNamesWhyTheHybridCannotApply) {
  const Manifest man = wide_manifest();
  EXPECT_EQ(hybrid_refusal(man, 0, 2), "");
  EXPECT_EQ(hybrid_refusal(man, 1, 9), "");
  EXPECT_NE(hybrid_refusal(man, 0, 1).find("hold 1 host layer"), std::string::npos) << hybrid_refusal(man, 0, 1);
  EXPECT_NE(hybrid_refusal(man, man.model.n_layers, 4).find("nothing streams"), std::string::npos);
  // A packed layer among the streamed ones refuses; resident packed layers would not matter, but
  // every layer of this layout is packed.
  const std::string why = hybrid_refusal(wide_manifest(TensorFormat{DType::FP8_E4M3, 0}), 1, 4);
  EXPECT_NE(why.find("layer 1's"), std::string::npos) << why;
  EXPECT_NE(why.find("fp8"), std::string::npos) << why;
}

}  // namespace
}  // namespace ringllama
