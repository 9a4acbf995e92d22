#include "worker/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <new>

#include "common/errors.h"
#include "common/quant.h"
#include "worker/backend.h"
#include "worker/sampler.h"

// The matmul and dot kernels are built twice on x86-64, for AVX2+FMA and for the baseline, and the
// loader picks one at startup: the binaries travel between machines, so no -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RL_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RL_SIMD_CLONES
#endif

// The 32-byte vector helpers below are internal and always inlined, so the ABI GCC warns about
// (how such vectors are passed without AVX) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ringllama {
namespace cpu {

namespace {

// Eight floats as one value; GCC maps it to one AVX register or two SSE/NEON registers.
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

#define RL_INLINE inline __attribute__((always_inline))

RL_INLINE v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// The last n < 8 values, zero-padded.
RL_INLINE v8f load_tail(const float* p, int64_t n) {
  float b[8] = {};
  for (int64_t j = 0; j < n; ++j) b[j] = p[j];
  return load8(b);
}

// bf16 is the top half of a float: widening is a shift.
RL_INLINE v8f widen8(const bf16_t* p) {
  v8h h;
  __builtin_memcpy(&h, p, sizeof h);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

RL_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

RL_INLINE void widen_row(const bf16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f f = widen8(src + i);
    __builtin_memcpy(dst + i, &f, sizeof f);
  }
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// y[t * ldy + r] += dot(w row r, x row t) over n values, for R weight rows and NT token rows.
// Every output element sees the same operations in the same order whatever R, NT and the path
// (micro or micro_bf16), so a row's result does not depend on how many tokens share a forward.
template <int R, int NT>
RL_INLINE void micro(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy) {
  v8f acc[R][NT] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = load8(x + t * ldx + i);
    for (int r = 0; r < R; ++r) {
      const v8f wv = load8(w + r * ldw + i);
      for (int t = 0; t < NT; ++t) acc[r][t] += wv * xv[t];
    }
  }
  if (i < n) {  // the tail, zero-padded, through the same vector arithmetic as the rest
    v8f xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = load_tail(x + t * ldx + i, n - i);
    for (int r = 0; r < R; ++r) {
      const v8f wv = load_tail(w + r * ldw + i, n - i);
      for (int t = 0; t < NT; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * ldy + r] += hsum(acc[r][t]);
}

template <int NT>
RL_INLINE void tile_rows(const float* tile, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t n,
                         float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) micro<4, NT>(tile + r * ldw, ldw, x, ldx, n, y + r, ldy);
  for (; r < rows; ++r) micro<1, NT>(tile + r * ldw, ldw, x, ldx, n, y + r, ldy);
}

// Rows [o0, o0 + rows) of y for all tokens. The weight block is widened KC values at a time into
// `tile` (RB x KC floats, L1/L2 sized) and reused by every token, so a prefill reads each weight
// once from memory; a decode step (one token) streams the weights at memory speed.
constexpr int64_t kRB = 32;
constexpr int64_t kKC = 512;

// One token (a decode step): the weights stream from memory once, widened in registers.
template <int R>
RL_INLINE void micro_bf16(const bf16_t* w, int64_t ldw, const float* x, int64_t n, float* y) {
  v8f acc[R] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f xv = load8(x + i);
    for (int r = 0; r < R; ++r) acc[r] += widen8(w + r * ldw + i) * xv;
  }
  if (i < n) {
    const v8f xv = load_tail(x + i, n - i);
    for (int r = 0; r < R; ++r) {
      float wt[8] = {};
      for (int64_t j = i; j < n; ++j) wt[j - i] = bf16_to_f32(w[r * ldw + j]);
      acc[r] += load8(wt) * xv;
    }
  }
  for (int r = 0; r < R; ++r) y[r] += hsum(acc[r]);
}

RL_SIMD_CLONES void matvec_block(const float* x, int64_t in, const bf16_t* w, int64_t o0, int64_t rows, float* y) {
  std::fill(y + o0, y + o0 + rows, 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += kKC) {
    const int64_t kc = std::min(kKC, in - k0);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) micro_bf16<4>(w + (o0 + r) * in + k0, in, x + k0, kc, y + o0 + r);
    for (; r < rows; ++r) micro_bf16<1>(w + (o0 + r) * in + k0, in, x + k0, kc, y + o0 + r);
  }
}

RL_SIMD_CLONES void matmul_block(const float* x, int64_t n_tokens, int64_t in, const bf16_t* w, int64_t out,
                                 int64_t o0, int64_t rows, float* tile, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t) std::fill(y + t * out + o0, y + t * out + o0 + rows, 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += kKC) {
    const int64_t kc = std::min(kKC, in - k0);
    for (int64_t r = 0; r < rows; ++r) widen_row(w + (o0 + r) * in + k0, kc, tile + r * kKC);
    int64_t t = 0;
    for (; t + 2 <= n_tokens; t += 2) tile_rows<2>(tile, kKC, rows, x + t * in + k0, in, kc, y + t * out + o0, out);
    if (t < n_tokens) tile_rows<1>(tile, kKC, rows, x + t * in + k0, in, kc, y + t * out + o0, out);
  }
}

