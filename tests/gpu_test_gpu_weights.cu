// The GPU group pool (worker/gpu_weights.h) moves the right bytes in the right order. Each pass, a
// "compute" kernel on the compute stream sums the 64-bit words of every acquired layer's device
// groups twice, with a spin before and between the two reads, and the sums are compared with the
// store's bytes summed on the host: every pass, every layer. A copy that refilled a buffer before
// the compute was done with it, or a compute that ran before its copy landed, changes a sum.
// Pools from the smallest (one buffer of each kind, nothing resident) to everything resident;
// sources: the whole store (pageable memory, one or several host layers in flight) and the local
// ring window (registered memory, slot tokens checked).
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/store.h"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "tests/gpu_skip.h"
#include "tests/test_util.h"
#include "worker/gpu_weights.h"
#include "worker/window_weights.h"

namespace ringllama {
namespace {

constexpr int64_t kLayers = 7;
constexpr int kPasses = 5;
constexpr long long kSpinCycles = 20000;  // ~10 us: long enough for an early copy to land under a read

// out += sum(words) twice: a spin, a read, a spin, a read. Unsigned sums wrap: order-free.
__global__ void sum_words_kernel(const unsigned long long* words, size_t n, unsigned long long* out,
                                 long long spin) {
  for (int round = 0; round < 2; ++round) {
    if (threadIdx.x == 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < spin) {
      }
    }
    __syncthreads();
    unsigned long long s = 0;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x)
      s += words[i];
    atomicAdd(out, s);
    __syncthreads();
  }
}

void launch_sum(const void* group, uint64_t bytes, unsigned long long* out, cudaStream_t s) {
  sum_words_kernel<<<16, 256, 0, s>>>(static_cast<const unsigned long long*>(group), bytes / 8, out, kSpinCycles);
  CUDA_CHECK_LAUNCH();
}

uint64_t host_sum(const char* p, uint64_t bytes) {
  uint64_t s = 0;
  for (uint64_t i = 0; i < bytes / 8; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    s += w;
  }
  return s;
}

struct Expected {
  uint64_t globals = 0;
  std::vector<uint64_t> attn, ffn;  // per layer
};

Expected expected_sums(const std::string& dir) {
  const Store store = Store::open(dir);
  const Manifest& m = store.manifest();
  Expected e;
  std::vector<char> buf;
  auto sum_group = [&](const GroupEntry& g) {
    buf.resize(g.size);
    store.read_group(g, buf.data());
    return host_sum(buf.data(), g.size);
  };
  e.globals = sum_group(m.globals());
  for (int64_t l = 0; l < m.model.n_layers; ++l) {
    e.attn.push_back(sum_group(m.attn(l)));
    e.ffn.push_back(sum_group(m.ffn(l)));
  }
  return e;
}

