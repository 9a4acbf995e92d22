// The manifest and the store reader: layout rules, YAML round trip, every malformed manifest
// refused with a StoreError, checksums checked on read.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <vector>

#include "common/errors.h"
#include "common/manifest.h"
#include "common/store.h"
#include "tests/test_util.h"

using namespace ringllama;

namespace {

ModelConfig small_model() {
  ModelConfig m;
  m.dim = 72;
  m.n_layers = 3;
  m.n_heads = 3;
  m.n_kv_heads = 1;
  m.head_dim = 24;
  m.ffn_dim = 200;
  m.vocab_size = 301;
  m.max_position_embeddings = 512;
  m.rope_theta = 500000;
  m.rope_scaling = {"llama3", 8, 1, 4, 64};
  m.bos_id = 1;
  m.eos_ids = {2, 3};
  return m;
}

// Writes a store whose weights are a deterministic byte pattern, with correct checksums.
Manifest write_store(const std::string& dir, const ModelConfig& m) {
  Manifest man = Manifest::plan(m, "test");
  std::vector<char> bytes(man.weights_size);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>((i * 131 + 7) & 0xFF);
  for (auto& g : man.groups) g.xxh3 = checksum(bytes.data() + g.offset, g.size);
  test::write_file(dir + "/weights.bin", std::string(bytes.begin(), bytes.end()));
  man.save(dir + "/manifest.yaml");
  return man;
}

}  // namespace

TEST(Manifest, LayoutIsAlignedAndAdjacent) {
  Manifest man = Manifest::plan(small_model(), "test");
  ASSERT_EQ(man.groups.size(), 1u + 2 * 3);
  uint64_t at = 0;
  for (const auto& g : man.groups) {
    EXPECT_EQ(g.offset, at) << g.label();
    EXPECT_EQ(g.offset % kGroupAlign, 0u) << g.label();
    EXPECT_EQ(g.size % kGroupAlign, 0u) << g.label();
    uint64_t end = 0;
    for (const auto& t : g.tensors) {
      EXPECT_EQ(t.offset % kTensorAlign, 0u) << t.name;
      EXPECT_GE(t.offset, end) << t.name;
      EXPECT_EQ(t.size, static_cast<uint64_t>(t.numel()) * 2) << t.name;
      end = t.offset + t.size;
    }
    EXPECT_LE(end, g.size);
    EXPECT_GT(end + kGroupAlign, g.size) << "more than one page of padding in " << g.label();
    at += g.size;
  }
  EXPECT_EQ(man.weights_size, at);
  for (int64_t l = 0; l < 3; ++l) EXPECT_EQ(man.attn(l).offset + man.attn(l).size, man.ffn(l).offset);
  EXPECT_EQ(man.globals().tensor("tok_embeddings").shape, (std::vector<int64_t>{301, 72}));
  EXPECT_EQ(man.attn(1).tensor("wq").shape, (std::vector<int64_t>{72, 72}));
  EXPECT_EQ(man.attn(1).tensor("wk").shape, (std::vector<int64_t>{24, 72}));
  EXPECT_EQ(man.ffn(2).tensor("w2").shape, (std::vector<int64_t>{72, 200}));
}

TEST(Manifest, TiedEmbeddingsHaveNoOutputTensor) {
  ModelConfig m = small_model();
  EXPECT_NE(Manifest::plan(m, "t").globals().find("output"), nullptr);
  m.tie_word_embeddings = true;
  EXPECT_EQ(Manifest::plan(m, "t").globals().find("output"), nullptr);
}

TEST(Manifest, YamlRoundTrip) {
  Manifest man = Manifest::plan(small_model(), "random:test");
  man.groups[3].xxh3 = 0x0123456789abcdefULL;
  man.tokenizer_files = {"tokenizer.json"};
  Manifest back = Manifest::from_yaml(man.to_yaml(), "mem");
  EXPECT_EQ(back.to_yaml(), man.to_yaml());
  EXPECT_EQ(back.groups[3].xxh3, 0x0123456789abcdefULL);
  EXPECT_EQ(back.model.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(back.model.rope_theta, 500000);
  EXPECT_EQ(back.model.eos_ids, (std::vector<int64_t>{2, 3}));
}

TEST(Manifest, BadModelConfigsAreRefused) {
  auto refused = [](auto edit) {
    ModelConfig m = small_model();
    edit(m);
    EXPECT_THROW(Manifest::plan(m, "t"), StoreError);
  };
  refused([](ModelConfig& m) { m.n_kv_heads = 2; });  // 3 heads are not a multiple of 2
  refused([](ModelConfig& m) { m.dim = 0; });
  refused([](ModelConfig& m) { m.head_dim = 23; });
  refused([](ModelConfig& m) { m.rope_scaling.type = "yarn"; });
  refused([](ModelConfig& m) { m.eos_ids = {301}; });
  refused([](ModelConfig& m) { m.architecture = "mistral"; });
}

TEST(Manifest, EditedManifestsAreRefused) {
  const std::string good = Manifest::plan(small_model(), "t").to_yaml();
  auto refused = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    auto p = text.find(from);
    ASSERT_NE(p, std::string::npos) << from;
    text.replace(p, from.size(), to);
    EXPECT_THROW(Manifest::from_yaml(text, "edited"), StoreError) << from << " -> " << to;
  };
  refused("format: 1", "format: 2");
  refused("dim: 72", "dim: 64");
  refused("shape: [24, 72]", "shape: [24, 73]");
  refused("name: wq", "name: wz");
  refused("dtype: bf16", "dtype: int3");
  refused("xxh3: 0000000000000000", "xxh3: zz");
  refused("n_layers: 3", "n_layers: three");
  refused("weights_size:", "weights_sizes:");
  refused("kind: ffn", "kind: moe");
  EXPECT_THROW(Manifest::from_yaml("[1, 2", "x"), StoreError);
  EXPECT_THROW(Manifest::from_yaml("- a\n- b\n", "x"), StoreError);
  EXPECT_THROW(Manifest::from_yaml("", "x"), StoreError);
}

