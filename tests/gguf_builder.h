// GGUF bytes built in C++ for the parser's and the packer's suites, valid or broken on purpose.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ringllama::test {

class GgufBuilder {
 public:
  // Encoded pieces, little-endian.
  static std::string u32(uint32_t v) { return raw(&v, 4); }
  static std::string u64(uint64_t v) { return raw(&v, 8); }
  static std::string f32(float v) { return raw(&v, 4); }
  static std::string str(const std::string& s) { return u64(s.size()) + s; }

  // A key with its value type and encoded value (use the helpers above).
  void kv(const std::string& key, uint32_t type, const std::string& value) {
    kvs_ += str(key) + u32(type) + value;
    ++n_kv_;
  }
  void kv_u32(const std::string& key, uint32_t v) { kv(key, 4, u32(v)); }
  void kv_f32(const std::string& key, float v) { kv(key, 6, f32(v)); }
  void kv_bool(const std::string& key, bool v) { kv(key, 7, std::string(1, v ? 1 : 0)); }
  void kv_str(const std::string& key, const std::string& v) { kv(key, 8, str(v)); }
  void kv_strs(const std::string& key, const std::vector<std::string>& v) {
    std::string s = u32(8) + u64(v.size());
    for (const auto& e : v) s += str(e);
    kv(key, 9, s);
  }
  void kv_i32s(const std::string& key, const std::vector<int32_t>& v) {
    std::string s = u32(5) + u64(v.size());
    for (int32_t e : v) s += raw(&e, 4);
    kv(key, 9, s);
  }

  // A tensor: ne in ggml order (row length first), ggml type, its data bytes.
  void tensor(const std::string& name, const std::vector<uint64_t>& ne, uint32_t type, const std::string& data) {
    tensors_.push_back({name, ne, type, data});
  }
  // F32 values of a tensor.
  void tensor_f32(const std::string& name, const std::vector<uint64_t>& ne, const std::vector<float>& v) {
    tensor(name, ne, 0, raw(v.data(), v.size() * 4));
  }

  uint32_t version = 3;
  uint64_t alignment = 32;  // only for laying out: set general.alignment yourself when not 32
  int64_t tensor_count_delta = 0;  // lie about the counts
  int64_t kv_count_delta = 0;
  int64_t offset_delta = 0;        // added to the last tensor's offset

  std::string build() const {
    std::string out = "GGUF" + u32(version) + u64(tensors_.size() + tensor_count_delta) + u64(n_kv_ + kv_count_delta) + kvs_;
    uint64_t off = 0;
    std::vector<uint64_t> offsets;
    for (const auto& t : tensors_) {
      offsets.push_back(off);
      off += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const auto& t = tensors_[i];
      out += str(t.name) + u32(static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) out += u64(d);
      out += u32(t.type) + u64(offsets[i] + (i + 1 == tensors_.size() ? offset_delta : 0));
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
    for (const auto& t : tensors_) {
      out += t.data;
      out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
    }
    return out;
  }

 private:
  static std::string raw(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }
  struct T {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    std::string data;
  };
  std::string kvs_;
  uint64_t n_kv_ = 0;
  std::vector<T> tensors_;
};

// What a tiny llama GGUF leaves out or changes, for the refusal tests.
struct TinyGgufSpec {
  std::string drop_key;       // a metadata key left out
  std::string drop_tensor;    // a tensor left out
  std::string arch = "llama";
  std::string pre = "smollm";
  std::string tokenizer_model = "gpt2";
  uint32_t up_type = 0;       // ggml type of blk.0.ffn_up (its data sized for F32 when 0)
};

// A tiny llama (dim 8, 1 layer, 2 heads / 1 kv, ffn 16, vocab 10, tied, F32) with a byte-level
// BPE vocabulary of 10 tokens.
inline GgufBuilder tiny_gguf(const TinyGgufSpec& s = {}) {
  GgufBuilder b;
  auto u32 = [&](const std::string& k, uint32_t v) {
    if (k != s.drop_key) b.kv_u32(k, v);
  };
  if (s.drop_key != "general.architecture") b.kv_str("general.architecture", s.arch);
  u32("llama.block_count", 1);
  u32("llama.context_length", 64);
  u32("llama.embedding_length", 8);
  u32("llama.feed_forward_length", 16);
  u32("llama.attention.head_count", 2);
  u32("llama.attention.head_count_kv", 1);
  if (s.drop_key != "llama.attention.layer_norm_rms_epsilon") b.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  b.kv_f32("llama.rope.freq_base", 10000.0f);
  b.kv_str("tokenizer.ggml.model", s.tokenizer_model);
  b.kv_str("tokenizer.ggml.pre", s.pre);
  b.kv_strs("tokenizer.ggml.tokens", {"<s>", "</s>", "a", "b", "c", "ab", "\xc4\xa0", "\xc4\xa0" "a", "bc", "abc"});
  b.kv_i32s("tokenizer.ggml.token_type", {3, 3, 1, 1, 1, 1, 1, 1, 1, 1});
  b.kv_strs("tokenizer.ggml.merges", {"a b", "\xc4\xa0 a", "b c", "ab c"});
  u32("tokenizer.ggml.bos_token_id", 0);
  u32("tokenizer.ggml.eos_token_id", 1);
  auto t = [&](const std::string& name, std::vector<uint64_t> ne, uint32_t type = 0) {
    if (name == s.drop_tensor) return;
    uint64_t n = 1;
    for (uint64_t d : ne) n *= d;
    std::vector<float> v(n);
    for (uint64_t i = 0; i < n; ++i) v[i] = 0.01f * static_cast<float>((i * 7 + name.size()) % 23) - 0.1f;
    if (type == 0) {
      b.tensor_f32(name, ne, v);
    } else {  // a type the packer refuses: bytes of a plausible size
      b.tensor(name, ne, type, std::string(n, '\x11'));
    }
  };
  t("token_embd.weight", {8, 10});
  t("output_norm.weight", {8});
  t("blk.0.attn_norm.weight", {8});
  t("blk.0.attn_q.weight", {8, 8});
  t("blk.0.attn_k.weight", {8, 4});
  t("blk.0.attn_v.weight", {8, 4});
  t("blk.0.attn_output.weight", {8, 8});
  t("blk.0.ffn_norm.weight", {8});
  t("blk.0.ffn_gate.weight", {8, 16});
  t("blk.0.ffn_up.weight", {8, 16}, s.up_type);
  t("blk.0.ffn_down.weight", {16, 8});
  return b;
}

}  // namespace ringllama::test
