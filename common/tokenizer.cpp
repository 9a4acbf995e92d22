// The Tokenizer facade: choosing the file, bos/eos from tokenizer_config.json, and decoding one
// token at a time (the whole decode is a stream run to its end, so the two always agree).
#include "common/tokenizer.h"

#include <nlohmann/json.hpp>

#include <filesystem>

#include "common/errors.h"
#include "common/store.h"
#include "common/tokenizer_model.h"

namespace fs = std::filesystem;

namespace ringllama {

// ---------------------------------------------------------------------------------------------
// UTF-8

namespace utf8 {
namespace {

enum class Status { Ok, Incomplete, Invalid };

// The character at s[i..] after Unicode's Table 3-7 (well-formed byte sequences): returns its
// length when Ok, the valid prefix cut by the end when Incomplete, and the maximal invalid subpart
// (at least 1) when Invalid, which is what from_utf8_lossy replaces by one U+FFFD.
Status decode_at(std::string_view s, size_t i, size_t* len) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    *len = 1;
    return Status::Ok;
  }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *len = 1;
    return Status::Invalid;
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) {
      *len = k;
      return Status::Incomplete;
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *len = k;
      return Status::Invalid;
    }
  }
  *len = need;
  return Status::Ok;
}

const char kReplacement[] = "\xEF\xBF\xBD";

}  // namespace

size_t char_len(std::string_view s, size_t i, bool* incomplete) {
  size_t len = 0;
  const Status st = decode_at(s, i, &len);
  if (incomplete) *incomplete = st == Status::Incomplete;
  return st == Status::Ok ? len : 0;
}

void append(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

char32_t next(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  const size_t n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
  char32_t c = b0 & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return c;
}

std::string lossy(std::string_view s, bool hold_incomplete, size_t* held) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  if (held) *held = 0;
  while (i < s.size()) {
    size_t len = 0;
    const Status st = decode_at(s, i, &len);
    if (st == Status::Ok) {
      out.append(s.data() + i, len);
    } else if (st == Status::Incomplete && hold_incomplete) {
      if (held) *held = s.size() - i;
      break;
    } else {
      out += kReplacement;
    }
    i += len;
  }
  return out;
}

bool valid(std::string_view s) {
  size_t i = 0, len = 0;
  while (i < s.size()) {
    if (decode_at(s, i, &len) != Status::Ok) return false;
    i += len;
  }
  return true;
}

}  // namespace utf8

// ---------------------------------------------------------------------------------------------
// Streaming decode

struct Tokenizer::Stream::State {
  const TokenizerModel* model;
  bool skip_special;
  size_t index = 0;      // tokens decoded so far (skipped ones not counted)
  bool at_start = true;  // no text yet, held bytes included
  std::string pending;   // bytes held back: an unfinished character or an open run of byte tokens
  size_t strip_left;     // leading strip characters that may still be removed

  // The held bytes as text. closing: the run ends here, so an unfinished character is final.
  std::string release(bool closing) {
    const ByteRunRule rule = model->decode_rules().bytes;
    std::string out;
    if (rule == ByteRunRule::WholeRun) {
      if (!closing) return out;
      if (utf8::valid(pending)) {
        out = pending;
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out += utf8::kReplacement;
      }
      pending.clear();
      return out;
    }
    if (rule == ByteRunRule::Lossy) {
      size_t held = 0;
      out = utf8::lossy(pending, !closing, &held);
      pending.erase(0, pending.size() - held);
      return out;
    }
    // PerCharacter: every byte that does not start a complete character is one U+FFFD.
    size_t i = 0;
    while (i < pending.size()) {
      bool incomplete = false;
      const size_t len = utf8::char_len(pending, i, &incomplete);
      if (len > 0) {
        out.append(pending, i, len);
        i += len;
      } else if (incomplete && !closing) {
        break;
      } else {
        out += utf8::kReplacement;
        i += 1;
      }
    }
    pending.erase(0, i);
    return out;
  }

  std::string strip(std::string out) {
    const char32_t c = model->decode_rules().strip_char;
    size_t cut = 0;
    while (strip_left > 0 && cut < out.size()) {
      size_t j = cut;
      if (utf8::next(out, j) != c) {
        strip_left = 0;
        break;
      }
      cut = j;
      --strip_left;
    }
    return out.substr(cut);
  }

