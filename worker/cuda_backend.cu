#include "worker/cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/errors.h"
#include "kernels/add_rms_norm.cuh"
#include "kernels/attention_decode.cuh"
#include "kernels/attention_prefill.cuh"
#include "kernels/check.h"
#include "kernels/embedding.cuh"
#include "kernels/gemm.h"
#include "kernels/rope.cuh"
#include "kernels/silu_mul.cuh"

namespace ringllama {

namespace {

using bf16 = __nv_bfloat16;

constexpr int64_t kDecodeMaxSplits = 64;  // spans of a long context in decode attention
constexpr int64_t kWeightAlign = 128;     // elements (256 bytes): every tensor starts 16-byte aligned

// Page-locked host memory, so that the small per-step copies are true async DMA.
template <typename T>
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t count) : count_(count) {
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&ptr_), std::max<size_t>(count, 1) * sizeof(T)));
  }
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  T* get() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// Checks the device index and makes it current; runs before any other member is built.
int select_device(int64_t gpu) {
  const int n = cuda_device_count();
  RL_REQUIRE(n > 0, "the CUDA backend needs a CUDA GPU, and none is visible (no device or no driver)");
  RL_REQUIRE(gpu >= 0 && gpu < n, "gpu {} does not exist: {} CUDA device(s) visible", gpu, n);
  CUDA_CHECK(cudaSetDevice(static_cast<int>(gpu)));
  return static_cast<int>(gpu);
}

// One layer's weights on the device: views into the one weight allocation.
struct DeviceLayer {
  const bf16* attn_norm = nullptr;  // [dim]
  const bf16* wq = nullptr;         // [q_dim, dim]
  const bf16* wk = nullptr;         // [kv_dim, dim]
  const bf16* wv = nullptr;         // [kv_dim, dim]
  const bf16* wo = nullptr;         // [dim, q_dim]
  const bf16* ffn_norm = nullptr;   // [dim]
  const bf16* w1 = nullptr;         // gate [ffn, dim]
  const bf16* w3 = nullptr;         // up [ffn, dim]
  const bf16* w2 = nullptr;         // down [dim, ffn]
};

class CudaBackend : public Backend {
 public:
  CudaBackend(WeightSource& ws, const Config& config)
      : m_(ws.manifest().model),
        device_(select_device(config.gpu)),
        max_ctx_(config.max_context),
        chunk_(std::max<int64_t>(1, std::min(config.prefill_chunk_tokens, config.max_context))),
        host_ids_(static_cast<size_t>(chunk_)),
        host_pos_(static_cast<size_t>(chunk_)),
        host_logits_(static_cast<size_t>(m_.vocab_size)) {
    RL_REQUIRE(max_ctx_ > 0, "max_context must be > 0 (got {})", max_ctx_);
    RL_REQUIRE(m_.head_dim % 2 == 0 && m_.head_dim <= 256, "the CUDA backend supports even head_dim up to 256, not {}",
               m_.head_dim);
    upload_weights(ws);
    allocate_state();
  }

  ~CudaBackend() override {
    // Buffers are freed next; let queued work finish first (errors here cannot be acted on).
    if (stream_.get()) cudaStreamSynchronize(stream_.get());
  }

  const char* name() const override { return "cuda"; }
  void reset() override { n_cached_ = 0; }

  std::vector<float> forward(const std::vector<int32_t>& tokens, int64_t start_pos) override {
    const int64_t T = static_cast<int64_t>(tokens.size());
    RL_REQUIRE(T > 0, "forward needs at least one token");
    RL_REQUIRE(start_pos == n_cached_, "forward at position {}, but the sequence has {} cached positions", start_pos,
               n_cached_);
    RL_REQUIRE(start_pos + T <= max_ctx_, "a context of {} tokens exceeds max_context ({})", start_pos + T, max_ctx_);
    // The embedding kernel trusts its ids: this is where they are checked.
    for (int64_t t = 0; t < T; ++t)
      RL_REQUIRE(tokens[t] >= 0 && tokens[t] < m_.vocab_size,
                 "token {} at position {} is outside the vocabulary [0, {})", tokens[t], start_pos + t, m_.vocab_size);
    CUDA_CHECK(cudaSetDevice(device_));
    for (int64_t c0 = 0; c0 < T; c0 += chunk_) {
      const int64_t n = std::min(chunk_, T - c0);
      run_chunk(tokens.data() + c0, n, start_pos + c0, c0 + n == T);
    }
    n_cached_ = start_pos + T;
    return std::vector<float>(host_logits_.get(), host_logits_.get() + m_.vocab_size);
  }

