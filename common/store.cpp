#include "common/store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/errors.h"

namespace ringllama {

uint64_t checksum(const void* data, uint64_t size) { return XXH3_64bits(data, size); }

namespace {
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

std::string read_regular_file(const std::string& path, uint64_t max_bytes) {
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (f.fd < 0) throw StoreError(fmt::format("{}: cannot open: {}", path, errno_text(errno)));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw StoreError(fmt::format("{}: cannot stat: {}", path, errno_text(errno)));
  if (S_ISDIR(st.st_mode)) throw StoreError(fmt::format("{}: is a directory, not a file", path));
  if (!S_ISREG(st.st_mode)) throw StoreError(fmt::format("{}: not a regular file (a FIFO, socket or device)", path));
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    throw StoreError(fmt::format("{}: {} bytes, over the {} byte limit for this file", path,
                                 static_cast<uint64_t>(st.st_size), max_bytes));
  std::string text;
  text.resize(static_cast<size_t>(st.st_size));
  size_t done = 0;
  for (;;) {
    // One byte past the size seen: the file may have grown since fstat, and must stay under the limit.
    if (done == text.size()) {
      if (done > max_bytes)
        throw StoreError(fmt::format("{}: over the {} byte limit for this file", path, max_bytes));
      text.resize(std::min<uint64_t>(max_bytes + 1, done + 65536));
    }
    ssize_t n = ::read(f.fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw StoreError(fmt::format("{}: read error: {}", path, errno_text(errno)));
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  text.resize(done);
  return text;
}

Store Store::open(const std::string& dir) {
  Store s;
  s.dir_ = dir;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) throw StoreError(fmt::format("{}: cannot open store: {}", dir, errno_text(errno)));
  if (!S_ISDIR(st.st_mode)) throw StoreError(fmt::format("{}: a store is a directory", dir));
  s.manifest_ = Manifest::load(dir + "/" + kManifestFile);
  const std::string wp = s.weights_path();
  if (::stat(wp.c_str(), &st) != 0) throw StoreError(fmt::format("{}: cannot open: {}", wp, errno_text(errno)));
  if (static_cast<uint64_t>(st.st_size) != s.manifest_.weights_size)
    throw StoreError(fmt::format("{}: {} bytes, the manifest says {} (truncated or replaced)", wp,
                                 static_cast<uint64_t>(st.st_size), s.manifest_.weights_size));
  return s;
}

std::string Store::weights_path() const { return dir_ + "/" + kWeightsFile; }

void Store::check_group(const GroupEntry& g, const void* data) const {
  uint64_t got = checksum(data, g.size);
  if (got != g.xxh3)
    throw StoreError(fmt::format("{}: checksum mismatch in {} at offset {} (xxh3 {:016x}, manifest {:016x})",
                                 weights_path(), g.label(), g.offset, got, g.xxh3));
}

void Store::read_group(const GroupEntry& g, void* dst) const {
  Fd f;
  f.fd = ::open(weights_path().c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw StoreError(fmt::format("{}: cannot open: {}", weights_path(), errno_text(errno)));
  uint64_t done = 0;
  auto* out = static_cast<char*>(dst);
  while (done < g.size) {
    ssize_t n = ::pread(f.fd, out + done, g.size - done, static_cast<off_t>(g.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      throw StoreError(fmt::format("{}: read error in {} at offset {}: {}", weights_path(), g.label(),
                                   g.offset + done, errno_text(errno)));
    if (n == 0)
      throw StoreError(fmt::format("{}: unexpected end of file in {} at offset {}", weights_path(), g.label(),
                                   g.offset + done));
    done += static_cast<uint64_t>(n);
  }
  check_group(g, dst);
}

size_t Store::verify(const std::function<void(const std::string&)>& report) const {
  size_t bad = 0;
  uint64_t biggest = 0;
  for (const auto& g : manifest_.groups) biggest = std::max(biggest, g.size);
  std::unique_ptr<char[]> buf(new char[biggest]);
  for (const auto& g : manifest_.groups) {
    try {
      read_group(g, buf.get());
    } catch (const StoreError& e) {
      ++bad;
      report(e.what());
    }
  }
  return bad;
}

}  // namespace ringllama
