// The tokenizer's unit cases: merges by rank, the byte table, added and special tokens, streaming
// decode, SentencePiece through a model trained here, stores without a tokenizer and files that
// must be refused. (tests/tokenizer_corpus_test.py compares whole corpora with `tokenizers`.)
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "common/errors.h"
#include "common/tokenizer.h"
#include "common/tokenizer_bpe.h"
#include "common/tokenizer_model.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

// A byte-level BPE tokenizer.json over a tiny vocabulary: every byte's character, then `extra`.
json byte_level_json(const std::vector<std::string>& extra, const json& merges) {
  json vocab = json::object();
  for (const std::string& c : byte_to_unicode()) vocab[c] = vocab.size();
  for (const std::string& t : extra) vocab[t] = vocab.size();
  json j;
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}};
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}};
  return j;
}

std::unique_ptr<Tokenizer> load(const test::TempDir& dir, const json& j, const std::string& name = "tokenizer.json") {
  test::write_file(dir / name, j.dump());
  return Tokenizer::from_file(dir / name);
}

int32_t id_of(const Tokenizer& t, const std::string& token) {
  auto id = t.token_id(token);
  EXPECT_TRUE(id.has_value()) << token;
  return id.value_or(-1);
}

TEST(TokenizerBytes, TableIsGpt2s) {
  const auto& table = byte_to_unicode();
  EXPECT_EQ(table[' '], "\xC4\xA0");   // Ġ
  EXPECT_EQ(table['\n'], "\xC4\x8A");  // Ċ
  EXPECT_EQ(table['A'], "A");
  EXPECT_EQ(table[0xAD], "\xC5\x83");  // soft hyphen is not printable: Ń
  std::set<std::string> seen(table.begin(), table.end());
  EXPECT_EQ(seen.size(), 256u);
  for (int b = 0; b < 256; ++b) {
    size_t i = 0;
    EXPECT_EQ(byte_of(utf8::next(table[b], i)), b);
    EXPECT_EQ(i, table[b].size());
  }
  EXPECT_EQ(byte_of(U'€'), -1);
}

TEST(TokenizerBpe, MergesApplyByRankThenLeftmost) {
  test::TempDir dir;
  // "b c" outranks "a b": abc → a + bc, although "ab" and "abc" are in the vocabulary.
  auto t = load(dir, byte_level_json({"ab", "bc", "abc", "aa"}, {"b c", "a b", "ab c", "a a"}));
  EXPECT_EQ(t->encode("abc"), (Ids{id_of(*t, "a"), id_of(*t, "bc")}));
  // Equal ranks: the leftmost pair first.
  EXPECT_EQ(t->encode("aaa"), (Ids{id_of(*t, "aa"), id_of(*t, "a")}));
  EXPECT_EQ(t->encode("ab"), (Ids{id_of(*t, "ab")}));
  // The [a, b] form of merges reads the same.
  test::TempDir dir2;
  auto t2 = load(dir2, byte_level_json({"ab", "bc", "abc", "aa"}, json::array({{"b", "c"}, {"a", "b"}, {"ab", "c"}, {"a", "a"}})));
  EXPECT_EQ(t2->encode("abc aaa"), t->encode("abc aaa"));
  EXPECT_EQ(t->decode(t->encode("abc aaa")), "abc aaa");
}

TEST(TokenizerBpe, IgnoreMergesTakesAWholeWord) {
  test::TempDir dir;
  json j = byte_level_json({"bc", "abc"}, {"b c"});
  EXPECT_EQ(load(dir, j)->encode("abc").size(), 2u);  // a + bc: no merge makes abc
  j["model"]["ignore_merges"] = true;
  auto t = load(dir, j);
  EXPECT_EQ(t->encode("abc"), (Ids{id_of(*t, "abc")}));
}

