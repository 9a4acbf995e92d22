#include "tests/golden.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace ringllama::test {

std::vector<std::string> golden_fixture_names(bool need_hf) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(data_dir(), ec))
    if (e.is_directory() && fs::exists(e.path() / "golden.json") && (!need_hf || fs::exists(e.path() / "hf")))
      names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

Golden load_golden(const std::string& name) {
  Golden g;
  g.dir = (fs::path(data_dir()) / name).string();
  const json j = json::parse(read_file(g.dir + "/golden.json"));
  g.prompt_ids = j.at("prompt_ids").get<std::vector<int32_t>>();
  g.tokens = j.at("tokens").get<std::vector<int32_t>>();
  g.vocab_size = j.at("vocab_size").get<int64_t>();
  g.rows = j.at("rows").get<int64_t>();
  const std::string bytes = read_file(g.dir + "/golden_logits.bin");
  g.logits_bytes = bytes.size();
  g.logits.resize(bytes.size() / sizeof(float));
  std::memcpy(g.logits.data(), bytes.data(), g.logits.size() * sizeof(float));  // little-endian host, as the files are
  return g;
}

}  // namespace ringllama::test
