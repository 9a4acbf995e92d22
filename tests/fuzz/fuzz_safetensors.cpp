// A safetensors file (daemon/safetensors.h) as ringllama-pack opens one: the 8-byte header length,
// the JSON header, the data area. The bytes go into an in-memory file (memfd) so that
// SafetensorsFile::open reads them through its own pread path, then every tensor that can be
// packed is read and converted to bf16. parse_st_header is also called on the bytes directly and
// must agree with what open saw. StoreError is the documented outcome of a bad file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "daemon/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

// One memfd reused for every input: a new one per run would cost a file descriptor churn for nothing.
int memfd() {
  static const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  if (fd < 0) fuzz::finding("safetensors: memfd_create failed");
  return fd;
}

void write_file(const uint8_t* data, size_t size) {
  const int fd = memfd();
  if (::ftruncate(fd, 0) != 0) fuzz::finding("safetensors: ftruncate failed");
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) fuzz::finding("safetensors: pwrite to the memfd failed");
    done += static_cast<size_t>(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  bool header_ok = false;
  size_t n_tensors = 0;
  fuzz::run_expecting<StoreError>("safetensors header", [&] {
    const StHeader h = parse_st_header(bytes, size, "fuzz.safetensors");
    header_ok = true;
    n_tensors = h.tensors.size();
    for (const auto& [name, t] : h.tensors) {
      // What the parser promises every reader: offsets inside the data area, sizes that match.
      fuzz::expect(t.begin <= t.end && t.end <= size - h.data_start(), "safetensors: tensor '" + name + "' outside the data");
      fuzz::expect(t.numel() * st_dtype_bytes(t.dtype) == t.end - t.begin, "safetensors: size of '" + name + "'");
    }
  });

  write_file(data, size);
  const std::string path = "/proc/self/fd/" + std::to_string(memfd());
  fuzz::run_expecting<StoreError>("safetensors file", [&] {
    std::unique_ptr<SafetensorsFile> f = SafetensorsFile::open(path);
    fuzz::expect(header_ok && f->header().tensors.size() == n_tensors,
                 "safetensors: open and parse_st_header disagree on the same bytes");
    for (const auto& [name, t] : f->header().tensors) {
      if (!st_dtype_convertible(t.dtype)) continue;
      std::vector<bf16_t> out(t.numel());
      f->read_bf16(t, 0, t.numel(), out.data());
      if (t.numel() > 1) f->read_bf16(t, 1, t.numel() - 1, out.data());
    }
  });
  if (header_ok) {
    // The same header checked against a larger file: only the data area grows.
    fuzz::run_expecting<StoreError>("safetensors header, longer file",
                                    [&] { (void)parse_st_header(bytes, size + 4096, "fuzz.safetensors"); });
  }
  return 0;
}