// Values [c0, c0 + n) of row r of a packed matrix, dequantized. For int4, c0 and n are multiples
// of the group size (kKC is a multiple of every allowed group and `in` of the one in use).
void dequant_range(const MatrixView& w, int64_t r, int64_t c0, int64_t n, float* out) {
  if (w.dtype == DType::FP8_E4M3) {
    const auto* q = static_cast<const uint8_t*>(w.data) + r * w.cols + c0;
    float scale;
    std::memcpy(&scale, static_cast<const char*>(w.scales) + 4 * r, 4);
    dequantize_row_fp8(q, scale, n, out);
  } else {
    const auto* q = static_cast<const uint8_t*>(w.data) + r * (w.cols / 2) + c0 / 2;
    const auto* sm = static_cast<const uint16_t*>(w.scales) + (r * (w.cols / w.group) + c0 / w.group) * 2;
    dequantize_row_int4(q, sm, n, w.group, out);
  }
}

RL_SIMD_CLONES void matmul_block_packed(const float* x, int64_t n_tokens, const MatrixView& w, int64_t o0,
                                        int64_t rows, float* tile, float* y) {
  const int64_t in = w.cols, out = w.rows;
  for (int64_t t = 0; t < n_tokens; ++t) std::fill(y + t * out + o0, y + t * out + o0 + rows, 0.0f);
  for (int64_t k0 = 0; k0 < in; k0 += kKC) {
    const int64_t kc = std::min(kKC, in - k0);
    for (int64_t r = 0; r < rows; ++r) dequant_range(w, o0 + r, k0, kc, tile + r * kKC);
    int64_t t = 0;
    for (; t + 2 <= n_tokens; t += 2) tile_rows<2>(tile, kKC, rows, x + t * in + k0, in, kc, y + t * out + o0, out);
    if (t < n_tokens) tile_rows<1>(tile, kKC, rows, x + t * in + k0, in, kc, y + t * out + o0, out);
  }
}

