// The GGUF reader (common/gguf.h), the dequantization and q/k row order (daemon/gguf_model.h), and
// `ringllama-pack --gguf` refusing broken files with one line and nothing left behind.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <typeinfo>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/gguf.h"
#include "daemon/gguf_model.h"
#include "daemon/gguf_tokenizer.h"
#include "tests/gguf_builder.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using test::GgufBuilder;
using test::TinyGgufSpec;

std::string parse_error(const std::string& bytes) {
  try {
    GgufFile::parse(bytes.data(), bytes.size(), "x.gguf");
  } catch (const StoreError& e) {
    return e.what();
  }
  return "";
}

TEST(Gguf, ParsesMetadataAndTensors) {
  GgufBuilder b = test::tiny_gguf();
  b.kv("some.u64", 10, GgufBuilder::u64(1ull << 40));
  b.kv("some.i8", 1, std::string(1, '\xfe'));
  b.kv("some.f64", 12, std::string("\x00\x00\x00\x00\x00\x00\xf8\x3f", 8));  // 1.5
  const std::string bytes = b.build();
  const GgufFile f = GgufFile::parse(bytes.data(), bytes.size(), "tiny.gguf");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.data_offset() % 32, 0u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 1);
  EXPECT_EQ(f.get_int("some.u64"), 1ll << 40);
  EXPECT_EQ(f.get_int("some.i8"), -2);
  EXPECT_DOUBLE_EQ(f.get_float("some.f64"), 1.5);
  // A float32 reads as the decimal it was written from.
  EXPECT_DOUBLE_EQ(f.get_float("llama.attention.layer_norm_rms_epsilon"), 1e-5);
  ASSERT_EQ(f.get_strings("tokenizer.ggml.tokens").size(), 10u);
  EXPECT_EQ(f.get_strings("tokenizer.ggml.merges")[3], "ab c");
  EXPECT_EQ(f.get_ints("tokenizer.ggml.token_type")[0], 3);
  EXPECT_FALSE(f.opt_int("no.such.key").has_value());
  EXPECT_THROW(f.get_int("general.architecture"), StoreError);  // a string, not an integer
  EXPECT_THROW(f.get_string("no.such.key"), StoreError);

  ASSERT_EQ(f.tensors().size(), 11u);
  const GgufTensorInfo* q = f.find_tensor("blk.0.attn_k.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->ne, (std::vector<int64_t>{8, 4}));
  EXPECT_EQ(q->shape(), (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(q->bytes, 4u * 8 * 4);
  std::vector<float> v(32);
  f.read(*q, 0, q->bytes, v.data());
  EXPECT_FLOAT_EQ(v[1], 0.01f * static_cast<float>((7 + 19) % 23) - 0.1f);
}

TEST(Gguf, ReadsVersion2) {  // v2 has v3's layout (v3 only added big-endian files, which are refused)
  GgufBuilder b = test::tiny_gguf();
  b.version = 2;
  const std::string bytes = b.build();
  const GgufFile f = GgufFile::parse(bytes.data(), bytes.size(), "v2.gguf");
  EXPECT_EQ(f.version(), 2u);
  EXPECT_EQ(f.tensors().size(), 11u);
}

TEST(Gguf, HonoursAlignment) {
  GgufBuilder b = test::tiny_gguf();
  b.alignment = 64;
  b.kv_u32("general.alignment", 64);
  const std::string bytes = b.build();
  const GgufFile f = GgufFile::parse(bytes.data(), bytes.size(), "a.gguf");
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.data_offset() % 64, 0u);
  GgufBuilder bad = test::tiny_gguf();
  bad.kv_u32("general.alignment", 48);
  EXPECT_NE(parse_error(bad.build()).find("not a power of two"), std::string::npos);
}

TEST(Gguf, RefusesLyingFiles) {
  const std::string good = test::tiny_gguf().build();
  EXPECT_EQ(parse_error(good), "");
  EXPECT_NE(parse_error("GGML" + good.substr(4)).find("not a GGUF file"), std::string::npos);
  EXPECT_NE(parse_error(good.substr(0, 3)).find("truncated"), std::string::npos);
  // Every cut inside the header and the data is refused, never a crash.
  for (size_t n = 0; n < good.size(); n += 7) EXPECT_NE(parse_error(good.substr(0, n)), "") << "cut at " << n;

  std::string v1 = good;
  v1[4] = 1;
  EXPECT_NE(parse_error(v1).find("version 1"), std::string::npos);
  std::string be = good;
  be[4] = 0;
  be[7] = 3;  // version 3 as a big-endian writer puts it
  EXPECT_NE(parse_error(be).find("big-endian"), std::string::npos);

  GgufBuilder counts = test::tiny_gguf();
  counts.kv_count_delta = 1ll << 40;
  EXPECT_NE(parse_error(counts.build()).find("metadata count"), std::string::npos);
  GgufBuilder tensors = test::tiny_gguf();
  tensors.tensor_count_delta = 3;
  EXPECT_NE(parse_error(tensors.build()), "");

  GgufBuilder arr;
  arr.kv("big.array", 9, GgufBuilder::u32(4) + GgufBuilder::u64(1ull << 23) + "xxxx");
  EXPECT_NE(parse_error(arr.build()).find("more than the"), std::string::npos);
  GgufBuilder huge;
  huge.kv("huge.array", 9, GgufBuilder::u32(8) + GgufBuilder::u64(1ull << 62));
  EXPECT_NE(parse_error(huge.build()).find("elements"), std::string::npos);
  GgufBuilder str;
  str.kv("s", 8, GgufBuilder::u64(1ull << 63) + "abc");
  EXPECT_NE(parse_error(str.build()).find("bytes long"), std::string::npos);
  GgufBuilder type;
  type.kv("t", 13, GgufBuilder::u32(0));
  EXPECT_NE(parse_error(type.build()).find("unknown value type 13"), std::string::npos);
  GgufBuilder nested;
  nested.kv("n", 9, GgufBuilder::u32(9) + GgufBuilder::u64(1));
  EXPECT_NE(parse_error(nested.build()).find("arrays of arrays"), std::string::npos);
  GgufBuilder dup = test::tiny_gguf();
  dup.kv_u32("llama.block_count", 2);
  EXPECT_NE(parse_error(dup.build()).find("appears twice"), std::string::npos);
  GgufBuilder boolean;
  boolean.kv("b", 7, std::string(1, '\x02'));
  EXPECT_NE(parse_error(boolean.build()).find("neither 0 nor 1"), std::string::npos);

  GgufBuilder ttype;
  ttype.tensor("x", {32}, 99, std::string(64, '\0'));
  EXPECT_NE(parse_error(ttype.build()).find("unknown type 99"), std::string::npos);
  GgufBuilder dims;
  dims.tensor("x", {1, 1, 1, 1, 1}, 0, std::string(4, '\0'));
  EXPECT_NE(parse_error(dims.build()).find("dimensions"), std::string::npos);
  GgufBuilder zero;
  zero.tensor("x", {4, 0}, 0, "");
  EXPECT_NE(parse_error(zero.build()).find("dimension 1 is 0"), std::string::npos);
  GgufBuilder overflow;
  overflow.tensor("x", {1ull << 32, 1ull << 32}, 0, "");
  EXPECT_NE(parse_error(overflow.build()), "");
  GgufBuilder block;
  block.tensor("x", {33}, 8, std::string(68, '\0'));  // Q8_0 rows are whole 32-element blocks
  EXPECT_NE(parse_error(block.build()).find("block size"), std::string::npos);
  GgufBuilder past = test::tiny_gguf();
  past.offset_delta = 1 << 20;
  EXPECT_NE(parse_error(past.build()).find("past the end"), std::string::npos);
  GgufBuilder misaligned = test::tiny_gguf();
  misaligned.offset_delta = 4;
  EXPECT_NE(parse_error(misaligned.build()).find("alignment"), std::string::npos);
}

// Random corruptions of a valid file: each is read as the packer reads one (config, tokenizer,
// every tensor dequantized); a StoreError is the only failure allowed, never another exception
// or a crash. (tests/fuzz/fuzz_gguf.cpp does this under libFuzzer and the sanitizers.)
TEST(Gguf, SurvivesRandomCorruption) {
  const std::string good = test::tiny_gguf().build();
  uint64_t s = 42;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  int refused = 0, accepted = 0;
  const auto level = spdlog::get_level();
  spdlog::set_level(spdlog::level::err);  // the packer's warnings about odd but readable files
  for (int round = 0; round < 3000; ++round) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(next() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly the header and metadata (where the counts and lengths live), sometimes anywhere.
      const size_t span = next() % 4 ? std::min<size_t>(bytes.size(), 600) : bytes.size();
      bytes[next() % span] = static_cast<char>(next() & 0xFF);
    }
    if (next() % 8 == 0) bytes.resize(next() % bytes.size());
    try {
      const GgufFile f = GgufFile::parse(bytes.data(), bytes.size(), "m.gguf");
      for (const GgufTensorInfo& t : f.tensors()) {
        uint64_t be = 0, bb = 0;
        if (!gguf_type_packable(t.type) || !ggml_type_layout(static_cast<uint32_t>(t.type), &be, &bb)) continue;
        const uint64_t blocks = std::min<uint64_t>(t.bytes / bb, 64);
        std::vector<unsigned char> raw(blocks * bb);
        std::vector<float> out(blocks * be);
        f.read(t, 0, raw.size(), raw.data());
        dequantize_blocks(t.type, raw.data(), blocks, out.data());
      }
      const ModelConfig m = gguf_model_config(f);
      (void)gguf_tokenizer_files(f, m);
      ++accepted;
    } catch (const StoreError&) {
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "round " << round << ": " << typeid(e).name() << ": " << e.what();
    }
  }
  spdlog::set_level(level);
  std::cout << "corrupted files: " << refused << " refused, " << accepted << " accepted" << std::endl;
  EXPECT_GT(refused, 1000);
}

