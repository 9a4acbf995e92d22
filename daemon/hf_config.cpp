#include "daemon/hf_config.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <optional>
#include <set>
#include <vector>

#include "common/errors.h"
#include "common/store.h"

namespace ringllama {

namespace {

using nlohmann::json;

// A config.json is a few KiB; anything near this is not one.
constexpr uint64_t kMaxHfConfigBytes = 16ull << 20;

class Reader {
 public:
  Reader(const json& root, std::string what) : root_(root), what_(std::move(what)) {}

  [[noreturn]] void bad(const std::string& field, const std::string& why) const {
    throw StoreError(fmt::format("{}: field '{}' {}", what_, field, why));
  }

  // A field that is absent or null reads as `fallback`.
  int64_t integer(const json& obj, const std::string& key, const std::string& field, std::optional<int64_t> fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      if (!fallback) bad(field, "is missing");
      return *fallback;
    }
    if (!it->is_number_integer()) bad(field, fmt::format("must be an integer, got {}", it->dump()));
    return it->get<int64_t>();
  }

  double number(const json& obj, const std::string& key, const std::string& field, std::optional<double> fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      if (!fallback) bad(field, "is missing");
      return *fallback;
    }
    if (!it->is_number()) bad(field, fmt::format("must be a number, got {}", it->dump()));
    return it->get<double>();
  }

  bool boolean(const json& obj, const std::string& key, bool fallback) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) bad(key, fmt::format("must be true or false, got {}", it->dump()));
    return it->get<bool>();
  }

  const json& root() const { return root_; }
  const std::string& what() const { return what_; }

 private:
  const json& root_;
  std::string what_;
};

void read_architecture(const Reader& r) {
  const json& j = r.root();
  auto arch = j.find("architectures");
  auto type = j.find("model_type");
  if (type != j.end() && !type->is_null()) {
    if (!type->is_string()) r.bad("model_type", "must be a string");
    if (type->get<std::string>() != "llama")
      r.bad("model_type", fmt::format("is '{}'; only llama (LlamaForCausalLM) is supported", type->get<std::string>()));
  }
  if (arch != j.end() && !arch->is_null()) {
    if (!arch->is_array()) r.bad("architectures", "must be a list of class names");
    for (const auto& a : *arch)
      if (a.is_string() && a.get<std::string>() == "LlamaForCausalLM") return;
    r.bad("architectures", fmt::format("is {}; only LlamaForCausalLM is supported", arch->dump()));
  }
  if (type == j.end() || type->is_null())
    r.bad("architectures", "is missing (and so is model_type): cannot tell this is a Llama model");
}

// rope_parameters (transformers 5) or rope_scaling (earlier), with the theta where each form keeps it.
void read_rope(const Reader& r, ModelConfig& m) {
  const json& j = r.root();
  std::string field = "rope_parameters";
  auto rp = j.find("rope_parameters");
  if (rp == j.end() || rp->is_null()) {
    field = "rope_scaling";
    rp = j.find("rope_scaling");
  }
  m.rope_theta = r.number(j, "rope_theta", "rope_theta", 10000.0);
  if (rp == j.end() || rp->is_null()) return;
  if (!rp->is_object()) r.bad(field, fmt::format("must be an object or null, got {}", rp->dump()));
  const json& p = *rp;
  m.rope_theta = r.number(p, "rope_theta", field + ".rope_theta", m.rope_theta);

  std::string type_key = p.contains("rope_type") ? "rope_type" : "type";
  std::string type = "default";
  auto t = p.find(type_key);
  if (t != p.end() && !t->is_null()) {
    if (!t->is_string()) r.bad(field + "." + type_key, "must be a string");
    type = t->get<std::string>();
  }
  if (type == "default") return;
  if (type != "llama3")
    r.bad(field + "." + type_key, fmt::format("is '{}'; supported rope types are default and llama3", type));
  RopeScaling& s = m.rope_scaling;
  s.type = "llama3";
  s.factor = r.number(p, "factor", field + ".factor", std::nullopt);
  s.low_freq_factor = r.number(p, "low_freq_factor", field + ".low_freq_factor", std::nullopt);
  s.high_freq_factor = r.number(p, "high_freq_factor", field + ".high_freq_factor", std::nullopt);
  s.original_max_position_embeddings =
      r.integer(p, "original_max_position_embeddings", field + ".original_max_position_embeddings", std::nullopt);
}

