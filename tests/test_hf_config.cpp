// config.json -> ModelConfig: the published Llama 3.x form, the transformers 5 form, Llama 2
// defaults, and a clear error for everything this engine cannot run.
#include <gtest/gtest.h>

#include <functional>

#include "common/errors.h"
#include "daemon/hf_config.h"
#include "tests/test_pack_fixtures.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

// Meta-Llama-3.1-8B-Instruct's config.json as published.
const char* kLlama31_8B = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// Llama-3.2-1B as transformers 5 writes it.
const char* kLlama32_1B_tf5 = R"({
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 128000,
  "dtype": "bfloat16",
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": true,
  "transformers_version": "5.0.0",
  "vocab_size": 128256
})";

// Llama-2-7b-hf: no rope_scaling key at all, no head_dim, no num_key_value_heads.
const char* kLlama2_7B = R"({
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 4096,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "torch_dtype": "float16",
  "vocab_size": 32000
})";

nlohmann::json base() { return nlohmann::json::parse(kLlama31_8B); }

std::string error_of(const std::string& text) {
  try {
    parse_hf_config(text, "m/config.json");
  } catch (const StoreError& e) {
    return e.what();
  }
  return "no error";
}

TEST(HfConfig, Llama31PublishedForm) {
  ModelConfig m = parse_hf_config(kLlama31_8B, "config.json");
  EXPECT_EQ(m.architecture, "llama");
  EXPECT_EQ(m.dim, 4096);
  EXPECT_EQ(m.n_layers, 32);
  EXPECT_EQ(m.n_heads, 32);
  EXPECT_EQ(m.n_kv_heads, 8);
  EXPECT_EQ(m.head_dim, 128);
  EXPECT_EQ(m.ffn_dim, 14336);
  EXPECT_EQ(m.vocab_size, 128256);
  EXPECT_EQ(m.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(m.norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(m.rope_theta, 500000.0);
  EXPECT_EQ(m.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(m.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(m.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(m.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(m.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(m.tie_word_embeddings);
  EXPECT_EQ(m.bos_id, 128000);
  EXPECT_EQ(m.eos_ids, (std::vector<int64_t>{128001, 128008, 128009}));
}

TEST(HfConfig, OlderTypeKeyInRopeScaling) {
  nlohmann::json j = base();
  j["rope_scaling"].erase("rope_type");
  j["rope_scaling"]["type"] = "llama3";
  ModelConfig m = parse_hf_config(j.dump(), "config.json");
  EXPECT_EQ(m.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(m.rope_scaling.factor, 8.0);
}

TEST(HfConfig, Transformers5Form) {
  ModelConfig m = parse_hf_config(kLlama32_1B_tf5, "config.json");
  EXPECT_EQ(m.dim, 2048);
  EXPECT_EQ(m.head_dim, 64);
  EXPECT_TRUE(m.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(m.rope_theta, 500000.0);
  EXPECT_EQ(m.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(m.rope_scaling.factor, 32.0);
  EXPECT_EQ(m.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(m.eos_ids, (std::vector<int64_t>{128001}));
}

TEST(HfConfig, Llama2Defaults) {
  ModelConfig m = parse_hf_config(kLlama2_7B, "config.json");
  EXPECT_EQ(m.n_kv_heads, 32);
  EXPECT_EQ(m.head_dim, 128);
  EXPECT_EQ(m.rope_scaling.type, "none");
  EXPECT_DOUBLE_EQ(m.rope_theta, 10000.0);
  EXPECT_FALSE(m.tie_word_embeddings);
  EXPECT_EQ(m.bos_id, 1);
  EXPECT_EQ(m.eos_ids, (std::vector<int64_t>{2}));

  nlohmann::json j = nlohmann::json::parse(kLlama2_7B);
  j["rope_scaling"] = nullptr;
  j["head_dim"] = nullptr;
  j["num_key_value_heads"] = nullptr;
  EXPECT_EQ(parse_hf_config(j.dump(), "c").rope_scaling.type, "none");
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_EQ(parse_hf_config(j.dump(), "c").rope_scaling.type, "none");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  ModelConfig m2 = parse_hf_config(j.dump(), "c");
  EXPECT_EQ(m2.rope_scaling.type, "none");
  EXPECT_DOUBLE_EQ(m2.rope_theta, 1e6);
}

TEST(HfConfig, TokenIdForms) {
  nlohmann::json j = base();
  j["eos_token_id"] = nullptr;
  j["bos_token_id"] = nullptr;
  ModelConfig m = parse_hf_config(j.dump(), "c");
  EXPECT_TRUE(m.eos_ids.empty());
  EXPECT_EQ(m.bos_id, -1);
  j["eos_token_id"] = 5;
  EXPECT_EQ(parse_hf_config(j.dump(), "c").eos_ids, (std::vector<int64_t>{5}));
  j.erase("eos_token_id");
  j.erase("tie_word_embeddings");
  m = parse_hf_config(j.dump(), "c");
  EXPECT_TRUE(m.eos_ids.empty());
  EXPECT_FALSE(m.tie_word_embeddings);
}

TEST(HfConfig, ExplicitHeadDimMayDifferFromDimOverHeads) {
  nlohmann::json j = base();
  j["head_dim"] = 64;
  EXPECT_EQ(parse_hf_config(j.dump(), "c").head_dim, 64);
}

TEST(HfConfig, TheFixtureConfigReadsInBothForms) {
  for (bool tf5 : {false, true}) {
    test::HfModelSpec s;
    s.transformers5 = tf5;
    ModelConfig m = parse_hf_config(test::tiny_config(s).dump(), "c");
    EXPECT_EQ(m.head_dim, 8);
    EXPECT_DOUBLE_EQ(m.rope_theta, 500000.0);
    EXPECT_EQ(m.rope_scaling.original_max_position_embeddings, 128);
  }
}

struct Bad {
  const char* what;
  std::function<void(nlohmann::json&)> edit;
  const char* expect;
};

TEST(HfConfig, ErrorsNameTheFileAndTheField) {
  std::vector<Bad> cases = {
      {"mistral", [](auto& j) { j["architectures"] = {"MistralForCausalLM"}; }, "'architectures'"},
      {"mistral model_type", [](auto& j) { j["model_type"] = "mistral"; }, "'model_type' is 'mistral'"},
      {"no architecture at all", [](auto& j) { j.erase("architectures"); j.erase("model_type"); }, "'architectures'"},
      {"yarn", [](auto& j) { j["rope_scaling"]["rope_type"] = "yarn"; }, "'rope_scaling.rope_type' is 'yarn'"},
      {"dynamic", [](auto& j) { j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}}; },
       "'rope_scaling.type' is 'dynamic'"},
      {"linear in tf5 form",
       [](auto& j) { j.erase("rope_scaling"); j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}}; },
       "'rope_parameters.rope_type' is 'linear'"},
      {"llama3 without factor", [](auto& j) { j["rope_scaling"].erase("factor"); }, "'rope_scaling.factor' is missing"},
      {"rope_scaling a string", [](auto& j) { j["rope_scaling"] = "llama3"; }, "'rope_scaling'"},
      {"missing hidden_size", [](auto& j) { j.erase("hidden_size"); }, "'hidden_size' is missing"},
      {"hidden_size a string", [](auto& j) { j["hidden_size"] = "4096"; }, "'hidden_size' must be an integer"},
      {"layers a float", [](auto& j) { j["num_hidden_layers"] = 32.5; }, "'num_hidden_layers' must be an integer"},
      {"zero heads", [](auto& j) { j["num_attention_heads"] = 0; }, "num_attention_heads"},
      {"heads not a multiple of kv", [](auto& j) { j["num_key_value_heads"] = 5; }, "n_kv_heads"},
      {"eos a string", [](auto& j) { j["eos_token_id"] = "</s>"; }, "'eos_token_id'"},
      {"eos out of the vocabulary", [](auto& j) { j["eos_token_id"] = 999999; }, "eos"},
      {"tie not a bool", [](auto& j) { j["tie_word_embeddings"] = "yes"; }, "'tie_word_embeddings'"},
      {"attention bias", [](auto& j) { j["attention_bias"] = true; }, "'attention_bias'"},
      {"gelu", [](auto& j) { j["hidden_act"] = "gelu"; }, "'hidden_act'"},
  };
  for (const Bad& c : cases) {
    nlohmann::json j = base();
    c.edit(j);
    std::string msg = error_of(j.dump());
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": " << msg;
    EXPECT_EQ(msg.rfind("m/config.json: ", 0), 0u) << c.what << ": " << msg;
  }
  EXPECT_NE(error_of("{\"hidden_size\": ").find("m/config.json: not valid JSON"), std::string::npos);
  EXPECT_NE(error_of("[1]").find("expected a JSON object"), std::string::npos);
}

TEST(HfConfig, MissingFile) {
  test::TempDir d;
  try {
    load_hf_config(d.path());
    FAIL();
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find(d / "config.json"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringllama
