// The decode kernel of the paged attention (PagedAttentionBatch::decode_only: four warps of a block
// on different keys of one token's GQA group) against a double-precision CPU reference and against
// the general kernel on the same inputs, unsplit and split (the same partials and combine kernel).
//
// Each case is one decode step of a batch of sequences, one token each, over a shuffled paged cache
// of 16-token blocks: contexts 1, 31, 32, 33 (around one 32-key tile), 100, 1000 and 5000 (spans of
// many tiles, a last iteration of 1-3 tiles), every context above 1 after a nonzero item_start.
// Token rows are stored in reverse item order, and q sits inside wider rows (as in the fused QKV
// output), so that the kernel's indexing is checked, not only its arithmetic. Groups 1, 2, 3 and 4
// take the decode kernel; group 8 must fall back to the general kernel, bit for bit. Inputs are
// drawn fresh per run; the seed is printed with any failure. Outputs start as NaN.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/errors.h"
#include "kernels/attention_paged.cuh"
#include "kernels/check.h"
#include "kernels/device_info.h"
#include "tests/attention_batch_util.h"
#include "tests/attention_reference.h"
#include "tests/gpu_skip.h"

namespace ringllama {
namespace {

using bf16 = __nv_bfloat16;
using test::attention_ref;

template <typename D, typename H>
DeviceBuffer<D> to_device(const std::vector<H>& h) {
  DeviceBuffer<D> d(std::max<size_t>(h.size() * sizeof(H) / sizeof(D), 1), "test input");
  CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(H), cudaMemcpyHostToDevice));
  return d;
}

struct Case {
  int64_t group, n_kv_heads, head_dim;
  std::vector<int64_t> ctx;  // keys each sequence's token sees (its position + 1)
  int64_t pad;               // kv row stride = n_kv_heads * head_dim + pad (4: no 16-byte loads)
};

