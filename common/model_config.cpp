#include "common/model_config.h"

#include <cmath>

#include <fmt/format.h>

#include "common/errors.h"

namespace ringllama {

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw StoreError("model config: " + what);
  };
  auto in_range = [&](int64_t v, const char* key, int64_t lo, int64_t hi) {
    need(v >= lo && v <= hi, fmt::format("{} = {}: must be between {} and {}", key, v, lo, hi));
  };
  // Finite and inside [lo, hi]; NaN fails every comparison and so is refused too.
  auto real = [&](double v, const char* key, double lo, double hi) {
    need(std::isfinite(v) && v >= lo && v <= hi, fmt::format("{} = {}: must be a finite number between {} and {}",
                                                             key, v, lo, hi));
  };
  need(architecture == "llama", "architecture must be llama");
  in_range(dim, "dim", 1, kMaxDim);
  in_range(n_layers, "n_layers", 1, kMaxLayers);
  in_range(n_heads, "n_heads", 1, kMaxHeads);
  in_range(n_kv_heads, "n_kv_heads", 1, n_heads);
  need(n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  in_range(head_dim, "head_dim", 2, kMaxHeadDim);
  need(head_dim % 2 == 0, "head_dim must be even");
  need(q_dim() <= kMaxQDim, fmt::format("n_heads * head_dim = {}: must be at most {}", q_dim(), kMaxQDim));
  in_range(ffn_dim, "ffn_dim", 1, kMaxFfnDim);
  in_range(vocab_size, "vocab_size", 1, kMaxVocab);
  in_range(max_position_embeddings, "max_position_embeddings", 1, kMaxPositions);
  real(norm_eps, "norm_eps", 1e-12, 0.1);
  real(rope_theta, "rope_theta", 1.0, 1e12);
  need(rope_scaling.type == "none" || rope_scaling.type == "llama3",
       "rope_scaling.type must be none or llama3");
  if (rope_scaling.type == "llama3") {
    real(rope_scaling.factor, "rope_scaling.factor", 1.0, 1024.0);
    real(rope_scaling.low_freq_factor, "rope_scaling.low_freq_factor", 1e-6, 1024.0);
    real(rope_scaling.high_freq_factor, "rope_scaling.high_freq_factor", 1e-6, 1024.0);
    need(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor,
         "rope_scaling needs 0 < low_freq_factor < high_freq_factor");
    in_range(rope_scaling.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings", 1,
             kMaxPositions);
  }
  need(bos_id == -1 || (bos_id >= 0 && bos_id < vocab_size),
       fmt::format("bos_id = {}: must be -1 (none) or in [0, vocab_size {})", bos_id, vocab_size));
  need(eos_ids.size() <= kMaxEosIds, fmt::format("eos_ids: at most {} ids", kMaxEosIds));
  for (int64_t e : eos_ids)
    need(e >= 0 && e < vocab_size, fmt::format("eos id {}: must be in [0, vocab_size {})", e, vocab_size));
}

std::vector<double> rope_inv_freq(const ModelConfig& m) {
  const int64_t half = m.head_dim / 2;
  std::vector<double> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // Same expression as transformers: theta ** (arange(0, d, 2) / d), computed in float32 there;
    // we keep double here and the backends round to float once.
    inv[i] = 1.0 / std::pow(m.rope_theta, static_cast<double>(2 * i) / static_cast<double>(m.head_dim));
  }
  if (m.rope_scaling.type == "llama3") {
    const RopeScaling& s = m.rope_scaling;
    const double old_ctx = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_ctx / s.low_freq_factor;
    const double high_wavelen = old_ctx / s.high_freq_factor;
    for (int64_t i = 0; i < half; ++i) {
      const double wavelen = 2 * M_PI / inv[i];
      if (wavelen > low_wavelen) {
        inv[i] = inv[i] / s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        inv[i] = (1 - smooth) * inv[i] / s.factor + smooth * inv[i];
      }
    }
  }
  return inv;
}

}  // namespace ringllama
