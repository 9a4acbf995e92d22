#include "daemon/loaderd_bench.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "common/errors.h"
#include "common/io_reader.h"
#include "common/log.h"
#include "common/store.h"

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

// Empties the page cache so that neither read finds the other's pages. Returns what happened.
std::string drop_page_cache() {
  ::sync();
  int fd = ::open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return fmt::format("NOT dropped (/proc/sys/vm/drop_caches: {})", errno_text(errno));
  const bool ok = ::write(fd, "3\n", 2) == 2;
  const int err = errno;
  ::close(fd);
  return ok ? std::string("dropped") : fmt::format("NOT dropped (write: {})", errno_text(err));
}

struct Rate {
  uint64_t bytes = 0;
  double seconds = 0;
  double gbps() const { return seconds > 0 ? double(bytes) / seconds / 1e9 : 0.0; }
};

// The whole file in order, as fast as the reader goes: every range lands in one scratch buffer
// (the bytes are not looked at), so memory is not what is measured.
Rate plain_read(const std::string& path, const IoOptions& io_opt) {
  IoReader io(path, io_opt);
  if (!io.direct()) spdlog::warn("{}: O_DIRECT refused; the plain read is buffered", path);
  const uint64_t chunk = 64ull << 20;
  void* p = nullptr;
  if (posix_memalign(&p, 1 << 21, chunk) != 0) fail("cannot allocate {} bytes", chunk);
  std::unique_ptr<void, decltype(&std::free)> buf(p, &std::free);
  const uint64_t size = io.file_size();
  const auto t0 = Clock::now();
  for (uint64_t off = 0; off < size; off += chunk) io.submit({off, std::min(chunk, size - off), buf.get(), off});
  std::string error;
  while (io.pending() > 0)
    io.poll([&](const ReadCompletion& c) {
      if (!c.ok() && error.empty()) error = c.error;
    }, true);
  Rate r;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!error.empty()) fail("plain read of {}: {}", path, error);
  r.bytes = io.stats().bytes;
  return r;
}

}  // namespace

int run_loaderd_bench(const Config& config, const LoaderdOptions& opt, int rounds, bool drop_cache) {
  const Store store = Store::open(config.store);
  const IoOptions io_opt = io_options(config);
  std::printf("store %s: weights.bin %.2f GB, %lld layers; window %lld slots; io_queue_depth %u, io_block_kib %llu\n",
              store.dir().c_str(), double(store.manifest().weights_size) / 1e9,
              static_cast<long long>(store.model().n_layers), static_cast<long long>(config.cpu_cap_layers),
              io_opt.queue_depth, static_cast<unsigned long long>(io_opt.block_bytes / 1024));
  double best_ratio = 0;
  for (int round = 1; round <= rounds; ++round) {
    const std::string d1 = drop_cache ? drop_page_cache() : std::string("kept");
    const Rate plain = plain_read(store.weights_path(), io_opt);
    std::printf("round %d: plain io_uring O_DIRECT sequential read: %.3f GB/s (%.2f GB in %.3f s; page cache %s)\n",
                round, plain.gbps(), double(plain.bytes) / 1e9, plain.seconds, d1.c_str());
    std::fflush(stdout);

    // The segment is created (fallocate, mlock) before the clock starts: only the fill is timed.
    Loaderd d(config, opt);
    const std::string d2 = drop_cache ? drop_page_cache() : std::string("kept");
    const auto t0 = Clock::now();
    if (!d.fill(-1)) fail("the window fill stopped");
    Rate fill;
    fill.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    fill.bytes = d.bytes_loaded();
    const double ratio = plain.gbps() > 0 ? fill.gbps() / plain.gbps() : 0.0;
    best_ratio = std::max(best_ratio, ratio);
    std::printf("round %d: loaderd window fill (checksums checked): %.3f GB/s (%.2f GB in %.3f s; page cache %s)\n",
                round, fill.gbps(), double(fill.bytes) / 1e9, fill.seconds, d2.c_str());
    std::printf("round %d: ratio fill / plain = %.3f (target >= 0.9)\n", round, ratio);
    std::fflush(stdout);
  }
  std::printf("best ratio %.3f\n", best_ratio);
  return 0;
}

}  // namespace ringllama
