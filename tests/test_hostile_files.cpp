// Model and config files that lie: counts and dimensions too large to be true, products that wrap,
// non-finite or absurd values, repeated keys, extra documents, and paths that are not regular files.
// Each is refused quickly, with one line naming the file, the key and the rule.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <iterator>
#include <regex>
#include <string>

#include "common/config.h"
#include "common/errors.h"
#include "common/manifest.h"
#include "common/store.h"
#include "daemon/hf_config.h"
#include "daemon/safetensors.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

ModelConfig small_model() {
  ModelConfig m;
  m.dim = 64;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 16;
  m.ffn_dim = 128;
  m.vocab_size = 256;
  m.max_position_embeddings = 512;
  m.rope_theta = 500000;
  m.rope_scaling = {"llama3", 8, 1, 4, 64};
  m.bos_id = 1;
  m.eos_ids = {2};
  return m;
}

std::string good_yaml() { return Manifest::plan(small_model(), "test").to_yaml(); }

// The YAML with the first line that starts (after indentation) with `key:` given a new value.
std::string with_value(const std::string& yaml, const std::string& key, const std::string& value) {
  std::smatch m;
  if (!std::regex_search(yaml, m, std::regex("\\n[ ]*" + key + ": [^\\n]*"))) {
    ADD_FAILURE() << "no key " << key;
    return yaml;
  }
  const size_t colon = yaml.find(':', m.position(0));
  return yaml.substr(0, colon + 2) + value + yaml.substr(m.position(0) + m.length(0));
}

// The error from_yaml throws, or "" when it accepts the text.
std::string manifest_error(const std::string& yaml) {
  try {
    Manifest::from_yaml(yaml, "store/manifest.yaml");
  } catch (const StoreError& e) {
    return e.what();
  }
  return "";
}

// Runs fn in a child with `seconds` of wall time and `mib` of address space; returns its exit
// status, or 128 + signal. A reader that blocks or balloons fails here instead of hanging the suite.
int bounded(const std::function<int()>& fn, int seconds = 10, uint64_t mib = 2048) {
  pid_t pid = fork();
  if (pid == 0) {
    alarm(seconds);
    struct rlimit rl {mib << 20, mib << 20};
    setrlimit(RLIMIT_AS, &rl);
    int rc = 99;
    try {
      rc = fn();
    } catch (...) {
      rc = 98;
    }
    _exit(rc);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// ---- 9: counts are checked before anything is sized from them ----

TEST(HostileManifest, HugeLayerCountIsRefusedBeforeTheLayoutIsBuilt) {
  const std::string yaml = with_value(good_yaml(), "n_layers", "1000000000");
  int rc = bounded([&] {
    std::string e = manifest_error(yaml);
    return e.find("n_layers") != std::string::npos && e.find("4096") != std::string::npos ? 0 : 1;
  });
  EXPECT_EQ(rc, 0);
  EXPECT_HAS(manifest_error(yaml), "store/manifest.yaml: model config: n_layers = 1000000000");
}

TEST(HostileManifest, GroupCountIsComparedWithTheLayerCountFirst) {
  // Within the bound, but the manifest lists the groups of two layers only.
  std::string e = manifest_error(with_value(good_yaml(), "n_layers", "4000"));
  EXPECT_HAS(e, "manifest has 5 groups, n_layers 4000 needs 8001");
}

// ---- 10: dimensions bounded, products checked ----

TEST(HostileManifest, VocabThatWrapsTheByteCountIsRefused) {
  // 2^58 + 256: times dim 64 times 2 bytes wraps to the size of a 256-row table.
  const std::string huge = "288230376151712000";
  std::string yaml = with_value(good_yaml(), "vocab_size", huge);
  yaml = std::regex_replace(yaml, std::regex("shape: \\[256, 64\\]"), "shape: [" + huge + ", 64]");
  std::string e = manifest_error(yaml);
  EXPECT_HAS(e, "vocab_size = " + huge);
  EXPECT_HAS(e, "must be between 1 and");
}

TEST(HostileManifest, EveryDimensionIsBounded) {
  for (const char* key : {"dim", "n_heads", "head_dim", "ffn_dim", "vocab_size", "max_position_embeddings"}) {
    std::string e = manifest_error(with_value(good_yaml(), key, "4611686018427387904"));
    EXPECT_HAS(e, std::string(key) + " = 4611686018427387904: must be between");
  }
  std::string e = manifest_error(with_value(good_yaml(), "n_kv_heads", "8"));
  EXPECT_HAS(e, "n_kv_heads = 8: must be between 1 and 4");
}

TEST(HostileManifest, TensorElementCountOverflowThrows) {
  TensorEntry t;
  t.name = "wq";
  t.shape = {int64_t(1) << 40, int64_t(1) << 40};
  EXPECT_THROW(t.numel(), StoreError);
}

TEST(HostileHfConfig, HugeDimensionsAreRefused) {
  const std::string base = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": VOCAB,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0})";
  auto parse = [&](const std::string& vocab) {
    return parse_hf_config(std::regex_replace(base, std::regex("VOCAB"), vocab), "m/config.json");
  };
  EXPECT_EQ(parse("256").vocab_size, 256);
  try {
    parse("288230376151712256");
    FAIL() << "accepted";
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), "m/config.json: model config: vocab_size = 288230376151712256: must be between");
  }
}

TEST(HostileSafetensors, ShapeDimensionsAndRankAreBounded) {
  auto header = [](const std::string& json) {
    std::string b(8, '\0');
    uint64_t n = json.size();
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return b + json;
  };
  // A zero-length dimension keeps the byte count at 0 whatever the other is.
  std::string b = header(R"({"w": {"dtype": "BF16", "shape": [4611686018427387904, 0], "data_offsets": [0, 0]}})");
  try {
    parse_st_header(b, b.size(), "x.safetensors");
    FAIL() << "accepted";
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), "x.safetensors: tensor 'w': shape dimension 4611686018427387904 is over the");
  }
  b = header(R"({"w": {"dtype": "BF16", "shape": [1,1,1,1,1,1,1,1,1], "data_offsets": [0, 2]}})");
  b += std::string(2, '\0');
  EXPECT_THROW(parse_st_header(b, b.size(), "x.safetensors"), StoreError);
}

// ---- 11: finite, sane values; unique keys; one document ----

TEST(HostileManifest, NonFiniteAndAbsurdValuesAreRefusedByKey) {
  struct Case {
    const char* key;
    const char* value;
  };
  for (const Case& c : {Case{"norm_eps", ".inf"}, Case{"norm_eps", ".nan"}, Case{"norm_eps", "1e-300"},
                        Case{"rope_theta", "1e-300"}, Case{"rope_theta", ".inf"}, Case{"rope_theta", ".nan"},
                        Case{"factor", ".inf"}, Case{"low_freq_factor", ".nan"}, Case{"high_freq_factor", "1e308"},
                        Case{"original_max_position_embeddings", "1000000000000"}, Case{"bos_id", "-99"}}) {
    std::string e = manifest_error(with_value(good_yaml(), c.key, c.value));
    EXPECT_HAS(e, "store/manifest.yaml: model config: ");
    EXPECT_HAS(e, c.key);
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  }
  // -1 still means "no bos".
  EXPECT_EQ(manifest_error(with_value(good_yaml(), "bos_id", "-1")), "");
}

TEST(HostileManifest, DuplicateKeysAreRefused) {
  std::string yaml = good_yaml();
  // A second vocab_size in the model mapping, and a second format at the top.
  std::string dup = std::regex_replace(yaml, std::regex("\\n(  vocab_size: [^\\n]*)"), "\n$1\n  vocab_size: 999",
                                       std::regex_constants::format_first_only);
  EXPECT_HAS(manifest_error(dup), "key 'vocab_size' appears twice");
  EXPECT_HAS(manifest_error("format: 1\n" + yaml), "key 'format' appears twice");
}

TEST(HostileManifest, SecondDocumentIsRefused) {
  EXPECT_HAS(manifest_error(good_yaml() + "---\nformat: 2\n"), "holds 2 YAML documents");
}

TEST(HostileConfig, DuplicateKeysAndSecondDocumentAreRefused) {
  ConfigLoader loader(kGenerate);
  try {
    loader.load_from(std::string("batch_size: 4\nmax_context: 64\nbatch_size: 8\n"), "c.yaml", {}, {});
    FAIL() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_HAS(e.what(), "config key 'batch_size' from file (c.yaml:3): appears twice");
  }
  try {
    loader.load_from(std::string("batch_size: 4\n---\nbatch_size: 8\n"), "c.yaml", {}, {});
    FAIL() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_HAS(e.what(), "config file c.yaml: holds 2 YAML documents");
  }
  // An empty file and a file of comments are still fine.
  EXPECT_NO_THROW(loader.load_from(std::string(""), "c.yaml", {}, {}));
  EXPECT_NO_THROW(loader.load_from(std::string("# nothing\n"), "c.yaml", {}, {}));
}

TEST(HostileHfConfig, DuplicateKeysAreRefused) {
  const std::string json = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
    "vocab_size": 100000, "max_position_embeddings": 512})";
  try {
    parse_hf_config(json, "m/config.json");
    FAIL() << "accepted";
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), "m/config.json: key 'vocab_size' appears twice");
  }
}

TEST(HostileHfConfig, AbsurdValuesAreRefused) {
  const std::string json = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
    "max_position_embeddings": 512, "rope_theta": 1e-300})";
  try {
    parse_hf_config(json, "m/config.json");
    FAIL() << "accepted";
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), "rope_theta = ");
  }
}

