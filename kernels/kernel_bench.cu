// ringllama-kernel-bench: the bandwidth-bound kernels against the card's own copy rate, measured
// in the same run. Packed GEMV (fp8, int4 g128, int4 g32) at the Llama 3 8B shapes, the dequant
// pass, and decode attention over a paged cache at long contexts: the general kernel unsplit and
// split, and the decode kernel (PagedAttentionBatch::decode_only) split.
//
// The int4 GEMV rows show both kernels (GemvInt4Kernel): the factored one and, at the end of the
// row, the legacy one (the default), timed in the same run; g32 takes the legacy kernel either way.
//
// Rates are bytes the kernel must read (packed data + scales; K and V) over the time per launch,
// from cudaEvents around many launches. Each launch reads a different copy of the operands, and
// the copies together are larger than L2 several times over, so nothing is served from cache.
// The reference is a device-to-device cudaMemcpy of 1 GiB, counted as read + write bytes (what
// HBM carries for it); "of copy" is the ratio.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/errors.h"
#include "kernels/attention_paged.cuh"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "kernels/gemv_packed.cuh"

namespace ringllama {
namespace {

struct Timer {
  cudaEvent_t a = nullptr, b = nullptr;
  Timer() {
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  // Seconds per call of f(i), i = 0.. iters - 1, after a few untimed calls.
  template <typename F>
  double per_call(int iters, F&& f) {
    for (int i = 0; i < 3; ++i) f(i);
    CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) f(i);
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms * 1e-3 / iters;
  }
};

double copy_rate(Timer& timer) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer<unsigned char> src(bytes, "copy source"), dst(bytes, "copy destination");
  CUDA_CHECK(cudaMemset(src.get(), 1, bytes));
  const double s = timer.per_call(10, [&](int) {
    CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice));
  });
  const double rate = 2.0 * bytes / s;
  std::printf("cudaMemcpy D2D 1 GiB: %.3f ms, %.0f GB/s read + write\n\n", s * 1e3, rate / 1e9);
  return rate;
}

// Copies of one packed matrix, enough that consecutive launches never find it in L2.
struct PackedCopies {
  std::vector<DeviceBuffer<unsigned char>> data, scales;
  std::vector<PackedWeight> w;
};

PackedCopies make_copies(PackedFormat f, int64_t rows, int64_t cols, int64_t group, size_t l2_bytes) {
  PackedCopies c;
  PackedWeight w{f, nullptr, nullptr, rows, cols, group};
  const size_t db = packed_data_bytes(w), sb = packed_scale_bytes(w);
  const size_t n = std::max<size_t>(2, (4 * l2_bytes + db - 1) / db);
  for (size_t i = 0; i < std::min<size_t>(n, 64); ++i) {
    c.data.emplace_back(db, "bench weights");
    c.scales.emplace_back(sb, "bench scales");
    // Finite values: 0x35 is an ordinary e4m3 value and the nibbles 5 and 3; 0x3C a sane scale.
    CUDA_CHECK(cudaMemset(c.data.back().get(), 0x35, db));
    CUDA_CHECK(cudaMemset(c.scales.back().get(), 0x3C, sb));
    w.data = c.data.back().get();
    w.scales = c.scales.back().get();
    c.w.push_back(w);
  }
  return c;
}

