// A tokenizer.json (common/tokenizer.h) as a store's tokenizer is loaded, and text through it.
// The input is the file, a NUL byte, then a text: the file goes into an in-memory file (memfd)
// that Tokenizer::from_file reads by path; a tokenizer that loads encodes the text, decodes the
// ids, and streams them, whose pieces must add up to the whole decode. Error is the documented
// outcome of a bad file.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

int memfd() {
  static const int fd = memfd_create("tokenizer.json", MFD_CLOEXEC);
  if (fd < 0) fuzz::finding("tokenizer: memfd_create failed");
  return fd;
}

void write_file(const std::string& bytes) {
  const int fd = memfd();
  if (::ftruncate(fd, 0) != 0) fuzz::finding("tokenizer: ftruncate failed");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) fuzz::finding("tokenizer: pwrite to the memfd failed");
    done += static_cast<size_t>(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  write_file(parts[0]);
  fuzz::run_expecting<Error>("tokenizer", [&] {
    const std::unique_ptr<Tokenizer> tok = Tokenizer::from_file("/proc/self/fd/" + std::to_string(memfd()));
    const int32_t n = tok->vocab_size();
    for (bool special : {false, true}) {
      const std::vector<int32_t> ids = tok->encode(parts[1], special);
      for (int32_t id : ids) fuzz::expect(id >= 0 && id < n, "tokenizer: encode gave an id outside the vocabulary");
      for (bool skip : {false, true}) {
        const std::string whole = tok->decode(ids, skip);
        Tokenizer::Stream s = tok->stream(skip);
        std::string pieces;
        for (int32_t id : ids) pieces += s.push(id);
        pieces += s.flush();
        fuzz::expect(pieces == whole, "tokenizer: streamed pieces differ from the whole decode");
      }
    }
    // Every id decodes on its own, and an id past the end is an Error, not a crash.
    for (int32_t id = 0; id < std::min<int32_t>(n, 512); ++id) (void)tok->decode({id});
    bool refused = false;
    try {
      (void)tok->decode({n});
    } catch (const Error&) {
      refused = true;
    }
    fuzz::expect(refused, "tokenizer: decode of an id past the vocabulary did not throw");
  });
  return 0;
}