 private:
  // ------------------------------------------------------------------------------------------
  // Construction

  void upload_weights(WeightSource& ws) {
    const int64_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim(), ffn = m_.ffn_dim, vocab = m_.vocab_size;
    const GlobalWeights g = ws.globals();
    const bool tied = m_.tie_word_embeddings || g.output == g.tok_embeddings;
    RL_REQUIRE(g.tok_embeddings && g.norm && g.output, "the weight source lacks a global tensor");

    // Offsets (elements) of every tensor in one allocation.
    int64_t total = 0;
    auto place = [&](int64_t count) {
      const int64_t at = total;
      total += (count + kWeightAlign - 1) / kWeightAlign * kWeightAlign;
      return at;
    };
    const int64_t emb_at = place(vocab * dim), norm_at = place(dim), out_at = tied ? emb_at : place(vocab * dim);
    const int64_t layer_sizes[9] = {dim, q_dim * dim, kv_dim * dim, kv_dim * dim, dim * q_dim,
                                    dim, ffn * dim,   ffn * dim,    dim * ffn};
    std::vector<std::array<int64_t, 9>> layer_at(m_.n_layers);
    for (auto& at : layer_at)
      for (int i = 0; i < 9; ++i) at[i] = place(layer_sizes[i]);
    weights_ = DeviceBuffer<bf16>(static_cast<size_t>(total), "the model's weights");

    bf16* base = weights_.get();
    auto copy = [&](int64_t at, const bf16_t* src, int64_t count) {
      CUDA_CHECK(cudaMemcpy(base + at, src, static_cast<size_t>(count) * sizeof(bf16), cudaMemcpyHostToDevice));
    };
    copy(emb_at, g.tok_embeddings, vocab * dim);
    copy(norm_at, g.norm, dim);
    if (!tied) copy(out_at, g.output, vocab * dim);
    tok_embeddings_ = base + emb_at;
    norm_ = base + norm_at;
    output_ = base + out_at;

    layers_.resize(m_.n_layers);
    for (int64_t l = 0; l < m_.n_layers; ++l) {
      const LayerWeights w = ws.acquire_layer(l);
      try {
        const bf16_t* src[9] = {w.attn_norm, w.wq, w.wk, w.wv, w.wo, w.ffn_norm, w.w1, w.w3, w.w2};
        for (int i = 0; i < 9; ++i) {
          RL_REQUIRE(src[i], "layer {}: the weight source lacks tensor {}", l, i);
          copy(layer_at[l][i], src[i], layer_sizes[i]);
        }
      } catch (...) {
        ws.release_layer(l);
        throw;
      }
      ws.release_layer(l);
      const auto& at = layer_at[l];
      layers_[l] = DeviceLayer{base + at[0], base + at[1], base + at[2], base + at[3], base + at[4],
                               base + at[5], base + at[6], base + at[7], base + at[8]};
    }
  }

