// Helpers shared by the test suites: where the binaries and fixtures are, temporary folders,
// running a binary as a real process.
#pragma once

#include <string>
#include <cstdint>
#include <vector>

namespace ringllama::test {

// Each path below is, in order: the environment variable (a build folder copied to another
// machine, at another path, sets it), else the path CMake compiled in when that exists, else one
// found from where this executable is (a build folder that moved along with its sources).

// build/bin: RINGLLAMA_TEST_BIN_DIR, else the build's bin folder, else this executable's folder.
std::string bin_dir();
// tests/data of the source tree: RINGLLAMA_TEST_DATA, else <source>/tests/data, else
// build/bin/../../tests/data.
std::string data_dir();

// A fresh directory removed (with its contents) when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct RunResult {
  int status = -1;      // exit code, or 128 + signal
  std::string out;      // stdout
  std::string err;      // stderr
};

// Runs build/bin/<binary> with args, waits at most timeout_s, captures both streams.
RunResult run_bin(const std::string& binary, const std::vector<std::string>& args, int timeout_s = 300);

std::string read_file(const std::string& path);

// A datagram socket bound at `path` for a service's sd_notify messages (NOTIFY_SOCKET), reads
// timing out after 100 ms; -1 when it cannot be made.
int bind_notify_socket(const std::string& path);
void write_file(const std::string& path, const std::string& text);

// Token ids as the command lines print them: separated by commas or spaces.
std::vector<int64_t> parse_ids(const std::string& text);

// SmolLM2-135M-Instruct's GGUF, fetched once into the build folder (bin/..) by
// scripts/fetch-smollm2.sh, its output in `log`: the path the script printed last; when the script
// failed (no network, say: the caller skips), "" with *why set to what it said.
std::string fetch_smollm2(const std::string& log, std::string* why);

}  // namespace ringllama::test
