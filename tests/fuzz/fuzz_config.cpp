// The configuration (common/config.h) from outside text: a YAML file, RINGLLAMA_* environment
// variables and flag values, applied the way ConfigLoader::load does and then adapted to a model.
// The input carries the three texts separated by NUL bytes: the file, then NAME=VALUE lines of the
// environment, then key=value lines of flags. ConfigError is the documented outcome of bad input.
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>

#include "common/config.h"
#include "common/errors.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

std::map<std::string, std::string> lines_to_map(const std::string& text) {
  std::map<std::string, std::string> m;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    m[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return m;
}

ModelConfig small_model() {
  ModelConfig m;
  m.dim = 64;
  m.n_layers = 6;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 16;
  m.ffn_dim = 128;
  m.vocab_size = 256;
  m.max_position_embeddings = 512;
  m.eos_ids = {2};
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 3);
  const auto env = lines_to_map(parts[1]);
  // Flags come from CLI11, which only ever hands over keys this binary declared; other keys are
  // still refused with ConfigError, which is what the loader promises.
  const auto flags = lines_to_map(parts[2]);
  // No file at all is a different path through the loader from an empty one.
  std::optional<std::string> file;
  if (!parts[0].empty()) file = parts[0];
  fuzz::run_expecting<ConfigError>("config", [&] {
    ConfigLoader loader(kAllReaders);
    Config c = loader.load_from(file, "fuzz.yaml", env, flags);
    (void)loader.describe(c);
    (void)expand_listen(c);
    loader.adapt_to_model(c, small_model());
    fuzz::expect(c.max_context <= 512, "config: max_context above the model's positions after adapt_to_model");
    fuzz::expect(c.prefill_chunk_tokens <= c.max_context, "config: prefill chunk above max_context after adapt");
    fuzz::expect(c.kv_block_tokens <= c.max_context, "config: kv block above max_context after adapt");
    (void)loader.describe(c);
  });
  return 0;
}
