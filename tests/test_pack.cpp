// ringllama-pack on Hugging Face folders: values survive the round trip in every input dtype,
// shards, tied and untied models, tokenizer files, every bad input refused with one clear line
// and nothing left behind, --force, and --verify catching damaged stores.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "common/errors.h"
#include "common/store.h"
#include "daemon/pack.h"
#include "tests/test_pack_fixtures.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace ringllama {
namespace {

using test::HfModelSpec;
using test::TempDir;
using Expected = std::map<std::string, std::vector<bf16_t>>;

PackOptions quiet_options(const std::string& out) {
  PackOptions o;
  o.out = out;
  o.progress = false;
  return o;
}

// Every tensor of the store equals the bf16-rounded input; padding is zero.
void expect_store_holds(const std::string& dir, const Expected& expected) {
  Store s = Store::open(dir);
  for (const GroupEntry& g : s.manifest().groups) {
    std::unique_ptr<char[]> buf(new char[g.size]);
    s.read_group(g, buf.get());
    uint64_t covered = 0;
    for (const TensorEntry& t : g.tensors) {
      const std::string hf = hf_tensor_name(g, t.name);
      auto it = expected.find(hf);
      ASSERT_NE(it, expected.end()) << hf;
      ASSERT_EQ(static_cast<uint64_t>(t.numel()), it->second.size()) << hf;
      ASSERT_EQ(std::memcmp(buf.get() + t.offset, it->second.data(), t.size), 0) << hf;
      for (uint64_t b = covered; b < t.offset; ++b) ASSERT_EQ(buf[b], 0) << "padding before " << hf;
      covered = t.offset + t.size;
    }
    for (uint64_t b = covered; b < g.size; ++b) ASSERT_EQ(buf[b], 0) << "padding at the end of " << g.label();
  }
}

// Nothing named STORE, STORE.tmp-* or STORE.old-* in the output's directory.
void expect_nothing_left(const std::string& out) {
  const fs::path p(out);
  EXPECT_FALSE(fs::exists(p)) << out;
  for (const auto& e : fs::directory_iterator(p.parent_path())) {
    const std::string name = e.path().filename().string();
    EXPECT_NE(name.rfind(p.filename().string() + ".", 0), 0u) << "left behind: " << name;
  }
}

// One line on stderr: "ringllama-pack: error: ..." (the log line before it, if any, aside).
std::string error_line(const test::RunResult& r) {
  std::string last;
  size_t count = 0;
  std::istringstream in(r.err);
  for (std::string line; std::getline(in, line);)
    if (line.rfind("ringllama-pack: error: ", 0) == 0) {
      last = line;
      ++count;
    }
  EXPECT_EQ(count, 1u) << r.err;
  return last;
}

class PackRoundTrip : public ::testing::TestWithParam<const char*> {};

TEST_P(PackRoundTrip, StoreHoldsTheRoundedInput) {
  TempDir d;
  fs::create_directory(d / "hf");
  HfModelSpec s;
  s.dtype = GetParam();
  Expected expected = test::write_tiny_hf(d / "hf", s);
  WriteResult r = pack_hf(d / "hf", quiet_options(d / "store"));
  EXPECT_EQ(r.manifest.groups.size(), 5u);
  expect_store_holds(d / "store", expected);

  Store st = Store::open(d / "store");
  const ModelConfig& m = st.model();
  EXPECT_EQ(m.dim, 32);
  EXPECT_EQ(m.n_layers, 2);
  EXPECT_EQ(m.n_heads, 4);
  EXPECT_EQ(m.n_kv_heads, 2);
  EXPECT_EQ(m.head_dim, 8);
  EXPECT_EQ(m.ffn_dim, 48);
  EXPECT_EQ(m.vocab_size, 40);
  EXPECT_EQ(m.rope_scaling.type, "llama3");
  EXPECT_EQ(m.eos_ids, (std::vector<int64_t>{2, 3}));
  EXPECT_FALSE(m.tie_word_embeddings);
  EXPECT_NE(st.manifest().globals().find("output"), nullptr);
  expect_nothing_left(d / "other");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PackRoundTrip, ::testing::Values("F32", "F16", "BF16"));

TEST(Pack, ShardedCheckpointThroughTheBinary) {
  TempDir d;
  fs::create_directory(d / "hf");
  HfModelSpec s;
  s.dtype = "BF16";
  s.shards = 3;
  Expected expected = test::write_tiny_hf(d / "hf", s);
  ASSERT_FALSE(fs::exists(d / "hf/model.safetensors"));
  test::RunResult r = test::run_bin("ringllama-pack", {"--hf", d / "hf", "--out", d / "store"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("5 groups"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("MB/s"), std::string::npos) << r.out;
  expect_store_holds(d / "store", expected);
}

TEST(Pack, BothConfigFormsGiveTheSameStore) {
  TempDir d;
  for (bool tf5 : {false, true}) {
    const std::string hf = d / (tf5 ? "hf5" : "hf4");
    fs::create_directory(hf);
    HfModelSpec s;
    s.transformers5 = tf5;
    test::write_tiny_hf(hf, s);
    pack_hf(hf, quiet_options(d / (tf5 ? "s5" : "s4")));
  }
  EXPECT_EQ(test::read_file(d / "s4/weights.bin"), test::read_file(d / "s5/weights.bin"));
  Manifest a = Manifest::load(d / "s4/manifest.yaml"), b = Manifest::load(d / "s5/manifest.yaml");
  a.source = b.source;
  EXPECT_EQ(a.to_yaml(), b.to_yaml());
}

TEST(Pack, TiedModelIgnoresAnLmHead) {
  for (bool with_head : {false, true}) {
    TempDir d;
    fs::create_directory(d / "hf");
    HfModelSpec s;
    s.tied = true;
    s.lm_head_when_tied = with_head;
    Expected expected = test::write_tiny_hf(d / "hf", s);
    pack_hf(d / "hf", quiet_options(d / "store"));
    Store st = Store::open(d / "store");
    EXPECT_TRUE(st.model().tie_word_embeddings);
    EXPECT_EQ(st.manifest().globals().tensors.size(), 2u);
    EXPECT_EQ(st.manifest().globals().find("output"), nullptr);
    expect_store_holds(d / "store", expected);
  }
}

TEST(Pack, TokenizerFilesAreCopiedAndListed) {
  TempDir d;
  fs::create_directory(d / "hf");
  test::write_tiny_hf(d / "hf", HfModelSpec{});
  test::write_file(d / "hf/tokenizer.json", "{\"model\": {}}");
  test::write_file(d / "hf/tokenizer_config.json", "{\"bos_token\": \"<s>\"}");
  test::write_file(d / "hf/generation_config.json", "{\"temperature\": 0.6}");
  test::write_file(d / "hf/README.md", "not copied");
  pack_hf(d / "hf", quiet_options(d / "store"));
  Store st = Store::open(d / "store");
  EXPECT_EQ(st.manifest().tokenizer_files,
            (std::vector<std::string>{"tokenizer.json", "tokenizer_config.json", "generation_config.json"}));
  EXPECT_EQ(test::read_file(d / "store/tokenizer.json"), "{\"model\": {}}");
  EXPECT_EQ(test::read_file(d / "store/generation_config.json"), "{\"temperature\": 0.6}");
  EXPECT_FALSE(fs::exists(d / "store/README.md"));
}

struct BadInput {
  const char* name;
  std::function<void(const std::string& hf)> setup;  // given an empty folder
  std::vector<const char*> expect;                   // all in the error line
};

void write_ok(const std::string& hf) { test::write_tiny_hf(hf, HfModelSpec{}); }

void edit_config(const std::string& hf, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json c = test::tiny_config(HfModelSpec{});
  edit(c);
  test::write_file(hf + "/config.json", c.dump());
}

TEST(Pack, BadInputsFailWithOneLineAndLeaveNothing) {
  std::vector<BadInput> cases = {
      {"missing config.json",
       [](const std::string& hf) {
         write_ok(hf);
         fs::remove(hf + "/config.json");
       },
       {"config.json: cannot open"}},
      {"malformed config.json",
       [](const std::string& hf) {
         write_ok(hf);
         test::write_file(hf + "/config.json", "{\"hidden_size\": 32,");
       },
       {"config.json: not valid JSON"}},
      {"unsupported architecture",
       [](const std::string& hf) {
         write_ok(hf);
         edit_config(hf, [](auto& c) { c["architectures"] = {"MistralForCausalLM"}; });
       },
       {"config.json", "'architectures'", "MistralForCausalLM"}},
      {"unsupported rope type",
       [](const std::string& hf) {
         write_ok(hf);
         edit_config(hf, [](auto& c) { c["rope_scaling"]["rope_type"] = "yarn"; });
       },
       {"config.json", "'rope_scaling.rope_type' is 'yarn'"}},
      {"missing tensor",
       [](const std::string& hf) { test::write_tiny_hf(hf, HfModelSpec{}, "model.layers.1.mlp.up_proj.weight"); },
       {"tensor 'model.layers.1.mlp.up_proj.weight' is missing"}},
      {"untied without lm_head",
       [](const std::string& hf) { test::write_tiny_hf(hf, HfModelSpec{}, "lm_head.weight"); },
       {"'lm_head.weight' is missing", "tie_word_embeddings false"}},
      {"shape mismatch",
       [](const std::string& hf) { test::write_tiny_hf(hf, HfModelSpec{}, "", "model.layers.0.self_attn.k_proj.weight"); },
       {"'model.layers.0.self_attn.k_proj.weight' has shape [16, 33], config.json expects [16, 32]"}},
      {"unsupported dtype I8",
       [](const std::string& hf) {
         HfModelSpec s;
         s.dtype_of["model.norm.weight"] = "I8";
         test::write_tiny_hf(hf, s);
       },
       {"'model.norm.weight' has dtype I8"}},
      {"unsupported dtype F64",
       [](const std::string& hf) {
         HfModelSpec s;
         s.dtype_of["model.layers.0.mlp.down_proj.weight"] = "F64";
         test::write_tiny_hf(hf, s);
       },
       {"'model.layers.0.mlp.down_proj.weight' has dtype F64"}},
      {"truncated safetensors",
       [](const std::string& hf) {
         write_ok(hf);
         fs::resize_file(hf + "/model.safetensors", fs::file_size(hf + "/model.safetensors") - 10);
       },
       {"model.safetensors: tensor '", "run beyond the end of the file"}},
      {"header length beyond the file",
       [](const std::string& hf) {
         write_ok(hf);
         std::fstream f(hf + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
         f.write("\xff\xff\xff\x00\x00\x00\x00\x00", 8);
       },
       {"model.safetensors: header length 16777215 runs beyond the end of the file"}},
      {"header offsets not matching the shape",
       [](const std::string& hf) {
         write_ok(hf);
         std::string b = test::read_file(hf + "/model.safetensors");
         // The embedding's [40, 32] becomes [40, 31]: same bytes, fewer elements.
         size_t at = b.find("[40,32]");
         ASSERT_NE(at, std::string::npos);
         b.replace(at, 7, "[40,31]");
         test::write_file(hf + "/model.safetensors", b);
       },
       {"model.safetensors: tensor '", "needs"}},
      {"no weights", [](const std::string& hf) { edit_config(hf, [](auto&) {}); },
       {"no model.safetensors or model.safetensors.index.json"}},
      {"index names a missing shard",
       [](const std::string& hf) {
         HfModelSpec s;
         s.shards = 2;
         test::write_tiny_hf(hf, s);
         fs::remove(hf + "/model-00002-of-00002.safetensors");
       },
       {"model-00002-of-00002.safetensors: cannot open"}},
      {"index points outside the folder",
       [](const std::string& hf) {
         HfModelSpec s;
         s.shards = 2;
         test::write_tiny_hf(hf, s);
         test::write_file(hf + "/model.safetensors.index.json",
                          R"({"weight_map": {"model.norm.weight": "../model-00001-of-00002.safetensors"}})");
       },
       {"not a file beside the index"}},
  };
  for (const BadInput& c : cases) {
    SCOPED_TRACE(c.name);
    TempDir d;
    fs::create_directory(d / "hf");
    c.setup(d / "hf");
    test::RunResult r = test::run_bin("ringllama-pack", {"--hf", d / "hf", "--out", d / "store"});
    EXPECT_EQ(r.status, 1) << r.err;
    std::string line = error_line(r);
    for (const char* e : c.expect) EXPECT_NE(line.find(e), std::string::npos) << line;
    expect_nothing_left(d / "store");
  }
}

TEST(Pack, CommandLineMistakes) {
  TempDir d;
  fs::create_directory(d / "hf");
  write_ok(d / "hf");
  std::vector<std::pair<std::vector<std::string>, const char*>> cases = {
      {{"--hf", d / "hf"}, "--out"},
      {{"--hf", d / "hf", "--random", "tiny", "--out", d / "s"}, "excludes"},
      {{"--random", "llama-9"}, "--out"},
      {{"--random", "llama-9", "--out", d / "s"}, "unknown random shape 'llama-9'"},
      {{"--random", "tiny", "--out", d / "missing/s"}, "parent directory does not exist"},
      {{"--random", "tiny", "--layers", "0", "--out", d / "s"}, "--layers"},
      {{}, "give one of"},
      {{"--verify", d / "nothing"}, "cannot open store"},
  };
  for (const auto& [args, expect] : cases) {
    test::RunResult r = test::run_bin("ringllama-pack", args);
    EXPECT_EQ(r.status, 1) << fmt::format("{}", fmt::join(args, " "));
    EXPECT_NE(error_line(r).find(expect), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(d / "s"));
  test::RunResult help = test::run_bin("ringllama-pack", {"--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("--random"), std::string::npos);
}

TEST(Pack, ExistingOutputNeedsForce) {
  TempDir d;
  fs::create_directory(d / "hf");
  write_ok(d / "hf");
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--seed", "3", "--out", d / "store"}).status, 0);
  const std::string weights = test::read_file(d / "store/weights.bin");
  const std::string manifest = test::read_file(d / "store/manifest.yaml");

  test::RunResult r = test::run_bin("ringllama-pack", {"--hf", d / "hf", "--out", d / "store"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(error_line(r).find("already exists"), std::string::npos);
  EXPECT_EQ(test::read_file(d / "store/weights.bin"), weights);
  EXPECT_EQ(test::read_file(d / "store/manifest.yaml"), manifest);

  r = test::run_bin("ringllama-pack", {"--hf", d / "hf", "--out", d / "store/", "--force"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(test::read_file(d / "store/manifest.yaml"), manifest);
  EXPECT_EQ(Store::open(d / "store").model().dim, 32);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(d.path())) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"hf", "store"}));
}

// --force replaces a store or an empty directory, never a folder of other files or a file.
TEST(Pack, ForceReplacesOnlyAStoreOrAnEmptyDirectory) {
  TempDir d;
  fs::create_directory(d / "photos");
  test::write_file(d / "photos/cat.jpg", "not a store");
  test::write_file(d / "notes.txt", "keep me");
  for (const std::string& out : {d / "photos", d / "notes.txt"}) {
    const test::RunResult r =
        test::run_bin("ringllama-pack", {"--random", "tiny", "--out", out, "--force", "--quiet"});
    EXPECT_EQ(r.status, 1) << out;
    EXPECT_NE(error_line(r).find("--force replaces only a store"), std::string::npos) << r.err;
  }
  EXPECT_EQ(test::read_file(d / "photos/cat.jpg"), "not a store");
  EXPECT_EQ(test::read_file(d / "notes.txt"), "keep me");
  fs::create_directory(d / "empty");
  EXPECT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--out", d / "empty", "--force", "--quiet"}).status,
            0);
  EXPECT_TRUE(fs::exists(d / "empty/manifest.yaml"));
}

class Verify : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directory(d_ / "hf");
    write_ok(d_ / "hf");
    pack_hf(d_ / "hf", quiet_options(store()));
  }
  std::string store() const { return d_ / "store"; }
  TempDir d_;
};

TEST_F(Verify, GoodStorePasses) {
  test::RunResult r = test::run_bin("ringllama-pack", {"--verify", store()});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find(store() + ": 5 groups, "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("all checksums match"), std::string::npos) << r.out;
}

TEST_F(Verify, FlippedByteIsFoundAndNamed) {
  Manifest m = Manifest::load(store() + "/manifest.yaml");
  const GroupEntry& g = m.attn(1);
  const uint64_t at = g.offset + g.tensor("wk").offset + 5;
  {
    std::fstream f(store() + "/weights.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    char c = 0;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&c, 1);
  }
  test::RunResult r = test::run_bin("ringllama-pack", {"--verify", store()});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find(fmt::format("layer 1 attn at offset {}", g.offset)), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 of 5 groups fail"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("all checksums match"), std::string::npos);
}

TEST_F(Verify, TruncatedWeightsFailToOpen) {
  fs::resize_file(store() + "/weights.bin", fs::file_size(store() + "/weights.bin") - 4096);
  test::RunResult r = test::run_bin("ringllama-pack", {"--verify", store()});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(error_line(r).find("weights.bin"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("truncated"), std::string::npos) << r.err;
}

TEST_F(Verify, ManifestWithAWrongShapeFailsToOpen) {
  std::string text = test::read_file(store() + "/manifest.yaml");
  const size_t at = text.find("shape: [16, 32]");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 15, "shape: [16, 31]");
  test::write_file(store() + "/manifest.yaml", text);
  test::RunResult r = test::run_bin("ringllama-pack", {"--verify", store()});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(error_line(r).find("manifest.yaml"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("'wk'"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace ringllama
