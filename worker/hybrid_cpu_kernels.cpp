// Block kernels of the hybrid CPU matmul (worker/hybrid_cpu_kernels.h).
//
// The SIMD kernels are compiled with target attributes rather than per-file flags: the rest of the
// build stays generic, and no inline function of a shared header gets compiled for an ISA that the
// running CPU may lack (the linker would keep one copy of it for everyone).
//
// bf16 pairs: a 32-bit lane of the weights' row holds two neighbours, w[2i] in its low half and
// w[2i+1] in its high half. vdpbf16ps adds w[2i]*x[2i] + w[2i+1]*x[2i+1] into lane i; the AVX2
// kernel does the same with two FMAs, the even element shifted up and the odd one masked, which
// turns bf16 into fp32 with one instruction per 8 values. The two kernels therefore have the same
// shape, lane for lane; only the width (16 vs 8 lanes) and the pair step differ.
#include "worker/hybrid_cpu_kernels.h"

#include <cstring>

#include "common/bf16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ringllama::hybrid {
namespace {

// Fills k.block[r-1][t-1] with Block<r, t> for every r <= R, t <= T (TB: the largest T).
template <template <int, int> class Block, int TB, int R, int T>
void fill(Kernel& k) {
  k.block[R - 1][T - 1] = &Block<R, T>::run;
  if constexpr (T > 1) {
    fill<Block, TB, R, T - 1>(k);
  } else if constexpr (R > 1) {
    fill<Block, TB, R - 1, TB>(k);
  }
}

template <template <int, int> class Block, int RB, int TB>
Kernel make_kernel() {
  static_assert(RB <= kMaxBlockRows && TB <= kMaxBlockTokens);
  Kernel k;
  k.rows = RB;
  k.tokens = TB;
  fill<Block, TB, RB, TB>(k);
  return k;
}

// ---- scalar: the reference shape, any CPU --------------------------------------------------------

template <int R, int T>
struct ScalarBlock {
  static void run(const uint16_t* w, const uint16_t* x, int64_t in, float* y, int64_t ldy) {
    float acc[R][T] = {};
    for (int64_t k = 0; k < in; ++k) {
      float wk[R];
      for (int r = 0; r < R; ++r) wk[r] = bf16_to_f32(w[r * in + k]);
      for (int t = 0; t < T; ++t) {
        const float xk = bf16_to_f32(x[t * in + k]);
        for (int r = 0; r < R; ++r) acc[r][t] += wk[r] * xk;
      }
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) y[t * ldy + r] = acc[r][t];
  }
};

#if defined(__x86_64__)

// The last n < S values of `rows` rows (stride ld) copied into rows of S zero-padded values, so that
// the tail of a row is one more full step (the zeros add nothing).
template <int S>
void copy_tail(uint16_t (*dst)[S], int rows, const uint16_t* src, int64_t ld, int64_t n) {
  for (int r = 0; r < rows; ++r) std::memcpy(dst[r], src + r * ld, static_cast<size_t>(n) * sizeof(uint16_t));
}

// ---- AVX2 + FMA: 8 lanes, 16 bf16 per step -------------------------------------------------------

#define RL_AVX2_TARGET target("avx2,fma")
#define RL_AVX2 __attribute__((RL_AVX2_TARGET, always_inline)) inline

RL_AVX2 __m256 even_avx2(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
RL_AVX2 __m256 odd_avx2(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

RL_AVX2 float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[r][t] += the pairs of one 16-value step of R weight rows (stride ldw) and T tokens (ldx).
// A token is loaded just before its FMAs, so a 2x4 block stays within the 16 registers.
template <int R, int T>
RL_AVX2 void step_avx2(__m256 (&acc)[R][T], const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx) {
  __m256 we[R], wo[R];
  for (int r = 0; r < R; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw));
    we[r] = even_avx2(v);
    wo[r] = odd_avx2(v);
  }
  for (int t = 0; t < T; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx));
    const __m256 xe = even_avx2(v), xo = odd_avx2(v);
    for (int r = 0; r < R; ++r) {
      acc[r][t] = _mm256_fmadd_ps(we[r], xe, acc[r][t]);
      acc[r][t] = _mm256_fmadd_ps(wo[r], xo, acc[r][t]);
    }
  }
}