TEST(TokenizerAdded, SpecialTokensMatchBeforeSplittingAndTemplateAddsBos) {
  test::TempDir dir;
  json j = byte_level_json({}, json::array());
  const int n = int(j["model"]["vocab"].size());
  j["added_tokens"] = {{{"id", n}, {"content", "<|bos|>"}, {"special", true}, {"normalized", false}},
                       {{"id", n + 1}, {"content", "<|x|>"}, {"special", true}, {"normalized", false}, {"rstrip", true}},
                       {{"id", n + 2}, {"content", "<|x|>yz"}, {"special", false}, {"normalized", false}}};
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
                                     {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                         {"special_tokens", {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {n}}, {"tokens", {"<|bos|>"}}}}}}};
  auto t = load(dir, j);
  EXPECT_EQ(t->vocab_size(), n + 3);
  EXPECT_EQ(t->bos_id(), n);
  EXPECT_TRUE(t->is_special(n + 1));
  EXPECT_FALSE(t->is_special(n + 2));
  // rstrip takes the spaces after <|x|>; the longest added token wins where two start together.
  EXPECT_EQ(t->encode("a<|x|>  b"), (Ids{id_of(*t, "a"), n + 1, id_of(*t, "b")}));
  EXPECT_EQ(t->encode("<|x|>yz"), (Ids{n + 2}));
  EXPECT_EQ(t->encode("a", true), (Ids{n, id_of(*t, "a")}));
  EXPECT_EQ(t->encode("", true), (Ids{n}));
  EXPECT_TRUE(t->encode("").empty());
  EXPECT_EQ(t->decode({n, id_of(*t, "a"), n + 1}), "<|bos|>a<|x|>");
  EXPECT_EQ(t->decode({n, id_of(*t, "a"), n + 1}, true), "a");
  EXPECT_EQ(t->token_text(n + 1), "<|x|>");
}