class ComputeStream {
 public:
  ComputeStream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~ComputeStream() { cudaStreamDestroy(s_); }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// kPasses passes through a GpuWeights over `source`; every sum compared with the store's.
void run_and_check(WeightSource& source, HostSlots* slots, const GpuPoolPlan& plan, const Expected& want) {
  const Manifest& m = source.manifest();
  ComputeStream compute;
  const size_t n_sums = static_cast<size_t>(kPasses * kLayers * 2 + 1);
  DeviceBuffer<unsigned long long> sums(n_sums, "test sums");
  CUDA_CHECK(cudaMemsetAsync(sums.get(), 0, sums.bytes(), compute.get()));
  GpuWeightsStats st;
  {
    GpuWeights gw(source, plan, compute.get(), slots);
    EXPECT_EQ(gw.resident_layers(), plan.resident_layers);
    const GroupEntry& gg = m.globals();
    const char* globals = reinterpret_cast<const char*>(gw.globals().tok_embeddings) - gg.tensor("tok_embeddings").offset;
    launch_sum(globals, gg.size, sums.get() + n_sums - 1, compute.get());

    for (int p = 0; p < kPasses; ++p) {
      gw.begin_pass();
      for (int64_t l = 0; l < kLayers; ++l) {
        const DeviceLayer d = gw.acquire(l);
        EXPECT_EQ(d.resident, l < plan.resident_layers);
        // Tensors at their offsets inside their groups.
        EXPECT_EQ(reinterpret_cast<const char*>(d.w.wk.data) - static_cast<const char*>(d.attn),
                  static_cast<std::ptrdiff_t>(m.attn(l).tensor("wk").offset));
        EXPECT_EQ(reinterpret_cast<const char*>(d.w.w2.data) - static_cast<const char*>(d.ffn),
                  static_cast<std::ptrdiff_t>(m.ffn(l).tensor("w2").offset));
        unsigned long long* out = sums.get() + (static_cast<size_t>(p) * kLayers + l) * 2;
        launch_sum(d.attn, m.attn(l).size, out, compute.get());
        launch_sum(d.ffn, m.ffn(l).size, out + 1, compute.get());
        gw.release(l);
      }
      gw.end_pass();
    }
    st = gw.stats();
    CUDA_CHECK(cudaStreamSynchronize(compute.get()));
  }
  std::vector<unsigned long long> got(n_sums);
  CUDA_CHECK(cudaMemcpy(got.data(), sums.get(), sums.bytes(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(got[n_sums - 1], 2 * want.globals) << "globals";
  int bad = 0;
  for (int p = 0; p < kPasses; ++p)
    for (int64_t l = 0; l < kLayers; ++l) {
      const size_t i = (static_cast<size_t>(p) * kLayers + l) * 2;
      if (got[i] != 2 * want.attn[l] || got[i + 1] != 2 * want.ffn[l]) {
        if (++bad <= 10)
          ADD_FAILURE() << "pass " << p << " layer " << l << ": attn sum " << got[i] << " (want " << 2 * want.attn[l]
                        << "), ffn sum " << got[i + 1] << " (want " << 2 * want.ffn[l] << ")";
      }
    }
  EXPECT_EQ(bad, 0);
  const int64_t streamed = kLayers - plan.resident_layers;
  EXPECT_EQ(st.passes, static_cast<uint64_t>(kPasses));
  EXPECT_EQ(st.copies, static_cast<uint64_t>(kPasses * streamed));
  EXPECT_EQ(st.bytes, static_cast<uint64_t>(kPasses * streamed) * m.layer_size(kLayers - 1));
  EXPECT_EQ(st.slot_changes, 0u);
  if (streamed > 0) EXPECT_GT(st.copy_seconds, 0.0);
  std::printf("  %lld copies, %llu bytes, %.3f ms copy time, %.2f GB/s, %llu event syncs, %llu deferrals "
              "(backlog %llu, buffers %llu), source waits %.3f ms\n",
              static_cast<long long>(st.copies), static_cast<unsigned long long>(st.bytes), st.copy_seconds * 1e3,
              st.gb_per_s(), static_cast<unsigned long long>(st.event_syncs),
              static_cast<unsigned long long>(st.backlog_deferrals + st.buffer_deferrals),
              static_cast<unsigned long long>(st.backlog_deferrals), static_cast<unsigned long long>(st.buffer_deferrals),
              st.source_wait_seconds * 1e3);
}

struct PoolCase {
  const char* name;
  GpuPoolPlan plan;
};

std::vector<PoolCase> pool_cases() {
  auto plan = [](int64_t resident, int64_t attn, int64_t ffn, int64_t ahead, int64_t backlog) {
    GpuPoolPlan p;
    p.resident_layers = resident;
    p.attn_buffers = attn;
    p.ffn_buffers = ffn;
    p.gpu_ahead_layers = ahead;
    p.h2d_backlog_max = backlog;
    return p;
  };
  return {
      {"smallest: 1 attn + 1 ffn buffer, nothing resident, 1 ahead", plan(0, 1, 1, 1, 4)},
      {"3 resident, 2 ahead (3 + 3 buffers), backlog 2", plan(3, 0, 0, 2, 2)},
      {"uneven: 2 attn + 3 ffn buffers, 2 ahead, backlog 1", plan(0, 2, 3, 2, 1)},
      {"4 ahead (5 + 5 buffers), backlog 4", plan(1, 0, 0, 4, 4)},
      {"every layer resident", plan(kLayers, 0, 0, 2, 4)},
  };
}

class GpuWeightsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    RL_SKIP_WITHOUT_GPU("the GPU group pool tests");
    CUDA_CHECK(cudaSetDevice(0));
    dir_ = tmp_ / "store";
    const auto r = test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", std::to_string(kLayers), "--seed",
                                                    "5", "--out", dir_, "--quiet"},
                                 120);
    ASSERT_EQ(r.status, 0) << r.err;
    want_ = expected_sums(dir_);
  }
  test::TempDir tmp_;
  std::string dir_;
  Expected want_;
};

TEST_F(GpuWeightsTest, StoreSourceOneHostLayerInFlight) {
  auto source = open_store_weights(dir_);
  for (const PoolCase& c : pool_cases()) {
    SCOPED_TRACE(c.name);
    std::printf("%s\n", c.name);
    run_and_check(*source, nullptr, c.plan, want_);
  }
}

TEST_F(GpuWeightsTest, StoreSourceSeveralHostLayersInFlight) {
  auto source = open_store_weights(dir_);
  for (PoolCase c : pool_cases()) {
    SCOPED_TRACE(c.name);
    std::printf("%s\n", c.name);
    c.plan.source_held_max = kLayers;
    run_and_check(*source, nullptr, c.plan, want_);
  }
}

