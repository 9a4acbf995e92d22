#include "daemon/random_model.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <map>
#include <tuple>

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
  const uint64_t base = mix64(seed * kGolden + 0x1234);
  // Tables are shared by tensors of one scale, so a 70B model builds a handful, not 723.
  std::map<std::tuple<double, double, uint64_t>, size_t> table_of;
  std::vector<std::pair<size_t, uint64_t>> refs;  // per tensor: table index, key
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    const GroupEntry& g = plan.groups[gi];
    if (group_index(g) != gi) throw Error("random source: groups are not in store order");
    first_key_.push_back(refs.size());
    for (size_t ti = 0; ti < g.tensors.size(); ++ti) {
      const uint64_t key = mix64(base + gi * 64 + ti);
      double mean = 0, sd = 1;
      scale_of(plan.model, g.tensors[ti].name, &mean, &sd);
      const auto id = std::make_tuple(mean, sd, key & 3);
      auto it = table_of.find(id);
      if (it == table_of.end()) {
        it = table_of.emplace(id, tables_.size()).first;
        // Box-Muller on the table's own stream: one pair of normal draws per pair of uniforms.
        uint64_t ctr = mix64(base ^ mix64(tables_.size() + 0x5DEECE66Dull));
        auto uniform = [&] { return (static_cast<double>(mix64(ctr += kGolden) >> 11) + 0.5) * 0x1p-53; };
        std::vector<uint32_t> pairs(size_t{1} << kTableBits);
        for (uint32_t& p : pairs) {
          const double r = std::sqrt(-2 * std::log(uniform())), a = 2 * M_PI * uniform();
          const bf16_t lo = f32_to_bf16(static_cast<float>(mean + sd * r * std::cos(a)));
          const bf16_t hi = f32_to_bf16(static_cast<float>(mean + sd * r * std::sin(a)));
          p = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        }
        tables_.push_back(std::move(pairs));
      }
      refs.emplace_back(it->second, key);
    }
  }
  for (const auto& [table, key] : refs) keys_.push_back({key, tables_[table].data()});
}

const RandomSource::TensorKey& RandomSource::tensor_key(const GroupEntry& g, size_t ti) const {
  return keys_.at(first_key_.at(group_index(g)) + ti);
}

void RandomSource::fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const {
  const TensorKey& t = tensor_key(g, ti);
  const uint32_t* tab = t.pairs;
  const uint64_t key = t.key;
  constexpr uint64_t kMask = (1u << kTableBits) - 1;
  // Element e is half (e % 2) of the pair that 16-bit slice (e / 2 % 4) of hash(key, e / 8) picks.
  auto one = [&](uint64_t e) {
    const uint32_t pair = tab[(mix64(key + (e >> 3) * kGolden) >> (16 * ((e >> 1) & 3))) & kMask];
    return static_cast<bf16_t>(pair >> (16 * (e & 1)));
  };
  uint64_t e = first;
  const uint64_t end = first + count;
  for (; e < end && (e & 7); ++e) *out++ = one(e);
  for (; e + 8 <= end; e += 8) {
    const uint64_t h = mix64(key + (e >> 3) * kGolden);
    const uint32_t p[4] = {tab[h & kMask], tab[(h >> 16) & kMask], tab[(h >> 32) & kMask], tab[h >> 48]};
    std::memcpy(out, p, sizeof p);
    out += 8;
  }
  for (; e < end; ++e) *out++ = one(e);
}

}  // namespace ringllama
