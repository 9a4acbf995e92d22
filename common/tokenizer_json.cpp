// tokenizer.json as Hugging Face `tokenizers` runs it: added tokens matched first (leftmost-longest,
// with their lstrip/rstrip/single_word rules), then the normalizer, the pre-tokenizer, the BPE
// model and the post-processor; decoding through the decoder's per-token rules. Parts of the format
// that a file uses and this reader does not know are refused by name rather than guessed.
// This file reads the JSON; common/tokenizer_pipeline.cpp runs it.
#include "common/tokenizer_json.h"

#include "common/errors.h"
#include "common/store.h"

namespace ringllama {
namespace tokjson {
namespace {


const json& field(const json& j, const char* key, const std::string& where) {
  RL_REQUIRE(j.is_object() && j.contains(key), "{}: missing \"{}\"", where, key);
  return j.at(key);
}
std::string str_field(const json& j, const char* key, const std::string& where) {
  const json& v = field(j, key, where);
  RL_REQUIRE(v.is_string(), "{}: \"{}\" is not a string", where, key);
  return v.get<std::string>();
}
bool bool_or(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : dflt;
}
char32_t one_char(const std::string& s, const std::string& where) {
  size_t i = 0;
  RL_REQUIRE(!s.empty() && utf8::char_len(s, 0) == s.size(), "{}: \"{}\" is not one character", where, s);
  return utf8::next(s, i);
}
// {"String": "..."} or {"Regex": "..."}, as tokenizers writes a pattern.
std::unique_ptr<Regex> pattern(const json& p, const std::string& where) {
  RL_REQUIRE(p.is_object(), "{}: pattern is not an object", where);
  if (p.contains("String") && p["String"].is_string()) return std::make_unique<Regex>(p["String"].get<std::string>(), true, where);
  if (p.contains("Regex") && p["Regex"].is_string()) return std::make_unique<Regex>(p["Regex"].get<std::string>(), false, where);
  fail("{}: pattern is neither {{\"String\"}} nor {{\"Regex\"}}", where);
}

// Sequences inside Sequences, bounded so that a hostile file cannot exhaust the stack.
struct Nesting {
  int& depth;
  Nesting(int& d, const std::string& where) : depth(d) {
    RL_REQUIRE(++depth <= 16, "{}: Sequences nested deeper than 16", where);
  }
  ~Nesting() { --depth; }
};

}  // namespace

JsonTokenizer::JsonTokenizer(const std::string& path) : where_(path) {
  json j;
  try {
    j = json::parse(read_regular_file(path, 1ull << 30));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }
  RL_REQUIRE(j.is_object(), "{}: not a tokenizer.json (not an object)", path);
  try {
    load_model(field(j, "model", path));
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) load_added(j["added_tokens"]);
    if (j.contains("normalizer")) load_normalizer(j["normalizer"]);
    if (j.contains("pre_tokenizer")) load_pre_tokenizer(j["pre_tokenizer"]);
    if (j.contains("post_processor")) load_post_processor(j["post_processor"]);
    if (j.contains("decoder")) load_decoder(j["decoder"]);
  } catch (const json::exception& e) {
    fail("{}: malformed: {}", path, e.what());
  }
}

void JsonTokenizer::load_model(const json& m) {
  const std::string w = where_ + ": model";
  RL_REQUIRE(m.is_object(), "{} is not an object", w);
  const std::string type = m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "BPE";
  RL_REQUIRE(type == "BPE", "{}: model type {} is not supported (BPE only; SentencePiece through tokenizer.model)", w,
             type);
  const json& vocab = field(m, "vocab", w);
  RL_REQUIRE(vocab.is_object(), "{}: vocab is not an object", w);
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    // Ids index a table: a file may leave holes, not a table many times its entries.
    RL_REQUIRE(it->is_number_integer() && it->get<int64_t>() >= 0 &&
                   it->get<int64_t>() < 2 * int64_t(vocab.size()) + 1024,
               "{}: vocab entry {} has no valid id (0 up to about twice the vocabulary's size)", w, it.key());
    max_id = std::max(max_id, it->get<int64_t>());
  }
  std::vector<std::string> toks(size_t(max_id + 1));
  for (auto it = vocab.begin(); it != vocab.end(); ++it) toks[it->get<int64_t>()] = it.key();
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    RL_REQUIRE(!m.contains(k) || m[k].is_null() || (m[k].is_string() && m[k].get<std::string>().empty()),
               "{}: {} is not supported", w, k);
  RL_REQUIRE(!m.contains("dropout") || m["dropout"].is_null() || m["dropout"] == 0,
             "{}: BPE dropout is not supported (it makes encoding random)", w);
  std::vector<std::pair<std::string, std::string>> merges;
  const json& mj = field(m, "merges", w);
  RL_REQUIRE(mj.is_array(), "{}: merges is not a list", w);
  merges.reserve(mj.size());
  for (const json& e : mj) {
    if (e.is_string()) {  // "a b", tokenizers' older form
      const std::string s = e.get<std::string>();
      if (s.rfind("#version", 0) == 0) continue;
      const size_t sp = s.find(' ');
      RL_REQUIRE(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
                 "{}: merge {} \"{}\" is not two tokens separated by one space", w, merges.size() + 1, s);
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else {
      RL_REQUIRE(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(),
                 "{}: merge {} is neither \"a b\" nor [a, b]", w, merges.size() + 1);
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    }
  }
  BpeOptions o;
  o.byte_fallback = bool_or(m, "byte_fallback", false);
  o.ignore_merges = bool_or(m, "ignore_merges", false);
  o.fuse_unk = bool_or(m, "fuse_unk", false);
  tokens_ = toks;
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    const std::string unk = m["unk_token"].get<std::string>();
    auto it = std::find(toks.begin(), toks.end(), unk);
    RL_REQUIRE(it != toks.end(), "{}: unk_token {} is not in the vocabulary", w, unk);
    o.unk_id = int32_t(it - toks.begin());
  }
  bpe_ = std::make_unique<Bpe>(std::move(toks), merges, o, w);
  special_.assign(tokens_.size(), false);
}


