// The model's hyper-parameters, as the store's manifest records them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ringllama {

// Bounds on what a manifest or config.json may claim. They sit far above any Llama published so
// far, yet keep every product of them (tensor sizes, the whole layout) well inside 63 bits, so that
// a lie is refused before anything is sized from it.
inline constexpr int64_t kMaxLayers = 4096;
inline constexpr int64_t kMaxDim = 1 << 17;           // hidden size
inline constexpr int64_t kMaxHeads = 1 << 12;
inline constexpr int64_t kMaxHeadDim = 1 << 12;
inline constexpr int64_t kMaxQDim = 1 << 17;          // n_heads * head_dim
inline constexpr int64_t kMaxFfnDim = 1 << 20;
inline constexpr int64_t kMaxVocab = 1 << 24;
inline constexpr int64_t kMaxPositions = 1 << 24;
inline constexpr size_t kMaxEosIds = 64;

// Llama 3 "llama3" rope scaling (Llama 3.1/3.2); type "none" leaves the frequencies alone.
struct RopeScaling {
  std::string type = "none";               // "none" | "llama3"
  double factor = 1.0;                     // how much longer the context is than the original
  double low_freq_factor = 1.0;            // wavelengths above orig/low_freq_factor are scaled fully
  double high_freq_factor = 1.0;           // wavelengths below orig/high_freq_factor are kept
  int64_t original_max_position_embeddings = 0;  // context the model was pre-trained with
};

struct ModelConfig {
  std::string architecture = "llama";
  int64_t dim = 0;            // hidden size
  int64_t n_layers = 0;       // decoder layers
  int64_t n_heads = 0;        // query heads
  int64_t n_kv_heads = 0;     // key/value heads (GQA: n_heads % n_kv_heads == 0)
  int64_t head_dim = 0;       // per head; need not be dim / n_heads
  int64_t ffn_dim = 0;        // intermediate size of the SwiGLU FFN
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double norm_eps = 1e-5;     // RMSNorm epsilon
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;  // lm_head shares the embedding matrix
  int64_t bos_id = -1;               // -1: none
  std::vector<int64_t> eos_ids;      // generation stops at any of these

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }

  // Throws StoreError naming the field when the numbers cannot describe a Llama model.
  void validate() const;
};

// Per-position RoPE inverse frequencies (head_dim / 2 values), llama3 scaling applied.
// Shared by every backend so that they rotate by exactly the same angles.
std::vector<double> rope_inv_freq(const ModelConfig& m);

}  // namespace ringllama
