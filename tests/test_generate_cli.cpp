// ringllama-generate end to end, as real processes, on stores made by ringllama-pack (and one
// written here, for the eos rule): output files, determinism, stopping, and bad input.
#include <gtest/gtest.h>

#include <iostream>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <sys/wait.h>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "common/store.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using test::run_bin;

constexpr int64_t kVocab = 512;  // the packer's tiny shape

class GenerateCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    auto r = run_bin("ringllama-pack", {"--random", "tiny", "--out", store(), "--quiet"});
    ASSERT_EQ(r.status, 0) << "ringllama-pack --random tiny failed: " << r.err;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(fs::exists(store() + "/" + kManifestFile)) << "no tiny store"; }

  static std::string store() { return *dir_ / "tiny"; }
  static std::string path(const std::string& name) { return *dir_ / name; }

  static inline test::TempDir* dir_ = nullptr;
};

std::vector<int32_t> ids_of(const std::string& line) {
  std::istringstream in(line);
  std::vector<int32_t> v;
  int32_t x;
  while (in >> x) v.push_back(x);
  return v;
}

std::vector<float> floats_of(const std::string& bytes) {
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

struct Gen {
  test::RunResult r;
  std::vector<int32_t> ids;
  std::string tokens_file;
  std::string logits;  // raw bytes
};

Gen generate(const std::string& store, const std::string& out_dir, std::vector<std::string> extra) {
  std::vector<std::string> args = {"--store",      store, "--tokens-out", out_dir + "/t.txt", "--logits-out",
                                   out_dir + "/l.bin"};
  args.insert(args.end(), extra.begin(), extra.end());
  Gen g;
  g.r = run_bin("ringllama-generate", args);
  g.ids = ids_of(g.r.out);
  if (g.r.status == 0) {
    g.tokens_file = test::read_file(out_dir + "/t.txt");
    g.logits = test::read_file(out_dir + "/l.bin");
  }
  return g;
}

TEST_F(GenerateCli, GreedyWritesOneLogitsRowPerToken) {
  Gen g = generate(store(), dir_->path(), {"--prompt-ids", "1,17,300,42", "--max-tokens", "12", "--ignore-eos"});
  ASSERT_EQ(g.r.status, 0) << g.r.err;
  ASSERT_EQ(g.ids.size(), 12u);
  // stdout: one line of space-separated ids; the file holds the same line.
  EXPECT_EQ(std::count(g.r.out.begin(), g.r.out.end(), '\n'), 1);
  EXPECT_EQ(g.tokens_file, g.r.out);
  EXPECT_NE(g.r.err.find("prefill 4 tokens"), std::string::npos) << g.r.err;
  EXPECT_NE(g.r.err.find("decode 11 tokens"), std::string::npos) << g.r.err;
  ASSERT_EQ(g.logits.size(), 12u * kVocab * 4);
  // Each token is the argmax of its row.
  auto rows = floats_of(g.logits);
  for (size_t i = 0; i < g.ids.size(); ++i) {
    auto row = rows.begin() + i * kVocab;
    EXPECT_EQ(std::max_element(row, row + kVocab) - row, g.ids[i]) << "token " << i;
  }
  // The first row is the prompt's last position, as the engine computes it in this process.
  auto ws = open_store_weights(store());
  Config c;
  c.max_context = 64;
  auto backend = make_cpu_backend(*ws, c);
  auto first = backend->forward({1, 17, 300, 42}, 0);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), rows.begin()));
  auto second = backend->forward({g.ids[0]}, 4);
  EXPECT_TRUE(std::equal(second.begin(), second.end(), rows.begin() + kVocab));
}