void JsonTokenizer::load_added(const json& a) {
  const std::string w = where_ + ": added_tokens";
  RL_REQUIRE(a.is_array(), "{} is not a list", w);
  added_.reserve(a.size());
  for (const json& t : a) {
    AddedToken at;
    at.content = str_field(t, "content", w);
    RL_REQUIRE(!at.content.empty() && utf8::valid(at.content), "{}: an added token is empty or not UTF-8", w);
    const json& idj = field(t, "id", w);
    RL_REQUIRE(idj.is_number_integer() && idj.get<int64_t>() >= 0 &&
                   idj.get<int64_t>() < int64_t(tokens_.size() + 2 * a.size()) + 1024,
               "{}: {} has no valid id", w, at.content);
    // A token the model already has keeps the model's id, as tokenizers does when it loads them.
    const int32_t model_id = bpe_->find(at.content);
    at.id = model_id >= 0 ? model_id : int32_t(idj.get<int64_t>());
    at.special = bool_or(t, "special", false);
    at.lstrip = bool_or(t, "lstrip", false);
    at.rstrip = bool_or(t, "rstrip", false);
    at.normalized = bool_or(t, "normalized", !at.special);
    at.single_word = bool_or(t, "single_word", false);
    added_.push_back(at);
  }
  for (const AddedToken& t : added_) {
    if (size_t(t.id) >= tokens_.size()) {
      tokens_.resize(t.id + 1);
      special_.resize(t.id + 1, false);
    }
    tokens_[t.id] = t.content;
    special_[t.id] = t.special;
    added_ids_.emplace(t.content, t.id);
    (t.normalized ? normalized_added_ : raw_added_).add(&t);
  }
}

void JsonTokenizer::load_normalizer(const json& n) {
  if (n.is_null()) return;
  const std::string w = where_ + ": normalizer";
  const std::string type = str_field(n, "type", w);
  if (type == "Sequence") {
    const Nesting nest(depth_, w);
    const json& list = field(n, "normalizers", w);
    RL_REQUIRE(list.is_array(), "{}: normalizers is not a list", w);
    for (const json& e : list) load_normalizer(e);
  } else if (type == "Prepend") {
    NormOp op;
    op.text = str_field(n, "prepend", w);
    norm_.push_back(op);
  } else if (type == "Replace") {
    NormOp op;
    op.kind = NormOp::Replace;
    op.text = str_field(n, "content", w);
    op.regex = pattern(field(n, "pattern", w), w);
    norm_.push_back(op);
  } else {
    fail("{}: normalizer {} is not supported (Sequence, Prepend, Replace)", w, type);
  }
}

