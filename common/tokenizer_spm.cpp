// tokenizer.model through libsentencepiece: encoding is the library's; decoding goes one piece at
// a time with the library's own rules (control pieces are invisible, byte pieces join into UTF-8
// with one U+FFFD per invalid byte, the leading space of the text is dropped), so that a stream of
// pieces adds up to DecodeIds.
#include <sentencepiece_processor.h>

#include "common/errors.h"
#include "common/tokenizer_model.h"

namespace ringllama {
namespace {

const char kSpace[] = "\xE2\x96\x81";  // ▁, SentencePiece's space

class SpmTokenizer : public TokenizerModel {
 public:
  explicit SpmTokenizer(const std::string& path) {
    const auto st = sp_.Load(path);
    RL_REQUIRE(st.ok(), "{}: not a SentencePiece model: {}", path, st.ToString());
    n_ = sp_.GetPieceSize();
    RL_REQUIRE(n_ > 0, "{}: a SentencePiece model without pieces", path);
    if (sp_.bos_id() >= 0 && sp_.bos_id() < n_) bos = sp_.bos_id();
    if (sp_.eos_id() >= 0 && sp_.eos_id() < n_) eos = sp_.eos_id();
    // Whether the text's leading space is dropped (add_dummy_prefix or remove_extra_whitespaces in
    // the model's normalizer spec, which the library's headers do not expose): ask the library.
    for (int id = 0; id < n_; ++id) {
      const std::string& p = sp_.IdToPiece(id);
      if (!sp_.IsControl(id) && !sp_.IsUnknown(id) && !sp_.IsByte(id) && p.size() > 3 &&
          p.compare(0, 3, kSpace) == 0) {
        strip_leading_ = sp_.DecodeIds({id}).compare(0, 1, " ") != 0;
        break;
      }
    }
    rules_.bytes = ByteRunRule::PerCharacter;
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int> ids;
    const auto st = sp_.Encode(text, &ids);
    RL_REQUIRE(st.ok(), "{}: encoding failed: {}", source, st.ToString());
    std::vector<int32_t> out;
    out.reserve(ids.size() + 1);
    if (add_special && bos) out.push_back(*bos);
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }
  int32_t vocab_size() const override { return n_; }
  std::string token_text(int32_t id) const override { return sp_.IdToPiece(id); }
  std::optional<int32_t> token_id(std::string_view t) const override {
    const int id = sp_.PieceToId(t);
    if (id < 0 || id >= n_ || sp_.IdToPiece(id) != t) return std::nullopt;
    return id;
  }
  bool is_special(int32_t id) const override { return sp_.IsControl(id); }

  DecodePiece piece(int32_t id, size_t, bool at_start) const override {
    if (sp_.IsControl(id)) return {};
    if (sp_.IsUnknown(id)) return {" \xE2\x81\x87 ", false};  // the library's unk surface, " ⁇ "
    const std::string& p = sp_.IdToPiece(id);
    if (sp_.IsByte(id)) return {std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16))), true};
    std::string_view v = p;
    if (at_start && strip_leading_ && v.compare(0, 3, kSpace) == 0) v.remove_prefix(3);
    std::string out;
    size_t pos = 0, hit;
    while ((hit = v.find(kSpace, pos)) != std::string_view::npos) {
      out.append(v.substr(pos, hit - pos));
      out += ' ';
      pos = hit + 3;
    }
    out.append(v.substr(pos));
    return {out, false};
  }
  const DecodeRules& decode_rules() const override { return rules_; }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  int32_t n_ = 0;
  bool strip_leading_ = true;
  DecodeRules rules_;
};

}  // namespace

std::unique_ptr<TokenizerModel> load_sentencepiece(const std::string& path) {
  return std::make_unique<SpmTokenizer>(path);
}

}  // namespace ringllama