// Random byte mutations of a valid manifest: each either parses to a valid manifest or is
// refused with a StoreError; nothing else escapes.
TEST(Manifest, FuzzedTextNeverCrashes) {
  const std::string good = Manifest::plan(small_model(), "t").to_yaml();
  std::mt19937 rng(42);
  int parsed = 0, refused = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string text = good;
    int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t at = rng() % text.size();
      switch (rng() % 3) {
        case 0: text[at] = static_cast<char>(rng() % 256); break;
        case 1: text.erase(at, 1 + rng() % 8); break;
        default: text.insert(at, 1, "0:[-{ \n9"[rng() % 8]); break;
      }
    }
    try {
      Manifest::from_yaml(text, "fuzz");
      ++parsed;
    } catch (const StoreError&) {
      ++refused;
    }
  }
  EXPECT_EQ(parsed + refused, 3000);
  EXPECT_GT(refused, 0);
}

TEST(Store, OpensAndReadsGroupsWithChecksums) {
  test::TempDir dir;
  Manifest man = write_store(dir.path(), small_model());
  Store s = Store::open(dir.path());
  std::vector<char> buf(man.max_layer_size());
  const GroupEntry& g = s.manifest().ffn(1);
  s.read_group(g, buf.data());
  for (uint64_t i = 0; i < g.size; ++i)
    ASSERT_EQ(buf[i], static_cast<char>(((g.offset + i) * 131 + 7) & 0xFF)) << i;
  size_t bad = s.verify([](const std::string& line) { ADD_FAILURE() << line; });
  EXPECT_EQ(bad, 0u);
}

TEST(Store, FlippedByteIsReportedWithGroupAndOffset) {
  test::TempDir dir;
  Manifest man = write_store(dir.path(), small_model());
  {
    std::fstream f(dir / "weights.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(man.attn(2).offset + 100));
    f.put('\x5a' ^ static_cast<char>(((man.attn(2).offset + 100) * 131 + 7) & 0xFF));
  }
  Store s = Store::open(dir.path());
  std::vector<std::string> lines;
  EXPECT_EQ(s.verify([&](const std::string& l) { lines.push_back(l); }), 1u);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("layer 2 attn"), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find(std::to_string(man.attn(2).offset)), std::string::npos) << lines[0];
  std::vector<char> buf(man.attn(2).size);
  EXPECT_THROW(s.read_group(man.attn(2), buf.data()), StoreError);
}

TEST(Store, TruncatedWeightsAreRefusedAtOpen) {
  test::TempDir dir;
  Manifest man = write_store(dir.path(), small_model());
  std::string w = test::read_file(dir / "weights.bin");
  test::write_file(dir / "weights.bin", w.substr(0, w.size() - 4096));
  try {
    Store::open(dir.path());
    FAIL() << "no error";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST(Store, MissingPiecesAreNamed) {
  test::TempDir dir;
  EXPECT_THROW(Store::open(dir / "nope"), StoreError);
  EXPECT_THROW(Store::open(dir.path()), StoreError);  // no manifest
  write_store(dir.path(), small_model());
  std::remove((dir / "weights.bin").c_str());
  try {
    Store::open(dir.path());
    FAIL() << "no error";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("weights.bin"), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, Llama3RopeScalingMatchesReferenceValues) {
  // transformers' _compute_llama3_parameters for theta 500000, head_dim 128, factor 8,
  // low 1, high 4, original 8192: the highest frequency is kept, the lowest divided by 8.
  ModelConfig m = small_model();
  m.head_dim = 128;
  m.rope_scaling = {"llama3", 8, 1, 4, 8192};
  std::vector<double> inv = rope_inv_freq(m);
  ASSERT_EQ(inv.size(), 64u);
  EXPECT_DOUBLE_EQ(inv[0], 1.0);
  const double plain_last = 1.0 / std::pow(500000.0, 126.0 / 128.0);
  EXPECT_NEAR(inv[63], plain_last / 8, 1e-15);
  // A band between the two wavelengths is interpolated: strictly between scaled and plain.
  int smoothed = 0;
  for (int i = 0; i < 64; ++i) {
    const double plain = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    EXPECT_LE(inv[i], plain * (1 + 1e-12));
    EXPECT_GE(inv[i], plain / 8 * (1 - 1e-12));
    if (inv[i] < plain * (1 - 1e-9) && inv[i] > plain / 8 * (1 + 1e-9)) ++smoothed;
  }
  EXPECT_GT(smoothed, 0);
}