std::vector<int64_t> read_ids(const Reader& r, const std::string& key) {
  const json& j = r.root();
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (it->is_number_integer()) return {it->get<int64_t>()};
  if (!it->is_array()) r.bad(key, fmt::format("must be a token id, a list of ids or null, got {}", it->dump()));
  std::vector<int64_t> ids;
  for (const auto& v : *it) {
    if (!v.is_number_integer()) r.bad(key, fmt::format("must hold token ids only, got {}", v.dump()));
    ids.push_back(v.get<int64_t>());
  }
  return ids;
}

}  // namespace

ModelConfig parse_hf_config(const std::string& json_text, const std::string& what) {
  // nlohmann keeps the last of a repeated key and other readers the first: refuse the file instead.
  std::vector<std::set<std::string>> keys_seen;  // one set per object being parsed
  std::string duplicate;
  json::parser_callback_t on_event = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys_seen.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys_seen.empty()) keys_seen.pop_back();
    } else if (event == json::parse_event_t::key && !keys_seen.empty() && duplicate.empty()) {
      const std::string key = parsed.get<std::string>();
      if (!keys_seen.back().insert(key).second) duplicate = key;
    }
    return true;
  };
  json j = json::parse(json_text, on_event, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw StoreError(fmt::format("{}: not valid JSON", what));
  if (!duplicate.empty())
    throw StoreError(fmt::format("{}: key '{}' appears twice in one object; keys must be unique", what, duplicate));
  if (!j.is_object()) throw StoreError(fmt::format("{}: expected a JSON object", what));
  Reader r(j, what);
  read_architecture(r);

  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null() && (!act->is_string() || act->get<std::string>() != "silu"))
    r.bad("hidden_act", fmt::format("is {}; only silu is supported", act->dump()));
  // Biases would be extra tensors that the store has no place for.
  if (r.boolean(j, "attention_bias", false)) r.bad("attention_bias", "is true; biased projections are not supported");
  if (r.boolean(j, "mlp_bias", false)) r.bad("mlp_bias", "is true; biased projections are not supported");

  ModelConfig m;
  m.architecture = "llama";
  m.dim = r.integer(j, "hidden_size", "hidden_size", std::nullopt);
  m.n_layers = r.integer(j, "num_hidden_layers", "num_hidden_layers", std::nullopt);
  m.n_heads = r.integer(j, "num_attention_heads", "num_attention_heads", std::nullopt);
  if (m.n_heads <= 0) r.bad("num_attention_heads", "must be > 0");
  m.n_kv_heads = r.integer(j, "num_key_value_heads", "num_key_value_heads", m.n_heads);
  m.head_dim = r.integer(j, "head_dim", "head_dim", m.dim / m.n_heads);
  m.ffn_dim = r.integer(j, "intermediate_size", "intermediate_size", std::nullopt);
  m.vocab_size = r.integer(j, "vocab_size", "vocab_size", std::nullopt);
  // transformers' LlamaConfig defaults where a field may be absent.
  m.max_position_embeddings = r.integer(j, "max_position_embeddings", "max_position_embeddings", 2048);
  m.norm_eps = r.number(j, "rms_norm_eps", "rms_norm_eps", 1e-6);
  read_rope(r, m);
  m.tie_word_embeddings = r.boolean(j, "tie_word_embeddings", false);
  std::vector<int64_t> bos = read_ids(r, "bos_token_id");
  if (bos.size() > 1) r.bad("bos_token_id", "must be one id");
  m.bos_id = bos.empty() ? -1 : bos[0];
  m.eos_ids = read_ids(r, "eos_token_id");

  for (const char* key : {"torch_dtype", "dtype"}) {
    auto it = j.find(key);
    if (it != j.end() && !it->is_null() && !it->is_string()) r.bad(key, "must be a string");
  }
  try {
    m.validate();
  } catch (const StoreError& e) {
    throw StoreError(fmt::format("{}: {}", what, e.what()));
  }
  return m;
}

ModelConfig load_hf_config(const std::string& dir) {
  const std::string path = dir + "/config.json";
  return parse_hf_config(read_regular_file(path, kMaxHfConfigBytes), path);
}

}  // namespace ringllama
