// Packed stores (--weights fp8|int4): the layout of the manifest, values within each format's
// bound of the bf16 source (quantized exactly as common/quant.h says), the same bytes however the
// writer's threads slice the tensors, and GGUF Q4_0/Q4_1 taken over exactly as int4 groups of 32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/quant.h"
#include "common/store.h"
#include "daemon/pack.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

PackOptions options(const std::string& out, DType weights, int64_t group = 0, int threads = 1) {
  PackOptions o;
  o.out = out;
  o.progress = false;
  o.weights = weights;
  o.group_size = group;
  o.threads = threads;
  return o;
}

// Every group of a store, read and checked.
std::vector<std::vector<char>> read_groups(const Store& s) {
  std::vector<std::vector<char>> out;
  for (const GroupEntry& g : s.manifest().groups) {
    out.emplace_back(g.size);
    s.read_group(g, out.back().data());
  }
  return out;
}

// The values of a stored tensor as its format defines them.
std::vector<float> values(const TensorEntry& t, const char* group) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  const char* d = group + t.offset;
  if (t.dtype == DType::BF16) {
    for (size_t i = 0; i < v.size(); ++i) {
      bf16_t b;
      std::memcpy(&b, d + 2 * i, 2);
      v[i] = bf16_to_f32(b);
    }
    return v;
  }
  const int64_t rows = t.shape[0], in = t.shape[1];
  for (int64_t r = 0; r < rows; ++r) {
    if (t.dtype == DType::FP8_E4M3) {
      float scale;
      std::memcpy(&scale, group + t.scales_offset + 4 * r, 4);
      dequantize_row_fp8(reinterpret_cast<const uint8_t*>(d) + r * in, scale, in, v.data() + r * in);
    } else {
      const auto* sm = reinterpret_cast<const uint16_t*>(group + t.scales_offset) + r * (in / t.group_size) * 2;
      dequantize_row_int4(reinterpret_cast<const uint8_t*>(d) + r * (in / 2), sm, in, t.group_size, v.data() + r * in);
    }
  }
  return v;
}

void expect_layout(const Manifest& m) {
  for (const GroupEntry& g : m.groups) {
    EXPECT_EQ(g.offset % kGroupAlign, 0u);
    for (const TensorEntry& t : g.tensors) {
      EXPECT_EQ(t.offset % kTensorAlign, 0u) << t.name;
      if (!dtype_packed(t.dtype)) continue;
      EXPECT_TRUE(tensor_packable(t.name)) << t.name;
      EXPECT_EQ(t.scales_offset % kTensorAlign, 0u) << t.name;
      EXPECT_GE(t.scales_offset, t.offset + t.size) << t.name;
      EXPECT_LE(t.scales_offset + t.scales_size, g.size) << t.name;
    }
  }
}

