#include "common/model_config.h"

#include <cmath>

#include "common/errors.h"

namespace ringllama {

void ModelConfig::validate() const {
  auto need = [](bool ok, const char* what) {
    if (!ok) throw StoreError(std::string("model config: ") + what);
  };
  need(architecture == "llama", "architecture must be llama");
  need(dim > 0, "dim must be > 0");
  need(n_layers > 0, "n_layers must be > 0");
  need(n_heads > 0, "n_heads must be > 0");
  need(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even and > 0");
  need(ffn_dim > 0, "ffn_dim must be > 0");
  need(vocab_size > 0, "vocab_size must be > 0");
  need(max_position_embeddings > 0, "max_position_embeddings must be > 0");
  need(norm_eps > 0, "norm_eps must be > 0");
  need(rope_theta > 0, "rope_theta must be > 0");
  need(rope_scaling.type == "none" || rope_scaling.type == "llama3",
       "rope_scaling.type must be none or llama3");
  if (rope_scaling.type == "llama3") {
    need(rope_scaling.factor >= 1, "rope_scaling.factor must be >= 1");
    need(rope_scaling.low_freq_factor > 0 && rope_scaling.high_freq_factor > rope_scaling.low_freq_factor,
         "rope_scaling needs 0 < low_freq_factor < high_freq_factor");
    need(rope_scaling.original_max_position_embeddings > 0,
         "rope_scaling.original_max_position_embeddings must be > 0");
  }
  need(bos_id < vocab_size, "bos_id must be < vocab_size");
  for (int64_t e : eos_ids) need(e >= 0 && e < vocab_size, "eos ids must be in [0, vocab_size)");
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