template <int R, int T>
struct Avx2Block {
  __attribute__((RL_AVX2_TARGET)) static void run(const uint16_t* w, const uint16_t* x, int64_t in, float* y,
                                                  int64_t ldy) {
    constexpr int S = 16;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + S <= in; k += S) step_avx2<R, T>(acc, w + k, in, x + k, in);
    if (k < in) {
      uint16_t wt[R][S] = {}, xt[T][S] = {};
      copy_tail<S>(wt, R, w + k, in, in - k);
      copy_tail<S>(xt, T, x + k, in, in - k);
      step_avx2<R, T>(acc, wt[0], S, xt[0], S);
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) y[t * ldy + r] = hsum_avx2(acc[r][t]);
  }
};

// ---- AVX-512 BF16: 16 lanes, 32 bf16 per step ----------------------------------------------------

#define RL_AVX512_TARGET target("avx512f,avx512bf16,avx512bw,avx512vl")
#define RL_AVX512 __attribute__((RL_AVX512_TARGET, always_inline)) inline

// GCC 12's _mm512_reduce_add_ps, unmasked shuffles and 512-to-128 casts warn (an "undefined"
// register in its header, -Wuninitialized); a masked shuffle with every lane set is the same
// instruction without it, and the last four lanes go through memory (once per block).
RL_AVX512 float hsum_avx512(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, _MM_SHUFFLE(1, 0, 3, 2)));  // 256-bit halves
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // 128-bit quarters
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// acc[r][t] += the pairs of one 32-value step of R weight rows (stride ldw) and T tokens (ldx);
// vdpbf16ps: lane i gets w[2i]*x[2i] + w[2i+1]*x[2i+1], as the two FMAs of step_avx2.
template <int R, int T>
RL_AVX512 void step_avx512(__m512 (&acc)[R][T], const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx) {
  __m512i wv[R];
  for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw);
  for (int t = 0; t < T; ++t) {
    const __m512i v = _mm512_loadu_si512(x + t * ldx);
    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)v);
  }
}

template <int R, int T>
struct Avx512Block {
  __attribute__((RL_AVX512_TARGET)) static void run(const uint16_t* w, const uint16_t* x, int64_t in, float* y,
                                                    int64_t ldy) {
    constexpr int S = 32;
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + S <= in; k += S) step_avx512<R, T>(acc, w + k, in, x + k, in);
    if (k < in) {
      uint16_t wt[R][S] = {}, xt[T][S] = {};
      copy_tail<S>(wt, R, w + k, in, in - k);
      copy_tail<S>(xt, T, x + k, in, in - k);
      step_avx512<R, T>(acc, wt[0], S, xt[0], S);
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) y[t * ldy + r] = hsum_avx512(acc[r][t]);
  }
};

#endif  // __x86_64__

}  // namespace

// Block sizes from the register files: AVX2 has 16 ymm registers, and a 2x4 block holds 8
// accumulators, 4 weight halves and 2 token halves; AVX-512 has 32 zmm registers, and a 4x4 block
// holds 16 accumulators, 4 weight rows and the token being multiplied. Larger T re-reads x less
// per weight row, which is what limits the large batches (x lives in L2).
const Kernel& kernel_for(CpuIsa isa) {
  static const Kernel scalar = make_kernel<ScalarBlock, 2, 4>();
#if defined(__x86_64__)
  static const Kernel avx2 = make_kernel<Avx2Block, 2, 4>();
  static const Kernel avx512 = make_kernel<Avx512Block, 4, 4>();
  switch (isa) {
    case CpuIsa::amx:
    case CpuIsa::avx512:
      return avx512;
    case CpuIsa::avx2:
      return avx2;
    case CpuIsa::scalar:
      break;
  }
#else
  (void)isa;
#endif
  return scalar;
}

}  // namespace ringllama::hybrid
