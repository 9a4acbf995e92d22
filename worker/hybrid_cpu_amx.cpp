// AMX-BF16 tiles for the hybrid CPU matmul at 16 tokens and more (worker/hybrid_cpu_kernels.h).
//
// One tdpbf16ps multiplies 16 weight rows by 16 tokens over 32 inputs: C[m][n] += sum over pairs i
// of A[m][2i]*B[i][2n] + A[m][2i+1]*B[i][2n+1]. A is 16 rows of W as they lie (tileloadd with W's row
// stride), B is x packed into pairs (amx_pack_x), C is y transposed. Eight tile registers: a block of
// 32 rows x 32 tokens uses two A tiles, two B tiles and four C tiles, which halves the loads per
// multiply against one of each.
#include <cstring>

#include "worker/hybrid_cpu_kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ringllama::hybrid {

void amx_pack_x(const uint16_t* x, int64_t in, int64_t tokens, uint32_t* xp) {
  const int64_t kbs = in / kAmxK, tts = (tokens + kAmxTokens - 1) / kAmxTokens;
  for (int64_t kb = 0; kb < kbs; ++kb)
    for (int64_t tt = 0; tt < tts; ++tt) {
      uint32_t* tile = xp + (kb * tts + tt) * kAmxTokens * kAmxTokens;
      for (int64_t i = 0; i < kAmxK / 2; ++i)
        for (int64_t n = 0; n < kAmxTokens; ++n) {
          const int64_t t = tt * kAmxTokens + n;
          uint32_t pair = 0;  // x[t][k] in the low half, x[t][k + 1] in the high one, as in memory
          if (t < tokens) std::memcpy(&pair, x + t * in + kb * kAmxK + 2 * i, sizeof pair);
          tile[i * kAmxTokens + n] = pair;
        }
    }
}

#if defined(__x86_64__)

bool amx_usable() {
  static const bool usable = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    if (!amx_bf16 || !amx_tile) return false;
    // Linux hands out the 8 KiB of tile state only to processes that ask (arch_prctl), for all
    // their threads at once; without it the first tile instruction is a SIGILL.
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

namespace {

#define RL_AMX_TARGET target("amx-tile,amx-bf16,avx512f")

// ldtilecfg's 64 bytes: palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC's tile intrinsics are asm statements that tell the compiler nothing of the memory they read
// or write; this barrier makes the stores before a tile load, and the loads after a tile store, real.
#define RL_MEMORY_BARRIER(p) __asm__ volatile("" ::"r"(p) : "memory")

// C tiles 0..3 = rows [0,16) x tokens [0,16), rows [0,16) x [16,32), rows [16,32) x [0,16),
// rows [16,32) x [16,32); A tiles 4, 5; B tiles 6, 7. RT row tiles, TN token tiles (1 or 2 each).
template <int RT, int TN>
__attribute__((RL_AMX_TARGET)) void amx_block(const uint16_t* w, int64_t in, const uint32_t* xp, int64_t tts,
                                              float (&c)[4][kAmxRows][kAmxTokens]) {
  const int64_t stride = in * 2, kbs = in / kAmxK, tile = kAmxTokens * kAmxTokens;
  _tile_zero(0);
  if constexpr (TN == 2) _tile_zero(1);
  if constexpr (RT == 2) _tile_zero(2);
  if constexpr (RT == 2 && TN == 2) _tile_zero(3);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    const uint16_t* a = w + kb * kAmxK;
    const uint32_t* b = xp + kb * tts * tile;
    _tile_loadd(4, a, stride);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TN == 2) {
      _tile_loadd(7, b + tile, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (RT == 2) {
      _tile_loadd(5, a + kAmxRows * in, stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (TN == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0], 64);
  if constexpr (TN == 2) _tile_stored(1, c[1], 64);
  if constexpr (RT == 2) _tile_stored(2, c[2], 64);
  if constexpr (RT == 2 && TN == 2) _tile_stored(3, c[3], 64);
  RL_MEMORY_BARRIER(&c);
}

}  // namespace

__attribute__((RL_AMX_TARGET)) void amx_rows(const uint16_t* w, int64_t in, int64_t rows, const uint32_t* xp,
                                             int64_t tokens, float* y, int64_t ldy) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = kAmxRows;
    cfg.colsb[i] = 64;
  }
  RL_MEMORY_BARRIER(&cfg);
  _tile_loadconfig(&cfg);
  const int64_t tts = (tokens + kAmxTokens - 1) / kAmxTokens, tile = kAmxTokens * kAmxTokens;
  alignas(64) float c[4][kAmxRows][kAmxTokens];
  for (int64_t r = 0; r < rows;) {
    const int rt = rows - r >= 2 * kAmxRows ? 2 : 1;
    // The tokens inside the rows: a 32-row block's weights stay in L2 for the second token pair.
    for (int64_t tt = 0; tt < tts;) {
      const int tn = tts - tt >= 2 ? 2 : 1;
      const uint16_t* wr = w + r * in;
      const uint32_t* xt = xp + tt * tile;
      if (rt == 2 && tn == 2) {
        amx_block<2, 2>(wr, in, xt, tts, c);
      } else if (rt == 2) {
        amx_block<2, 1>(wr, in, xt, tts, c);
      } else if (tn == 2) {
        amx_block<1, 2>(wr, in, xt, tts, c);
      } else {
        amx_block<1, 1>(wr, in, xt, tts, c);
      }
      for (int j = 0; j < rt; ++j)
        for (int q = 0; q < tn; ++q) {
          const float(&ct)[kAmxRows][kAmxTokens] = c[j * 2 + q];
          for (int64_t n = 0; n < kAmxTokens; ++n) {
            const int64_t t = (tt + q) * kAmxTokens + n;
            if (t >= tokens) break;
            for (int64_t m = 0; m < kAmxRows; ++m) y[t * ldy + r + j * kAmxRows + m] = ct[m][n];
          }
        }
      tt += tn;
    }
    r += rt * kAmxRows;
  }
  _tile_release();
}

#else  // not x86-64: no tiles

bool amx_usable() { return false; }
void amx_rows(const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t) {}

#endif

}  // namespace ringllama::hybrid