// The step of case c, run with and without decode_only at splits 1, 7, 64 and as
// attention_paged_splits picks; every result against the reference and against the general kernel.
void check_case(const Case& c, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t KVH = c.n_kv_heads, H = c.group * KVH, hd = c.head_dim, B = 16;
  const int64_t kv_dim = KVH * hd, stride = kv_dim + c.pad, q_dim = H * hd, q_stride = q_dim + 2 * kv_dim;
  const int64_t n = static_cast<int64_t>(c.ctx.size());
  int64_t blocks = 0, max_blocks = 0, max_ctx = 0;
  for (int64_t len : c.ctx) {
    blocks += (len + B - 1) / B;
    max_blocks = std::max(max_blocks, (len + B - 1) / B);
    max_ctx = std::max(max_ctx, len);
  }
  std::vector<int32_t> perm(blocks + 2);
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), gen);
  // Unwritten pool rows hold NaN: a key read outside its sequence's context shows.
  std::vector<bf16_t> kp(perm.size() * B * stride, 0x7FC0), vp(kp.size(), 0x7FC0);
  std::vector<bf16_t> qb(n * q_stride, 0x7FC0);
  std::vector<double> ref(n * q_dim);
  std::vector<int32_t> row0, count, start, tables(n * max_blocks, -1);
  int64_t used = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = c.ctx[i], nb = (len + B - 1) / B, tok = n - 1 - i;  // rows in reverse item order
    for (int64_t b = 0; b < nb; ++b) tables[i * max_blocks + b] = perm[used++];
    std::vector<double> q(q_dim), k(len * kv_dim), v(len * kv_dim);
    for (int64_t d = 0; d < q_dim; ++d) q[d] = bf16_to_f32(qb[tok * q_stride + d] = f32_to_bf16(1.5f * normal(gen)));
    for (int64_t p = 0; p < len; ++p) {
      const int64_t pr = tables[i * max_blocks + p / B] * B + p % B;
      for (int64_t d = 0; d < kv_dim; ++d) {
        const bf16_t kb = f32_to_bf16(normal(gen)), vb = f32_to_bf16(normal(gen));
        k[p * kv_dim + d] = bf16_to_f32(kp[pr * stride + d] = kb);
        v[p * kv_dim + d] = bf16_to_f32(vp[pr * stride + d] = vb);
      }
    }
    const auto o = attention_ref(q, k, v, len - 1, H, KVH, hd);
    std::copy(o.begin(), o.end(), ref.begin() + tok * q_dim);
    row0.push_back(static_cast<int32_t>(tok));
    count.push_back(1);
    start.push_back(static_cast<int32_t>(len - 1));
  }
  auto d_q = to_device<bf16>(qb), d_k = to_device<bf16>(kp), d_v = to_device<bf16>(vp);
  const test::DeviceAttentionBatch db(row0, count, start, tables, max_blocks, c.group);
  const PagedAttentionBatch& b = db.batch;
  const size_t ws_bytes = attention_paged_workspace_bytes(n, H, hd, kAttentionPagedMaxSplits);
  DeviceBuffer<unsigned char> ws(ws_bytes, "split partials");
  const int auto_splits = attention_paged_splits(b.n_tiles, KVH, max_ctx, cuda_sm_count(0), n, H, hd, ws_bytes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  auto run = [&](bool decode_only, int splits) {
    DeviceBuffer<bf16> out(n * q_dim, "attention output");
    CUDA_CHECK(cudaMemset(out.get(), 0xFF, n * q_dim * sizeof(bf16)));  // NaN
    CUDA_CHECK(cudaMemset(ws.get(), 0xFF, ws_bytes));  // NaN: a partial read before it is written shows
    PagedAttentionBatch bb = b;
    bb.decode_only = decode_only;
    PagedAttentionSplit sp{splits, n, ws.get(), ws_bytes};
    launch_attention_paged(d_q.get(), q_stride, d_k.get(), d_v.get(), stride, B, out.get(), q_dim, bb, H, KVH, hd,
                           scale, nullptr, sp);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> bits(n * q_dim);
    CUDA_CHECK(cudaMemcpy(bits.data(), out.get(), bits.size() * 2, cudaMemcpyDeviceToHost));
    return bits;
  };
  for (int splits : {1, 7, kAttentionPagedMaxSplits, auto_splits}) {
    const std::vector<uint16_t> general = run(false, splits), decode = run(true, splits);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t tok = n - 1 - i;
      double max_diff = 0, max_ref = 0, max_vs_general = 0, general_diff = 0;
      int64_t non_finite = 0, differ = 0;
      for (int64_t d = tok * q_dim; d < (tok + 1) * q_dim; ++d) {
        const double got = bf16_to_f32(decode[d]), gen_v = bf16_to_f32(general[d]), r = ref[d];
        non_finite += !std::isfinite(got) + !std::isfinite(gen_v);
        max_diff = std::max(max_diff, std::fabs(got - r));
        general_diff = std::max(general_diff, std::fabs(gen_v - r));
        max_ref = std::max(max_ref, std::fabs(r));
        max_vs_general = std::max(max_vs_general, std::fabs(got - gen_v));
        differ += decode[d] != general[d];
      }
      const std::string what = "group " + std::to_string(c.group) + " head_dim " + std::to_string(hd) + " pad " +
                               std::to_string(c.pad) + " batch " + std::to_string(n) + " context " +
                               std::to_string(c.ctx[i]) + " splits " + std::to_string(splits) + " seed " +
                               std::to_string(seed);
      EXPECT_EQ(non_finite, 0) << what;
      EXPECT_LE(max_diff / max_ref, 1e-2) << what;
      EXPECT_LE(general_diff / max_ref, 1e-2) << what;
      EXPECT_LE(max_vs_general / max_ref, 1e-2) << what;
      if (c.group > 4) EXPECT_EQ(differ, 0) << "group over 4 must take the general kernel: " << what;
      if (i == n - 1 && (splits == 1 || splits == auto_splits))
        std::printf("  decode attention %s: max|diff|/max|ref| %.2e (general kernel %.2e), vs general %.2e\n",
                    what.c_str(), max_diff / max_ref, general_diff / max_ref, max_vs_general / max_ref);
    }
  }
}

class AttentionDecode : public ::testing::Test {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU("the decode attention kernel tests"); }
};

const std::vector<std::vector<int64_t>> kBatches = {
    {5000}, {1, 33, 1000}, {1, 31, 32, 33, 100, 1000, 5000, 17}};

TEST_F(AttentionDecode, MatchesReferenceAndGeneralKernel) {
  const uint64_t seed = std::random_device{}();
  for (int64_t group : {1, 2, 3, 4, 8})
    for (int64_t hd : {64, 128})
      for (const auto& ctx : kBatches) check_case(Case{group, 2, hd, ctx, 0}, seed + group * 1000 + hd + ctx.size());
}