TEST_F(GenerateCli, SameSeedSameOutputDifferentSeedDiffers) {
  const std::vector<std::string> common = {"--prompt-ids", "5,6,7", "--max-tokens", "24", "--ignore-eos",
                                           "--temperature", "1.5", "--top-k", "100", "--top-p", "0.95"};
  auto with_seed = [&](const std::string& seed, const std::string& sub) {
    fs::create_directories(path(sub));
    auto args = common;
    args.insert(args.end(), {"--seed", seed});
    return generate(store(), path(sub), args);
  };
  Gen a = with_seed("7", "a"), b = with_seed("7", "b"), c = with_seed("8", "c");
  ASSERT_EQ(a.r.status, 0) << a.r.err;
  ASSERT_EQ(c.r.status, 0) << c.r.err;
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_TRUE(a.logits == b.logits) << "the logits differ";
  EXPECT_EQ(a.ids.size(), 24u);
  EXPECT_NE(a.ids, c.ids);
  EXPECT_EQ(c.logits.size(), c.ids.size() * kVocab * 4);
  // Greedy runs agree with each other too.
  Gen g1 = generate(store(), path("a"), {"--prompt-ids", "5,6,7", "--max-tokens", "8", "--ignore-eos"});
  Gen g2 = generate(store(), path("b"), {"--prompt-ids", "5,6,7", "--max-tokens", "8", "--ignore-eos"});
  EXPECT_EQ(g1.ids, g2.ids);
  EXPECT_TRUE(g1.logits == g2.logits) << "the logits differ";
}

TEST_F(GenerateCli, StopsAtStopIdsKeepingTheStopToken) {
  Gen full = generate(store(), dir_->path(), {"--prompt-ids", "9,10,11", "--max-tokens", "16", "--ignore-eos"});
  ASSERT_EQ(full.r.status, 0) << full.r.err;
  // The first token that did not occur before it: stopping there gives exactly that prefix.
  size_t at = 2;
  while (at < full.ids.size() &&
         std::find(full.ids.begin(), full.ids.begin() + at, full.ids[at]) != full.ids.begin() + at)
    ++at;
  ASSERT_LT(at, full.ids.size()) << "no fresh token in " << full.r.out;
  Gen stopped = generate(store(), dir_->path(),
                         {"--prompt-ids", "9,10,11", "--max-tokens", "16", "--ignore-eos", "--stop-ids",
                          "511," + std::to_string(full.ids[at])});
  ASSERT_EQ(stopped.r.status, 0) << stopped.r.err;
  EXPECT_EQ(stopped.ids, std::vector<int32_t>(full.ids.begin(), full.ids.begin() + at + 1));
  EXPECT_EQ(stopped.logits.size(), (at + 1) * kVocab * 4);
  EXPECT_TRUE(stopped.logits == full.logits.substr(0, stopped.logits.size())) << "the logits differ";
  EXPECT_NE(stopped.r.err.find("stop: stop"), std::string::npos) << stopped.r.err;
}

TEST_F(GenerateCli, StopsAtTheModelsEosUnlessIgnored) {
  // A store whose eos is a token greedy decoding is known to produce.
  const ModelConfig m = test::tiny_config();
  test::TinyModel tm(m, 3, 0.3f);
  const std::string s1 = path("eos1"), s2 = path("eos2");
  fs::create_directories(s1);
  tm.write_store(s1);
  Gen full = generate(s1, dir_->path(), {"--prompt-ids", "4,5", "--max-tokens", "10", "--ignore-eos"});
  ASSERT_EQ(full.r.status, 0) << full.r.err;
  size_t at = 1;
  while (at < full.ids.size() &&
         std::find(full.ids.begin(), full.ids.begin() + at, full.ids[at]) != full.ids.begin() + at)
    ++at;
  ASSERT_LT(at, full.ids.size()) << full.r.out;
  tm.manifest.model.eos_ids = {full.ids[at]};
  fs::create_directories(s2);
  tm.write_store(s2);
  Gen eos = generate(s2, dir_->path(), {"--prompt-ids", "4,5", "--max-tokens", "10"});
  ASSERT_EQ(eos.r.status, 0) << eos.r.err;
  EXPECT_EQ(eos.ids, std::vector<int32_t>(full.ids.begin(), full.ids.begin() + at + 1));
  Gen ignored = generate(s2, dir_->path(), {"--prompt-ids", "4,5", "--max-tokens", "10", "--ignore-eos"});
  EXPECT_EQ(ignored.ids, full.ids);
}

