// The pieces of a tokenizer.json pipeline that do the work: a PCRE2 regex as `tokenizers` uses
// its Oniguruma ones, GPT-2's byte ↔ unicode table, and the BPE model (merges by rank).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

struct pcre2_real_code_8;

namespace ringllama {

// A compiled pattern: UTF and Unicode properties (\s, \p{L}, \w as Unicode sees them), JIT where
// the platform has it. Immutable, shared by threads.
class Regex {
 public:
  // literal: the pattern is a plain string (tokenizers' {"String": ...} patterns). where: named in
  // the error when the pattern does not compile.
  Regex(const std::string& pattern, bool literal, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping matches [begin, end) in order; empty matches are skipped. s must be valid UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const;
  bool matches_at(std::string_view s, size_t pos, size_t* end) const;  // anchored at pos

 private:
  pcre2_real_code_8* code_ = nullptr;
};

// GPT-2's reversible map of the 256 byte values onto printable characters (UTF-8 of each), and
// back: byte_of(c) is -1 for a character outside the map.
const std::array<std::string, 256>& byte_to_unicode();
int byte_of(char32_t c);

struct BpeOptions {
  bool byte_fallback = false;  // characters outside the vocabulary as <0xXX> tokens
  bool ignore_merges = false;  // a word that is a token is that token, merges or not
  bool fuse_unk = false;       // consecutive unknown characters as one unk token
  int32_t unk_id = -1;         // -1: unknown characters are dropped
};

class Bpe {
 public:
  // vocab: id → token (holes as empty strings never match); merges in rank order.
  // Throws Error (naming `where`) for a merge whose parts or result are not in the vocabulary.
  Bpe(std::vector<std::string> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
      const BpeOptions& opts, const std::string& where);

  // Appends the ids of one pre-tokenized word (already in the vocabulary's alphabet).
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  int32_t find(std::string_view token) const;  // -1 when absent
  const std::vector<std::string>& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  std::vector<std::string> vocab_;
  std::unordered_map<std::string_view, int32_t> ids_;  // views into vocab_
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_;  // <0xXX> tokens, -1 where absent
  BpeOptions opts_;
};

}  // namespace ringllama