  std::string push(int32_t id) {
    RL_REQUIRE(id >= 0 && id < model->vocab_size(), "token id {} is outside the vocabulary of {} (0..{})", id,
               model->source, model->vocab_size() - 1);
    if (skip_special && model->is_special(id)) return {};
    DecodePiece p = model->piece(id, index++, at_start);
    if (!p.text.empty()) at_start = false;
    std::string out;
    if (model->decode_rules().bytes == ByteRunRule::Lossy || p.is_bytes) {
      pending += p.text;
      out = release(false);
    } else {
      out = release(true);
      out += p.text;
    }
    return strip(std::move(out));
  }

  std::string flush() { return strip(release(true)); }
};

Tokenizer::Stream::Stream(std::unique_ptr<State> state) : state_(std::move(state)) {}
Tokenizer::Stream::Stream(Stream&&) noexcept = default;
Tokenizer::Stream& Tokenizer::Stream::operator=(Stream&&) noexcept = default;
Tokenizer::Stream::~Stream() = default;
std::string Tokenizer::Stream::push(int32_t id) { return state_->push(id); }
std::string Tokenizer::Stream::flush() { return state_->flush(); }

Tokenizer::Stream Tokenizer::stream(bool skip_special) const {
  auto st = std::make_unique<Stream::State>();
  st->model = model_.get();
  st->skip_special = skip_special;
  st->strip_left = model_->decode_rules().strip_start;
  return Stream(std::move(st));
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// tokenizer_config.json's bos_token / eos_token: a string, or an object with "content".
std::optional<int32_t> config_token(const nlohmann::json& cfg, const char* key, const TokenizerModel& m) {
  auto it = cfg.find(key);
  if (it == cfg.end()) return std::nullopt;
  std::string text;
  if (it->is_string()) {
    text = it->get<std::string>();
  } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    text = (*it)["content"].get<std::string>();
  } else {
    return std::nullopt;
  }
  return m.token_id(text);
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<TokenizerModel> model) : model_(std::move(model)) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::unique_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  std::error_code ec;
  RL_REQUIRE(fs::is_regular_file(path, ec), "tokenizer file {} does not exist or is not a regular file", path);
  std::unique_ptr<TokenizerModel> m = fs::path(path).extension() == ".model" ? load_sentencepiece(path)
                                                                             : load_tokenizer_json(path);
  m->source = path;
  const fs::path cfg_path = fs::path(path).parent_path() / "tokenizer_config.json";
  if (fs::is_regular_file(cfg_path, ec)) {
    nlohmann::json cfg;
    try {
      cfg = nlohmann::json::parse(read_regular_file(cfg_path.string(), 64ull << 20));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: not valid JSON: {}", cfg_path.string(), e.what());
    }
    if (cfg.is_object()) {
      if (auto b = config_token(cfg, "bos_token", *m)) m->bos = b;
      if (auto e = config_token(cfg, "eos_token", *m)) m->eos = e;
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(m)));
}

std::unique_ptr<Tokenizer> Tokenizer::from_store(const std::string& store_dir) {
  std::error_code ec;
  RL_REQUIRE(fs::is_directory(store_dir, ec), "store {} is not a directory", store_dir);
  for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
    const std::string p = (fs::path(store_dir) / name).string();
    if (fs::exists(p, ec)) return from_file(p);
  }
  return nullptr;
}

std::unique_ptr<Tokenizer> Tokenizer::require_store(const std::string& store_dir) {
  auto t = from_store(store_dir);
  RL_REQUIRE(t, "store {} has no tokenizer.json or tokenizer.model; give token ids", store_dir);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Queries

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  // Input that is not UTF-8 is read as `tokenizers` reads Python's text decoded with
  // errors="replace": each invalid part becomes U+FFFD.
  if (!utf8::valid(text)) {
    const std::string fixed = utf8::lossy(text);
    return model_->encode(fixed, add_special);
  }
  return model_->encode(text, add_special);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  Stream s = stream(skip_special);
  std::string out;
  for (int32_t id : ids) out += s.push(id);
  out += s.flush();
  return out;
}

std::string Tokenizer::token_text(int32_t id) const {
  RL_REQUIRE(id >= 0 && id < vocab_size(), "token id {} is outside the vocabulary of {} (0..{})", id, source(),
             vocab_size() - 1);
  return model_->token_text(id);
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const { return model_->token_id(token); }
bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && model_->is_special(id); }
int32_t Tokenizer::vocab_size() const { return model_->vocab_size(); }
std::optional<int32_t> Tokenizer::bos_id() const { return model_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return model_->eos; }
const std::string& Tokenizer::source() const { return model_->source; }

}  // namespace ringllama
