// Golden outputs from Hugging Face transformers, end to end as real processes: every fixture under
// tests/data/<name>/ that has golden.json (made by scripts/make-fixtures.py) is packed with
// `ringllama-pack --hf`, decoded greedily with `ringllama-generate --backend cpu --ignore-eos`, and
// compared: the same tokens, and in every logits row max|diff| / max|golden| < 1e-3.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "tests/golden.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

constexpr double kTolerance = 1e-3;  // max|diff| / max|golden| of a row

// Every folder of tests/data with a golden.json, hf/ or not: one without hf/ fails here.
std::vector<std::string> fixture_names() { return test::golden_fixture_names(/*need_hf=*/false); }

std::vector<float> floats_of(const std::string& bytes) {
  std::vector<float> v(bytes.size() / sizeof(float));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));  // little-endian host, as the files are
  return v;
}

using test::join_ids;

// Without this a missing or empty tests/data would leave the parameterised suite with nothing to run.
TEST(GoldenFixtures, AreFound) {
  const auto names = fixture_names();
  EXPECT_FALSE(names.empty()) << "no fixture with golden.json under " << test::data_dir()
                              << " (set RINGLLAMA_TEST_DATA, or make them with scripts/make-fixtures.py)";
  for (const auto& n : names) std::cout << "golden fixture: " << n << "\n";
}

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, MatchesTransformers) {
  const test::Golden g = test::load_golden(GetParam());
  const std::vector<int64_t> prompt(g.prompt_ids.begin(), g.prompt_ids.end());
  const std::vector<int64_t> want_tokens(g.tokens.begin(), g.tokens.end());
  const int64_t vocab = g.vocab_size;
  const int64_t rows = g.rows;
  ASSERT_EQ(static_cast<int64_t>(want_tokens.size()), rows);
  const std::vector<float>& want = g.logits;
  ASSERT_EQ(static_cast<int64_t>(want.size()), rows * vocab) << "golden_logits.bin is not rows x vocab_size float32";

  test::TempDir tmp;
  const std::string store = tmp / "store";
  auto pack = test::run_bin("ringllama-pack", {"--hf", g.hf_dir(), "--out", store, "--quiet"});
  ASSERT_EQ(pack.status, 0) << "ringllama-pack --hf " << g.hf_dir() << " failed:\n" << pack.err << pack.out;

  auto gen = test::run_bin("ringllama-generate",
                           {"--store", store, "--backend", "cpu", "--prompt-ids", join_ids(prompt, ","), "--max-tokens",
                            std::to_string(rows), "--ignore-eos", "--tokens-out", tmp / "t", "--logits-out", tmp / "l"});
  ASSERT_EQ(gen.status, 0) << "ringllama-generate failed:\n" << gen.err << gen.out;

  const std::vector<int64_t> got_tokens = test::parse_ids(test::read_file(tmp / "t"));
  const std::vector<float> got = floats_of(test::read_file(tmp / "l"));
  EXPECT_EQ(got_tokens, want_tokens) << "tokens differ\n  engine:       " << join_ids(got_tokens, " ")
                                     << "\n  transformers: " << join_ids(want_tokens, " ");
  const int64_t got_rows = static_cast<int64_t>(got.size()) / vocab;
  EXPECT_EQ(static_cast<int64_t>(got.size()), rows * vocab) << "the logits file holds " << got.size()
                                                            << " floats, want rows x vocab = " << rows * vocab;

  // Row i is computed from tokens[0..i-1]: rows after the first differing token are not comparable.
  int64_t comparable = std::min(got_rows, rows);
  for (int64_t i = 0; i < comparable && i < static_cast<int64_t>(got_tokens.size()); ++i)
    if (got_tokens[i] != want_tokens[i]) {
      comparable = i + 1;
      break;
    }

  double worst = 0;
  int64_t worst_row = -1;
  int failures = 0;
  for (int64_t r = 0; r < comparable; ++r) {
    const float* w = want.data() + r * vocab;
    const float* x = got.data() + r * vocab;
    double max_golden = 0, max_diff = 0;
    int64_t at = 0;
    bool finite = true;
    for (int64_t v = 0; v < vocab; ++v) {
      max_golden = std::max(max_golden, std::fabs(static_cast<double>(w[v])));
      const double d = std::fabs(static_cast<double>(x[v]) - static_cast<double>(w[v]));
      if (!std::isfinite(x[v])) finite = false;
      if (d > max_diff) {
        max_diff = d;
        at = v;
      }
    }
    const double ratio = finite ? max_diff / max_golden : INFINITY;
    if (ratio > worst || worst_row < 0) {
      worst = ratio;
      worst_row = r;
    }
    if (!(ratio < kTolerance) && ++failures <= 5)
      ADD_FAILURE() << GetParam() << " row " << r << ": max|diff| " << max_diff << " at id " << at << " (engine "
                    << x[at] << ", transformers " << w[at] << "), max|golden| " << max_golden << ", ratio " << ratio
                    << (finite ? "" : " (non-finite logits)") << " >= " << kTolerance;
  }
  std::ostringstream summary;
  summary << "golden " << GetParam() << ": " << comparable << "/" << rows << " rows compared, worst row max|diff|/max|golden| "
          << worst << " (row " << worst_row << "), tokens " << (got_tokens == want_tokens ? "identical" : "DIFFER");
  std::cout << summary.str() << std::endl;
  std::ostringstream w;
  w << worst;
  RecordProperty("worst_row_ratio", w.str());
  RecordProperty("worst_row", std::to_string(worst_row));
  EXPECT_EQ(failures, 0) << failures << " of " << comparable << " rows over the tolerance";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden, ::testing::ValuesIn(fixture_names()), test::FixtureTestName());
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Golden);

}  // namespace
}  // namespace ringllama
