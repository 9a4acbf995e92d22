// Small Hugging Face Llama folders built in C++ for the packer's suites: config.json in either
// form, safetensors files (single or sharded) in F32, F16 or BF16, and the bf16 values the store
// must then hold.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "tests/test_util.h"

namespace ringllama::test {

struct StEntry {
  std::string name;
  std::string dtype;            // "F32", "F16", "BF16", "I8", ...
  std::vector<int64_t> shape;
  std::string data;             // raw little-endian bytes
};

// A safetensors file's bytes; the header is padded with spaces to 8 bytes as the format's writer does.
inline std::string make_safetensors(const std::vector<StEntry>& entries) {
  nlohmann::json h = nlohmann::json::object();
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t at = 0;
  std::string data;
  for (const auto& e : entries) {
    h[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {at, at + e.data.size()}}};
    at += e.data.size();
    data += e.data;
  }
  std::string text = h.dump();
  while (text.size() % 8) text += ' ';
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + text + data;
}

// Deterministic values of a tensor in a dtype, and what the store must hold after conversion.
struct TensorValues {
  std::string raw;               // bytes in `dtype`
  std::vector<bf16_t> expected;  // bf16 after round-to-nearest-even
};

inline TensorValues make_values(const std::string& dtype, int64_t numel, uint64_t seed) {
  TensorValues v;
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  auto next = [&] {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  };
  for (int64_t i = 0; i < numel; ++i) {
    const uint64_t r = next();
    if (dtype == "F32") {
      // Values of many magnitudes with all 23 mantissa bits in use, so rounding is exercised;
      // every 7th value sits exactly half way between two bf16 values (ties go to even).
      float f = static_cast<float>(static_cast<int64_t>(r % 2000001) - 1000000) * 1e-6f *
                static_cast<float>(1 << (r >> 60));
      if (i % 7 == 3) {
        uint32_t bits = (static_cast<uint32_t>(r >> 20) & 0xFFFF0000u & 0xBFFF0000u) | 0x8000u;
        std::memcpy(&f, &bits, 4);
      }
      v.raw.append(reinterpret_cast<const char*>(&f), 4);
      v.expected.push_back(f32_to_bf16(f));
    } else if (dtype == "F16") {
      uint16_t h = static_cast<uint16_t>(r & 0xFFFF);
      if (((h >> 10) & 0x1F) == 0x1F) h &= 0xBFFF;  // no inf/NaN
      v.raw.append(reinterpret_cast<const char*>(&h), 2);
      v.expected.push_back(f32_to_bf16(f16_to_f32(h)));
    } else if (dtype != "BF16") {  // a dtype the packer refuses: bytes of the right size
      const size_t n = dtype == "F64" || dtype == "I64" ? 8 : dtype == "I32" ? 4 : 1;
      for (size_t k = 0; k < n; ++k) v.raw.push_back(static_cast<char>((r >> (8 * k)) & 0xFF));
    } else {  // BF16: copied as is
      uint16_t b = static_cast<uint16_t>(r & 0xFFFF);
      if (((b >> 7) & 0xFF) == 0xFF) b &= 0xBFFF;
      v.raw.append(reinterpret_cast<const char*>(&b), 2);
      v.expected.push_back(b);
    }
  }
  return v;
}

// A tiny Llama: dim 32, 2 layers, 4 heads, 2 kv heads, head_dim 8 (from dim / heads), ffn 48, vocab 40.
struct HfModelSpec {
  bool tied = false;
  bool transformers5 = false;  // rope_parameters + dtype instead of rope_theta + rope_scaling + torch_dtype
  std::string dtype = "F32";
  int shards = 1;              // > 1: model-0000k-of-0000n.safetensors + index
  bool lm_head_when_tied = false;
  std::map<std::string, std::string> dtype_of;  // HF name -> dtype other than `dtype`
};

inline nlohmann::json tiny_config(const HfModelSpec& s) {
  nlohmann::json c = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", 32},
      {"num_hidden_layers", 2},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 2},
      {"intermediate_size", 48},
      {"vocab_size", 40},
      {"max_position_embeddings", 1024},
      {"rms_norm_eps", 1e-5},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", s.tied},
      {"bos_token_id", 1},
      {"eos_token_id", {2, 3}},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"some_future_field", {{"x", 1}}},
  };
  nlohmann::json rope = {{"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 128},
                         {"rope_type", "llama3"}};
  if (s.transformers5) {
    rope["rope_theta"] = 500000.0;
    c["rope_parameters"] = rope;
    c["dtype"] = "bfloat16";
  } else {
    c["rope_theta"] = 500000.0;
    c["rope_scaling"] = rope;
    c["torch_dtype"] = "bfloat16";
  }
  return c;
}

// HF tensor name -> (shape) of the tiny model.
inline std::vector<std::pair<std::string, std::vector<int64_t>>> tiny_tensors(const HfModelSpec& s) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t = {{"model.embed_tokens.weight", {40, 32}},
                                                                 {"model.norm.weight", {32}}};
  if (!s.tied || s.lm_head_when_tied) t.push_back({"lm_head.weight", {40, 32}});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {32}});
    t.push_back({p + "self_attn.q_proj.weight", {32, 32}});
    t.push_back({p + "self_attn.k_proj.weight", {16, 32}});
    t.push_back({p + "self_attn.v_proj.weight", {16, 32}});
    t.push_back({p + "self_attn.o_proj.weight", {32, 32}});
    t.push_back({p + "post_attention_layernorm.weight", {32}});
    t.push_back({p + "mlp.gate_proj.weight", {48, 32}});
    t.push_back({p + "mlp.up_proj.weight", {48, 32}});
    t.push_back({p + "mlp.down_proj.weight", {32, 48}});
  }
  return t;
}

// Writes config.json and the weights into `dir`; returns the expected bf16 values per HF name.
// `drop` leaves a tensor out; `reshape` gives one a different shape.
inline std::map<std::string, std::vector<bf16_t>> write_tiny_hf(const std::string& dir, const HfModelSpec& s,
                                                                const std::string& drop = "",
                                                                const std::string& reshape = "") {
  write_file(dir + "/config.json", tiny_config(s).dump(2));
  std::map<std::string, std::vector<bf16_t>> expected;
  std::vector<std::vector<StEntry>> shards(s.shards);
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t seed = 1;
  int i = 0;
  for (auto& [name, shape] : tiny_tensors(s)) {
    ++seed;
    if (name == drop) continue;
    std::vector<int64_t> sh = shape;
    if (name == reshape) sh.back() += 1;
    int64_t numel = 1;
    for (int64_t d : sh) numel *= d;
    auto odd = s.dtype_of.find(name);
    const std::string dtype = odd == s.dtype_of.end() ? s.dtype : odd->second;
    TensorValues v = make_values(dtype, numel, seed);
    expected[name] = v.expected;
    const int k = i++ % s.shards;
    shards[k].push_back({name, dtype, sh, v.raw});
    weight_map[name] = "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(s.shards) + ".safetensors";
  }
  if (s.shards == 1) {
    write_file(dir + "/model.safetensors", make_safetensors(shards[0]));
  } else {
    for (int k = 0; k < s.shards; ++k)
      write_file(dir + "/model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(s.shards) + ".safetensors",
                 make_safetensors(shards[k]));
    nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
    write_file(dir + "/model.safetensors.index.json", index.dump(2));
  }
  return expected;
}

}  // namespace ringllama::test
