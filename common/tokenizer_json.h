// Inside the tokenizer.json reader: the parts of `tokenizers`' pipeline as plain data, read by
// common/tokenizer_json.cpp and run by common/tokenizer_pipeline.cpp.
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <memory>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/tokenizer_bpe.h"
#include "common/tokenizer_model.h"

namespace ringllama {
namespace tokjson {

using json = nlohmann::json;

std::string replace_all(std::string s, const std::string& from, const std::string& to);
bool is_white(char32_t c);  // Rust's char::is_whitespace (Unicode White_Space)

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, normalized, single_word;
};

struct Segment {  // a stretch of text, or an added token
  size_t begin, end;
  int32_t id;  // -1: text
};

// The added tokens of one kind (normalized or not), found leftmost-longest through a byte trie.
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    int node = 0;
    for (unsigned char b : t->content) {
      auto& kids = nodes_[node].kids;
      auto it = std::find_if(kids.begin(), kids.end(), [b](auto& k) { return k.first == b; });
      if (it == kids.end()) {
        nodes_.push_back({});
        nodes_[node].kids.emplace_back(b, int(nodes_.size()) - 1);
        node = int(nodes_.size()) - 1;
      } else {
        node = it->second;
      }
    }
    if (!nodes_[node].token) nodes_[node].token = t;  // the first of two equal contents wins
    first_[static_cast<unsigned char>(t->content[0])] = true;
    any_ = true;
  }
  bool empty() const { return !any_; }

  // tokenizers' AddedVocabulary::find_matches over s (valid UTF-8), appending segments that start
  // at base + their offset in s. word_char: one character of a word, for single_word tokens.
  void split(std::string_view s, size_t base, const Regex& word_char, std::vector<Segment>& out) const;

 private:
  static bool ends_with_word(std::string_view s, const Regex& word_char);
  struct Node {
    std::vector<std::pair<unsigned char, int>> kids;
    const AddedToken* token = nullptr;
  };
  std::vector<Node> nodes_{1};
  std::array<bool, 256> first_{};
  bool any_ = false;
};

struct NormOp {
  enum Kind { Prepend, Replace } kind = Prepend;
  std::string text;               // Prepend's text, Replace's content
  std::shared_ptr<Regex> regex;   // Replace's pattern
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreOp {
  enum Kind { Split, Metaspace, PrefixSpace } kind = Split;  // PrefixSpace: ByteLevel's add_prefix_space
  std::shared_ptr<Regex> regex;  // Split: matches of this (each a separate match)
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  std::string replacement;  // Metaspace
  enum Prepend { Always, First, Never } prepend = Always;
  bool split = true;
};

struct Piece {
  std::string text;
  bool origin;  // starts at offset 0 of the original text (Metaspace's "first")
};

// tokenizers' NormalizedString::split: matches and the stretches between them, then combined.
void split_piece(Piece&& p, const PreOp& op, std::vector<Piece>& out);

struct DecOp {
  enum Kind { Replace, Metaspace, Strip } kind = Replace;
  std::string from, to;     // Replace
  std::string replacement;  // Metaspace
  bool strip_first = true;  // Metaspace: prepend_scheme is not "never"
  char32_t content = ' ';   // Strip
  size_t start = 0, stop = 0;
};

class JsonTokenizer : public TokenizerModel {
 public:
  JsonTokenizer(const std::string& path);
  std::vector<int32_t> encode(std::string_view text, bool add_special) const override;
  int32_t vocab_size() const override { return int32_t(tokens_.size()); }
  std::string token_text(int32_t id) const override { return tokens_[id]; }
  std::optional<int32_t> token_id(std::string_view t) const override {
    auto it = added_ids_.find(std::string(t));
    if (it != added_ids_.end()) return it->second;
    const int32_t id = bpe_->find(t);
    return id >= 0 ? std::optional<int32_t>(id) : std::nullopt;
  }
  bool is_special(int32_t id) const override { return special_[id]; }
  DecodePiece piece(int32_t id, size_t index, bool at_start) const override;
  const DecodeRules& decode_rules() const override { return rules_; }

 private:
  void load_model(const json& m);
  void load_added(const json& a);
  void load_normalizer(const json& n);
  void load_pre_tokenizer(const json& p);
  void load_post_processor(const json& p);
  void load_decoder(const json& d);
  void encode_text(std::string_view text, bool origin, std::vector<int32_t>& ids) const;

  std::string where_;
  int depth_ = 0;  // Sequences being read
  std::unique_ptr<Bpe> bpe_;
  std::vector<std::string> tokens_;  // id → token, added tokens included
  std::vector<bool> special_;
  std::vector<AddedToken> added_;
  std::unordered_map<std::string, int32_t> added_ids_;
  AddedMatcher raw_added_, normalized_added_;
  Regex word_char_{"[\\p{Alphabetic}\\p{N}]", false, "word characters"};
  std::vector<NormOp> norm_;
  std::vector<PreOp> pre_;
  bool byte_level_ = false;  // the pre-tokenizer ends in ByteLevel: bytes → GPT-2 characters
  std::vector<int32_t> template_before_, template_after_;  // post-processor's ids around the text
  bool byte_level_decoder_ = false;
  bool byte_fallback_decoder_ = false;
  bool fused_ = false;
  std::vector<DecOp> dec_;
  DecodeRules rules_;

  // Ids of words already seen (pre-tokenized pieces, before the byte mapping), shared by calls and
  // threads as tokenizers' BPE cache is; it stops growing at kCacheWords.
  static constexpr size_t kCacheWords = 1 << 18;
  mutable std::shared_mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace tokjson
}  // namespace ringllama