  void allocate_state() {
    const size_t C = static_cast<size_t>(chunk_);
    const size_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim(), ffn = m_.ffn_dim;
    const size_t cache = static_cast<size_t>(m_.n_layers) * static_cast<size_t>(max_ctx_) * kv_dim;
    k_cache_ = DeviceBuffer<bf16>(cache, "the key cache (n_layers x max_context x kv_dim)");
    v_cache_ = DeviceBuffer<bf16>(cache, "the value cache (n_layers x max_context x kv_dim)");
    x_ = DeviceBuffer<float>(C * dim, "the residual stream");
    xn_ = DeviceBuffer<bf16>(C * dim, "normed activations");
    q_ = DeviceBuffer<bf16>(C * q_dim, "queries");
    att_ = DeviceBuffer<bf16>(C * q_dim, "attention output");
    proj_ = DeviceBuffer<float>(C * dim, "projection output");
    gate_ = DeviceBuffer<bf16>(C * ffn, "FFN gate");
    up_ = DeviceBuffer<bf16>(C * ffn, "FFN up");
    logits_ = DeviceBuffer<float>(static_cast<size_t>(m_.vocab_size), "logits");
    ids_ = DeviceBuffer<int32_t>(C, "token ids");
    pos_ = DeviceBuffer<int32_t>(C, "positions");
    attn_ws_floats_ = attention_decode_workspace_floats(m_.n_heads, m_.head_dim, kDecodeMaxSplits);
    attn_ws_ = DeviceBuffer<float>(attn_ws_floats_, "decode attention workspace");
    target_blocks_ = 2 * cuda_sm_count(device_);

    const std::vector<double> inv = rope_inv_freq(m_);
    const std::vector<float> inv_f(inv.begin(), inv.end());  // rounded to float once, as transformers keeps it
    inv_freq_ = DeviceBuffer<float>(inv_f.size(), "RoPE frequencies");
    CUDA_CHECK(cudaMemcpy(inv_freq_.get(), inv_f.data(), inv_f.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  // ------------------------------------------------------------------------------------------
  // The forward, top to bottom

  // Tokens [start, start + n) through every layer; with want_logits, the last one's logits to host.
  void run_chunk(const int32_t* tokens, int64_t n, int64_t start, bool want_logits) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim;
    const float eps = static_cast<float>(m_.norm_eps);
    // The host staging buffers are reused: the previous chunk's copies out of them must be done.
    CUDA_CHECK(cudaStreamSynchronize(s));
    for (int64_t t = 0; t < n; ++t) {
      host_ids_.get()[t] = tokens[t];
      host_pos_.get()[t] = static_cast<int32_t>(start + t);
    }
    CUDA_CHECK(cudaMemcpyAsync(ids_.get(), host_ids_.get(), n * sizeof(int32_t), cudaMemcpyHostToDevice, s));
    CUDA_CHECK(cudaMemcpyAsync(pos_.get(), host_pos_.get(), n * sizeof(int32_t), cudaMemcpyHostToDevice, s));

    launch_embedding(ids_.get(), n, tok_embeddings_, m_.vocab_size, dim, x_.get(), ElemType::F32, s);
    for (int64_t l = 0; l < m_.n_layers; ++l) {
      const DeviceLayer& w = layers_[l];
      // x += the previous layer's FFN output (layer 0 starts from the embeddings); xn = norm(x).
      launch_add_rms_norm(x_.get(), l == 0 ? nullptr : proj_.get(), ElemType::F32, w.attn_norm, eps, xn_.get(), n,
                          dim, s);
      attention_block(l, w, n, start);
      // x += attention output; xn = norm(x).
      launch_add_rms_norm(x_.get(), proj_.get(), ElemType::F32, w.ffn_norm, eps, xn_.get(), n, dim, s);
      ffn_block(w, n);
    }
    if (!want_logits) return;  // an earlier chunk of a long prompt: only its cache rows matter

    // Final norm and lm_head on the last position only.
    const int64_t last = (n - 1) * dim;
    launch_add_rms_norm(x_.get() + last, proj_.get() + last, ElemType::F32, norm_, eps, xn_.get() + last, 1, dim, s);
    gemm_.matmul(xn_.get() + last, 1, dim, output_, m_.vocab_size, logits_.get(), ElemType::F32, m_.vocab_size, s);
    CUDA_CHECK(cudaMemcpyAsync(host_logits_.get(), logits_.get(), m_.vocab_size * sizeof(float),
                               cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
  }

  // xn → q, k, v (keys and values written straight into the cache rows of their positions) →
  // RoPE → attention over the cache → O projection into proj_ (fp32).
  void attention_block(int64_t l, const DeviceLayer& w, int64_t n, int64_t start) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim, q_dim = m_.q_dim(), kv_dim = m_.kv_dim();
    bf16* kc = k_cache_.get() + static_cast<size_t>(l) * static_cast<size_t>(max_ctx_) * kv_dim;
    bf16* vc = v_cache_.get() + static_cast<size_t>(l) * static_cast<size_t>(max_ctx_) * kv_dim;
    bf16* k_new = kc + start * kv_dim;
    bf16* v_new = vc + start * kv_dim;
    gemm_.matmul(xn_.get(), n, dim, w.wq, q_dim, q_.get(), ElemType::BF16, q_dim, s);
    gemm_.matmul(xn_.get(), n, dim, w.wk, kv_dim, k_new, ElemType::BF16, kv_dim, s);
    gemm_.matmul(xn_.get(), n, dim, w.wv, kv_dim, v_new, ElemType::BF16, kv_dim, s);
    launch_rope(q_.get(), q_dim, m_.n_heads, k_new, kv_dim, m_.n_kv_heads, m_.head_dim, pos_.get(), inv_freq_.get(), n,
                s);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(m_.head_dim)));
    if (n > 1) {
      launch_attention_prefill(q_.get(), kc, vc, kv_dim, att_.get(), n, start, m_.n_heads, m_.n_kv_heads, m_.head_dim,
                               scale, s);
    } else {
      launch_attention_decode(q_.get(), kc, vc, kv_dim, att_.get(), start + 1, m_.n_heads, m_.n_kv_heads, m_.head_dim,
                              scale, attn_ws_.get(), attn_ws_floats_, target_blocks_, s);
    }
    gemm_.matmul(att_.get(), n, q_dim, w.wo, dim, proj_.get(), ElemType::F32, dim, s);
  }

  // xn → gate, up → SiLU(gate)·up in place → down projection into proj_ (fp32).
  void ffn_block(const DeviceLayer& w, int64_t n) {
    cudaStream_t s = stream_.get();
    const int64_t dim = m_.dim, ffn = m_.ffn_dim;
    gemm_.matmul(xn_.get(), n, dim, w.w1, ffn, gate_.get(), ElemType::BF16, ffn, s);
    gemm_.matmul(xn_.get(), n, dim, w.w3, ffn, up_.get(), ElemType::BF16, ffn, s);
    launch_silu_mul(gate_.get(), up_.get(), n * ffn, s);
    gemm_.matmul(gate_.get(), n, ffn, w.w2, dim, proj_.get(), ElemType::F32, dim, s);
  }

  // ------------------------------------------------------------------------------------------

  const ModelConfig m_;
  const int device_;       // set current before any member below is built
  const int64_t max_ctx_;  // positions of the KV cache
  const int64_t chunk_;    // tokens per pass through the layers (activations are sized for it)
  Stream stream_;
  Gemm gemm_;

  DeviceBuffer<bf16> weights_;  // every tensor, 256-byte aligned
  const bf16* tok_embeddings_ = nullptr;
  const bf16* norm_ = nullptr;
  const bf16* output_ = nullptr;  // == tok_embeddings_ when tied
  std::vector<DeviceLayer> layers_;

  DeviceBuffer<bf16> k_cache_, v_cache_;  // [layer][pos][kv_dim], keys rotated
  int64_t n_cached_ = 0;

  // Activations of one chunk, [tokens][width].
  DeviceBuffer<float> x_;     // residual stream (fp32: see add_rms_norm.cuh)
  DeviceBuffer<bf16> xn_;     // normed x, the GEMMs' input
  DeviceBuffer<bf16> q_;      // queries
  DeviceBuffer<bf16> att_;    // attention output
  DeviceBuffer<float> proj_;  // O or down projection, added into x by the next norm
  DeviceBuffer<bf16> gate_;   // gate, then SiLU(gate)·up
  DeviceBuffer<bf16> up_;
  DeviceBuffer<float> logits_;  // [vocab]
  DeviceBuffer<int32_t> ids_, pos_;
  DeviceBuffer<float> inv_freq_;  // [head_dim / 2]
  DeviceBuffer<float> attn_ws_;
  size_t attn_ws_floats_ = 0;
  int target_blocks_ = 0;

  PinnedBuffer<int32_t> host_ids_, host_pos_;
  PinnedBuffer<float> host_logits_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config) {
  return std::make_unique<CudaBackend>(weights, config);
}

}  // namespace ringllama