void bench_gemv(Timer& timer, double copy, size_t l2_bytes) {
  struct Shape {
    int64_t rows, cols;
    const char* what;
  };
  const Shape shapes[] = {{4096, 4096, "q/o"},
                          {1024, 4096, "k/v"},
                          {14336, 4096, "gate/up"},
                          {4096, 14336, "down"},
                          {128256, 4096, "lm_head"}};
  struct Fmt {
    PackedFormat f;
    int64_t group;
  };
  const Fmt fmts[] = {{PackedFormat::FP8_E4M3, 0}, {PackedFormat::INT4, 128}, {PackedFormat::INT4, 32}};
  DeviceBuffer<__nv_bfloat16> x(8 * 14336, "bench x");
  DeviceBuffer<float> y(8 * 128256, "bench y");
  DeviceBuffer<__nv_bfloat16> deq(size_t{128256} * 4096, "bench dequant");
  CUDA_CHECK(cudaMemset(x.get(), 0x3C, x.bytes()));
  std::printf("%-22s %-14s %2s %10s %10s %8s   %-8s %10s %8s\n", "gemv", "shape", "T", "us", "GB/s", "of copy", "",
              "legacy us", "of copy");
  for (const Fmt& fm : fmts) {
    for (const Shape& s : shapes) {
      PackedCopies c = make_copies(fm.f, s.rows, s.cols, fm.group, l2_bytes);
      const double bytes = static_cast<double>(packed_data_bytes(c.w[0]) + packed_scale_bytes(c.w[0]));
      std::string name = packed_format_name(fm.f);
      if (fm.f == PackedFormat::INT4) name += " g" + std::to_string(fm.group);
      const std::string shape = std::to_string(s.rows) + "x" + std::to_string(s.cols);
      for (int64_t T : {1, 4, 8}) {
        auto time_kernel = [&](GemvInt4Kernel k) {
          return timer.per_call(200, [&](int i) {
            launch_gemv_packed(x.get(), T, s.cols, c.w[i % c.w.size()], y.get(), ElemType::BF16, s.rows, nullptr, k);
          });
        };
        const double t = time_kernel(GemvInt4Kernel::Factored);
        std::printf("%-22s %-14s %2lld %10.2f %10.0f %8.2f   %-8s", name.c_str(), shape.c_str(),
                    static_cast<long long>(T), t * 1e6, bytes / t / 1e9, bytes / t / copy, s.what);
        if (fm.f == PackedFormat::INT4) {
          const double tl = time_kernel(GemvInt4Kernel::Legacy);
          std::printf(" %10.2f %8.2f", tl * 1e6, bytes / tl / copy);
        }
        std::printf("\n");
      }
      // The prefill path's extra pass: packed bytes in, bf16 out (both counted).
      const double td = timer.per_call(20, [&](int i) {
        launch_dequant_packed(c.w[i % c.w.size()], 0, s.rows, deq.get(), s.cols, nullptr);
      });
      const double moved = bytes + 2.0 * s.rows * s.cols;
      std::printf("%-22s %-14s %2s %10.2f %10.0f %8.2f   dequant to bf16 (read + write)\n", name.c_str(),
                  shape.c_str(), "-", td * 1e6, moved / td / 1e9, moved / td / copy);
    }
  }
  std::printf("\n");
}

