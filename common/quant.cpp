#include "common/quant.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "common/errors.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ringllama {

namespace {

// Every e4m3fn value, by its bits: decoding is a lookup.
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 0xF, m = b & 7;
    float v = e == 0 ? std::ldexp(static_cast<float>(m), -9)              // subnormal: m/8 * 2^-6
                     : std::ldexp(static_cast<float>(8 + m), e - 7 - 3);  // (1 + m/8) * 2^(e-7)
    if ((b & 0x7F) == 0x7F) v = NAN;
    t[static_cast<size_t>(b)] = (b & 0x80) ? -v : v;
  }
  return t;
}

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> t = make_e4m3_table();
  return t;
}

// The searches' sizes. fp8: scales amax / (448 - k * kFp8Step), k = 0..kFp8Candidates. int4: inverse
// scales (15 + kInt4Lo + kInt4Step * i) / (max - min), i = 0..kInt4Candidates, then at most
// kInt4Rounds rounds of refitting. llama.cpp's Q4_K tries 21 inverse scales (-1, 0.1, 20); on
// SmolLM2's weights 6 find 98 % of that gain (fp8: 5 scales find 90 % of what 17 do) at a fraction
// of the packing time.
constexpr int kFp8Candidates = 4;
constexpr float kFp8Step = 8.0f;
constexpr int kInt4Candidates = 5;
constexpr double kInt4Lo = -1.0;
constexpr double kInt4Step = 0.4;
constexpr int kInt4Rounds = 3;

}  // namespace

float e4m3_to_float(uint8_t b) { return e4m3_table()[b]; }

uint8_t float_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7FFFFFFF;
  if (a > 0x7F800000) return 0x7F;             // NaN
  if (a >= 0x43E00000) return sign | 0x7E;     // |f| >= 448, infinity included: saturate
  if (a < 0x3C800000) {                        // |f| < 2^-6: multiples of the subnormal step 2^-9
    float m;
    std::memcpy(&m, &a, 4);
    // Exact scaling, then round to nearest even; 8 steps is 2^-6, whose code 0x08 is the smallest normal.
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(m * 512.0f)));
  }
  // Normal: keep 3 of the 23 mantissa bits, round to nearest even on the 20 dropped (a carry moves
  // into the exponent, as it should), and rebias the exponent from 127 to 7.
  const uint32_t r = a + 0x7FFFF + ((a >> 20) & 1);
  const uint32_t code = (r >> 20) - (120u << 3);
  return static_cast<uint8_t>(sign | std::min<uint32_t>(code, 0x7E));
}

// Both on the bits, without library calls: the int4 search converts a few halves per candidate.
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
  uint32_t u;
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;  // subnormal: exact
    std::memcpy(&u, &v, 4);
  } else if (e == 31) {
    u = 0x7F800000 | (m << 13);  // infinity, or NaN keeping its payload
  } else {
    u = ((e + 127 - 15) << 23) | (m << 13);
  }
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7FFFFFFF;
  if (a > 0x7F800000) return 0x7E00;                  // NaN
  if (a >= 0x477FF000) return sign | 0x7C00;           // >= 65520 rounds past 65504: infinity
  if (a < 0x38800000) {                                // below 2^-14: multiples of 2^-24
    float m;
    std::memcpy(&m, &a, 4);
    // Exact scaling, then round to nearest even by adding 1.5 * 2^23 (below 2^10, far from
    // the float's limits); 1024 steps is 2^-14, whose code 0x0400 is the smallest normal.
    const float r = (m * 0x1p24f + 0x1.8p23f) - 0x1.8p23f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  // Normal: keep 10 of the 23 mantissa bits, round to nearest even on the 13 dropped (a carry moves
  // into the exponent), and rebias the exponent from 127 to 15.
  const uint32_t r = a + 0xFFF + ((a >> 13) & 1);
  return static_cast<uint16_t>(sign | ((r - (112u << 23)) >> 13));
}