void JsonTokenizer::load_pre_tokenizer(const json& p) {
  if (p.is_null()) return;
  const std::string w = where_ + ": pre_tokenizer";
  const std::string type = str_field(p, "type", w);
  RL_REQUIRE(!byte_level_, "{}: {} after ByteLevel is not supported", w, type);
  auto behavior = [&](const std::string& b) {
    if (b == "Removed") return Behavior::Removed;
    if (b == "Isolated") return Behavior::Isolated;
    if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
    if (b == "MergedWithNext") return Behavior::MergedWithNext;
    if (b == "Contiguous") return Behavior::Contiguous;
    fail("{}: unknown split behavior {}", w, b);
  };
  if (type == "Sequence") {
    const Nesting nest(depth_, w);
    const json& list = field(p, "pretokenizers", w);
    RL_REQUIRE(list.is_array(), "{}: pretokenizers is not a list", w);
    for (const json& e : list) load_pre_tokenizer(e);
  } else if (type == "Split") {
    PreOp op;
    op.regex = pattern(field(p, "pattern", w), w);
    op.behavior = behavior(str_field(p, "behavior", w));
    op.invert = bool_or(p, "invert", false);
    pre_.push_back(op);
  } else if (type == "Digits") {
    // Rust's char::is_numeric: the N categories.
    PreOp op;
    op.regex = std::make_shared<Regex>("\\p{N}", false, w);
    op.behavior = bool_or(p, "individual_digits", false) ? Behavior::Isolated : Behavior::Contiguous;
    pre_.push_back(op);
  } else if (type == "ByteLevel") {
    if (bool_or(p, "add_prefix_space", false)) {
      PreOp op;
      op.kind = PreOp::PrefixSpace;
      pre_.push_back(op);
    }
    if (bool_or(p, "use_regex", true)) {
      PreOp op;
      // GPT-2's pattern, as tokenizers' ByteLevel has it built in.
      op.regex = std::make_shared<Regex>(
          "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", false, w);
      pre_.push_back(op);
    }
    byte_level_ = true;
  } else if (type == "Metaspace") {
    PreOp op;
    op.kind = PreOp::Metaspace;
    op.replacement = str_field(p, "replacement", w);
    one_char(op.replacement, w);
    op.prepend = bool_or(p, "add_prefix_space", true) ? PreOp::Always : PreOp::Never;
    if (p.contains("prepend_scheme") && p["prepend_scheme"].is_string()) {
      const std::string s = p["prepend_scheme"].get<std::string>();
      RL_REQUIRE(s == "always" || s == "first" || s == "never", "{}: unknown prepend_scheme {}", w, s);
      op.prepend = s == "always" ? PreOp::Always : s == "first" ? PreOp::First : PreOp::Never;
    }
    op.split = bool_or(p, "split", true);
    if (op.split) op.regex = std::make_shared<Regex>(op.replacement, true, w);
    op.behavior = Behavior::MergedWithNext;
    pre_.push_back(op);
  } else {
    fail("{}: pre-tokenizer {} is not supported (Sequence, Split, Digits, ByteLevel, Metaspace)", w, type);
  }
}

