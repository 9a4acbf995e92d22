// What the CPU sampler (worker/sampler.cpp) and the GPU sampler (kernels/sample.cu) share, so that
// for the same logits, seed and step both pick the same token: the per-row parameters, the
// counter-based random number generator, the order of the tokens and the fixed-point weights.
//
// Plain C++ (no CUDA headers): the CPU engine includes it without the CUDA toolkit; nvcc compiles
// the same functions for the device.
//
// The selection rule, in exact integer arithmetic on both sides:
//   1. temperature 0 (or a non-finite largest logit): the argmax, the lowest index on ties;
//   2. tokens ranked by (logit descending, index ascending), NaN ranking as -inf;
//   3. weight w_i = round(exp((logit_i - max) / T) * 2^40), 0 below exp(-29) (it would round to 0);
//   4. top_k: the k best ranks; top_p: of those, the shortest ranked prefix whose weight reaches
//      ceil(top_p * total weight kept by top_k) (at least one token);
//   5. with x the 53 random bits of (seed, step) and W the kept weight, r = floor(x * W / 2^53);
//      the kept tokens are walked in INDEX order (not rank order: the GPU then needs thresholds
//      only, never a sort) and the first whose running weight exceeds r is the token.
// Integer sums do not depend on the order of addition, so a parallel reduction on the GPU and a
// loop on the CPU agree exactly. The one inexact step is exp(): the CUDA and C libraries may differ
// by an ulp, which moves a weight by one unit of 2^-40 about once in thousands of tokens, and a
// draw only when r lands on that unit.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define RL_SAMPLE_HD __host__ __device__ __forceinline__
#else
#define RL_SAMPLE_HD inline
#endif

namespace ringllama {

// One row of a launch_sample call: the sequence's sampling parameters and which draw this is.
struct SampleParams {
  double temperature;  // 0 = greedy (argmax); otherwise logits are divided by it
  double top_p;        // keep the shortest most-likely prefix with this much of the mass; >= 1 = all
  uint64_t seed;       // the sequence's seed
  uint64_t step;       // the sequence's draw counter: 0 for its first sampled token, then 1, 2, ...
  int32_t top_k;       // keep the k most likely tokens; <= 0 = all
  int32_t reserved;    // 0
};

// Largest vocabulary: n * 2^40 must fit a signed 64-bit sum of weights.
inline constexpr int64_t kSampleMaxVocab = int64_t{1} << 23;

// One unit of weight is 2^-40 of the most likely token's.
inline constexpr double kSampleWeightScale = 1099511627776.0;  // 2^40
// exp(-29) * 2^40 = 0.28 rounds to 0: no exp() is spent below it (NaN goes there too).
inline constexpr double kSampleMinExpArg = -29.0;

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter
// based generator, so draw `step` of a sequence needs no state but (seed, step).

struct Philox4x32 {
  uint32_t v[4];
};

RL_SAMPLE_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// 53 uniform random bits for draw `step` of the sequence seeded `seed`: key = seed, counter = step.
RL_SAMPLE_HD uint64_t random_bits53(uint64_t seed, uint64_t step) {
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), 0u, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return ((static_cast<uint64_t>(out.v[0]) << 32) | out.v[1]) >> 11;
}

// Uniform in [0, 1), a multiple of 2^-53: the same double on the CPU and the GPU.
RL_SAMPLE_HD double uniform01(uint64_t seed, uint64_t step) {
  return static_cast<double>(random_bits53(seed, step)) * 0x1.0p-53;
}

// floor(bits53 * total / 2^53), exactly: the draw's position in [0, total) for total > 0.
RL_SAMPLE_HD uint64_t sample_draw_point(uint64_t bits53, uint64_t total) {
#if defined(__CUDA_ARCH__)
  return (__umul64hi(bits53, total) << 11) | ((bits53 * total) >> 53);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits53) * total) >> 53);
#endif
}

// ---------------------------------------------------------------------------------------------
// Order and weights.

// An unsigned key whose order is the order of the logits: NaN ranks as -inf, and -0 ties with +0
// (as the float comparison says). Ties between equal keys go to the lower index.
RL_SAMPLE_HD uint32_t sample_key(float v) {
  if (v != v) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(v);
#else
  memcpy(&b, &v, sizeof b);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// round(exp((logit - max_logit) / temperature) * 2^40); 0 for NaN and far below the max.
// max_logit is the (finite) largest logit, so the argument is <= 0 and the weight <= 2^40.
RL_SAMPLE_HD uint64_t sample_weight(float logit, double max_logit, double temperature) {
  const double x = (static_cast<double>(logit) - max_logit) / temperature;
  if (!(x >= kSampleMinExpArg)) return 0;
  return static_cast<uint64_t>(exp(x) * kSampleWeightScale + 0.5);
}

// The weight the top_p prefix must reach: ceil(top_p * total), within [1, total].
RL_SAMPLE_HD uint64_t sample_top_p_target(double top_p, uint64_t total) {
  const double t = ceil(top_p * static_cast<double>(total));
  if (!(t >= 1.0)) return 1;
  if (t >= static_cast<double>(total)) return total;
  return static_cast<uint64_t>(t);
}

// The kept tokens are those ranked at or before a cut token (key, index): a higher key, or the
// same key and an index not above. {0, n - 1} keeps everything (no real token has key 0).
struct SampleCut {
  uint32_t key;
  int32_t index;
};

RL_SAMPLE_HD bool sample_kept(SampleCut c, uint32_t key, int32_t i) {
  return key > c.key || (key == c.key && i <= c.index);
}

}  // namespace ringllama
