// The golden fixtures of tests/data (see tests/data/README.md): Hugging Face checkpoints with the
// greedy tokens and logits transformers computes for them.
#pragma once

#include <cctype>
#include <cstdint>
#include <string>
#include <vector>

namespace ringllama::test {

// One fixture's golden.json and golden_logits.bin.
struct Golden {
  std::string dir;                 // tests/data/<name>
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> tokens;     // greedy, eos ignored: tokens[i] is the argmax of logits row i
  int64_t vocab_size = 0;
  int64_t rows = 0;
  std::vector<float> logits;       // golden_logits.bin as float32 (whole floats only); rows x vocab_size when sound
  size_t logits_bytes = 0;         // size of golden_logits.bin

  std::string hf_dir() const { return dir + "/hf"; }
  const float* row(int64_t r) const { return logits.data() + r * vocab_size; }
};

// The folders of tests/data that hold golden.json and hf/ (with need_hf false: every folder that
// holds golden.json), sorted.
std::vector<std::string> golden_fixture_names(bool need_hf = true);

// Reads tests/data/<name>/golden.json and golden_logits.bin; throws where either cannot be read.
Golden load_golden(const std::string& name);

// "1,2,3" from {1, 2, 3} and ",".
template <typename Int>
std::string join_ids(const std::vector<Int>& ids, const char* sep) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? sep : "") + std::to_string(ids[i]);
  return s;
}

// The name of a test over a fixture: every character but letters and digits becomes '_'.
struct FixtureTestName {
  template <typename ParamInfo>
  std::string operator()(const ParamInfo& info) const {
    std::string n = info.param;
    for (char& c : n)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    return n;
  }
};

}  // namespace ringllama::test