// The store's memory named in pieces, the globals first and then one per group, as the daemon's
// source names its globals and slots: the pool registers the first at once and the others on a
// thread while the first passes already copy (each copy waits only for its own piece).
class PiecewiseSource : public WeightSource {
 public:
  explicit PiecewiseSource(std::unique_ptr<WeightSource> inner) : inner_(std::move(inner)) {}
  const Manifest& manifest() const override { return inner_->manifest(); }
  GlobalWeights globals() override { return inner_->globals(); }
  LayerWeights acquire_layer(int64_t layer) override { return inner_->acquire_layer(layer); }
  void release_layer(int64_t layer) override { inner_->release_layer(layer); }
  int64_t layers_held_at_once() const override { return inner_->layers_held_at_once(); }
  std::vector<HostRange> host_memory() const override {
    const std::vector<HostRange> whole = inner_->host_memory();
    EXPECT_EQ(whole.size(), 1u);
    const char* base = static_cast<const char*>(whole.at(0).data);
    std::vector<HostRange> pieces;
    for (const GroupEntry& g : manifest().groups) pieces.push_back(HostRange{base + g.offset, g.size});
    return pieces;  // groups() lists the globals first
  }

 private:
  std::unique_ptr<WeightSource> inner_;
};

TEST_F(GpuWeightsTest, StoreSourceRegisteredInTheBackground) {
  PiecewiseSource source(open_store_weights(dir_));
  ASSERT_EQ(source.manifest().groups.front().kind, GroupKind::Globals);
  for (PoolCase c : pool_cases()) {
    SCOPED_TRACE(c.name);
    std::printf("%s\n", c.name);
    c.plan.source_held_max = kLayers;
    run_and_check(source, nullptr, c.plan, want_);
  }
}

TEST_F(GpuWeightsTest, WindowSource) {
  for (int64_t cap : {int64_t{2}, int64_t{3}, kLayers}) {
    for (const PoolCase& c : pool_cases()) {
      SCOPED_TRACE(std::string(c.name) + ", window of " + std::to_string(cap));
      std::printf("%s, window of %lld\n", c.name, static_cast<long long>(cap));
      Config config;
      config.cpu_cap_layers = cap;
      auto source = open_window_weights(dir_, config);
      run_and_check(*source, source.get(), c.plan, want_);
      const WindowStats ws = source->stats();
      EXPECT_LE(ws.max_held, source->max_held_layers());
      EXPECT_EQ(ws.read_errors, 0u);
    }
  }
}

// The debug lines (per layer and per pass) format without error.
TEST_F(GpuWeightsTest, VerboseLines) {
  const auto level = spdlog::get_level();
  spdlog::set_level(spdlog::level::debug);
  Config config;
  config.cpu_cap_layers = 2;
  auto source = open_window_weights(dir_, config);
  run_and_check(*source, source.get(), pool_cases()[1].plan, want_);
  spdlog::set_level(level);
}

// Holding more streamed layers than there are buffers is refused, not deadlocked; the pool goes on.
TEST_F(GpuWeightsTest, HoldingPastTheBuffersThrows) {
  auto source = open_store_weights(dir_);
  ComputeStream compute;
  GpuPoolPlan plan;
  plan.attn_buffers = 1;
  plan.ffn_buffers = 1;
  plan.gpu_ahead_layers = 1;
  GpuWeights gw(*source, plan, compute.get());
  gw.begin_pass();
  gw.acquire(0);
  EXPECT_THROW(gw.acquire(1), Error);
  gw.end_pass();
  EXPECT_THROW(gw.acquire(3), Error);  // a pass starts at layer 0
  gw.end_pass();
  gw.begin_pass();
  for (int64_t l = 0; l < kLayers; ++l) {
    gw.acquire(l);
    EXPECT_THROW(gw.release(l + 1), Error);
    gw.release(l);
  }
  gw.end_pass();
  CUDA_CHECK(cudaStreamSynchronize(compute.get()));
}

TEST_F(GpuWeightsTest, RefusesPlansThatCannotWork) {
  auto source = open_store_weights(dir_);
  ComputeStream compute;
  GpuPoolPlan plan;
  plan.resident_layers = kLayers + 1;
  EXPECT_THROW({ GpuWeights gw(*source, plan, compute.get()); }, ConfigError);
  plan.resident_layers = 0;
  plan.h2d_backlog_max = 0;
  EXPECT_THROW({ GpuWeights gw(*source, plan, compute.get()); }, ConfigError);
}

}  // namespace
}  // namespace ringllama
