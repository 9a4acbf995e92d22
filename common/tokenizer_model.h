// Inside the tokenizer: what each kind of tokenizer file implements (tokenizer.json through
// JsonTokenizer, tokenizer.model through libsentencepiece), and the UTF-8 helpers they share.
// Decoding is one token at a time everywhere (common/tokenizer.cpp assembles the pieces), so that
// the streaming decode and the whole decode are the same code and cannot disagree.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ringllama {

// How runs of raw bytes that tokens spell become text; each library has its own rule and the
// decoded text must match it byte for byte.
enum class ByteRunRule {
  Lossy,          // Rust's String::from_utf8_lossy over all bytes: one U+FFFD per maximal invalid
                  // subpart (`tokenizers`' ByteLevel decoder)
  WholeRun,       // a run of byte tokens is its UTF-8 text if all valid, else one U+FFFD per byte
                  // (`tokenizers`' ByteFallback decoder)
  PerCharacter,   // each invalid byte of a run becomes one U+FFFD (SentencePiece)
};

struct DecodeRules {
  ByteRunRule bytes = ByteRunRule::Lossy;
  size_t strip_start = 0;     // leading `strip_char`s removed from the whole text, at most this many
  char32_t strip_char = ' ';  // (tokenizers' Strip decoder after Fuse)
};

// One token's contribution to the decoded text.
struct DecodePiece {
  std::string text;     // UTF-8 text, or raw bytes when is_bytes
  bool is_bytes = false;
};

class TokenizerModel {
 public:
  virtual ~TokenizerModel() = default;
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual std::string token_text(int32_t id) const = 0;  // id already range-checked
  virtual std::optional<int32_t> token_id(std::string_view token) const = 0;
  virtual bool is_special(int32_t id) const = 0;
  // index: the token's position among those decoded (skipped special tokens not counted);
  // at_start: no text came before it. id already range-checked.
  virtual DecodePiece piece(int32_t id, size_t index, bool at_start) const = 0;
  virtual const DecodeRules& decode_rules() const = 0;

  std::optional<int32_t> bos, eos;
  std::string source;
};

// The tokenizer.json reader (common/tokenizer_json.cpp) and the SentencePiece one
// (common/tokenizer_spm.cpp). Both throw Error naming the file for anything malformed.
std::unique_ptr<TokenizerModel> load_tokenizer_json(const std::string& path);
std::unique_ptr<TokenizerModel> load_sentencepiece(const std::string& path);

namespace utf8 {

// Length of the valid UTF-8 character at s[i..], 0 if the bytes there are not one; *incomplete is
// set when they are a valid start cut short by the end of s.
size_t char_len(std::string_view s, size_t i, bool* incomplete = nullptr);
// Appends the UTF-8 encoding of c.
void append(std::string& out, char32_t c);
// Decodes the character at s[i..] (which must be valid), advancing i.
char32_t next(std::string_view s, size_t& i);
// s with every maximal invalid subpart replaced by U+FFFD (Rust's from_utf8_lossy). When
// hold_incomplete, a valid but unfinished character at the end is left out and its length
// returned in *held.
std::string lossy(std::string_view s, bool hold_incomplete = false, size_t* held = nullptr);
bool valid(std::string_view s);

}  // namespace utf8
}  // namespace ringllama