namespace {

// v rounded to the nearest integer, ties to even, for |v| < 2^51: the addition rounds in the default
// mode. std::nearbyint does the same through a library call that saves the floating-point
// environment, which the searches below would pay on every weight of every candidate.
inline double round_even(double v) {
  constexpr double kMagic = 0x1.8p52;
  return (v + kMagic) - kMagic;
}

// Squared error of an fp8 row under `scale`: every product e4m3 value x scale is exact in double
// (4 significant bits times 24), so the sum is the error of the float dequantization up to its
// final rounding.
double fp8_error(const float* w, int64_t n, float scale) {
  const std::array<float, 256>& t = e4m3_table();
  double err = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double d = static_cast<double>(t[float_to_e4m3(w[c] / scale)]) * scale - w[c];
    err += d * d;
  }
  return err;
}

}  // namespace

float quantize_row_fp8(const float* w, int64_t n, uint8_t* q, ScaleRule rule) {
  float amax = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (!std::isfinite(w[c])) throw Error(fmt::format("fp8: weight {} of a row is {}", c, w[c]));
    amax = std::max(amax, std::fabs(w[c]));
  }
  if (amax == 0) {
    std::memset(q, 0, static_cast<size_t>(n));
    return 0.0f;
  }
  float scale = amax / kE4m3Max;
  if (rule == ScaleRule::kSearch) {
    // Candidates amax / (448 - k * kFp8Step): amax maps to 448, 440, ..., 416, so no weight
    // saturates; each moves the row's weights along e4m3's grid. (Smaller scales, which clip the
    // largest weights, measure a lower squared error than 448 too, but a worse perplexity.) Every
    // candidate is a correctly rounded float division, so each machine tries the same scales.
    double best = fp8_error(w, n, scale);
    for (int k = 1; k <= kFp8Candidates; ++k) {
      const float s = amax / (kE4m3Max - static_cast<float>(k) * kFp8Step);
      const double err = fp8_error(w, n, s);
      if (err < best) best = err, scale = s;
    }
  }
  // The largest |w| / scale may come out a hair above 448: float_to_e4m3 saturates it.
  for (int64_t c = 0; c < n; ++c) q[c] = float_to_e4m3(w[c] / scale);
  return scale;
}

void dequantize_row_fp8(const uint8_t* q, float scale, int64_t n, float* out) {
  const std::array<float, 256>& t = e4m3_table();
  for (int64_t c = 0; c < n; ++c) out[c] = t[q[c]] * scale;
}