// Decode over a paged cache: `batch` sequences of `ctx` tokens, one query each; Llama 3 8B heads.
void bench_attention(Timer& timer, double copy, int sm_count) {
  const int64_t H = 32, KVH = 8, hd = 128, kv_dim = KVH * hd, B = 16;
  std::printf("%-30s %10s %10s %8s %7s  %s\n", "decode attention", "us", "GB/s", "of copy", "splits", "kernel");
  struct Case {
    int64_t batch, ctx;
  };
  for (Case c : {Case{1, 4096}, Case{1, 32768}, Case{4, 32768}, Case{16, 32768}, Case{64, 32768}, Case{1, 131072}}) {
    const int64_t blocks_per_seq = c.ctx / B, rows = c.batch * c.ctx;
    // Two caches: the second launch of a pair never finds the first one's keys in L2.
    std::vector<DeviceBuffer<__nv_bfloat16>> k, v;
    for (int i = 0; i < 2; ++i) {
      k.emplace_back(rows * kv_dim, "bench K");
      v.emplace_back(rows * kv_dim, "bench V");
      CUDA_CHECK(cudaMemset(k.back().get(), 0x3C, k.back().bytes()));
      CUDA_CHECK(cudaMemset(v.back().get(), 0x3C, v.back().bytes()));
    }
    std::vector<int32_t> row0(c.batch), count(c.batch, 1), start(c.batch, static_cast<int32_t>(c.ctx - 1));
    std::vector<int32_t> tables(c.batch * blocks_per_seq);
    for (int64_t i = 0; i < c.batch; ++i) row0[i] = static_cast<int32_t>(i);
    for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int32_t>(i);
    std::vector<int32_t> tile_item, tile_row0;
    attention_paged_tiles(std::vector<int64_t>(c.batch, 1), H / KVH, &tile_item, &tile_row0);
    std::vector<int32_t> meta;
    for (auto* part : {&row0, &count, &start, &tables, &tile_item, &tile_row0})
      meta.insert(meta.end(), part->begin(), part->end());
    DeviceBuffer<int32_t> d_meta(meta.size(), "bench metadata");
    CUDA_CHECK(cudaMemcpy(d_meta.get(), meta.data(), meta.size() * 4, cudaMemcpyHostToDevice));
    PagedAttentionBatch b;
    const int32_t* m = d_meta.get();
    b.item_row0 = m;
    b.item_count = m + c.batch;
    b.item_start = m + 2 * c.batch;
    b.block_tables = m + 3 * c.batch;
    b.table_stride = blocks_per_seq;
    b.tile_item = b.block_tables + tables.size();
    b.tile_row0 = b.tile_item + tile_item.size();
    b.n_tiles = static_cast<int64_t>(tile_item.size());
    DeviceBuffer<__nv_bfloat16> q(c.batch * H * hd, "bench q"), out(c.batch * H * hd, "bench out");
    CUDA_CHECK(cudaMemset(q.get(), 0x3C, q.bytes()));
    const size_t ws_bytes = attention_paged_workspace_bytes(c.batch, H, hd, kAttentionPagedMaxSplits);
    DeviceBuffer<unsigned char> ws(ws_bytes, "bench partials");
    const int auto_splits = attention_paged_splits(b.n_tiles, KVH, c.ctx, sm_count, c.batch, H, hd, ws_bytes);
    const double bytes = 2.0 * rows * kv_dim * 2;  // K and V, bf16
    // The general kernel unsplit and split, then the decode kernel (decode_only) split alike and
    // split into as many blocks as the GPU holds at once (one wave; at least one span per tile).
    const int64_t resident = int64_t{attention_paged_decode_blocks_per_sm(H, KVH, hd)} * sm_count;
    const int64_t max_wave = std::max<int64_t>(1, std::min<int64_t>(kAttentionPagedMaxSplits, c.ctx / 32));
    const int wave_splits = static_cast<int>(std::clamp<int64_t>(resident / (b.n_tiles * KVH), 1, max_wave));
    struct Row {
      int splits;
      bool decode;
      const char* kernel;
    };
    const Row table[] = {{1, false, "general"},
                         {auto_splits, false, "general"},
                         {auto_splits, true, "decode"},
                         {wave_splits, true, "decode, one wave"}};
    for (const Row& r : table) {
      if (&r == &table[1] && auto_splits == 1) continue;  // the launch of the row above
      PagedAttentionSplit sp{r.splits, c.batch, ws.get(), ws_bytes};
      PagedAttentionBatch rb = b;
      rb.decode_only = r.decode;
      const double t = timer.per_call(20, [&](int i) {
        launch_attention_paged(q.get(), H * hd, k[i % 2].get(), v[i % 2].get(), kv_dim, B, out.get(), H * hd, rb, H,
                               KVH, hd, 0.088f, nullptr, sp);
      });
      const std::string what = "batch " + std::to_string(c.batch) + " context " + std::to_string(c.ctx);
      std::printf("%-30s %10.2f %10.0f %8.2f %7d  %s\n", what.c_str(), t * 1e6, bytes / t / 1e9, bytes / t / copy,
                  r.splits, r.kernel);
    }
  }
}

int run(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "ringllama-kernel-bench: no CUDA GPU\n");
    return 1;
  }
  if (!only.empty() && only != "gemv" && only != "attention") {
    std::fprintf(stderr, "usage: ringllama-kernel-bench [gemv|attention]\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s: %d SMs, %.0f MiB L2\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1048576.0);
  Timer timer;
  const double copy = copy_rate(timer);
  if (only.empty() || only == "gemv") bench_gemv(timer, copy, static_cast<size_t>(prop.l2CacheSize));
  if (only.empty() || only == "attention") bench_attention(timer, copy, prop.multiProcessorCount);
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-kernel-bench", ringllama::run, argc, argv); }
