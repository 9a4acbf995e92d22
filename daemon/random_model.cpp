#include "daemon/random_model.h"

#include <fmt/format.h>

#include <cmath>

#include "common/errors.h"

namespace ringllama {

namespace {

// splitmix64's finaliser: a good 64-bit mix, and a counter-based generator when fed a counter.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

ModelConfig llama3(int64_t dim, int64_t layers, int64_t heads, int64_t kv, int64_t ffn, double factor, bool tied) {
  ModelConfig m;
  m.dim = dim;
  m.n_layers = layers;
  m.n_heads = heads;
  m.n_kv_heads = kv;
  m.head_dim = dim / heads;
  m.ffn_dim = ffn;
  m.vocab_size = 128256;
  m.max_position_embeddings = 131072;
  m.norm_eps = 1e-5;
  m.rope_theta = 500000.0;
  m.rope_scaling = {"llama3", factor, 1.0, 4.0, 8192};
  m.tie_word_embeddings = tied;
  m.bos_id = 128000;
  m.eos_ids = {128001, 128008, 128009};
  return m;
}

size_t group_index(const GroupEntry& g) {
  if (g.kind == GroupKind::Globals) return 0;
  return 1 + 2 * static_cast<size_t>(g.layer) + (g.kind == GroupKind::Ffn ? 1 : 0);
}

}  // namespace

std::vector<std::string> random_shape_names() {
  return {"tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"};
}

ModelConfig random_shape(const std::string& name) {
  if (name == "tiny") {
    // A few MB, yet every feature of the real models: GQA, head_dim != dim / heads, an ffn size
    // that is no multiple of 8, llama3 rope scaling that matters within max_position_embeddings.
    ModelConfig m;
    m.dim = 64;
    m.n_layers = 2;
    m.n_heads = 4;
    m.n_kv_heads = 2;
    m.head_dim = 16;
    m.ffn_dim = 172;
    m.vocab_size = 512;
    m.max_position_embeddings = 2048;
    m.norm_eps = 1e-5;
    m.rope_theta = 500000.0;
    m.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 256};
    m.tie_word_embeddings = false;
    m.bos_id = 1;
    m.eos_ids = {2};
    return m;
  }
  if (name == "llama-3.2-1b") {
    ModelConfig m = llama3(2048, 16, 32, 8, 8192, 32.0, true);
    m.head_dim = 64;
    return m;
  }
  if (name == "llama-3.2-3b") return llama3(3072, 28, 24, 8, 8192, 32.0, true);
  if (name == "llama-3.1-8b") return llama3(4096, 32, 32, 8, 14336, 8.0, false);
  if (name == "llama-3.1-70b") return llama3(8192, 80, 64, 8, 28672, 8.0, false);
  throw Error(fmt::format("unknown random shape '{}' (shapes: {})", name, fmt::join(random_shape_names(), ", ")));
}

void RandomSource::scale_of(const ModelConfig& m, const std::string& name, double* mean, double* stddev) {
  *mean = 0;
  if (name == "norm" || name == "attn_norm" || name == "ffn_norm") {
    *mean = 1;
    *stddev = 0.05;
  } else if (name == "tok_embeddings") {
    *stddev = 1;
  } else if (name == "wo") {
    *stddev = 0.5 / std::sqrt(static_cast<double>(m.q_dim()));
  } else if (name == "w2") {
    *stddev = 0.5 / std::sqrt(static_cast<double>(m.ffn_dim));
  } else {  // output, wq, wk, wv, w1, w3: all read the model dimension
    *stddev = 1 / std::sqrt(static_cast<double>(m.dim));
  }
}

RandomSource::RandomSource(const Manifest& plan, uint64_t seed) {
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    const GroupEntry& g = plan.groups[gi];
    if (group_index(g) != gi) throw Error("random source: groups are not in store order");
    first_table_.push_back(tables_.size());
    for (size_t ti = 0; ti < g.tensors.size(); ++ti) {
      Table t;
      t.key = mix64(mix64(seed * kGolden + 0x1234) + gi * 64 + ti);
      double mean = 0, sd = 1;
      scale_of(plan.model, g.tensors[ti].name, &mean, &sd);
      const size_t n = size_t{1} << kTableBits;
      t.values.resize(n);
      // Box-Muller on the tensor's own stream: two normal draws per pair of uniforms.
      uint64_t ctr = mix64(t.key ^ 0x5DEECE66Dull);
      auto uniform = [&] { return (static_cast<double>(mix64(ctr += kGolden) >> 11) + 0.5) * 0x1p-53; };
      for (size_t i = 0; i < n; i += 2) {
        const double r = std::sqrt(-2 * std::log(uniform())), a = 2 * M_PI * uniform();
        t.values[i] = f32_to_bf16(static_cast<float>(mean + sd * r * std::cos(a)));
        t.values[i + 1] = f32_to_bf16(static_cast<float>(mean + sd * r * std::sin(a)));
      }
      tables_.push_back(std::move(t));
    }
  }
}

const RandomSource::Table& RandomSource::table(const GroupEntry& g, size_t ti) const {
  return tables_.at(first_table_.at(group_index(g)) + ti);
}

void RandomSource::fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const {
  const Table& t = table(g, ti);
  const bf16_t* tab = t.values.data();
  const uint64_t key = t.key;
  constexpr uint64_t kMask = (1u << kTableBits) - 1;
  // Element e takes 16-bit slice (e % 4) of hash(key, e / 4), of which the low 12 bits pick.
  uint64_t e = first;
  const uint64_t end = first + count;
  while (e < end && (e & 3)) {
    *out++ = tab[(mix64(key + (e >> 2) * kGolden) >> (16 * (e & 3))) & kMask];
    ++e;
  }
  for (; e + 4 <= end; e += 4) {
    const uint64_t h = mix64(key + (e >> 2) * kGolden);
    out[0] = tab[h & kMask];
    out[1] = tab[(h >> 16) & kMask];
    out[2] = tab[(h >> 32) & kMask];
    out[3] = tab[(h >> 48) & kMask];
    out += 4;
  }
  for (; e < end; ++e) *out++ = tab[(mix64(key + (e >> 2) * kGolden) >> (16 * (e & 3))) & kMask];
}

}  // namespace ringllama