namespace {

// One int4 group's candidate: the halves and the squared error they give.
struct Int4Fit {
  uint16_t scale_h = 0, min_h = 0;
  double err = 0;
};

// What every candidate of a group shares: its size, sum x and sum x^2.
struct GroupSums {
  double n = 0, x = 0, xx = 0;
};

// The sums over a group that a least-squares (scale, min) for fixed levels q needs. Sums of levels
// are integers below 2^53, exact in any order; sum q x is added in a fixed order (below).
struct LevelSums {
  double q = 0, qq = 0, qx = 0;
};

// The nearest level of x under (scale, min): q = clamp(round_even((x - min) / scale), 0, 15), 0
// where scale is 0. Clamping first is the same (0 and 15 are integers) and keeps v small.
inline double int4_level(double x, double scale, double min) {
  if (scale == 0) return 0;
  return round_even(std::clamp((x - min) / scale, 0.0, 15.0));
}

// Levels q = clamp(round_even((x - base) * inv), 0, 15) of a group and their sums. This loop is
// the searches' cost. It keeps kLanes partial sums of q x, element j going to lane j % kLanes, the
// lanes added in order at the end: SSE2 (every x86-64) runs them two by two in vector registers,
// other targets one by one, with the same result (the operations are the same IEEE ones, in the
// same order; max and min are exact). Compilers turn the scalar clamp into branches, hence the
// explicit vectors.
LevelSums int4_levels(const float* x, int64_t g, double base, double inv) {
  constexpr int kLanes = 4;
  double q[kLanes] = {}, qq[kLanes] = {}, qx[kLanes] = {};
  int64_t j = 0;
#if defined(__SSE2__)
  const __m128d vb = _mm_set1_pd(base), vi = _mm_set1_pd(inv), zero = _mm_setzero_pd(), top = _mm_set1_pd(15.0);
  const __m128d magic = _mm_set1_pd(0x1.8p52);
  __m128d q0 = zero, q1 = zero, qq0 = zero, qq1 = zero, qx0 = zero, qx1 = zero;
  for (; j + kLanes <= g; j += kLanes) {
    const __m128 f = _mm_loadu_ps(x + j);
    const __m128d x0 = _mm_cvtps_pd(f), x1 = _mm_cvtps_pd(_mm_movehl_ps(f, f));
    __m128d l0 = _mm_min_pd(_mm_max_pd(_mm_mul_pd(_mm_sub_pd(x0, vb), vi), zero), top);
    __m128d l1 = _mm_min_pd(_mm_max_pd(_mm_mul_pd(_mm_sub_pd(x1, vb), vi), zero), top);
    l0 = _mm_sub_pd(_mm_add_pd(l0, magic), magic);
    l1 = _mm_sub_pd(_mm_add_pd(l1, magic), magic);
    q0 = _mm_add_pd(q0, l0), qq0 = _mm_add_pd(qq0, _mm_mul_pd(l0, l0)), qx0 = _mm_add_pd(qx0, _mm_mul_pd(l0, x0));
    q1 = _mm_add_pd(q1, l1), qq1 = _mm_add_pd(qq1, _mm_mul_pd(l1, l1)), qx1 = _mm_add_pd(qx1, _mm_mul_pd(l1, x1));
  }
  _mm_storeu_pd(q, q0), _mm_storeu_pd(q + 2, q1);
  _mm_storeu_pd(qq, qq0), _mm_storeu_pd(qq + 2, qq1);
  _mm_storeu_pd(qx, qx0), _mm_storeu_pd(qx + 2, qx1);
#else
  for (; j + kLanes <= g; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double v = (static_cast<double>(x[j + k]) - base) * inv;
      const double l = round_even(std::min(std::max(v, 0.0), 15.0));
      q[k] += l, qq[k] += l * l, qx[k] += l * x[j + k];
    }
  }
#endif
  for (; j < g; ++j) {
    const double v = (static_cast<double>(x[j]) - base) * inv;
    const double l = round_even(std::min(std::max(v, 0.0), 15.0));
    q[0] += l, qq[0] += l * l, qx[0] += l * x[j];
  }
  LevelSums t;
  for (int k = 0; k < kLanes; ++k) t.q += q[k], t.qq += qq[k], t.qx += qx[k];
  return t;
}

// sum (q s + m - x)^2 over the group for the levels behind t, expanded into the sums: a
// candidate's error without another pass over the weights.
double level_error(const LevelSums& t, const GroupSums& gs, double s, double m) {
  return s * s * t.qq + 2 * s * m * t.q + gs.n * m * m - 2 * s * t.qx - 2 * m * gs.x + gs.xx;
}

// The least-squares (scale, min) for the levels behind `t`, rounded to halves, and its error for
// those levels; false where the levels are all equal, the scale comes out negative or either half
// overflows.
bool int4_least_squares(const LevelSums& t, const GroupSums& gs, Int4Fit* f) {
  const double det = gs.n * t.qq - t.q * t.q;
  if (det <= 0) return false;
  const double s = (gs.n * t.qx - t.q * gs.x) / det;
  const double m = (t.qq * gs.x - t.q * t.qx) / det;
  if (!(s >= 0)) return false;
  f->scale_h = float_to_half(static_cast<float>(s));
  f->min_h = float_to_half(static_cast<float>(m));
  const double sh = half_to_float(f->scale_h), mh = half_to_float(f->min_h);
  if (!std::isfinite(sh) || !std::isfinite(mh)) return false;
  f->err = level_error(t, gs, sh, mh);
  return true;
}

// The levels nearest to each weight under f's halves; f.err becomes their error. (Through the
// reciprocal of the scale: a level can differ from quantize_row_int4's division only at a tie,
// where both levels give the same error.)
LevelSums int4_nearest(const float* x, int64_t g, const GroupSums& gs, Int4Fit* f) {
  const double s = half_to_float(f->scale_h), m = half_to_float(f->min_h);
  const LevelSums t = s == 0 ? LevelSums{} : int4_levels(x, g, m, 1 / s);
  f->err = level_error(t, gs, s, m);
  return t;
}

