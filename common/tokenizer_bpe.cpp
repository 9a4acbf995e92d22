#include "common/tokenizer_bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <queue>

#include "common/errors.h"
#include "common/tokenizer_model.h"

namespace ringllama {

// ---------------------------------------------------------------------------------------------
// Regex

namespace {

// Unicode's White_Space, the set Oniguruma's \s matches in `tokenizers`. PCRE2's \s (with UCP)
// also takes U+180E, MONGOLIAN VOWEL SEPARATOR, which splits words differently; so \s and \S
// are spelled out as this set.
constexpr const char* kWhiteSpace =
    "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

std::string spell_out_spaces(const std::string& p) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char n = p[++i];
      if (n == 's') {
        out += in_class ? std::string(kWhiteSpace) : "[" + std::string(kWhiteSpace) + "]";
      } else if (n == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpace) + "]";
      } else {
        out += c;
        out += n;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // a leading ] is literal
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

}  // namespace

Regex::Regex(const std::string& pattern_in, bool literal, const std::string& where) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  // UCP: \d, \w and POSIX classes by Unicode properties, as Oniguruma matches them in `tokenizers`.
  const uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  const std::string pattern = literal ? pattern_in : spell_out_spaces(pattern_in);
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &err_off,
                        nullptr);
  if (!code_) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    fail("{}: pattern {} does not compile at offset {}: {}", where, pattern_in, err_off,
         reinterpret_cast<const char*>(msg));
  }
  // Without JIT (a platform that lacks it) the interpreter gives the same matches, slower.
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
}

Regex::~Regex() { pcre2_code_free(code_); }

namespace {

// Match data and a JIT stack large enough for long runs (a megabyte of spaces against
// `\s+(?!\S)`), made once per thread: a search is one call per piece of text, and making them per
// call (the stack is a mapping of its maximum size) would cost more than the match.
struct MatchScratch {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* js = nullptr;
  MatchScratch() {
    md = pcre2_match_data_create(64, nullptr);  // the whole match is all we read
    mc = pcre2_match_context_create(nullptr);
    js = pcre2_jit_stack_create(32 * 1024, 64 << 20, nullptr);
    if (md && mc && js) pcre2_jit_stack_assign(mc, nullptr, js);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(js);
    pcre2_match_context_free(mc);
    pcre2_match_data_free(md);
  }
  static MatchScratch& get() {
    thread_local MatchScratch m;
    RL_REQUIRE(m.md && m.mc && m.js, "out of memory for a regex match");
    return m;
  }
};

[[noreturn]] void match_failed(int rc) {
  PCRE2_UCHAR msg[256];
  pcre2_get_error_message(rc, msg, sizeof msg);
  fail("regex match failed: {}", reinterpret_cast<const char*>(msg));
}

}  // namespace

std::vector<std::pair<size_t, size_t>> Regex::find_all(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  MatchScratch& m = MatchScratch::get();
  size_t off = 0;
  while (off < s.size()) {
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), off, PCRE2_NO_UTF_CHECK,
                               m.md, m.mc);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) match_failed(rc);
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.md);
    if (ov[1] <= ov[0]) {  // empty match: step over one character
      size_t len = utf8::char_len(s, ov[0]);
      off = ov[0] + (len ? len : 1);
      continue;
    }
    out.emplace_back(ov[0], ov[1]);
    off = ov[1];
  }
  return out;
}

bool Regex::matches_at(std::string_view s, size_t pos, size_t* end) const {
  MatchScratch& m = MatchScratch::get();
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                             PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, m.md, m.mc);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) match_failed(rc);
  if (end) *end = pcre2_get_ovector_pointer(m.md)[1];
  return true;
}

// ---------------------------------------------------------------------------------------------
// Byte-level table

namespace {

struct ByteTable {
  std::array<std::string, 256> to_unicode;
  std::array<int, 324> from_unicode;  // every mapped character is below U+0144
  ByteTable() {
    from_unicode.fill(-1);
    // Printable Latin-1 bytes stand for themselves; the others take U+0100 onwards in order.
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t c = printable ? char32_t(b) : char32_t(256 + n++);
      utf8::append(to_unicode[b], c);
      from_unicode[c] = b;
    }
  }
};

const ByteTable& byte_table() {
  static const ByteTable t;
  return t;
}

}  // namespace

const std::array<std::string, 256>& byte_to_unicode() { return byte_table().to_unicode; }