uint16_t h(float x) {  // float -> IEEE half for exactly representable values
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const uint32_t sign = (b >> 16) & 0x8000, exp = (b >> 23) & 0xFF, mant = b & 0x7FFFFF;
  if (exp == 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | ((exp - 127 + 15) << 10) | (mant >> 13));
}

TEST(GgufDequant, BlockLayouts) {
  // Q8_0: f16 scale, 32 int8.
  unsigned char q8[34];
  const uint16_t d = h(0.5f);
  std::memcpy(q8, &d, 2);
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<unsigned char>(static_cast<int8_t>(j - 16));
  float y[32];
  dequantize_blocks(GgmlType::Q8_0, q8, 1, y);
  for (int j = 0; j < 32; ++j) EXPECT_FLOAT_EQ(y[j], 0.5f * (j - 16)) << j;

  // Q4_0: low nibbles are elements 0..15, high nibbles 16..31, value (q - 8) * d.
  unsigned char q4[18];
  const uint16_t d4 = h(2.0f);
  std::memcpy(q4, &d4, 2);
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<unsigned char>((j & 0xF) | ((15 - j) << 4));
  dequantize_blocks(GgmlType::Q4_0, q4, 1, y);
  for (int j = 0; j < 16; ++j) {
    EXPECT_FLOAT_EQ(y[j], 2.0f * (j - 8)) << j;
    EXPECT_FLOAT_EQ(y[16 + j], 2.0f * (15 - j - 8)) << j;
  }

  // Q4_1: d, m, nibbles as Q4_0, value q * d + m.
  unsigned char q41[20];
  const uint16_t dd = h(0.25f), mm = h(-1.0f);
  std::memcpy(q41, &dd, 2);
  std::memcpy(q41 + 2, &mm, 2);
  for (int j = 0; j < 16; ++j) q41[4 + j] = static_cast<unsigned char>(j | (3 << 4));
  dequantize_blocks(GgmlType::Q4_1, q41, 1, y);
  for (int j = 0; j < 16; ++j) {
    EXPECT_FLOAT_EQ(y[j], 0.25f * j - 1.0f) << j;
    EXPECT_FLOAT_EQ(y[16 + j], 0.25f * 3 - 1.0f) << j;
  }
  EXPECT_THROW(dequantize_blocks(GgmlType::Q2_K, q41, 1, y), Error);
}

