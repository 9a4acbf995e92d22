#include "daemon/loaderd_bench.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <algorithm>

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

// The first `span` bytes of the file (the range the window fill reads: the globals, then the first
// cpu_cap_layers layers) in order, as fast as the reader goes, in 64 MiB ranges into a buffer as
// large as the range (up to 8 GiB, then reused in turn), touched beforehand as the segment's pages
// are: the same bytes and the same kind of destination as the fill, so that only the reading differs.
Rate plain_read(const std::string& path, const IoOptions& io_opt, uint64_t span) {
  IoReader io(path, io_opt);
  if (!io.direct()) spdlog::warn("{}: O_DIRECT refused; the plain read is buffered", path);
  const uint64_t chunk = 64ull << 20;
  const uint64_t size = std::min(span, io.file_size());
  const uint64_t scratch = std::min<uint64_t>(align_up(size, chunk), 8ull << 30);
  void* p = nullptr;
  if (posix_memalign(&p, 1 << 21, scratch) != 0) fail("cannot allocate {} bytes", scratch);
  std::unique_ptr<void, decltype(&std::free)> buf(p, &std::free);
  std::memset(buf.get(), 0, scratch);
  const auto t0 = Clock::now();
  for (uint64_t off = 0; off < size; off += chunk)
    io.submit({off, std::min(chunk, size - off), static_cast<char*>(buf.get()) + off % scratch, off});
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
  if (rounds < 1) fail("--bench-rounds must be >= 1 (got {})", rounds);
  std::printf("store %s: weights.bin %.2f GB, %lld layers; window %lld slots; io_queue_depth %u, io_block_kib %llu\n",
              store.dir().c_str(), double(store.manifest().weights_size) / 1e9,
              static_cast<long long>(store.model().n_layers), static_cast<long long>(config.cpu_cap_layers),
              io_opt.queue_depth, static_cast<unsigned long long>(io_opt.block_bytes / 1024));
  const Manifest& man = store.manifest();
  const int64_t slots = std::min<int64_t>(config.cpu_cap_layers, man.model.n_layers);
  const uint64_t span = slots >= man.model.n_layers ? man.weights_size : man.layer_offset(slots);
  std::vector<double> ratios;
  // A virtual disk may keep what was just read in its host's cache, which dropping ours does not
  // empty: the order of the two reads alternates between rounds so that neither always goes second.
  for (int round = 1; round <= rounds; ++round) {
    const bool plain_first = round % 2 == 1;
    Rate plain, fill;
    auto run_plain = [&] {
      const std::string d = drop_cache ? drop_page_cache() : std::string("kept");
      plain = plain_read(store.weights_path(), io_opt, span);
      std::printf("round %d: plain io_uring O_DIRECT sequential read: %.3f GB/s (%.2f GB in %.3f s; page cache %s)\n",
                  round, plain.gbps(), double(plain.bytes) / 1e9, plain.seconds, d.c_str());
      std::fflush(stdout);
    };
    auto run_fill = [&] {
      // The segment is created (fallocate, mlock) before the clock starts: only the fill is timed.
      Loaderd d(config, opt);
      const std::string dropped = drop_cache ? drop_page_cache() : std::string("kept");
      const auto t0 = Clock::now();
      if (!d.fill(-1)) fail("the window fill stopped");
      fill.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      fill.bytes = d.bytes_loaded();
      std::printf("round %d: loaderd window fill (checksums checked): %.3f GB/s (%.2f GB in %.3f s; page cache %s)\n",
                  round, fill.gbps(), double(fill.bytes) / 1e9, fill.seconds, dropped.c_str());
      std::fflush(stdout);
    };
    if (plain_first) {
      run_plain();
      run_fill();
    } else {
      run_fill();
      run_plain();
    }
    const double ratio = plain.gbps() > 0 ? fill.gbps() / plain.gbps() : 0.0;
    ratios.push_back(ratio);
    std::printf("round %d (%s first): ratio fill / plain = %.3f (target >= 0.9)\n", round,
                plain_first ? "plain" : "fill", ratio);
    std::fflush(stdout);
  }
  std::sort(ratios.begin(), ratios.end());
  std::printf("ratio fill / plain over %d rounds: median %.3f, min %.3f, max %.3f\n", rounds,
              ratios[ratios.size() / 2], ratios.front(), ratios.back());
  return 0;
}

}  // namespace ringllama
