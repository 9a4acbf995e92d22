// Running a tokenizer.json pipeline (common/tokenizer_json.h): added tokens, normalizer,
// pre-tokenizer, BPE with a cache of words, post-processor; and one token's decoded piece.
#include <algorithm>
#include <mutex>

#include "common/errors.h"
#include "common/tokenizer_json.h"

namespace ringllama {
namespace tokjson {

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0, hit;
  while ((hit = s.find(from, pos)) != std::string::npos) {
    out.append(s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  return out;
}

// Rust's char::is_whitespace (Unicode White_Space).

bool is_white(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}


void AddedMatcher::split(std::string_view s, size_t base, const Regex& word_char, std::vector<Segment>& out) const {
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    if (!first_[static_cast<unsigned char>(s[pos])]) {
      ++pos;
      continue;
    }
    const AddedToken* hit = nullptr;
    size_t hit_end = 0;
    int node = 0;
    for (size_t k = pos; k < s.size(); ++k) {
      int nxt = -1;
      for (auto& kid : nodes_[node].kids)
        if (kid.first == static_cast<unsigned char>(s[k])) nxt = kid.second;
      if (nxt < 0) break;
      node = nxt;
      if (nodes_[node].token) hit = nodes_[node].token, hit_end = k + 1;
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = hit_end;
    pos = hit_end;  // matches never overlap, a refused one included
    if (hit->single_word) {
      const bool start_ok = start == 0 || !ends_with_word(s.substr(0, start), word_char);
      const bool stop_ok = stop == s.size() || !word_char.matches_at(s, stop, nullptr);
      if (!start_ok || !stop_ok) continue;
    }
    if (hit->lstrip) {
      size_t b = start;
      while (b > 0) {
        size_t c = b - 1;
        while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
        size_t j = c;
        if (!is_white(utf8::next(s, j))) break;
        b = c;
      }
      start = std::max(b, start_offset);
    }
    if (hit->rstrip) {
      size_t j = stop;
      while (j < s.size()) {
        size_t k = j;
        if (!is_white(utf8::next(s, k))) break;
        j = k;
      }
      stop = j;
      pos = stop;
    }
    if (start_offset < start) out.push_back({base + start_offset, base + start, -1});
    out.push_back({base + start, base + stop, hit->id});
    start_offset = stop;
  }
  if (start_offset < s.size() || s.empty()) out.push_back({base + start_offset, base + s.size(), -1});
}

bool AddedMatcher::ends_with_word(std::string_view s, const Regex& word_char) {
  size_t c = s.size() - 1;
  while (c > 0 && (static_cast<unsigned char>(s[c]) & 0xC0) == 0x80) --c;
  return word_char.matches_at(s, c, nullptr);
}

void split_piece(Piece&& p, const PreOp& op, std::vector<Piece>& out) {
  std::vector<std::pair<size_t, size_t>> m = op.regex->find_all(p.text);
  struct Part {
    size_t b, e;
    bool match;
  };
  std::vector<Part> parts;
  size_t prev = 0;
  for (auto [b, e] : m) {
    if (prev < b) parts.push_back({prev, b, op.invert});
    parts.push_back({b, e, !op.invert});
    prev = e;
  }
  if (prev < p.text.size()) parts.push_back({prev, p.text.size(), op.invert});
  std::vector<Part> res;
  bool prev_match = false;
  switch (op.behavior) {
    case Behavior::Removed:
      for (auto& q : parts)
        if (!q.match) res.push_back(q);
      break;
    case Behavior::Isolated:
      res = parts;
      break;
    case Behavior::MergedWithPrevious:
      for (auto& q : parts) {
        if (q.match && !prev_match && !res.empty()) res.back().e = q.e;
        else res.push_back(q);
        prev_match = q.match;
      }
      break;
    case Behavior::MergedWithNext:
      for (size_t k = parts.size(); k-- > 0;) {
        const Part& q = parts[k];
        if (q.match && !prev_match && !res.empty()) res.back().b = q.b;
        else res.push_back(q);
        prev_match = q.match;
      }
      std::reverse(res.begin(), res.end());
      break;
    case Behavior::Contiguous:
      for (auto& q : parts) {
        if (q.match == prev_match && !res.empty()) res.back().e = q.e;
        else res.push_back(q);
        prev_match = q.match;
      }
      break;
  }
  for (auto& q : res)
    if (q.e > q.b) out.push_back(Piece{p.text.substr(q.b, q.e - q.b), p.origin && q.b == 0});
}


DecodePiece JsonTokenizer::piece(int32_t id, size_t index, bool) const {
  const std::string& t = tokens_[id];
  if (byte_level_decoder_) {
    // A token with a character outside the byte table (an added token with a space) is its text.
    std::string bytes;
    size_t i = 0;
    while (i < t.size()) {
      const int b = byte_of(utf8::next(t, i));
      if (b < 0) return {t, true};
      bytes += char(b);
    }
    return {bytes, true};
  }
  if (byte_fallback_decoder_ && t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
      isxdigit(static_cast<unsigned char>(t[3])) && isxdigit(static_cast<unsigned char>(t[4])))
    return {std::string(1, char(std::stoi(t.substr(3, 2), nullptr, 16))), true};
  std::string s = t;
  for (const DecOp& op : dec_) {
    if (op.kind == DecOp::Replace) {
      s = replace_all(std::move(s), op.from, op.to);
    } else if (op.kind == DecOp::Metaspace) {
      // tokenizers drops every replacement character of the first token, not only a leading one.
      s = replace_all(std::move(s), op.replacement, index == 0 && op.strip_first ? "" : " ");
    } else {
      std::vector<std::pair<size_t, char32_t>> chars;  // (offset, character)
      for (size_t i = 0; i < s.size();) {
        const size_t at = i;
        chars.emplace_back(at, utf8::next(s, i));
      }
      size_t a = 0, b = chars.size();
      while (a < op.start && a < b && chars[a].second == op.content) ++a;
      while (chars.size() - b < op.stop && b > a && chars[b - 1].second == op.content) --b;
      const size_t from = a < chars.size() ? chars[a].first : s.size();
      const size_t to = b < chars.size() ? chars[b].first : s.size();
      s = s.substr(from, to - from);
    }
  }
  return {s, false};
}

void JsonTokenizer::encode_text(std::string_view text, bool origin, std::vector<int32_t>& ids) const {
  std::vector<Piece> pieces{Piece{std::string(text), origin}}, next;
  for (const PreOp& op : pre_) {
    next.clear();
    for (Piece& p : pieces) {
      if (op.kind == PreOp::PrefixSpace) {
        if (p.text.empty() || p.text[0] != ' ') p.text.insert(0, 1, ' ');
        next.push_back(std::move(p));
        continue;
      }
      if (op.kind == PreOp::Metaspace) {
        p.text = replace_all(std::move(p.text), " ", op.replacement);
        const bool starts = p.text.compare(0, op.replacement.size(), op.replacement) == 0;
        if (!starts && (op.prepend == PreOp::Always || (op.prepend == PreOp::First && p.origin)))
          p.text = op.replacement + p.text;
        if (!op.split) {
          next.push_back(std::move(p));
          continue;
        }
      }
      split_piece(std::move(p), op, next);
    }
    std::swap(pieces, next);
  }
  const auto& table = byte_to_unicode();
  std::string mapped;
  for (Piece& p : pieces) {
    if (p.text.empty()) continue;
    {
      std::shared_lock<std::shared_mutex> lock(cache_mu_);
      auto hit = cache_.find(p.text);
      if (hit != cache_.end()) {
        ids.insert(ids.end(), hit->second.begin(), hit->second.end());
        continue;
      }
    }
    std::vector<int32_t> word;
    if (byte_level_) {
      mapped.clear();
      for (unsigned char b : p.text) mapped += table[b];
      bpe_->encode_word(mapped, word);
    } else {
      bpe_->encode_word(p.text, word);
    }
    ids.insert(ids.end(), word.begin(), word.end());
    std::unique_lock<std::shared_mutex> lock(cache_mu_);
    if (cache_.size() < kCacheWords) cache_.emplace(std::move(p.text), std::move(word));
  }
}

std::vector<int32_t> JsonTokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> ids;
  if (add_special) ids = template_before_;
  std::vector<Segment> segs, inner;
  raw_added_.split(text, 0, word_char_, segs);
  for (const Segment& sg : segs) {
    if (sg.id >= 0) {
      ids.push_back(sg.id);
      continue;
    }
    std::string s(text.substr(sg.begin, sg.end - sg.begin));
    for (const NormOp& op : norm_) {
      if (op.kind == NormOp::Prepend) {
        if (!s.empty()) s = op.text + s;  // tokenizers prepends to non-empty text only
        continue;
      }
      std::string out;
      size_t prev = 0;
      for (auto [b, e] : op.regex->find_all(s)) {
        out.append(s, prev, b - prev);
        out += op.text;
        prev = e;
      }
      out.append(s, prev, std::string::npos);
      s = std::move(out);
    }
    if (s.empty()) continue;
    if (normalized_added_.empty()) {
      encode_text(s, sg.begin == 0, ids);
      continue;
    }
    inner.clear();
    normalized_added_.split(s, 0, word_char_, inner);
    for (const Segment& in : inner) {
      if (in.id >= 0) ids.push_back(in.id);
      else if (in.end > in.begin) encode_text(std::string_view(s).substr(in.begin, in.end - in.begin), sg.begin == 0 && in.begin == 0, ids);
    }
  }
  if (add_special) ids.insert(ids.end(), template_after_.begin(), template_after_.end());
  return ids;
}


}  // namespace tokjson
}  // namespace ringllama
