// A binary's command line (common/config.h): the flags ConfigLoader adds to a CLI11 app, parsed by
// parse_command_line, then ConfigLoader::load (which also reads --config's file and the
// environment). The input's first byte picks which binaries' keys are declared (loaderd, worker,
// generate, pack in any mix); the rest is argv, one argument per NUL-separated part.
// ConfigError is the documented outcome of a bad command line.
#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/errors.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {
constexpr size_t kMaxArgs = 24;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const unsigned readers = 1u + data[0] % kAllReaders;
  std::vector<std::string> args = fuzz::split_parts(data + 1, size - 1, kMaxArgs);
  while (!args.empty() && args.back().empty()) args.pop_back();
  std::vector<char*> argv;
  std::string prog = "ringllama-fuzz";
  argv.push_back(prog.data());
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  fuzz::run_expecting<ConfigError>("cmdline", [&] {
    CLI::App app("fuzzed command line");
    ConfigLoader loader(readers);
    loader.add_flags(app);
    if (parse_command_line(app, static_cast<int>(argv.size() - 1), argv.data())) return;  // --help
    Config c = loader.load();
    if (loader.print_requested()) (void)loader.describe(c);
  });
  return 0;
}
