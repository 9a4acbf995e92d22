// GGUF round trip: tests/gguf_fixture.py writes the golden fixtures (tests/data/<name>/hf) as GGUF
// files with the `gguf` package, q/k rows permuted as llama.cpp's converter does, and
// `ringllama-pack --gguf` must give back
//   - F32 and BF16: a weights.bin byte for byte the one `--hf` packs, and through the CPU backend
//     the tokens and logits transformers computed (llama3 rope scaling recovered from rope_freqs);
//   - F16 and the quantized types: in every element, the bf16 of what gguf.quants.dequantize gives
//     (F16 exactly, quantized within one bf16 step).
// The tokenizer check (gguf_fixture.py tokenizer) loads the converted tokenizer.json with HF
// tokenizers and encodes a corpus as a reference tokenizer built with the right pre-tokenizer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/store.h"
#include "daemon/pack.h"
#include "tests/golden.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;

std::string source_dir() { return fs::path(test::data_dir()).parent_path().parent_path().string(); }

// Runs a shell command; its output goes to `log`. Returns the exit status.
int shell(const std::string& cmd, const std::string& log) { return std::system((cmd + " > " + log + " 2>&1").c_str()); }

// Skips the test where python3 or its gguf/tokenizers packages are missing (scripts/install-deps.sh
// installs them).
bool python_ready(std::string* why) {
  test::TempDir tmp;
  if (shell("python3 -c 'import gguf, tokenizers, numpy'", tmp / "log") == 0) return true;
  *why = test::read_file(tmp / "log");
  return false;
}

#define REQUIRE_PYTHON()                                                                            \
  do {                                                                                              \
    std::string why;                                                                                \
    if (!python_ready(&why)) GTEST_SKIP() << "python3 with gguf, tokenizers and numpy is needed: " << why; \
  } while (0)

// Writes the GGUF (and the expected values) with gguf_fixture.py; fails the test on error.
void make_gguf(const std::vector<std::string>& args, const test::TempDir& tmp) {
  std::string cmd = "python3 " + source_dir() + "/tests/gguf_fixture.py";
  for (const auto& a : args) cmd += " '" + a + "'";
  const int rc = shell(cmd, tmp / "py.log");
  ASSERT_EQ(rc, 0) << cmd << "\n" << test::read_file(tmp / "py.log");
}

std::vector<float> read_f32(const std::string& path) {
  const std::string b = test::read_file(path);
  std::vector<float> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

// Distance in bf16 steps (same sign assumed where it matters: values near 0 differ by few steps).
int64_t bf16_steps(bf16_t a, bf16_t b) {
  auto key = [](bf16_t x) { return (x & 0x8000) ? -static_cast<int64_t>(x & 0x7FFF) : static_cast<int64_t>(x); };
  return std::llabs(key(a) - key(b));
}

// Compares every stored tensor with the expected values; returns the largest distance in bf16
// steps, and counts the elements that differ at all.
int64_t compare_store(const std::string& store_dir, const std::string& expected_dir, uint64_t* differing,
                      uint64_t* elements) {
  const Store s = Store::open(store_dir);
  int64_t worst = 0;
  for (const GroupEntry& g : s.manifest().groups) {
    std::vector<char> buf(g.size);
    s.read_group(g, buf.data());
    for (const TensorEntry& t : g.tensors) {
      const std::string hf = hf_tensor_name(g, t.name);
      const std::vector<float> want = read_f32(expected_dir + "/" + hf + ".f32");
      EXPECT_EQ(static_cast<int64_t>(want.size()), t.numel()) << hf;
      if (static_cast<int64_t>(want.size()) != t.numel()) continue;
      const auto* got = reinterpret_cast<const bf16_t*>(buf.data() + t.offset);
      for (size_t i = 0; i < want.size(); ++i) {
        const int64_t d = bf16_steps(got[i], f32_to_bf16(want[i]));
        if (d) ++*differing;
        worst = std::max(worst, d);
      }
      *elements += want.size();
    }
  }
  return worst;
}

class GgufRoundTrip : public ::testing::TestWithParam<std::string> {};

// F32 and BF16: the store is the HF path's, byte for byte, and decodes as transformers did.
TEST_P(GgufRoundTrip, LosslessTypesMatchTheHfPathAndTheGoldenLogits) {
  REQUIRE_PYTHON();
  const test::Golden g = test::load_golden(GetParam());
  test::TempDir tmp;
  auto hf = test::run_bin("ringllama-pack", {"--hf", g.hf_dir(), "--out", tmp / "hf", "--quiet"});
  ASSERT_EQ(hf.status, 0) << hf.err;
  for (const std::string type : {"F32", "BF16"}) {
    SCOPED_TRACE(type);
    const std::string gguf = tmp / (type + ".gguf"), store = tmp / type;
    make_gguf({"model", g.hf_dir(), gguf, type, tmp / ("exp-" + type)}, tmp);
    auto p = test::run_bin("ringllama-pack", {"--gguf", gguf, "--out", store, "--quiet"});
    ASSERT_EQ(p.status, 0) << p.err;
    EXPECT_TRUE(test::read_file(tmp / "hf/weights.bin") == test::read_file(store + "/weights.bin"))
        << "weights.bin differs from the --hf store";
    const ModelConfig a = Store::open(tmp / "hf").model(), b = Store::open(store).model();
    EXPECT_EQ(a.dim, b.dim);
    EXPECT_EQ(a.n_layers, b.n_layers);
    EXPECT_EQ(a.n_heads, b.n_heads);
    EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
    EXPECT_EQ(a.head_dim, b.head_dim);
    EXPECT_EQ(a.ffn_dim, b.ffn_dim);
    EXPECT_EQ(a.vocab_size, b.vocab_size);
    EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
    EXPECT_EQ(a.norm_eps, b.norm_eps);
    EXPECT_EQ(a.rope_theta, b.rope_theta);
    EXPECT_EQ(a.rope_scaling.type, b.rope_scaling.type);
    EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
    EXPECT_EQ(a.bos_id, b.bos_id);
    EXPECT_EQ(a.eos_ids, b.eos_ids);
    const std::vector<double> fa = rope_inv_freq(a), fb = rope_inv_freq(b);
    ASSERT_EQ(fa.size(), fb.size());
    for (size_t i = 0; i < fa.size(); ++i) EXPECT_NEAR(fa[i], fb[i], 1e-6 * fa[i]) << "rope frequency " << i;
  }

  // The F32 store through the CPU backend: transformers' greedy tokens and logits.
  const std::vector<int64_t> prompt(g.prompt_ids.begin(), g.prompt_ids.end());
  auto gen = test::run_bin("ringllama-generate",
                           {"--store", tmp / "F32", "--backend", "cpu", "--prompt-ids", test::join_ids(prompt, ","),
                            "--max-tokens", std::to_string(g.rows), "--ignore-eos", "--tokens-out", tmp / "t",
                            "--logits-out", tmp / "l"});
  ASSERT_EQ(gen.status, 0) << gen.err;
  const std::vector<int64_t> want(g.tokens.begin(), g.tokens.end());
  EXPECT_EQ(test::parse_ids(test::read_file(tmp / "t")), want);
  const std::vector<float> got = read_f32(tmp / "l");
  ASSERT_EQ(static_cast<int64_t>(got.size()), g.rows * g.vocab_size);
  double worst = 0;
  for (int64_t r = 0; r < g.rows; ++r) {
    double max_golden = 0, max_diff = 0;
    for (int64_t v = 0; v < g.vocab_size; ++v) {
      max_golden = std::max(max_golden, std::fabs(static_cast<double>(g.row(r)[v])));
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[r * g.vocab_size + v]) - g.row(r)[v]));
    }
    worst = std::max(worst, max_diff / max_golden);
  }
  EXPECT_LT(worst, 1e-3);
  std::cout << "gguf " << GetParam() << ": F32/BF16 weights.bin identical to --hf, worst logits row "
            << "max|diff|/max|golden| " << worst << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GgufRoundTrip, ::testing::ValuesIn(test::golden_fixture_names()),
                         test::FixtureTestName());
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(GgufRoundTrip);

