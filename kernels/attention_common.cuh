// What the two attention kernels share: how head_dim picks a kernel instance, and the layout of the
// per-lane output accumulators (lane l owns dimensions l, l + 32, l + 64, ... of a head).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/check.h"

namespace ringllama {

inline constexpr int kAttentionMaxHeadDim = 256;

// Calls f(std::integral_constant<int, J>) with J = ceil(head_dim / 32) rounded up to 1, 2, 4 or 8:
// the number of output dimensions each lane keeps in registers. Any even head_dim up to 256 works
// (24 and 40 run in the 32 and 64 instances, with the lanes past head_dim idle).
template <typename F>
void dispatch_head_dim(int64_t head_dim, const char* op, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 1>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 2>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 4>{});
  if (head_dim <= 256) return f(std::integral_constant<int, 8>{});
  throw_arg_error(op, "head_dim " + std::to_string(head_dim) + " over the supported 256");
}

// Shared checks of both launchers.
inline void check_attention_shape(const char* op, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                  int64_t kv_row_stride) {
  KERNEL_REQUIRE(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, op,
                 "n_heads (" + std::to_string(n_heads) + ") must be a positive multiple of n_kv_heads (" +
                     std::to_string(n_kv_heads) + ")");
  KERNEL_REQUIRE(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kAttentionMaxHeadDim, op,
                 "head_dim must be even and in [2, 256], got " + std::to_string(head_dim));
  // Keys and values are read as bf16 pairs (4-byte loads): rows must start on an even element.
  KERNEL_REQUIRE(kv_row_stride >= n_kv_heads * head_dim && kv_row_stride % 2 == 0, op,
                 "kv_row_stride must be even and >= n_kv_heads * head_dim, got " + std::to_string(kv_row_stride));
}

}  // namespace ringllama
