// Text ⇄ token ids for a model, exactly as Hugging Face `tokenizers` (tokenizer.json) or
// SentencePiece (tokenizer.model) would do it.
//
// tokenizer.json is the source of truth: byte-level BPE (Llama 3, GPT-2 style as SmolLM2) with the
// pre-tokenizer's own split regex through PCRE2, and Metaspace + byte_fallback BPE (Llama 2 style
// tokenizer.json). A store with only tokenizer.model goes through libsentencepiece. Added and
// special tokens in the text are matched before any splitting, as `tokenizers` does.
//
// A Tokenizer is immutable once loaded: encode, decode and stream may be called from several
// threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ringllama {

class TokenizerModel;  // common/tokenizer_model.h: one implementation per file kind

class Tokenizer {
 public:
  // From a store folder: tokenizer.json if present, else tokenizer.model; nullptr when the store
  // has neither (it still serves token ids). bos/eos come from tokenizer_config.json beside the
  // file when it names them. Throws Error when a file is there but malformed or unsupported.
  static std::unique_ptr<Tokenizer> from_store(const std::string& store_dir);
  // As from_store, but a store without a tokenizer is an Error that says to give token ids:
  // "store X has no tokenizer.json or tokenizer.model; give token ids".
  static std::unique_ptr<Tokenizer> require_store(const std::string& store_dir);
  // One file: *.model is SentencePiece, anything else is read as tokenizer.json. A
  // tokenizer_config.json in the same folder supplies bos/eos where present. Throws Error.
  static std::unique_ptr<Tokenizer> from_file(const std::string& path);

  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Ids of text. add_special: the special tokens the post-processor adds (Llama 3's
  // <|begin_of_text|>; for SentencePiece, BOS). Special-token strings inside the text are always
  // their special ids, as `tokenizers` encodes them.
  std::vector<int32_t> encode(std::string_view text, bool add_special = false) const;
  // Text of ids; invalid UTF-8 that the tokens spell becomes U+FFFD as `tokenizers` writes it.
  // Throws Error for an id outside [0, vocab_size()).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  std::string token_text(int32_t id) const;                       // raw token string; Error if out of range
  std::optional<int32_t> token_id(std::string_view token) const;  // exact token, special ones included
  bool is_special(int32_t id) const;                              // an added token marked special
  int32_t vocab_size() const;                                     // ids are [0, vocab_size())
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  const std::string& source() const;  // the file it was loaded from, for messages

  // Streaming decode: push ids one at a time; each push returns the text now complete. A token
  // that ends inside a multi-byte character (or a run of byte tokens still open) is held until it
  // completes; flush() returns what is still held. The pieces concatenated equal decode() of all
  // the ids pushed. Holds a reference to its Tokenizer, which must outlive it.
  class Stream {
   public:
    std::string push(int32_t id);
    std::string flush();

    Stream(Stream&&) noexcept;
    Stream& operator=(Stream&&) noexcept;
    ~Stream();

   private:
    friend class Tokenizer;
    struct State;  // what is held back and the first-token rules, per model kind
    explicit Stream(std::unique_ptr<State> state);
    std::unique_ptr<State> state_;
  };
  Stream stream(bool skip_special = false) const;

  const TokenizerModel& model() const { return *model_; }

 private:
  explicit Tokenizer(std::unique_ptr<TokenizerModel> model);
  std::unique_ptr<TokenizerModel> model_;
};

}  // namespace ringllama
