// The safetensors reader: valid files, every kind of lying header, conversion to bf16, and a
// fuzz run over mutated headers.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/errors.h"
#include "daemon/safetensors.h"
#include "tests/test_pack_fixtures.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

using test::StEntry;
using test::TempDir;

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

// A header followed by `data_bytes` zero bytes.
std::string with_header(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + json + std::string(data_bytes, '\0');
}

std::string open_error(const std::string& bytes, const std::string& path) {
  test::write_file(path, bytes);
  try {
    SafetensorsFile::open(path);
  } catch (const StoreError& e) {
    return e.what();
  }
  return "no error";
}

TEST(Safetensors, ParsesAValidFile) {
  TempDir d;
  std::string bytes = test::make_safetensors({{"a", "F32", {2, 3}, f32_bytes({1, 2, 3, 4, 5, 6})},
                                              {"b", "I64", {1}, std::string(8, '\x07')},
                                              {"empty", "BF16", {0, 4}, ""}});
  test::write_file(d / "m.safetensors", bytes);
  auto f = SafetensorsFile::open(d / "m.safetensors");
  ASSERT_EQ(f->header().tensors.size(), 3u);
  EXPECT_EQ(f->header().metadata.at("format"), "pt");
  const StTensor* a = f->find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, StDType::F32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->end - a->begin, 24u);
  EXPECT_EQ(f->find("b")->dtype, StDType::I64);
  EXPECT_EQ(f->find("empty")->numel(), 0u);
  EXPECT_EQ(f->find("nope"), nullptr);

  std::vector<bf16_t> out(4);
  f->read_bf16(*a, 1, 4, out.data());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(bf16_to_f32(out[i]), static_cast<float>(i + 2));
}

TEST(Safetensors, ConvertsEachDtypeWithRoundToNearestEven) {
  TempDir d;
  for (const char* dtype : {"F32", "F16", "BF16"}) {
    const int64_t n = 3000000;  // more than one staging block
    test::TensorValues v = test::make_values(dtype, n, 7);
    test::write_file(d / "m.safetensors", test::make_safetensors({{"w", dtype, {n}, v.raw}}));
    auto f = SafetensorsFile::open(d / "m.safetensors");
    std::vector<bf16_t> out(n - 5);
    f->read_bf16(*f->find("w"), 5, n - 5, out.data());
    EXPECT_TRUE(std::equal(out.begin(), out.end(), v.expected.begin() + 5)) << dtype;
  }
  // Ties go to the even neighbour; just above a tie goes up.
  test::write_file(d / "t.safetensors",
                   test::make_safetensors({{"w", "F32", {4}, f32_bytes({1.00390625f, 1.01171875f, std::nextafter(1.00390625f, 2.0f), -2.5f})}}));
  auto f = SafetensorsFile::open(d / "t.safetensors");
  std::vector<bf16_t> out(4);
  f->read_bf16(*f->find("w"), 0, 4, out.data());
  EXPECT_EQ(bf16_to_f32(out[0]), 1.0f);
  EXPECT_EQ(bf16_to_f32(out[1]), 1.015625f);
  EXPECT_EQ(bf16_to_f32(out[2]), 1.0078125f);
  EXPECT_EQ(bf16_to_f32(out[3]), -2.5f);
}

TEST(Safetensors, RefusesToConvertOtherDtypes) {
  TempDir d;
  test::write_file(d / "m.safetensors", test::make_safetensors({{"q", "I8", {4}, "abcd"}}));
  auto f = SafetensorsFile::open(d / "m.safetensors");
  std::vector<bf16_t> out(4);
  try {
    f->read_bf16(*f->find("q"), 0, 4, out.data());
    FAIL() << "no error";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("'q' has dtype I8"), std::string::npos) << e.what();
  }
}

struct BadCase {
  const char* what;
  std::string bytes;
  const char* expect;  // in the message
};