// F16 and the quantized types, against gguf.quants.dequantize of the same values.
class GgufDequantTypes : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufDequantTypes, MatchGgufQuants) {
  REQUIRE_PYTHON();
  const std::string type = GetParam();
  const bool kquant = type == "Q4_K" || type == "Q6_K";
  test::TempDir tmp;
  const std::string gguf = tmp / "m.gguf", store = tmp / "store", exp = tmp / "exp";
  if (kquant) {
    make_gguf({"synthetic", gguf, type, exp}, tmp);
  } else {  // dim 96: whole 32-element blocks; the ffn rows (248) stay F32 as a mixed file
    make_gguf({"model", test::data_dir() + "/llama31_gqa_untied/hf", gguf, type, exp}, tmp);
  }
  auto p = test::run_bin("ringllama-pack", {"--gguf", gguf, "--out", store, "--quiet"});
  ASSERT_EQ(p.status, 0) << p.err;
  uint64_t differing = 0, elements = 0;
  const int64_t worst = compare_store(store, exp, &differing, &elements);
  EXPECT_GT(elements, 0u);
  if (type == "F16") {
    EXPECT_EQ(worst, 0) << differing << " of " << elements << " elements differ";
  } else {
    EXPECT_LE(worst, 1) << differing << " of " << elements << " elements differ";
  }
  std::cout << "gguf " << type << ": " << elements << " elements, " << differing
            << " differ from bf16(gguf.quants.dequantize), by at most " << worst << " bf16 step(s)" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Types, GgufDequantTypes,
                         ::testing::Values("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"));

TEST(GgufTokenizer, EncodesAsTheReferenceTokenizer) {
  REQUIRE_PYTHON();
  test::TempDir tmp;
  const std::string cmd = "python3 " + source_dir() + "/tests/gguf_fixture.py tokenizer " + test::bin_dir() +
                          "/ringllama-pack " + tmp.path();
  const int rc = shell(cmd, tmp / "log");
  const std::string log = test::read_file(tmp / "log");
  std::cout << log;
  EXPECT_EQ(rc, 0) << log;
  for (const char* pre : {"smollm: ", "llama-bpe: ", "gpt2: "})
    EXPECT_NE(log.find(std::string(pre)), std::string::npos) << pre << "missing from\n" << log;
  EXPECT_EQ(log.find("differences"), std::string::npos) << log;
}

}  // namespace
}  // namespace ringllama