// Rows of logits do not depend on how many tokens share a forward: chunks give the same bytes.
TEST_F(GenerateCli, PrefillInChunksGivesTheSameLogits) {
  fs::create_directories(path("one"));
  fs::create_directories(path("chunks"));
  const std::vector<std::string> args = {"--prompt-ids", "3,1,4,1,5,9,2,6,5", "--max-tokens", "6", "--ignore-eos"};
  Gen one = generate(store(), path("one"), args);
  auto chunked_args = args;
  chunked_args.insert(chunked_args.end(), {"--prefill-chunk-tokens", "4"});
  Gen chunks = generate(store(), path("chunks"), chunked_args);
  ASSERT_EQ(one.r.status, 0) << one.r.err;
  ASSERT_EQ(chunks.r.status, 0) << chunks.r.err;
  EXPECT_EQ(one.ids, chunks.ids);
  EXPECT_TRUE(one.logits == chunks.logits) << "the logits differ";
}

TEST_F(GenerateCli, ContextExactlyAtMaxContextIsAllowed) {
  Gen g = generate(store(), dir_->path(), {"--prompt-ids", "1,2,3", "--max-tokens", "5", "--max-context", "8",
                                           "--kv-block-tokens", "8", "--ignore-eos"});
  ASSERT_EQ(g.r.status, 0) << g.r.err;
  EXPECT_EQ(g.ids.size(), 5u);
}

// Without a GPU (or without CUDA in the build) --backend cuda is one clear error line; with one
// it runs.
TEST_F(GenerateCli, CudaBackendRunsOrSaysWhyNot) {
  auto r = run_bin("ringllama-generate", {"--store", store(), "--prompt-ids", "1", "--max-tokens", "4", "--backend", "cuda"});
  if (r.status == 0) {
    EXPECT_FALSE(r.out.empty());
    return;
  }
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("ringllama-generate: error: --backend cuda", 0), 0u) << r.err;
  std::cout << "[ info ] --backend cuda here: " << r.err;
}

TEST_F(GenerateCli, BadInputIsOneErrorLine) {
  const std::string s = store();
  const std::string missing = path("no-such-store");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--store", s, "--max-tokens", "4"}, "a prompt is required: --prompt-ids"},
      {{"--store", s, "--prompt-ids", "", "--max-tokens", "4"}, "--prompt-ids is empty"},
      {{"--store", s, "--prompt-ids", "1,two", "--max-tokens", "4"}, "'two' is not a token id"},
      {{"--store", s, "--prompt-ids", "1,,2", "--max-tokens", "4"}, "empty id"},
      {{"--store", s, "--prompt-ids", "1,512", "--max-tokens", "4"}, "token id 512 is outside the vocabulary [0, 512)"},
      {{"--store", s, "--prompt-ids", "-1", "--max-tokens", "4"}, "outside the vocabulary"},
      {{"--store", s, "--prompt-ids", "1,2,3", "--max-tokens", "6", "--max-context", "8", "--kv-block-tokens", "8"},
       "plus --max-tokens (6) is over max_context (8)"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "0"}, "--max-tokens must be >= 1"},
      {{"--store", s, "--prompt-ids", "1", "--batch-size", ""},
       "config key 'batch_size' = '' from flag (--batch-size): must be an integer"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--backend", "tpu"}, "--backend 'tpu' is unknown"},
      {{"--store", missing, "--prompt-ids", "1", "--max-tokens", "4"}, "cannot open store"},
      {{"--prompt-ids", "1", "--max-tokens", "4"}, "no store"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--temperature", "-1"}, "temperature must be >= 0"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--top-p", "2"}, "top_p must be in (0, 1]"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--stop-ids", "x"}, "--stop-ids: 'x' is not a token id"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "many"}, "--max-tokens"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--no-such-flag"}, "--no-such-flag"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--max-context", "100000"}, "the model supports 2048"},
      {{"--store", s, "--prompt-ids", "1", "--max-tokens", "4", "--logits-out", missing + "/l.bin"}, "--logits-out"},
  };
  for (const auto& [args, want] : cases) {
    auto r = run_bin("ringllama-generate", args);
    const std::string what = ::testing::PrintToString(args);
    EXPECT_EQ(r.status, 1) << what << "\n" << r.err;
    EXPECT_EQ(r.out, "") << what;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << what << "\n" << r.err;
    EXPECT_EQ(r.err.rfind("ringllama-generate: error: ", 0), 0u) << what << "\n" << r.err;
    EXPECT_NE(r.err.find(want), std::string::npos) << what << "\nwanted: " << want << "\ngot: " << r.err;
  }
}

