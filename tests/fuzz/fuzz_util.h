// Shared by the fuzz targets (tests/fuzz/fuzz_*.cpp): each defines LLVMFuzzerTestOneInput and
// feeds its bytes to one parser the way the program does. The documented error of that parser is
// the expected outcome of bad input; anything else (another exception, a crash, a sanitizer
// report, a broken round trip) is a finding and aborts, so that libFuzzer and the replay test
// (replay_main.cpp) both see it.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

namespace ringllama::fuzz {

// A finding: say what broke, then abort (libFuzzer saves the input; the replay test fails).
[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) finding(what);
}

// Runs `body`; the parser's documented error type E is fine, any other exception is a finding.
template <typename E, typename F>
void run_expecting(const char* target, F&& body) {
  try {
    body();
  } catch (const E&) {
  } catch (const std::exception& e) {
    finding(std::string(target) + ": undocumented exception escaped: " + e.what());
  } catch (...) {
    finding(std::string(target) + ": non-standard exception escaped");
  }
}

// Splits an input into `n` parts at NUL bytes (the last part keeps any further NULs), so one
// input can carry several texts: a file, its environment, its flags.
inline std::vector<std::string> split_parts(const uint8_t* data, size_t size, size_t n) {
  std::vector<std::string> parts;
  std::string_view s(reinterpret_cast<const char*>(data), size);
  while (parts.size() + 1 < n) {
    const size_t z = s.find('\0');
    if (z == std::string_view::npos) break;
    parts.emplace_back(s.substr(0, z));
    s.remove_prefix(z + 1);
  }
  parts.emplace_back(s);
  parts.resize(n);
  return parts;
}

}  // namespace ringllama::fuzz