TEST(GgufDequant, UndoesTheConvertersQkPermutation) {
  // convert_hf_to_gguf.py's permute for 2 heads of 4 rows: each head's rows [0 1 | 2 3] go to
  // the order 0 2 1 3 (pairs of first-half, second-half rows).
  const std::vector<int64_t> gguf_rows_of_hf = {0, 2, 1, 3, 4, 6, 5, 7};
  for (int64_t r = 0; r < 8; ++r) EXPECT_EQ(gguf_permuted_row(r, 8, 2), gguf_rows_of_hf[r]) << r;
  // A bijection for a Llama shape.
  std::vector<int> seen(1024, 0);
  for (int64_t r = 0; r < 1024; ++r) ++seen.at(gguf_permuted_row(r, 1024, 8));
  for (int s : seen) EXPECT_EQ(s, 1);
}

// ringllama-pack --gguf on a broken file: exit 1, one line naming the fault, no store and no
// temporary directory left.
struct BadCase {
  std::string name;
  std::string bytes;
  std::string message;
};

std::vector<BadCase> bad_cases() {
  const std::string good = test::tiny_gguf().build();
  auto spec = [](auto f) {
    TinyGgufSpec s;
    f(s);
    return test::tiny_gguf(s).build();
  };
  std::string cut = good.substr(0, good.size() - 100);
  GgufBuilder lie = test::tiny_gguf();
  lie.kv("lying.array", 9, GgufBuilder::u32(8) + GgufBuilder::u64(1000000));
  return {
      {"BadMagic", "GGUX" + good.substr(4), "not a GGUF file"},
      {"Truncated", cut, "past the end of the file"},
      {"TruncatedHeader", good.substr(0, 200), "truncated"},
      {"LyingArray", lie.build(), "truncated"},
      {"MissingTensor", spec([](TinyGgufSpec& s) { s.drop_tensor = "blk.0.ffn_up.weight"; }),
       "tensor 'blk.0.ffn_up.weight' is missing"},
      {"MissingKey", spec([](TinyGgufSpec& s) { s.drop_key = "llama.block_count"; }), "key 'llama.block_count' is missing"},
      {"MissingEps", spec([](TinyGgufSpec& s) { s.drop_key = "llama.attention.layer_norm_rms_epsilon"; }),
       "layer_norm_rms_epsilon' is missing"},
      {"OtherArchitecture", spec([](TinyGgufSpec& s) { s.arch = "qwen2"; }), "only llama is supported"},
      {"UnknownPre", spec([](TinyGgufSpec& s) { s.pre = "mystery"; }), "tokenizer.ggml.pre 'mystery' is not supported"},
      {"SentencePiece", spec([](TinyGgufSpec& s) { s.tokenizer_model = "llama"; }), "SentencePiece"},
      {"UnpackableType", spec([](TinyGgufSpec& s) { s.up_type = 24; }), "is I8"},
  };
}

