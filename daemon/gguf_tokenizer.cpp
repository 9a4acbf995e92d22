#include "daemon/gguf_tokenizer.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <unordered_set>

#include "common/errors.h"

namespace ringllama {

namespace {

using ojson = nlohmann::ordered_json;

// Llama 3's pre-tokenizer regex, as its tokenizer.json (and llama.cpp's "llama3" pre) has it.
constexpr const char* kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
// llama.cpp's regexes for pre "default", applied one after the other (llama-vocab.cpp).
const char* const kDefaultRegexes[] = {
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "\\p{N}+",
    "[0-9][0-9][0-9]",
};

// llama.cpp's token types.
constexpr int64_t kTypeControl = 3, kTypeUserDefined = 4;

ojson byte_level(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

ojson split(const std::string& regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
}

// The pre-tokenizer of a pre kind, and whether its model ignores merges (Llama 3 looks a whole
// pre-token up in the vocabulary before merging).
ojson pre_tokenizer(const std::string& pre, const std::string& what, bool* ignore_merges) {
  *ignore_merges = false;
  if (pre == "llama-bpe" || pre == "llama3") {
    *ignore_merges = true;
    return {{"type", "Sequence"}, {"pretokenizers", ojson::array({split(kLlama3Regex), byte_level(false)})}};
  }
  if (pre == "smollm")
    return {{"type", "Sequence"},
            {"pretokenizers", ojson::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})}};
  if (pre == "gpt-2" || pre == "gpt2") return byte_level(true);
  if (pre == "default") {
    ojson seq = ojson::array();
    for (const char* r : kDefaultRegexes) seq.push_back(split(r));
    seq.push_back(byte_level(false));
    return {{"type", "Sequence"}, {"pretokenizers", seq}};
  }
  throw StoreError(fmt::format("{}: tokenizer.ggml.pre '{}' is not supported (supported: {})", what, pre,
                               fmt::join(gguf_pre_tokenizer_names(), ", ")));
}

std::string dump(const ojson& j, const std::string& what) {
  try {
    return j.dump(2) + "\n";
  } catch (const nlohmann::json::exception&) {
    throw StoreError(fmt::format("{}: the tokenizer holds text that is not valid UTF-8", what));
  }
}

}  // namespace

const std::vector<std::string>& gguf_pre_tokenizer_names() {
  static const std::vector<std::string> names = {"llama-bpe", "llama3", "smollm", "gpt-2", "gpt2", "default"};
  return names;
}