int byte_of(char32_t c) {
  const auto& f = byte_table().from_unicode;
  return c < f.size() ? f[c] : -1;
}

// ---------------------------------------------------------------------------------------------
// BPE

Bpe::Bpe(std::vector<std::string> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
         const BpeOptions& opts, const std::string& where)
    : vocab_(std::move(vocab)), opts_(opts) {
  ids_.reserve(vocab_.size());
  for (size_t i = 0; i < vocab_.size(); ++i)
    if (!vocab_[i].empty()) ids_.emplace(vocab_[i], int32_t(i));
  byte_ids_.fill(-1);
  if (opts_.byte_fallback) {
    for (int b = 0; b < 256; ++b) byte_ids_[b] = find(fmt::format("<0x{:02X}>", b));
  }
  merges_.reserve(merges.size());
  std::string joined;
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& [a, b] = merges[r];
    const int32_t ia = find(a), ib = find(b);
    joined = a + b;
    const int32_t in = find(joined);
    RL_REQUIRE(ia >= 0 && ib >= 0 && in >= 0, "{}: merge {} ({} + {}) names a token outside the vocabulary", where,
               r + 1, a, b);
    // A pair listed twice keeps its later rank, as tokenizers' map does.
    merges_[key(ia, ib)] = Merge{int32_t(r), in};
  }
}

int32_t Bpe::find(std::string_view token) const {
  auto it = ids_.find(token);
  return it == ids_.end() ? -1 : it->second;
}

void Bpe::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (opts_.ignore_merges) {
    const int32_t id = find(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool gone;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  auto add = [&](int32_t id) { sym.push_back(Symbol{id, int32_t(sym.size()) - 1, int32_t(sym.size()) + 1, false}); };
  // Initial symbols: one per character, else its bytes (byte_fallback), else unk (fused or not).
  int32_t pending_unk = -1;
  size_t i = 0;
  while (i < word.size()) {
    size_t len = utf8::char_len(word, i);
    if (len == 0) len = 1;
    const std::string_view c = word.substr(i, len);
    i += len;
    const int32_t id = find(c);
    if (id >= 0) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(id);
      continue;
    }
    if (opts_.byte_fallback) {
      bool all = true;
      for (unsigned char b : c) all = all && byte_ids_[b] >= 0;
      if (all) {
        // tokenizers emits the byte tokens without first closing a pending unk.
        for (unsigned char b : c) add(byte_ids_[b]);
        continue;
      }
    }
    if (opts_.unk_id >= 0) {
      if (pending_unk >= 0 && !opts_.fuse_unk) add(pending_unk);
      pending_unk = opts_.unk_id;
    }
  }
  if (pending_unk >= 0) add(pending_unk);
  if (sym.empty()) return;
  sym.back().next = -1;

  // Lowest rank first, then leftmost: tokenizers' Word::merge_all, entries checked when popped.
  struct Cand {
    int32_t rank, pos, new_id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Cand> heap_storage;
  heap_storage.reserve(sym.size());
  std::priority_queue<Cand> q(std::less<Cand>(), std::move(heap_storage));
  auto lookup = [&](int32_t a, int32_t b) -> const Merge* {
    auto it = merges_.find(key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t k = 0; k + 1 < sym.size(); ++k)
    if (const Merge* m = lookup(sym[k].id, sym[k + 1].id)) q.push(Cand{m->rank, int32_t(k), m->new_id});
  while (!q.empty()) {
    const Cand top = q.top();
    q.pop();
    Symbol& cur = sym[top.pos];
    if (cur.gone || cur.next < 0) continue;
    Symbol& right = sym[cur.next];
    const Merge* m = lookup(cur.id, right.id);
    if (!m || m->new_id != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    right.gone = true;
    cur.next = right.next;
    if (cur.next >= 0) sym[cur.next].prev = top.pos;
    if (cur.prev >= 0)
      if (const Merge* pm = lookup(sym[cur.prev].id, cur.id)) q.push(Cand{pm->rank, cur.prev, pm->new_id});
    if (cur.next >= 0)
      if (const Merge* nm = lookup(cur.id, sym[cur.next].id)) q.push(Cand{nm->rank, top.pos, nm->new_id});
  }
  for (const Symbol& s : sym)
    if (!s.gone) out.push_back(s.id);
}

}  // namespace ringllama