class GgufPackRefuses : public ::testing::TestWithParam<BadCase> {};

TEST_P(GgufPackRefuses, WithOneLineAndNothingLeft) {
  test::TempDir tmp;
  const std::string in = tmp / "bad.gguf", out = tmp / "store";
  test::write_file(in, GetParam().bytes);
  auto r = test::run_bin("ringllama-pack", {"--gguf", in, "--out", out, "--quiet"});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find(GetParam().message), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("ringllama-pack: error: "), 0u) << r.err;
  // One error line (warnings from the log may come before it, never after).
  const std::string last = r.err.substr(r.err.rfind("ringllama-pack: error: "));
  EXPECT_EQ(last.find('\n'), last.size() - 1) << r.err;
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(tmp.path())) {
    ++entries;
    EXPECT_EQ(e.path().filename(), "bad.gguf") << "left behind: " << e.path();
  }
  EXPECT_EQ(entries, 1u);
}

INSTANTIATE_TEST_SUITE_P(Cases, GgufPackRefuses, ::testing::ValuesIn(bad_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(GgufPack, PacksTheTinyModel) {
  test::TempDir tmp;
  const std::string in = tmp / "tiny.gguf", out = tmp / "store";
  test::write_file(in, test::tiny_gguf().build());
  auto r = test::run_bin("ringllama-pack", {"--gguf", in, "--out", out, "--quiet"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("vocab 10, tied embeddings"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(out + "/tokenizer.json"));
  EXPECT_TRUE(fs::exists(out + "/tokenizer_config.json"));
  auto v = test::run_bin("ringllama-pack", {"--verify", out});
  EXPECT_EQ(v.status, 0) << v.err;
}

}  // namespace
}  // namespace ringllama