TEST(Safetensors, RejectsEveryKindOfBadHeader) {
  TempDir d;
  const std::string good_tensor = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  std::string huge_len(8, '\xff');
  std::vector<BadCase> cases = {
      {"empty file", "", "too short"},
      {"short file", "abc", "too short"},
      {"header length beyond the file", huge_len + "{}", "header length"},
      {"header length one past", with_header("{}", 0).substr(0, 9), "runs beyond the end of the file"},
      {"invalid JSON", with_header("{\"w\": [1, 2", 0), "not valid JSON"},
      {"not an object", with_header("[1, 2, 3]", 0), "not a JSON object"},
      {"entry not an object", with_header(R"({"w": 3})", 0), "'w'"},
      {"unknown dtype", with_header(R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,4]}})", 4),
       "unknown dtype 'F17'"},
      {"dtype not a string", with_header(R"({"w":{"dtype":1,"shape":[2],"data_offsets":[0,4]}})", 4), "dtype"},
      {"negative shape", with_header(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "shape"},
      {"float shape", with_header(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8), "shape"},
      {"missing shape", with_header(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8), "shape"},
      {"three offsets", with_header(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8),
       "data_offsets"},
      {"offsets backwards", with_header(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "end before they begin"},
      {"size not matching shape", with_header(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 16),
       "hold 12 bytes, but F32 [2, 2] needs 16"},
      {"offsets beyond the file", with_header("{" + good_tensor + "}", 12), "run beyond the end of the file"},
      {"shape overflow",
       with_header(R"({"w":{"dtype":"F64","shape":[1099511627776,1099511627776,1099511627776],"data_offsets":[0,8]}})", 8),
       "overflows"},
      {"metadata not an object", with_header(R"({"__metadata__": 5})", 0), "__metadata__"},
  };
  for (const BadCase& c : cases) {
    const std::string path = d / "bad.safetensors";
    std::string msg = open_error(c.bytes, path);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": " << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << c.what << ": " << msg;
  }
}

TEST(Safetensors, TruncatedFileNamesFileAndTensor) {
  TempDir d;
  std::string bytes = test::make_safetensors({{"first", "F32", {4}, f32_bytes({1, 2, 3, 4})},
                                              {"model.norm.weight", "F32", {4}, f32_bytes({1, 2, 3, 4})}});
  const std::string path = d / "model.safetensors";
  std::string msg = open_error(bytes.substr(0, bytes.size() - 3), path);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("'model.norm.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST(Safetensors, OverlappingTensorsAreAccepted) {
  TempDir d;
  const std::string json =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  test::write_file(d / "m.safetensors", with_header(json, 12));
  auto f = SafetensorsFile::open(d / "m.safetensors");
  EXPECT_EQ(f->header().tensors.size(), 2u);
}

TEST(Safetensors, MissingFile) {
  TempDir d;
  try {
    SafetensorsFile::open(d / "none.safetensors");
    FAIL();
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("none.safetensors: cannot open"), std::string::npos) << e.what();
  }
}

// Mutated copies of a valid file's first bytes: every outcome is a parse or a StoreError, never a
// crash, a hang or another exception type. Run under the sanitizers, this is the parser's fuzz test.
TEST(Safetensors, FuzzedHeadersParseOrThrowStoreError) {
  std::string valid = test::make_safetensors({{"model.embed_tokens.weight", "BF16", {4, 2}, std::string(16, '\1')},
                                              {"model.norm.weight", "F32", {2}, f32_bytes({1, 2})},
                                              {"lm_head.weight", "F16", {4, 2}, std::string(16, '\2')}});
  std::mt19937_64 rng(20261125);
  const char* tokens[] = {"{", "}", "[", "]", ",", ":", "\"", "-", "0", "9", "1e400", "null", "true", "\\u0000",
                          "18446744073709551616", "F32", "I8", "data_offsets", "shape", "dtype"};
  int parsed = 0, rejected = 0;
  for (int it = 0; it < 4000; ++it) {
    std::string b = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % b.size();
      switch (rng() % 5) {
        case 0: b[pos] = static_cast<char>(rng() & 0xFF); break;                       // any byte
        case 1: b[pos] = static_cast<char>(b[pos] ^ (1u << (rng() % 8))); break;       // bit flip
        case 2: b.erase(pos, 1 + rng() % 8); break;                                     // delete
        case 3: b.insert(pos, tokens[rng() % (sizeof tokens / sizeof *tokens)]); break;  // JSON token
        case 4: b.resize(pos); break;                                                   // truncate
      }
      if (b.empty()) break;
    }
    try {
      StHeader h = parse_st_header(b, b.size(), "fuzz.safetensors");
      for (const auto& [name, t] : h.tensors) {
        ASSERT_LE(t.begin, t.end);
        ASSERT_LE(t.end, b.size() - h.data_start());
        ASSERT_EQ(t.end - t.begin, t.numel() * st_dtype_bytes(t.dtype));
      }
      ++parsed;
    } catch (const StoreError&) {
      ++rejected;
    }
  }
  EXPECT_GT(parsed, 0);
  EXPECT_GT(rejected, 0);
  std::printf("fuzzed safetensors headers: %d parsed, %d rejected\n", parsed, rejected);
}

}  // namespace
}  // namespace ringllama