// The search of llama.cpp's make_qkx2_quants, measured on the stored halves: levels from candidate
// inverse scales (15 + kInt4Lo + kInt4Step * i) / (max - min) counted from min, the least-squares
// (scale, min) for those levels rounded to halves, its error from the sums. The best candidate's
// weights then move to their nearest levels under its halves (which can only lower the error) and
// are refitted, a few rounds while the error drops. `plain` is kept unless a candidate measures
// lower.
Int4Fit int4_search(const float* x, int64_t g, double lo, double hi, Int4Fit plain) {
  GroupSums gs;
  gs.n = static_cast<double>(g);
  for (int64_t j = 0; j < g; ++j) gs.x += x[j], gs.xx += static_cast<double>(x[j]) * x[j];
  int4_nearest(x, g, gs, &plain);
  const double range = hi - lo;
  if (!(plain.err > 0) || range <= 0) return plain;
  Int4Fit best;
  best.err = INFINITY;
  for (int i = 0; i <= kInt4Candidates; ++i) {
    Int4Fit f;
    const double inv = (15 + kInt4Lo + kInt4Step * i) / range;
    if (int4_least_squares(int4_levels(x, g, lo, inv), gs, &f) && f.err < best.err) best = f;
  }
  if (best.err == INFINITY) return plain;
  LevelSums t = int4_nearest(x, g, gs, &best);
  for (int round = 0; round < kInt4Rounds; ++round) {
    Int4Fit f;
    if (!int4_least_squares(t, gs, &f) || !(f.err < best.err)) break;
    const LevelSums next = int4_nearest(x, g, gs, &f);
    best = f;
    t = next;
  }
  return best.err < plain.err ? best : plain;
}

}  // namespace

void quantize_row_int4(const float* w, int64_t n, int64_t g, uint8_t* q, uint16_t* sm, ScaleRule rule) {
  if (g <= 0 || g % 2 != 0 || n % g != 0)
    throw Error(fmt::format("int4: a row of {} weights does not split into groups of {}", n, g));
  for (int64_t k = 0; k < n / g; ++k) {
    const float* x = w + k * g;
    float lo = x[0], hi = x[0];
    for (int64_t i = 0; i < g; ++i) {
      if (!std::isfinite(x[i])) throw Error(fmt::format("int4: weight {} of a row is {}", k * g + i, x[i]));
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    // The plain rule: min and (max - min) / 15, rounded to halves.
    Int4Fit fit;
    fit.min_h = float_to_half(lo);
    const float min_f = half_to_float(fit.min_h);
    fit.scale_h = float_to_half((hi - min_f) / 15.0f);
    if (!std::isfinite(min_f) || !std::isfinite(half_to_float(fit.scale_h)))
      throw Error(fmt::format("int4: a group spans [{}, {}], beyond what half scales hold", lo, hi));
    if (rule == ScaleRule::kSearch) fit = int4_search(x, g, lo, hi, fit);
    sm[2 * k] = fit.scale_h;
    sm[2 * k + 1] = fit.min_h;
    // g is even: a group starts on a byte, and each byte is written once.
    const double s = half_to_float(fit.scale_h), m = half_to_float(fit.min_h);
    uint8_t* qb = q + k * g / 2;
    for (int64_t i = 0; i < g; i += 2) {
      const auto even = static_cast<unsigned>(int4_level(x[i], s, m));
      const auto odd = static_cast<unsigned>(int4_level(x[i + 1], s, m));
      qb[i / 2] = static_cast<uint8_t>(even | odd << 4);
    }
  }
}

void dequantize_row_int4(const uint8_t* q, const uint16_t* sm, int64_t n, int64_t g, float* out) {
  for (int64_t k = 0; k < n / g; ++k) {
    const float scale = half_to_float(sm[2 * k]), min = half_to_float(sm[2 * k + 1]);
    for (int64_t i = 0; i < g; ++i) {
      const int64_t c = k * g + i;
      const int u = c % 2 ? q[c / 2] >> 4 : q[c / 2] & 0xF;
      out[c] = static_cast<float>(u) * scale + min;
    }
  }
}

}  // namespace ringllama
