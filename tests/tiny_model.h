// A tiny Llama model with random weights, built in memory: its manifest, its weights.bin image, a
// WeightSource over it, and a store on disk. For suites that must not depend on the packer.
#pragma once

#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/quant.h"
#include "common/manifest.h"
#include "common/store.h"
#include "worker/weights.h"

namespace ringllama::test {

inline ModelConfig tiny_config() {
  ModelConfig m;
  m.dim = 48;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 12;
  m.ffn_dim = 80;
  m.vocab_size = 97;
  m.max_position_embeddings = 64;
  m.norm_eps = 1e-5;
  m.rope_theta = 10000.0;
  m.bos_id = 1;
  m.eos_ids = {2};
  return m;
}

// Wide enough for batched GPU work: dim 256, 8 heads / 2 kv heads of 32, ffn 344, vocab 301, 1024
// positions, 2 layers.
inline ModelConfig wide_config() {
  ModelConfig m = tiny_config();
  m.dim = 256;
  m.n_layers = 2;
  m.n_heads = 8;
  m.n_kv_heads = 2;
  m.head_dim = 32;
  m.ffn_dim = 344;
  m.vocab_size = 301;
  m.max_position_embeddings = 1024;
  return m;
}

// n token ids in [0, vocab) from seed.
inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& t : v) t = static_cast<int32_t>(rng() % vocab);
  return v;
}

// The manifest and the bytes of weights.bin (globals and groups at their offsets, checksums set).
// Weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1), as trained models have them. With a packed
// `linear` format the linear weights are those same bf16 values quantized (common/quant.h), so
// models of one seed differ only by the packing.
struct TinyModel {
  Manifest manifest;
  std::vector<char> image;

  explicit TinyModel(const ModelConfig& m, uint64_t seed = 1, float std = 0.08f, TensorFormat linear = {}) {
    manifest = Manifest::plan(m, "random:test", [&](const GroupEntry&, const TensorSpec& t) {
      return tensor_packable(t.name) ? linear : TensorFormat{};
    });
    image.assign(manifest.weights_size, 0);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (GroupEntry& g : manifest.groups) {
      for (const TensorEntry& t : g.tensors) {
        const bool norm = t.shape.size() == 1;
        std::vector<float> v(static_cast<size_t>(t.numel()));
        for (float& x : v) x = bf16_to_f32(f32_to_bf16(norm ? 1.0f + 0.1f * normal(rng) : std * normal(rng)));
        char* base = image.data() + g.offset;
        if (t.dtype == DType::BF16) {
          auto* p = reinterpret_cast<bf16_t*>(base + t.offset);
          for (size_t i = 0; i < v.size(); ++i) p[i] = f32_to_bf16(v[i]);
          continue;
        }
        const int64_t rows = t.shape[0], in = t.shape[1];
        auto* q = reinterpret_cast<uint8_t*>(base + t.offset);
        for (int64_t r = 0; r < rows; ++r) {
          if (t.dtype == DType::FP8_E4M3) {
            const float scale = quantize_row_fp8(v.data() + r * in, in, q + r * in);
            std::memcpy(base + t.scales_offset + 4 * r, &scale, 4);
          } else {
            auto* sm = reinterpret_cast<uint16_t*>(base + t.scales_offset) + r * (in / t.group_size) * 2;
            quantize_row_int4(v.data() + r * in, in, t.group_size, q + r * (in / 2), sm);
          }
        }
      }
      g.xxh3 = checksum(image.data() + g.offset, g.size);
    }
  }

  void write_store(const std::string& dir) const {
    manifest.save(dir + "/" + kManifestFile);
    std::ofstream out(dir + "/" + kWeightsFile, std::ios::binary);
    out.write(image.data(), static_cast<std::streamsize>(image.size()));
  }
};

// A WeightSource over a TinyModel's image that counts its calls.
class MemoryWeights : public WeightSource {
 public:
  explicit MemoryWeights(const TinyModel& t) : t_(t) {}
  const Manifest& manifest() const override { return t_.manifest; }
  GlobalWeights globals() override {
    return globals_view(t_.manifest, t_.image.data() + t_.manifest.globals().offset);
  }
  LayerWeights acquire_layer(int64_t layer) override {
    ++acquired;
    ++held;
    return layer_view(t_.manifest, layer, t_.image.data() + t_.manifest.layer_offset(layer));
  }
  void release_layer(int64_t) override { --held; }
  void begin_pass() override { ++passes; }
  void end_pass() override { ++ended; }

  int acquired = 0, held = 0, passes = 0, ended = 0;

 private:
  const TinyModel& t_;
};

}  // namespace ringllama::test