RL_SIMD_CLONES float dot(const float* a, const float* b, int64_t n) {
  v8f acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// Below this many multiply-adds a parallel loop costs more than it saves.
constexpr int64_t kParallelWork = int64_t(1) << 18;

// Runs fn over [0, n) on the pool when the work is worth it, else on this thread.
void maybe_parallel(ThreadPool* pool, int64_t n, int64_t work, const std::function<void(int64_t, int)>& fn) {
  if (pool && n > 1 && work >= kParallelWork) {
    pool->parallel_for(n, fn);
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
  }
}

void matmul_bf16(ThreadPool* pool, const float* x, int64_t n_tokens, int64_t in, const bf16_t* w, int64_t out,
                 float* y) {
  const int64_t n_blocks = (out + kRB - 1) / kRB;
  maybe_parallel(pool, n_blocks, n_tokens * in * out, [&](int64_t b, int) {
    const int64_t o0 = b * kRB, rows = std::min(kRB, out - o0);
    if (n_tokens == 1) {
      matvec_block(x, in, w, o0, rows, y);
    } else {
      alignas(32) float tile[kRB * kKC];
      matmul_block(x, n_tokens, in, w, out, o0, rows, tile, y);
    }
  });
}

void matmul(ThreadPool* pool, const float* x, int64_t n_tokens, int64_t in, const MatrixView& w, int64_t out,
            float* y) {
  if (w.rows != out || w.cols != in)
    throw Error(fmt::format("matmul: the weight is {}x{}, the layer needs {}x{}", w.rows, w.cols, out, in));
  if (!w.packed()) return matmul_bf16(pool, x, n_tokens, in, w.bf16(), out, y);
  if (w.dtype == DType::INT4 && (w.group <= 0 || kKC % w.group != 0 || in % w.group != 0))
    throw Error(fmt::format("matmul: int4 group size {} does not suit {} inputs", w.group, in));
  const int64_t n_blocks = (out + kRB - 1) / kRB;
  maybe_parallel(pool, n_blocks, n_tokens * in * out, [&](int64_t b, int) {
    const int64_t o0 = b * kRB, rows = std::min(kRB, out - o0);
    alignas(32) float tile[kRB * kKC];
    matmul_block_packed(x, n_tokens, w, o0, rows, tile, y);
  });
}

void rms_norm(const float* x, const bf16_t* w, int64_t n_tokens, int64_t dim, float eps, float* y) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xr = x + t * dim;
    float* yr = y + t * dim;
    // The mean of squares in double: at least as exact as torch's float32 reduction.
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float var = static_cast<float>(ss / static_cast<double>(dim));
    const float r = 1.0f / std::sqrt(var + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = bf16_to_f32(w[i]) * (xr[i] * r);
  }
}

std::vector<float> rope_inv_freq_f32(const ModelConfig& m) {
  std::vector<double> d = rope_inv_freq(m);
  return std::vector<float>(d.begin(), d.end());
}

void rope(float* x, int64_t n_heads, int64_t head_dim, int64_t pos, const std::vector<float>& inv_freq) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    // transformers: freqs = inv_freq @ position (float32), cos/sin of that, q*cos + rotate_half(q)*sin.
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
    const float s = static_cast<float>(std::sin(static_cast<double>(angle)));
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + h * head_dim;
      const float a = v[i], b = v[i + half];
      v[i] = a * c + (-b) * s;
      v[i + half] = b * c + a * s;
    }
  }
}

void silu_mul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void attention(ThreadPool* pool, const ModelConfig& m, const float* q, const KvPages& kv, int64_t n_tokens,
               int64_t start, float* out) {
  const int64_t hd = m.head_dim, q_dim = m.q_dim(), kv_dim = m.kv_dim();
  const int64_t group = m.n_heads / m.n_kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t items = m.n_heads * n_tokens;
  // One row of probabilities per thread.
  std::vector<std::vector<float>> scratch(pool ? pool->threads() : 1,
                                          std::vector<float>(static_cast<size_t>(start + n_tokens)));
  // The pool row of every position, looked up once.
  std::vector<int64_t> rows(static_cast<size_t>(start + n_tokens));
  for (int64_t j = 0; j < start + n_tokens; ++j) rows[j] = kv.row(j) * kv_dim;
  maybe_parallel(pool, items, items * (start + n_tokens) * hd, [&](int64_t item, int thread) {
    float* p = scratch[thread].data();
    const int64_t h = item % m.n_heads, t = item / m.n_heads;
    const int64_t pos = start + t;
    const int64_t kvo = (h / group) * hd;
    const float* qh = q + t * q_dim + h * hd;
    float mx = -INFINITY;
    for (int64_t j = 0; j <= pos; ++j) {
      p[j] = dot(qh, kv.k + rows[j] + kvo, hd) * scale;
      mx = std::max(mx, p[j]);
    }
    float sum = 0;
    for (int64_t j = 0; j <= pos; ++j) {
      p[j] = std::exp(p[j] - mx);
      sum += p[j];
    }
    float* o = out + t * q_dim + h * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t j = 0; j <= pos; ++j) {
      const float pj = p[j] / sum;
      const float* vj = kv.v + rows[j] + kvo;
      for (int64_t i = 0; i < hd; ++i) o[i] += pj * vj[i];
    }
  });
}

}  // namespace cpu