void JsonTokenizer::load_post_processor(const json& p) {
  if (p.is_null()) return;
  const std::string w = where_ + ": post_processor";
  const std::string type = str_field(p, "type", w);
  if (type == "ByteLevel") return;  // offsets only
  if (type == "Sequence") {
    const Nesting nest(depth_, w);
    const json& list = field(p, "processors", w);
    RL_REQUIRE(list.is_array(), "{}: processors is not a list", w);
    for (const json& e : list) load_post_processor(e);
  } else if (type == "TemplateProcessing") {
    const json& single = field(p, "single", w);
    const json& specials = field(p, "special_tokens", w);
    RL_REQUIRE(single.is_array() && specials.is_object(), "{}: single or special_tokens malformed", w);
    template_before_.clear();
    template_after_.clear();
    bool seen_a = false;
    for (const json& item : single) {
      if (item.contains("Sequence")) {
        seen_a = true;
        continue;
      }
      const std::string name = str_field(field(item, "SpecialToken", w), "id", w);
      const json& ids = field(field(specials, name.c_str(), w), "ids", w);
      RL_REQUIRE(ids.is_array(), "{}: special token {} has no ids", w, name);
      for (const json& id : ids) {
        RL_REQUIRE(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < int64_t(tokens_.size()),
                   "{}: special token {} has an id outside the vocabulary", w, name);
        (seen_a ? template_after_ : template_before_).push_back(id.get<int32_t>());
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    for (const char* k : {"cls", "sep"}) {
      const json& e = field(p, k, w);
      RL_REQUIRE(e.is_array() && e.size() == 2 && e[1].is_number_integer() && e[1].get<int64_t>() >= 0 &&
                     e[1].get<int64_t>() < int64_t(tokens_.size()),
                 "{}: {} malformed", w, k);
    }
    template_before_ = {p["cls"][1].get<int32_t>()};
    template_after_ = {p["sep"][1].get<int32_t>()};
  } else {
    fail("{}: post-processor {} is not supported", w, type);
  }
  if (!template_before_.empty()) bos = template_before_.front();
}

void JsonTokenizer::load_decoder(const json& d) {
  if (d.is_null()) return;
  const std::string w = where_ + ": decoder";
  const std::string type = str_field(d, "type", w);
  if (type == "Sequence") {
    const Nesting nest(depth_, w);
    const json& list = field(d, "decoders", w);
    RL_REQUIRE(list.is_array(), "{}: decoders is not a list", w);
    for (const json& e : list) load_decoder(e);
  } else if (type == "ByteLevel") {
    byte_level_decoder_ = true;
    rules_.bytes = ByteRunRule::Lossy;
  } else if (type == "ByteFallback") {
    byte_fallback_decoder_ = true;
    rules_.bytes = ByteRunRule::WholeRun;
  } else if (type == "Fuse") {
    fused_ = true;
  } else if (type == "Replace") {
    const json& pat = field(d, "pattern", w);
    RL_REQUIRE(pat.is_object() && pat.contains("String") && pat["String"].is_string(),
               "{}: Replace with a regex pattern is not supported", w);
    DecOp op;
    op.from = pat["String"].get<std::string>();
    op.to = str_field(d, "content", w);
    dec_.push_back(op);
  } else if (type == "Metaspace") {
    DecOp op;
    op.kind = DecOp::Metaspace;
    op.replacement = str_field(d, "replacement", w);
    one_char(op.replacement, w);
    op.strip_first = bool_or(d, "add_prefix_space", true);
    if (d.contains("prepend_scheme") && d["prepend_scheme"].is_string())
      op.strip_first = d["prepend_scheme"].get<std::string>() != "never";
    dec_.push_back(op);
  } else if (type == "Strip") {
    DecOp op;
    op.kind = DecOp::Strip;
    op.content = one_char(str_field(d, "content", w), w);
    const json& a = field(d, "start", w);
    const json& b = field(d, "stop", w);
    RL_REQUIRE(a.is_number_unsigned() && b.is_number_unsigned(), "{}: Strip start/stop are not counts", w);
    op.start = a.get<size_t>();
    op.stop = b.get<size_t>();
    if (fused_) {
      // After Fuse the text is one string: only its start can be stripped as tokens stream.
      RL_REQUIRE(op.stop == 0, "{}: Strip of the end of the whole text is not supported", w);
      rules_.strip_start = op.start;
      rules_.strip_char = op.content;
    } else {
      dec_.push_back(op);
    }
  } else {
    fail("{}: decoder {} is not supported (ByteLevel, Metaspace, Sequence of Replace, ByteFallback, Fuse, Strip)",
         w, type);
  }
}


}  // namespace tokjson

std::unique_ptr<TokenizerModel> load_tokenizer_json(const std::string& path) {
  return std::make_unique<tokjson::JsonTokenizer>(path);
}

}  // namespace ringllama