std::optional<std::vector<std::pair<std::string, std::string>>> gguf_tokenizer_files(const GgufFile& f,
                                                                                     const ModelConfig& m) {
  const std::string& what = f.what();
  std::optional<std::string> model = f.opt_string("tokenizer.ggml.model");
  if (!model) return std::nullopt;
  if (*model == "llama")
    throw StoreError(fmt::format("{}: tokenizer.ggml.model 'llama' (SentencePiece) cannot be converted to a "
                                 "tokenizer.json yet; only byte-level BPE ('gpt2') is supported",
                                 what));
  if (*model != "gpt2")
    throw StoreError(fmt::format("{}: tokenizer.ggml.model '{}' is not supported; only byte-level BPE ('gpt2')", what,
                                 *model));
  const std::vector<std::string>& tokens = f.get_strings("tokenizer.ggml.tokens");
  const std::vector<std::string>& merges = f.get_strings("tokenizer.ggml.merges");
  std::vector<int64_t> types(tokens.size(), 1);
  if (f.find("tokenizer.ggml.token_type")) {
    types = f.get_ints("tokenizer.ggml.token_type");
    if (types.size() != tokens.size())
      throw StoreError(fmt::format("{}: tokenizer.ggml.token_type has {} entries for {} tokens", what, types.size(),
                                   tokens.size()));
  }
  // Files from before llama.cpp recorded the pre-tokenizer get its default regexes, as llama.cpp
  // itself runs them.
  const std::string pre = f.opt_string("tokenizer.ggml.pre").value_or("default");
  if (!f.find("tokenizer.ggml.pre"))
    spdlog::warn("{}: no tokenizer.ggml.pre: llama.cpp's default pre-tokenizer is assumed", what);
  bool ignore_merges = false;
  ojson pre_tok = pre_tokenizer(pre, what, &ignore_merges);

  ojson vocab = ojson::object();
  ojson added = ojson::array();
  std::unordered_set<std::string> seen;  // ordered_json looks keys up linearly
  size_t duplicates = 0;
  for (size_t id = 0; id < tokens.size(); ++id) {
    if (!seen.insert(tokens[id]).second) {
      ++duplicates;  // HF's vocabulary is a map: the first id keeps the text
    } else {
      vocab[tokens[id]] = id;
    }
    if (types[id] == kTypeControl || types[id] == kTypeUserDefined)
      added.push_back({{"id", id}, {"content", tokens[id]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", types[id] == kTypeControl}});
  }
  if (duplicates) spdlog::warn("{}: {} token(s) repeat an earlier token's text", what, duplicates);

  ojson merge_list = ojson::array();
  for (size_t k = 0; k < merges.size(); ++k) {
    // llama.cpp splits at the first space after the first character: a merge's left part may be
    // a space-free token only, but its first character can be anything.
    const size_t sp = merges[k].find(' ', 1);
    if (sp == std::string::npos || sp + 1 >= merges[k].size())
      throw StoreError(fmt::format("{}: merge {} '{}' is not two tokens separated by a space", what, k, merges[k]));
    merge_list.push_back(ojson::array({merges[k].substr(0, sp), merges[k].substr(sp + 1)}));
  }

  auto id_key = [&](const char* key) -> std::optional<int64_t> {
    std::optional<int64_t> id = f.opt_int(key);
    if (id && (*id < 0 || *id >= static_cast<int64_t>(tokens.size())))
      throw StoreError(fmt::format("{}: {} is {}, outside the {} tokens", what, key, *id, tokens.size()));
    return id;
  };
  const std::optional<int64_t> bos = id_key("tokenizer.ggml.bos_token_id");
  const std::optional<int64_t> eos = id_key("tokenizer.ggml.eos_token_id");
  const std::optional<int64_t> pad = id_key("tokenizer.ggml.padding_token_id");
  const std::optional<int64_t> unk = id_key("tokenizer.ggml.unknown_token_id");
  // llama.cpp adds bos for Llama 3 vocabularies unless told otherwise, and not for the others.
  const bool add_bos =
      f.opt_bool("tokenizer.ggml.add_bos_token").value_or(pre == "llama-bpe" || pre == "llama3") && bos.has_value();
  const bool add_eos = f.opt_bool("tokenizer.ggml.add_eos_token").value_or(false);

  ojson post = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  if (add_bos) {
    const std::string b = tokens[*bos];
    ojson tp = {{"type", "TemplateProcessing"},
                {"single", ojson::array({{{"SpecialToken", {{"id", b}, {"type_id", 0}}}},
                                         {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                {"pair", ojson::array({{{"SpecialToken", {{"id", b}, {"type_id", 0}}}},
                                       {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                       {{"SpecialToken", {{"id", b}, {"type_id", 1}}}},
                                       {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
                {"special_tokens", {{b, {{"id", b}, {"ids", ojson::array({*bos})}, {"tokens", ojson::array({b})}}}}}};
    post = {{"type", "Sequence"}, {"processors", ojson::array({post, tp})}};
  }

  ojson tj;
  tj["version"] = "1.0";
  tj["truncation"] = nullptr;
  tj["padding"] = nullptr;
  tj["added_tokens"] = added;
  tj["normalizer"] = nullptr;
  tj["pre_tokenizer"] = pre_tok;
  tj["post_processor"] = post;
  tj["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  tj["model"] = {{"type", "BPE"},
                 {"dropout", nullptr},
                 {"unk_token", nullptr},
                 {"continuing_subword_prefix", nullptr},
                 {"end_of_word_suffix", nullptr},
                 {"fuse_unk", false},
                 {"byte_fallback", false},
                 {"ignore_merges", ignore_merges},
                 {"vocab", std::move(vocab)},
                 {"merges", std::move(merge_list)}};

  ojson tc;
  tc["add_bos_token"] = add_bos;
  tc["add_eos_token"] = add_eos;
  if (bos) tc["bos_token"] = tokens[*bos];
  if (eos) tc["eos_token"] = tokens[*eos];
  if (pad) tc["pad_token"] = tokens[*pad];
  if (unk) tc["unk_token"] = tokens[*unk];
  if (auto tmpl = f.opt_string("tokenizer.chat_template")) tc["chat_template"] = *tmpl;
  tc["clean_up_tokenization_spaces"] = false;
  tc["model_max_length"] = m.max_position_embeddings;
  tc["tokenizer_class"] = "PreTrainedTokenizerFast";

  return std::vector<std::pair<std::string, std::string>>{{"tokenizer.json", dump(tj, what)},
                                                          {"tokenizer_config.json", dump(tc, what)}};
}

}  // namespace ringllama