// ---- 12: regular files only, of a bounded size ----

TEST(HostileFiles, FifoDeviceAndDirectoryAreRefusedAtOnce) {
  test::TempDir dir;
  const std::string fifo = dir / "manifest.yaml";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  for (const std::string& path : {fifo, std::string("/dev/zero"), dir.path()}) {
    int rc = bounded([&] {
      try {
        Manifest::load(path);
      } catch (const StoreError& e) {
        return std::string(e.what()).rfind(path + ": ", 0) == 0 ? 0 : 1;
      }
      return 2;
    });
    EXPECT_EQ(rc, 0) << path;
  }
  try {
    Manifest::load(fifo);
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), "not a regular file");
  }
  // config.json of a model directory too.
  test::TempDir model;
  ASSERT_EQ(mkfifo((model / "config.json").c_str(), 0600), 0);
  EXPECT_EQ(bounded([&] {
              try {
                load_hf_config(model.path());
              } catch (const StoreError& e) {
                return std::string(e.what()).find("not a regular file") != std::string::npos ? 0 : 1;
              }
              return 2;
            }),
            0);
}

TEST(HostileFiles, ShardIndexFifoIsRefused) {
  // A sharded checkpoint whose model.safetensors.index.json is a FIFO: refused, not read forever.
  test::TempDir model;
  const std::string src = test::data_dir() + "/llama2_sharded_mha/hf";
  for (const char* f : {"config.json"}) {
    std::ifstream in(src + "/" + f, std::ios::binary);
    test::write_file(model / f, std::string(std::istreambuf_iterator<char>(in), {}));
  }
  ASSERT_EQ(mkfifo((model / "model.safetensors.index.json").c_str(), 0600), 0);
  test::TempDir out;
  const auto r = test::run_bin("ringllama-pack", {"--hf", model.path(), "--out", out / "store", "--quiet"}, 20);
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_HAS(r.err, "model.safetensors.index.json: not a regular file");
}

TEST(HostileFiles, OversizedFileIsRefused) {
  test::TempDir dir;
  const std::string big = dir / "big.yaml";
  test::write_file(big, std::string((1 << 20) + 1, '#'));
  try {
    read_regular_file(big, 1 << 20);
    FAIL() << "accepted";
  } catch (const StoreError& e) {
    EXPECT_HAS(e.what(), big + ": 1048577 bytes, over the 1048576 byte limit");
  }
  EXPECT_EQ(read_regular_file(big, 2 << 20).size(), (1u << 20) + 1);
}

TEST(HostileFiles, ConfigFifoDeviceDirectoryAndOversizeAreRefused) {
  test::TempDir dir;
  const std::string fifo = dir / "c.yaml";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string big = dir / "big.yaml";
  test::write_file(big, std::string((1 << 20) + 1, '#'));
  struct Case {
    std::string path;
    std::string says;
  };
  for (const Case& c : {Case{fifo, "not a regular file"}, Case{"/dev/zero", "not a regular file"},
                        Case{dir.path(), "is a directory"}, Case{big, "byte limit"}}) {
    auto r = test::run_bin("ringllama-generate", {"--config", c.path, "--print-config"}, 20);
    EXPECT_EQ(r.status, 1) << c.path;
    EXPECT_HAS(r.err, "config file " + c.path + ": ");
    EXPECT_HAS(r.err, c.says);
  }
}

// ---- packed tensors: the scales and sizes a manifest records are checked against the layout ----

// small_model with every linear weight int4 in groups of 32 (attention) or fp8 (ffn).
std::string packed_yaml() {
  return Manifest::plan(small_model(), "test", [](const GroupEntry& g, const TensorSpec& t) {
           if (!tensor_packable(t.name)) return TensorFormat{};
           return g.kind == GroupKind::Ffn ? TensorFormat{DType::FP8_E4M3, 0} : TensorFormat{DType::INT4, 32};
         }).to_yaml();
}

// The YAML with `from` replaced once inside the first tensor entry named `tensor`.
std::string edit_tensor(const std::string& yaml, const std::string& tensor, const std::string& from,
                        const std::string& to) {
  const size_t at = yaml.find("name: " + tensor + ",");
  const size_t end = yaml.find('}', at);
  const size_t p = yaml.find(from, at);
  if (at == std::string::npos || p == std::string::npos || p > end) {
    ADD_FAILURE() << "no '" << from << "' in tensor " << tensor;
    return yaml;
  }
  return yaml.substr(0, p) + to + yaml.substr(p + from.size());
}

// The value of `key` in the first tensor entry named `tensor`.
uint64_t tensor_value(const std::string& yaml, const std::string& tensor, const std::string& key) {
  const size_t at = yaml.find("name: " + tensor + ",");
  const size_t p = yaml.find(key + ": ", at);
  return std::stoull(yaml.substr(p + key.size() + 2));
}