// --batch-prompts: every line runs together (two at a time here, so the third waits for a place)
// and gets the same tokens and logits bytes as when it runs alone.
TEST_F(GenerateCli, BatchPromptsGiveEachLineWhatItGetsAlone) {
  const std::vector<std::string> lines = {"1,17,300,42", "5 6 7", "9, 10 ,11,12,13,14,15,16,17,18,19,20,21,22"};
  {
    std::ofstream f(path("prompts.txt"));
    for (const auto& l : lines) f << l << "\n";
  }
  const std::string bt = path("bt.txt"), bl = path("bl.bin");
  auto r = run_bin("ringllama-generate", {"--store", store(), "--batch-prompts", path("prompts.txt"), "--max-tokens",
                                          "7", "--ignore-eos", "--batch-size", "2", "--prefill-chunk-tokens", "8",
                                          "--kv-block-tokens", "4", "--tokens-out", bt, "--logits-out", bl});
  ASSERT_EQ(r.status, 0) << r.err;
  std::istringstream out(r.out);
  std::string line;
  std::vector<std::string> out_lines;
  while (std::getline(out, line)) out_lines.push_back(line);
  ASSERT_EQ(out_lines.size(), lines.size()) << r.out;
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string joined;  // the same ids as one --prompt-ids
    for (int32_t id : ids_of(std::regex_replace(lines[i], std::regex(","), " "))) joined += std::to_string(id) + ",";
    joined.pop_back();
    const std::string dir = path("alone" + std::to_string(i));
    fs::create_directories(dir);
    Gen alone = generate(store(), dir, {"--prompt-ids", joined, "--max-tokens", "7", "--ignore-eos"});
    ASSERT_EQ(alone.r.status, 0) << alone.r.err;
    EXPECT_EQ(ids_of(out_lines[i]), alone.ids) << "line " << i;
    EXPECT_EQ(test::read_file(bt + "." + std::to_string(i)), alone.tokens_file) << "line " << i;
    EXPECT_EQ(test::read_file(bl + "." + std::to_string(i)), alone.logits) << "line " << i;
    EXPECT_EQ(alone.logits.size(), 7u * kVocab * 4);
  }
  // A bad line is named.
  {
    std::ofstream f(path("bad.txt"));
    f << "1,2\n3,x\n";
  }
  auto bad = run_bin("ringllama-generate", {"--store", store(), "--batch-prompts", path("bad.txt")});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("line 2: 'x' is not a token id"), std::string::npos) << bad.err;
}

// Every output is checked: a full device is an error, never exit 0 with nothing written.
TEST_F(GenerateCli, FullOutputsFailInsteadOfExitingZero) {
  ASSERT_TRUE(fs::exists("/dev/full"));
  for (const char* flag : {"--logits-out", "--tokens-out"}) {
    auto r = run_bin("ringllama-generate",
                     {"--store", store(), "--backend", "cpu", "--prompt-ids", "1,2", "--max-tokens", "2", flag, "/dev/full"});
    EXPECT_EQ(r.status, 1) << flag;
    EXPECT_NE(r.err.find(std::string(flag) + " /dev/full: "), std::string::npos) << r.err;
  }
  // stdout itself on a full device.
  const std::string cmd = test::bin_dir() + "/ringllama-generate --store " + store() +
                          " --backend cpu --prompt-ids 1,2 --max-tokens 2 >/dev/full 2>/dev/null";
  const int st = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 1) << "ids lost on a full stdout";
}

// Numbers that would wrap: refused up front, not run.
TEST_F(GenerateCli, HugeAndNegativeNumbersAreRefused) {
  auto r = run_bin("ringllama-generate", {"--store", store(), "--backend", "cpu", "--prompt-ids", "1,2",
                                          "--max-tokens", "9223372036854775807"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("over max_context"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  r = run_bin("ringllama-generate", {"--store", store(), "--backend", "cpu", "--prompt-ids", "1,2", "--seed", "-5"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--seed"), std::string::npos) << r.err;
}

TEST_F(GenerateCli, HelpExitsZero) {
  auto r = run_bin("ringllama-generate", {"--help"});
  EXPECT_EQ(r.status, 0);
  for (const char* flag : {"--prompt-ids", "--max-tokens", "--stop-ids", "--logits-out", "--config", "--print-config",
                           "--max-context", "--store"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
}

}  // namespace
}  // namespace ringllama