TEST(TokenizerStream, HoldsAnUnfinishedCharacterAndAddsUpToDecode) {
  test::TempDir dir;
  auto t = load(dir, byte_level_json({}, json::array()));
  const std::string text = "é€😀 ok";  // 2-, 3- and 4-byte characters, one byte per token
  const Ids ids = t->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  Tokenizer::Stream s = t->stream();
  std::string joined;
  EXPECT_EQ(s.push(ids[0]), "");  // first byte of é
  EXPECT_EQ(s.push(ids[1]), "é");
  joined = "é";
  for (size_t i = 2; i < ids.size(); ++i) {
    const std::string piece = s.push(ids[i]);
    joined += piece;
  }
  joined += s.flush();
  EXPECT_EQ(joined, text);
  // A character cut short at the end becomes U+FFFD, in the stream as in decode.
  Tokenizer::Stream cut = t->stream();
  EXPECT_EQ(cut.push(ids[2]), "");
  EXPECT_EQ(cut.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(t->decode({ids[2]}), "\xEF\xBF\xBD");
  EXPECT_EQ(t->decode({ids[2], ids[2], ids[0], ids[1]}), "\xEF\xBF\xBD\xEF\xBF\xBD\xC3\xA9");
  EXPECT_THROW(t->decode({t->vocab_size()}), Error);
  EXPECT_THROW(t->stream().push(-1), Error);
}

TEST(TokenizerStore, WithoutTokenizerSaysToGiveIds) {
  test::TempDir dir;
  EXPECT_EQ(Tokenizer::from_store(dir.path()), nullptr);
  try {
    Tokenizer::require_store(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no tokenizer.json or tokenizer.model; give token ids"), std::string::npos)
        << e.what();
  }
  const auto r = test::run_bin("ringllama-tokenize", {"--store", dir.path(), "--file", "/dev/null"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("give token ids"), std::string::npos) << r.err;
  EXPECT_THROW(Tokenizer::from_store(dir / "missing"), Error);
}

TEST(TokenizerStore, ConfigNamesBosAndEos) {
  test::TempDir dir;
  json j = byte_level_json({}, json::array());
  const int n = int(j["model"]["vocab"].size());
  j["added_tokens"] = {{{"id", n}, {"content", "<s>"}, {"special", true}}, {{"id", n + 1}, {"content", "</s>"}, {"special", true}}};
  test::write_file(dir / "tokenizer.json", j.dump());
  test::write_file(dir / "tokenizer_config.json", json{{"bos_token", "<s>"}, {"eos_token", {{"content", "</s>"}}}}.dump());
  auto t = Tokenizer::require_store(dir.path());
  EXPECT_EQ(t->bos_id(), n);
  EXPECT_EQ(t->eos_id(), n + 1);
}

TEST(TokenizerRefuses, MalformedFilesCleanly) {
  test::TempDir dir;
  const json good = byte_level_json({"ab"}, {"a b"});
  auto refuse = [&](const std::string& text, const std::string& needle) {
    test::write_file(dir / "tokenizer.json", text);
    try {
      Tokenizer::from_file(dir / "tokenizer.json");
      ADD_FAILURE() << "accepted: " << text.substr(0, 200);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refuse("{\"model\": ", "not valid JSON");
  refuse("[1, 2]", "not an object");
  refuse("{}", "missing \"model\"");
  json j = good;
  j["model"]["type"] = "WordPiece";
  refuse(j.dump(), "WordPiece is not supported");
  j = good;
  j["model"]["merges"] = {"a zz"};
  refuse(j.dump(), "outside the vocabulary");
  j["model"]["merges"] = {"a b c"};
  refuse(j.dump(), "two tokens");
  j = good;
  j["model"]["vocab"]["x"] = -3;
  refuse(j.dump(), "no valid id");
  j["model"]["vocab"]["x"] = 100000000;  // a table of 10^8 entries for 258 tokens
  refuse(j.dump(), "no valid id");
  j = good;
  json nested = {{"type", "ByteLevel"}};
  for (int k = 0; k < 40; ++k) nested = {{"type", "Sequence"}, {"pretokenizers", json::array({nested})}};
  j["pre_tokenizer"] = nested;
  refuse(j.dump(), "nested deeper");
  j = good;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  refuse(j.dump(), "does not compile");
  j = good;
  j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  refuse(j.dump(), "BertPreTokenizer is not supported");
  j = good;
  j["normalizer"] = {{"type", "NFKC"}};
  refuse(j.dump(), "NFKC is not supported");
  j = good;
  j["model"]["dropout"] = 0.1;
  refuse(j.dump(), "dropout");
  j = good;
  j["added_tokens"] = {{{"content", "<x>"}}};
  refuse(j.dump(), "missing \"id\"");
  test::write_file(dir / "bad.model", "not a protobuf");
  EXPECT_THROW(Tokenizer::from_file(dir / "bad.model"), Error);
  EXPECT_THROW(Tokenizer::from_file(dir / "none.json"), Error);
}

TEST(TokenizerInput, InvalidUtf8IsReadAsReplacementCharacters) {
  test::TempDir dir;
  auto t = load(dir, byte_level_json({}, json::array()));
  EXPECT_EQ(t->encode("a\xFF" "b"), t->encode("a\xEF\xBF\xBD" "b"));
  // A megabyte of spaces, and of one punctuation character, end in time (no quadratic merge).
  EXPECT_EQ(t->decode(t->encode(std::string(1 << 20, ' '))), std::string(1 << 20, ' '));
  EXPECT_EQ(t->encode(std::string(1 << 20, '!')).size(), size_t(1 << 20));
}

// SentencePiece: a model trained here, against the library itself.
TEST(TokenizerSentencePiece, MatchesTheLibrary) {
  test::TempDir dir;
  std::string text;
  const char* lines[] = {"the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer",
                         "ringllama streams layers from disk", "naïve café déjà vu", "数字 123 4567 89"};
  for (int k = 0; k < 200; ++k) text += std::string(lines[k % 5]) + " " + std::to_string(k * 37) + "\n";
  test::write_file(dir / "corpus.txt", text);
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + dir / "corpus.txt" + " --model_prefix=" + dir / "tokenizer" +
      " --vocab_size=400 --model_type=bpe --byte_fallback=true --character_coverage=0.98 --minloglevel=2");
  ASSERT_TRUE(st.ok()) << st.ToString();
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(dir / "tokenizer.model").ok());
  auto t = Tokenizer::require_store(dir.path());
  EXPECT_EQ(t->vocab_size(), sp.GetPieceSize());
  EXPECT_EQ(t->bos_id(), sp.bos_id());
  EXPECT_EQ(t->eos_id(), sp.eos_id());
  const std::vector<std::string> texts = {"", "hello world", "  leading spaces", "unseen ÆØÅ 😀 text", "数字 and é",
                                          "the fox\nthe dog\t tab", "<s> not special"};
  for (const std::string& s : texts) {
    std::vector<int> want;
    ASSERT_TRUE(sp.Encode(s, &want).ok());
    const Ids got = t->encode(s);
    EXPECT_EQ(got, Ids(want.begin(), want.end())) << s;
    EXPECT_EQ(t->decode(got), sp.DecodeIds(want)) << s;
    Ids with = t->encode(s, true);
    ASSERT_FALSE(with.empty());
    EXPECT_EQ(with[0], sp.bos_id());
  }
  // Random ids, byte pieces and control pieces included: decode and the stream as the library.
  std::mt19937 rng(5);
  for (int k = 0; k < 500; ++k) {
    std::vector<int> ids(1 + rng() % 12);
    for (int& id : ids) id = int(rng() % sp.GetPieceSize());
    const Ids ours(ids.begin(), ids.end());
    const std::string want = sp.DecodeIds(ids);
    EXPECT_EQ(t->decode(ours), want);
    Tokenizer::Stream s = t->stream();
    std::string joined;
    for (int32_t id : ours) joined += s.push(id);
    joined += s.flush();
    EXPECT_EQ(joined, want);
  }
  EXPECT_TRUE(t->is_special(sp.bos_id()));
  EXPECT_EQ(t->decode({sp.bos_id()}, true), "");
  EXPECT_EQ(t->token_id(sp.IdToPiece(10)), 10);
  EXPECT_FALSE(t->token_id("no such piece").has_value());
}

}  // namespace
}  // namespace ringllama