TEST(HostilePackedManifest, APackedManifestRoundTrips) {
  const std::string y = packed_yaml();
  EXPECT_EQ(manifest_error(y), "");
  EXPECT_EQ(Manifest::from_yaml(y, "x").to_yaml(), y);
  const Manifest m = Manifest::from_yaml(y, "x");
  EXPECT_EQ(m.attn(0).tensor("wq").dtype, DType::INT4);
  EXPECT_EQ(m.attn(0).tensor("wq").group_size, 32);
  EXPECT_EQ(m.attn(0).tensor("wq").scales_size, 64u * 2 * 4);  // [64 rows][2 groups] x (scale, min) halves
  EXPECT_EQ(m.ffn(1).tensor("w2").dtype, DType::FP8_E4M3);
  EXPECT_EQ(m.ffn(1).tensor("w2").scales_size, 64u * 4);
  EXPECT_EQ(m.globals().tensor("output").dtype, DType::INT4);
  EXPECT_EQ(m.globals().tensor("tok_embeddings").dtype, DType::BF16);
  // A bf16 manifest carries none of the new keys: it reads as before they existed.
  EXPECT_EQ(good_yaml().find("scales_offset"), std::string::npos);
  EXPECT_EQ(good_yaml().find("group_size"), std::string::npos);
}

TEST(HostilePackedManifest, ScalesOutsideTheGroupAreRefused) {
  const std::string y = packed_yaml();
  const uint64_t so = tensor_value(y, "wo", "scales_offset");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wo", "scales_offset: " + std::to_string(so), "scales_offset: 1048576")),
             "layer 0 attn: tensor 'wo': scales [1048576, +");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wo", "scales_offset: " + std::to_string(so),
                                        "scales_offset: 18446744073709551615")),
             "run outside the group");
  // Into the tensor's own values.
  const uint64_t off = tensor_value(y, "wo", "offset");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wo", "scales_offset: " + std::to_string(so),
                                        "scales_offset: " + std::to_string(off))),
             "into the values");
  // Inside the group, but not where the layout puts them.
  EXPECT_HAS(manifest_error(edit_tensor(y, "wo", "scales_offset: " + std::to_string(so),
                                        "scales_offset: " + std::to_string(so + 256))),
             "disagrees with the model config");
}

TEST(HostilePackedManifest, SizesThatDoNotMatchShapeAndDtypeAreRefused) {
  const std::string y = packed_yaml();
  const uint64_t ss = tensor_value(y, "w1", "scales_size");
  EXPECT_HAS(manifest_error(edit_tensor(y, "w1", "scales_size: " + std::to_string(ss), "scales_size: 4")),
             "layer 0 ffn: tensor 'w1': scales_size 4 does not match shape 128x64 as fp8_e4m3 (512 bytes)");
  const uint64_t sz = tensor_value(y, "wq", "size");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wq", "size: " + std::to_string(sz), "size: " + std::to_string(2 * sz))),
             "tensor 'wq': size 4096 does not match shape 64x64 as int4 (2048 bytes)");
  // The dtype changed under the same sizes.
  EXPECT_HAS(manifest_error(edit_tensor(y, "w1", "dtype: fp8_e4m3", "dtype: bf16")), "has no 'scales_offset'");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wq", "dtype: int4", "dtype: fp8_e4m3")), "has no 'group_size'");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wq", "dtype: int4", "dtype: int8")), "unsupported tensor dtype 'int8'");
}

TEST(HostilePackedManifest, FormatsATensorCannotTakeAreRefused) {
  const std::string y = packed_yaml();
  EXPECT_HAS(manifest_error(edit_tensor(y, "wk", "group_size: 32", "group_size: 64")),
             "tensor 'wk': int4 group_size 64 is not supported (32 or 128)");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wk", "group_size: 32", "group_size: 128")),
             "tensor 'wk': 64 inputs do not split into int4 groups of 128");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wk", "group_size: 32", "group_size: -9223372036854775808")),
             "not supported");
  // Norms and the embedding are bf16 only; a bf16 tensor has no group size.
  EXPECT_HAS(manifest_error(edit_tensor(y, "attn_norm", "dtype: bf16", "dtype: fp8_e4m3, scales_offset: 0, "
                                                                       "scales_size: 0")),
             "tensor 'attn_norm' is stored as bf16 only, not fp8_e4m3");
  EXPECT_HAS(manifest_error(edit_tensor(y, "tok_embeddings", "dtype: bf16", "dtype: bf16, group_size: 32")),
             "is bf16 and has no 'group_size'");
  EXPECT_HAS(manifest_error(edit_tensor(y, "wq", "group_size: 32, ", "")), "missing key 'group_size'");
}

}  // namespace
}  // namespace ringllama