TEST(PackPacked, RandomFp8AndInt4AreTheBf16ValuesQuantized) {
  TempDir tmp;
  const WriteResult ref = pack_random("tiny", 9, 2, options(tmp / "bf16", DType::BF16));
  const WriteResult fp8 = pack_random("tiny", 9, 2, options(tmp / "fp8", DType::FP8_E4M3));
  // Three threads slice the groups at 4 KiB boundaries in the middle of rows.
  const WriteResult int4 = pack_random("tiny", 9, 2, options(tmp / "int4", DType::INT4, 32, 3));
  EXPECT_LT(fp8.manifest.weights_size, ref.manifest.weights_size);
  EXPECT_LT(int4.manifest.weights_size, fp8.manifest.weights_size);
  expect_layout(fp8.manifest);
  expect_layout(int4.manifest);

  const Store sr = Store::open(tmp / "bf16");
  const auto gr = read_groups(sr);
  int packed_tensors = 0;
  for (const std::string& name : {"fp8", "int4"}) {
    const Store s = Store::open(tmp / name);
    const auto gs = read_groups(s);
    for (size_t gi = 0; gi < gs.size(); ++gi) {
      const GroupEntry& g = s.manifest().groups[gi];
      const GroupEntry& g0 = sr.manifest().groups[gi];
      for (size_t ti = 0; ti < g.tensors.size(); ++ti) {
        const TensorEntry& t = g.tensors[ti];
        const std::vector<float> src = values(g0.tensors[ti], gr[gi].data());
        const std::vector<float> got = values(t, gs[gi].data());
        if (!tensor_packable(t.name)) {
          EXPECT_EQ(t.dtype, DType::BF16) << t.name;
          EXPECT_EQ(got, src) << g.label() << " " << t.name;
          continue;
        }
        if (t.dtype == DType::BF16) {  // the tiny shape's w2 has 172 inputs: no int4 groups of 32
          EXPECT_EQ(name, std::string("int4"));
          EXPECT_NE(t.shape[1] % 32, 0) << t.name;
          continue;
        }
        ++packed_tensors;
        const int64_t rows = t.shape[0], in = t.shape[1];
        // The stored bytes are exactly the quantization of the bf16 values, row by row.
        for (int64_t r = 0; r < rows; ++r) {
          const float* w = src.data() + r * in;
          const char* base = gs[gi].data();
          if (t.dtype == DType::FP8_E4M3) {
            std::vector<uint8_t> q(in);
            const float scale = quantize_row_fp8(w, in, q.data());
            ASSERT_EQ(std::memcmp(q.data(), base + t.offset + r * in, in), 0) << t.name << " row " << r;
            ASSERT_EQ(std::memcmp(&scale, base + t.scales_offset + 4 * r, 4), 0) << t.name << " row " << r;
            // Within half an e4m3 step, or clipped to 448 x scale (the scale search may clip a few).
            for (int64_t c = 0; c < in; ++c)
              ASSERT_LE(std::fabs(got[r * in + c] - w[c]),
                        std::max(std::fabs(w[c]) - 448 * scale, 0.0f) + std::fabs(w[c]) * 0x1p-4f + scale * 0x1p-10f +
                            1e-12f);
          } else {
            std::vector<uint8_t> q(in / 2);
            std::vector<uint16_t> sm(in / t.group_size * 2);
            quantize_row_int4(w, in, t.group_size, q.data(), sm.data());
            ASSERT_EQ(std::memcmp(q.data(), base + t.offset + r * (in / 2), in / 2), 0) << t.name << " row " << r;
            ASSERT_EQ(std::memcmp(sm.data(), base + t.scales_offset + r * sm.size() * 2, sm.size() * 2), 0);
            // The nearest of the group's 16 levels (the scale search may leave a few weights
            // outside [min, min + 15 step], clipped to the end level).
            for (int64_t c = 0; c < in; ++c) {
              const float step = half_to_float(sm[(c / t.group_size) * 2]);
              const float min = half_to_float(sm[(c / t.group_size) * 2 + 1]);
              for (int l = 0; l < 16; ++l)
                ASSERT_LE(std::fabs(got[r * in + c] - w[c]), std::fabs(l * step + min - w[c]) + 1e-6f)
                    << t.name << " row " << r << " col " << c;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(packed_tensors, 10);

  // One thread or three: the same bytes.
  pack_random("tiny", 9, 2, options(tmp / "int4-1", DType::INT4, 32, 1));
  EXPECT_EQ(test::read_file(tmp / "int4-1/weights.bin"), test::read_file(tmp / "int4/weights.bin"));
  EXPECT_EQ(Manifest::load(tmp / "int4-1/manifest.yaml").to_yaml(), Manifest::load(tmp / "int4/manifest.yaml").to_yaml());
}

TEST(PackPacked, CommandLineChecksTheFormatOptions) {
  TempDir tmp;
  auto bad_group = test::run_bin("ringllama-pack", {"--random", "tiny", "--out", tmp / "a", "--weights", "int4",
                                                    "--group-size", "64", "--quiet"});
  EXPECT_NE(bad_group.status, 0);
  EXPECT_NE(bad_group.err.find("--group-size"), std::string::npos) << bad_group.err;
  auto group_fp8 = test::run_bin("ringllama-pack", {"--random", "tiny", "--out", tmp / "b", "--weights", "fp8",
                                                    "--group-size", "32", "--quiet"});
  EXPECT_NE(group_fp8.status, 0);
  EXPECT_NE(group_fp8.err.find("--group-size goes with --weights int4"), std::string::npos) << group_fp8.err;
  auto bad_weights = test::run_bin("ringllama-pack", {"--random", "tiny", "--out", tmp / "c", "--weights", "int8"});
  EXPECT_NE(bad_weights.status, 0);
  auto ok = test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "1", "--out", tmp / "d", "--weights",
                                             "fp8", "--quiet"});
  ASSERT_EQ(ok.status, 0) << ok.err;
  EXPECT_NE(ok.out.find("weights fp8_e4m3 x 8"), std::string::npos) << ok.out;  // 7 per layer and output
  const Manifest m = Manifest::load(tmp / "d/manifest.yaml");
  EXPECT_EQ(m.attn(0).tensor("wq").dtype, DType::FP8_E4M3);
  EXPECT_EQ(m.globals().tensor("tok_embeddings").dtype, DType::BF16);
  auto verify = test::run_bin("ringllama-pack", {"--verify", tmp / "d"});
  EXPECT_EQ(verify.status, 0) << verify.err;
}

// ---- GGUF ----

int shell(const std::string& cmd, const std::string& log) { return std::system((cmd + " > " + log + " 2>&1").c_str()); }

std::vector<float> read_f32(const std::string& path) {
  const std::string b = test::read_file(path);
  std::vector<float> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

class PackPackedGguf : public ::testing::TestWithParam<std::string> {};

// tests/gguf_fixture.py writes a fixture's weights as GGUF blocks of one type (rows that are no
// whole number of blocks stay F32) and the values gguf.quants.dequantize reads from them.
TEST_P(PackPackedGguf, MatchesGgufQuants) {
  TempDir tmp;
  if (shell("python3 -c 'import gguf, tokenizers, numpy'", tmp / "py.log") != 0)
    GTEST_SKIP() << "python3 with gguf, tokenizers and numpy is needed: " << test::read_file(tmp / "py.log");
  const std::string type = GetParam();
  const std::string src = fs::path(test::data_dir()).parent_path().parent_path().string();
  const std::string gguf = tmp / "m.gguf", exp = tmp / "exp";
  ASSERT_EQ(shell("python3 " + src + "/tests/gguf_fixture.py model " + test::data_dir() +
                      "/llama31_gqa_untied/hf " + gguf + " " + type + " " + exp,
                  tmp / "fixture.log"),
            0)
      << test::read_file(tmp / "fixture.log");
  const bool q4 = type != "Q8_0";
  const std::string weights = q4 ? "int4" : "fp8";
  auto p = test::run_bin("ringllama-pack", {"--gguf", gguf, "--out", tmp / "store", "--weights", weights, "--quiet"});
  ASSERT_EQ(p.status, 0) << p.err;
  const Store s = Store::open(tmp / "store");
  const auto groups = read_groups(s);
  int exact = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const GroupEntry& g = s.manifest().groups[gi];
    for (const TensorEntry& t : g.tensors) {
      const std::vector<float> want = read_f32(exp + "/" + hf_tensor_name(g, t.name) + ".f32");
      const std::vector<float> got = values(t, groups[gi].data());
      ASSERT_EQ(want.size(), got.size()) << t.name;
      if (t.dtype == DType::BF16) {
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_LE(std::fabs(got[i] - want[i]), std::fabs(want[i]) * 0x1p-8f) << g.label() << " " << t.name;
      } else if (t.dtype == DType::INT4) {
        // Q4_0 (q - 8) * d and Q4_1 d * q + m are int4 groups of 32: the very values (Q4_0's
        // 0 * d may be -0 where q * d + (-8d) is +0, hence == rather than the bits).
        EXPECT_EQ(t.group_size, 32) << t.name;
        EXPECT_EQ(got, want) << g.label() << " " << t.name;
        ++exact;
      } else {
        const int64_t in = t.shape[1];
        for (int64_t r = 0; r < t.shape[0]; ++r) {
          float scale;
          std::memcpy(&scale, groups[gi].data() + t.scales_offset + 4 * r, 4);
          for (int64_t c = 0; c < in; ++c) {
            const float w = want[r * in + c];
            ASSERT_LE(std::fabs(got[r * in + c] - w), std::fabs(w) * 0x1p-4f + scale * 0x1p-10f + 1e-12f);
          }
        }
        ++exact;
      }
    }
  }
  EXPECT_GT(exact, 5);
}

INSTANTIATE_TEST_SUITE_P(Types, PackPackedGguf, ::testing::Values("Q4_0", "Q4_1", "Q8_0"));

}  // namespace
}  // namespace ringllama