namespace {

class CpuBackend : public Backend {
 public:
  CpuBackend(WeightSource& ws, const Config& config)
      : Backend(ws.manifest().model, config), ws_(ws), m_(ws.manifest().model), inv_freq_(cpu::rope_inv_freq_f32(m_)) {
    // One allocation for the whole pool, made once; pages appear as blocks are first written.
    const size_t cache = static_cast<size_t>(m_.n_layers) * static_cast<size_t>(kv_.n_blocks()) *
                         static_cast<size_t>(kv_.block_tokens()) * m_.kv_dim();
    try {
      k_cache_.reset(new float[cache]);
      v_cache_.reset(new float[cache]);
    } catch (const std::bad_alloc&) {
      fail("cannot allocate the KV cache: {} bytes for {} blocks of {} tokens (batch_size x max_context {}; lower "
           "either)",
           2 * cache * sizeof(float), kv_.n_blocks(), kv_.block_tokens(), limits_.max_context);
    }
  }

  const char* name() const override { return "cpu"; }
  bool scores_every_row() const override { return true; }  // run() computes logits for any rows

 protected:
  void run_step(const StepLayout& L, const StepOutput& out) override {
    ws_.begin_pass();
    try {
      run(L, out);
    } catch (...) {
      ws_.end_pass();
      throw;
    }
    ws_.end_pass();
  }

 private:
  size_t layer_rows() const { return static_cast<size_t>(kv_.n_blocks()) * static_cast<size_t>(kv_.block_tokens()); }

  void run(const StepLayout& L, const StepOutput& out) {
    const int64_t T = L.rows();
    const int64_t dim = m_.dim;
    const GlobalWeights g = ws_.globals();
    x_.resize(T * dim);
    xn_.resize(T * dim);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < dim; ++i) x_[t * dim + i] = bf16_to_f32(g.tok_embeddings[L.ids[t] * dim + i]);

    for (int64_t l = 0; l < m_.n_layers; ++l) {
      const LayerWeights w = ws_.acquire_layer(l);
      try {
        layer(l, w, L);
      } catch (...) {
        ws_.release_layer(l);
        throw;
      }
      ws_.release_layer(l);
    }

    // Only the rows whose logits are wanted go through the final norm and lm_head. Rows do not
    // depend on how many share a matmul, so a batch gives each sequence the bits it gets alone.
    const int64_t R = static_cast<int64_t>(L.logit_rows.size());
    std::vector<float> out_rows(static_cast<size_t>(R * m_.vocab_size));
    if (R > 0) {
      std::vector<float> last(static_cast<size_t>(R * dim));
      for (int64_t r = 0; r < R; ++r)
        cpu::rms_norm(x_.data() + L.logit_rows[r] * dim, g.norm, 1, dim, static_cast<float>(m_.norm_eps),
                      last.data() + r * dim);
      cpu::matmul(&pool_, last.data(), R, dim, g.output, m_.vocab_size, out_rows.data());
    }
    if (out.ids) {
      // The GPU sampler's rule and generator (kernels/sample_common.h): the same draw per row.
      out.ids->resize(static_cast<size_t>(R));
      for (int64_t r = 0; r < R; ++r) {
        const float* row = out_rows.data() + r * m_.vocab_size;
        (*out.ids)[r] = out.sample ? sample_row(row, m_.vocab_size, (*out.sample)[r], scratch_)
                                   : argmax(row, m_.vocab_size);
      }
    }
    if (out.logits) *out.logits = std::move(out_rows);
  }