// Rows that 16-byte loads cannot take (the single-word path), and head sizes at the ends of the
// range: 256 (8 dimensions per lane) and 32 and 40 (lanes past the head idle).
TEST_F(AttentionDecode, OtherLoadPathsAndHeadSizes) {
  const uint64_t seed = std::random_device{}();
  for (int64_t group : {2, 4}) {
    check_case(Case{group, 2, 128, kBatches[2], 4}, seed + group);
    check_case(Case{group, 2, 64, kBatches[1], 2}, seed + group + 10);
  }
  check_case(Case{4, 1, 256, kBatches[1], 0}, seed + 20);
  check_case(Case{4, 3, 32, kBatches[2], 0}, seed + 21);
  check_case(Case{1, 2, 40, kBatches[1], 0}, seed + 22);
}

// What the kernel bench sizes a one-wave split from: at least one block per SM for the 8B's heads
// (about 68 KiB of shared memory each), none where the general kernel would run.
TEST_F(AttentionDecode, BlocksPerSm) {
  const int blocks = attention_paged_decode_blocks_per_sm(32, 8, 128);
  EXPECT_GE(blocks, 1);
  EXPECT_LE(blocks, 16);  // 4 warps each: no more than an SM's warps
  EXPECT_EQ(attention_paged_decode_blocks_per_sm(64, 8, 128), 0);  // group 8: the general kernel
  EXPECT_THROW(attention_paged_decode_blocks_per_sm(30, 8, 128), Error);  // not a multiple
}

// The decode step's split count (host code): one wave of blocks, at least 3 spans, capped like
// attention_paged_splits (shortest span, most spans, the workspace).
TEST(AttentionDecodeSplits, OneWaveAtLeastThree) {
  const size_t ws = attention_paged_workspace_bytes(64, 32, 128, kAttentionPagedMaxSplits);
  // One sequence at 32k on 132 SMs holding 3 blocks each: 396 / 8 blocks.
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 32768, 132, 3, 32, 128, ws), 49);
  EXPECT_EQ(attention_paged_decode_splits(4, 8, 32768, 132, 3, 32, 128, ws), 12);
  // 64 sequences fill more than a wave: 3 spans still (measured faster than 1).
  EXPECT_EQ(attention_paged_decode_splits(64, 8, 32768, 132, 3, 32, 128, ws), 3);
  // A short context: no span under the minimum.
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 300, 132, 3, 32, 128, ws), 2);
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 100, 132, 3, 32, 128, ws), 1);
  // The cap and the workspace.
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 1 << 20, 1000, 3, 32, 128, ws), kAttentionPagedMaxSplits);
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 32768, 132, 3, 32, 128, attention_paged_workspace_bytes(1, 32, 128, 5)),
            5);
  // No decode kernel for these heads, or nothing to split: one span.
  EXPECT_EQ(attention_paged_decode_splits(1, 8, 32768, 132, 0, 32, 128, ws), 1);
  EXPECT_EQ(attention_paged_decode_splits(0, 8, 32768, 132, 3, 32, 128, ws), 1);
}

// The batch the cases above are built with refuses host arrays that disagree, before any copy (so
// this runs without a GPU too: the message is the helper's, not a failed allocation's).
TEST(DeviceAttentionBatch, RefusesArraysThatDisagree) {
  const std::vector<int32_t> one = {0};
  auto refused = [](auto make) {
    try {
      make();
    } catch (const Error& e) {
      return std::string(e.what()).rfind("DeviceAttentionBatch:", 0) == 0;
    }
    return false;
  };
  EXPECT_TRUE(refused([&] { test::DeviceAttentionBatch({0, 1}, one, one, {0, 0}, 1, 1); }));  // 2 items, 1 count
  EXPECT_TRUE(refused([&] { test::DeviceAttentionBatch(one, one, one, {0, 0, 0}, 2, 1); }));  // 3 entries, stride 2
  EXPECT_TRUE(refused([&] { test::DeviceAttentionBatch(one, one, one, {0}, 0, 1); }));        // stride 0
  EXPECT_TRUE(refused([&] { test::DeviceAttentionBatch(one, one, one, {0}, 1, 0); }));        // group 0
}

}  // namespace
}  // namespace ringllama