  void layer(int64_t l, const LayerWeights& w, const StepLayout& L) {
    const int64_t T = L.rows();
    const int64_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim(), ffn = m_.ffn_dim;
    const float eps = static_cast<float>(m_.norm_eps);
    q_.resize(T * q_dim);
    k_.resize(T * kv_dim);
    v_.resize(T * kv_dim);
    att_.resize(T * q_dim);
    gate_.resize(T * ffn);
    up_.resize(T * ffn);
    float* kc = k_cache_.get() + static_cast<size_t>(l) * layer_rows() * kv_dim;
    float* vc = v_cache_.get() + static_cast<size_t>(l) * layer_rows() * kv_dim;

    // Attention block. New keys and values go to their sequences' cache rows, keys rotated.
    cpu::rms_norm(x_.data(), w.attn_norm, T, dim, eps, xn_.data());
    cpu::matmul(&pool_, xn_.data(), T, dim, w.wq, q_dim, q_.data());
    cpu::matmul(&pool_, xn_.data(), T, dim, w.wk, kv_dim, k_.data());
    cpu::matmul(&pool_, xn_.data(), T, dim, w.wv, kv_dim, v_.data());
    for (int64_t t = 0; t < T; ++t) {
      cpu::rope(q_.data() + t * q_dim, m_.n_heads, m_.head_dim, L.pos[t], inv_freq_);
      cpu::rope(k_.data() + t * kv_dim, m_.n_kv_heads, m_.head_dim, L.pos[t], inv_freq_);
      std::copy_n(k_.data() + t * kv_dim, kv_dim, kc + static_cast<size_t>(L.slot[t]) * kv_dim);
      std::copy_n(v_.data() + t * kv_dim, kv_dim, vc + static_cast<size_t>(L.slot[t]) * kv_dim);
    }
    for (int64_t i = 0; i < L.items(); ++i) {
      const cpu::KvPages pages{kc, vc, kv_.table(L.seq[i]).data(), kv_.block_tokens()};
      cpu::attention(&pool_, m_, q_.data() + L.row0[i] * q_dim, pages, L.count[i], L.start[i],
                     att_.data() + L.row0[i] * q_dim);
    }
    cpu::matmul(&pool_, att_.data(), T, q_dim, w.wo, dim, xn_.data());
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xn_[i];

    // FFN block: SwiGLU, the product written over the gate.
    cpu::rms_norm(x_.data(), w.ffn_norm, T, dim, eps, xn_.data());
    cpu::matmul(&pool_, xn_.data(), T, dim, w.w1, ffn, gate_.data());
    cpu::matmul(&pool_, xn_.data(), T, dim, w.w3, ffn, up_.data());
    cpu::silu_mul(gate_.data(), up_.data(), T * ffn);
    cpu::matmul(&pool_, gate_.data(), T, ffn, w.w2, dim, xn_.data());
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xn_[i];
  }

  WeightSource& ws_;
  const ModelConfig m_;
  const std::vector<float> inv_freq_;
  ThreadPool pool_;
  SampleScratch scratch_;
  // [layer][pool row][kv_dim] for n_blocks * block_tokens pool rows; rope already applied to keys.
  std::unique_ptr<float[]> k_cache_, v_cache_;
  // Activations of the current step, [rows][width].
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(WeightSource& weights, const Config& config) {
  return std::make_unique<CpuBackend>(weights, config);
}

}  // namespace ringllama
