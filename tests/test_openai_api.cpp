// The OpenAI API's messages without sockets (worker/openai_api.h): request parsing and its 400s,
// stop strings over streamed pieces, log-probabilities, response and chunk shapes, the model name,
// secret comparison.
#include "worker/openai_api.h"

#include <gtest/gtest.h>

#include <cmath>

#include "common/tokenizer_bpe.h"
#include "tests/test_util.h"
#include "worker/generation.h"

namespace ringllama {
namespace {

using json = nlohmann::json;
using namespace openai;

ApiRequest completion(const json& j) { return parse_request(Endpoint::Completions, j.dump()); }
ApiRequest chat(const json& j) { return parse_request(Endpoint::Chat, j.dump()); }

// The ApiError a body gives ("" status 0 when it parses).
ApiError error_of(Endpoint e, const std::string& body) {
  try {
    parse_request(e, body);
  } catch (const ApiError& err) {
    return err;
  }
  return ApiError(0, "", "(no error)");
}

TEST(OpenAiRequest, CompletionFields) {
  const ApiRequest r = completion({{"model", "m"}, {"prompt", "Hello"}, {"max_tokens", 7}, {"temperature", 0},
                                   {"top_p", 0.5}, {"seed", 42}, {"stop", "\n"}, {"logprobs", 3}, {"stream", true},
                                   {"stream_options", {{"include_usage", true}}}, {"user", "u"}, {"whatever", 1}});
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.gen.form, GenerateRequest::Form::Text);
  EXPECT_EQ(r.gen.prompt, "Hello");
  EXPECT_EQ(r.gen.max_tokens, 7);
  EXPECT_EQ(r.gen.temperature, 0);
  EXPECT_EQ(r.gen.top_p, 0.5);
  EXPECT_EQ(r.gen.seed, 42u);
  EXPECT_EQ(r.stop, std::vector<std::string>{"\n"});
  EXPECT_EQ(r.logprobs, 3);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAiRequest, DefaultsAreOpenAis) {
  const ApiRequest r = completion({{"prompt", "x"}});
  EXPECT_EQ(r.model, "");
  EXPECT_EQ(r.gen.max_tokens, 0) << "not given: what the context leaves";
  EXPECT_EQ(r.gen.temperature, 1.0);
  EXPECT_EQ(r.gen.top_p, 1.0);
  EXPECT_EQ(r.logprobs, -1);
  EXPECT_FALSE(r.stream);
  EXPECT_TRUE(r.stop.empty());
  EXPECT_EQ(completion({{"prompt", "x"}, {"max_tokens", 5}, {"max_completion_tokens", 9}}).gen.max_tokens, 9);
}

TEST(OpenAiRequest, PromptForms) {
  const ApiRequest ids = completion({{"prompt", {1, 2, 3}}});
  EXPECT_EQ(ids.gen.form, GenerateRequest::Form::Ids);
  EXPECT_EQ(ids.gen.prompt_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(completion({{"prompt", {"one"}}}).gen.prompt, "one");
  EXPECT_EQ(completion({{"prompt", {{4, 5}}}}).gen.prompt_ids, (std::vector<int64_t>{4, 5}));
  const ApiError several = error_of(Endpoint::Completions, R"({"prompt": ["a", "b"]})");
  EXPECT_EQ(several.status, 400);
  EXPECT_EQ(several.param, "prompt");
  EXPECT_NE(std::string(several.what()).find("several prompts"), std::string::npos) << several.what();
  EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": [[1], [2]]})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": [-1]})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": ""})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::Completions, R"({"prompt": 5})").param, "prompt");
  EXPECT_EQ(error_of(Endpoint::Completions, R"({"max_tokens": 5})").param, "prompt");
}

TEST(OpenAiRequest, ChatMessages) {
  const ApiRequest r = chat({{"messages",
                              {{{"role", "developer"}, {"content", "Be brief."}},
                               {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Hi "}}, {{"type", "text"}, {"text", "there"}}}}},
                               {{"role", "assistant"}, {"content", nullptr}}}},
                             {"logprobs", true}, {"top_logprobs", 5}});
  ASSERT_EQ(r.gen.messages.size(), 3u);
  EXPECT_EQ(r.gen.form, GenerateRequest::Form::Chat);
  EXPECT_EQ(r.gen.messages[0].role, "system");
  EXPECT_EQ(r.gen.messages[1].content, "Hi there");
  EXPECT_EQ(r.gen.messages[2].content, "");
  EXPECT_EQ(r.logprobs, 5);
  EXPECT_EQ(chat({{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"logprobs", true}}).logprobs, 0);
  EXPECT_EQ(chat({{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"logprobs", false}}).logprobs, -1);
  for (const char* bad : {R"({"messages": []})", R"({"messages": "hi"})", R"({"messages": [{"role": "tool", "content": "x"}]})",
                          R"({"messages": [{"role": "user"}]})", R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
                          R"({"messages": [{"content": "x"}]})", R"({})"})
    EXPECT_EQ(error_of(Endpoint::Chat, bad).param, "messages") << bad;
  EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})").param,
            "top_logprobs");
  EXPECT_EQ(error_of(Endpoint::Chat, R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21})")
                .param,
            "top_logprobs");
}

TEST(OpenAiRequest, WrongTypesAndValuesNameTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("max_tokens": "5")", "max_tokens"},   {R"("max_tokens": 0)", "max_tokens"},
      {R"("max_tokens": 1.5)", "max_tokens"},   {R"("temperature": "hot")", "temperature"},
      {R"("temperature": -1)", "temperature"},  {R"("top_p": 0)", "top_p"},
      {R"("top_p": 1.5)", "top_p"},             {R"("seed": -3)", "seed"},
      {R"("seed": "s")", "seed"},               {R"("stream": "yes")", "stream"},
      {R"("stop": 5)", "stop"},                 {R"("stop": ["a","b","c","d","e"])", "stop"},
      {R"("stop": [1])", "stop"},               {R"("n": 2)", "n"},
      {R"("n": "1")", "n"},                     {R"("logprobs": 21)", "logprobs"},
      {R"("logprobs": true)", "logprobs"},      {R"("model": 3)", "model"},
      {R"("stream_options": 1)", "stream_options"}, {R"("user": 1)", "user"},
  };
  for (const auto& [field, param] : cases) {
    const ApiError e = error_of(Endpoint::Completions, R"({"prompt": "x", )" + field + "}");
    EXPECT_EQ(e.status, 400) << field;
    EXPECT_EQ(e.type, "invalid_request_error") << field;
    EXPECT_EQ(e.param, param) << field << ": " << e.what();
  }
  EXPECT_NE(std::string(error_of(Endpoint::Completions, R"({"prompt": "x", "n": 2})").what()).find("only n = 1"),
            std::string::npos);
  EXPECT_EQ(completion({{"prompt", "x"}, {"n", 1}, {"max_tokens", 4.0}, {"stop", nullptr}}).gen.max_tokens, 4);
}

TEST(OpenAiRequest, MalformedBodies) {
  for (const std::string& body : {std::string("{"), std::string("[1]"), std::string("\"x\""), std::string(""),
                                  std::string(100, '[') + std::string(100, ']')}) {
    const ApiError e = error_of(Endpoint::Completions, body);
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.param, "") << body;
  }
}

TEST(OpenAiError, BodyShape) {
  const json j = error_body(ApiError(404, "invalid_request_error", "no such model", "model", "model_not_found"));
  EXPECT_EQ(j["error"]["message"], "no such model");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "model");
  EXPECT_EQ(j["error"]["code"], "model_not_found");
  const json k = error_body(bad_param("", "x"));
  EXPECT_TRUE(k["error"]["param"].is_null());
  EXPECT_TRUE(k["error"]["code"].is_null());
  EXPECT_EQ(from_reply(ErrorReply{"1", ErrorCode::Overloaded, "full"}).status, 429);
  EXPECT_EQ(from_reply(ErrorReply{"1", ErrorCode::Unavailable, "bye"}).status, 503);
  EXPECT_EQ(from_reply(ErrorReply{"1", ErrorCode::BadRequest, "no"}).status, 400);
  EXPECT_EQ(from_reply(ErrorReply{"1", ErrorCode::Internal, "oops"}).status, 500);
}

// Feeds pieces; returns what came out and whether a stop string ended it.
std::pair<std::string, bool> run_stops(const std::vector<std::string>& stops, const std::vector<std::string>& pieces) {
  StopMatcher m(stops);
  std::string out;
  for (const std::string& p : pieces) {
    out += m.push(p);
    if (m.stopped()) break;
  }
  out += m.flush();
  return {out, m.stopped()};
}

TEST(OpenAiStop, MatchesAcrossPiecesAndDropsTheStop) {
  EXPECT_EQ(run_stops({"END"}, {"abc", "E", "N", "Dxyz"}), std::make_pair(std::string("abc"), true));
  EXPECT_EQ(run_stops({"END"}, {"abc", "E", "N", "x"}), std::make_pair(std::string("abcENx"), false));
  EXPECT_EQ(run_stops({"\n\n", "o w"}, {"hell", "o", " wor", "ld"}), std::make_pair(std::string("hell"), true));
  EXPECT_EQ(run_stops({"b", "ab"}, {"xab"}), std::make_pair(std::string("x"), true)) << "the earliest match wins";
  EXPECT_EQ(run_stops({}, {"a", "b"}), std::make_pair(std::string("ab"), false));
  EXPECT_EQ(run_stops({""}, {"a", "b"}), std::make_pair(std::string("ab"), false)) << "an empty stop string is ignored";
  // Text that could still start a stop string is held, the rest goes out at once.
  StopMatcher m({"STOP"});
  EXPECT_EQ(m.push("hello ST"), "hello ");
  EXPECT_EQ(m.push("O"), "");
  EXPECT_EQ(m.push("x"), "STOx");
  EXPECT_EQ(m.push("🙂S"), "🙂");
  EXPECT_EQ(m.flush(), "S");
}

TEST(OpenAiLogprobs, LogSoftmaxOfTheRow) {
  const std::vector<float> row{1.0f, 3.0f, 2.0f, 3.0f};
  double z = 0;
  for (float v : row) z += std::exp(static_cast<double>(v));
  const TokenLogprobs lp = token_logprobs(row, 2, 3);
  EXPECT_NEAR(lp.logprob, 2.0 - std::log(z), 1e-12);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].first, 1) << "ties by id";
  EXPECT_EQ(lp.top[1].first, 3);
  EXPECT_EQ(lp.top[2].first, 2);
  EXPECT_NEAR(lp.top[0].second, 3.0 - std::log(z), 1e-12);
  EXPECT_TRUE(token_logprobs(row, 0, 0).top.empty());
  EXPECT_EQ(token_logprobs(row, 0, 99).top.size(), 4u);
  EXPECT_THROW(token_logprobs(row, 4, 1), Error);
}

TEST(OpenAiLogprobs, JsonShapes) {
  test::TempDir dir;
  json vocab = json::object();
  for (const std::string& c : byte_to_unicode()) vocab[c] = vocab.size();
  json tj;
  tj["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}};
  tj["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  tj["decoder"] = {{"type", "ByteLevel"}};
  test::write_file(dir / "tokenizer.json", tj.dump());
  const auto tok = Tokenizer::from_file(dir / "tokenizer.json");
  const int32_t a = tok->encode("a")[0], b = tok->encode("b")[0];
  const std::vector<LogprobEntry> entries{{a, {-0.5, {{a, -0.5}, {b, -1.5}}}}, {b, {-0.25, {{b, -0.25}}}}};
  const json c = logprobs_json(Endpoint::Completions, entries, *tok, 10);
  EXPECT_EQ(c["tokens"], json({"a", "b"}));
  EXPECT_EQ(c["token_logprobs"], json({-0.5, -0.25}));
  EXPECT_EQ(c["top_logprobs"][0], json({{"a", -0.5}, {"b", -1.5}}));
  EXPECT_EQ(c["text_offset"], json({10, 11}));
  const json h = logprobs_json(Endpoint::Chat, entries, *tok);
  ASSERT_EQ(h["content"].size(), 2u);
  EXPECT_EQ(h["content"][0]["token"], "a");
  EXPECT_EQ(h["content"][0]["bytes"], json({97}));
  EXPECT_EQ(h["content"][0]["top_logprobs"][1]["token"], "b");
  EXPECT_EQ(h["content"][0]["top_logprobs"][1]["logprob"], -1.5);
}

TEST(OpenAiResponse, Shapes) {
  const ResponseHead c{Endpoint::Completions, "cmpl-1", 123, "m"};
  const json r = response_json(c, "hi", "length", nullptr, {3, 2});
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["choices"][0]["text"], "hi");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["usage"], json({{"prompt_tokens", 3}, {"completion_tokens", 2}, {"total_tokens", 5}}));
  const ResponseHead h{Endpoint::Chat, "chatcmpl-1", 123, "m"};
  const json m = response_json(h, "yo", "stop", nullptr, {1, 1});
  EXPECT_EQ(m["object"], "chat.completion");
  EXPECT_EQ(m["choices"][0]["message"], json({{"role", "assistant"}, {"content", "yo"}}));
  EXPECT_EQ(chunk_json(h, "", nullptr, nullptr, true)["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(chunk_json(h, "x", nullptr, nullptr)["choices"][0]["delta"], json({{"content", "x"}}));
  const json last = chunk_json(h, "", "stop", nullptr, false, true);
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_TRUE(last.contains("usage") && last["usage"].is_null());
  EXPECT_EQ(chunk_json(c, "x", nullptr, nullptr)["object"], "text_completion");
  const json u = usage_chunk_json(h, {4, 5});
  EXPECT_TRUE(u["choices"].empty());
  EXPECT_EQ(u["usage"]["total_tokens"], 9);
  EXPECT_EQ(sse_event(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(dump(json("\xff")), "\"\xef\xbf\xbd\"") << "invalid UTF-8 is replaced, not thrown";
  EXPECT_EQ(new_response_id(Endpoint::Chat).rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(new_response_id(Endpoint::Completions).size(), 5u + 24u);
  EXPECT_NE(new_response_id(Endpoint::Completions), new_response_id(Endpoint::Completions));
  EXPECT_STREQ(finish_reason(DoneReason::Eos), "stop");
  EXPECT_STREQ(finish_reason(DoneReason::Length), "length");
}

TEST(OpenAiModel, NameFromTheSource) {
  EXPECT_EQ(model_name("hf:/models/SmolLM2-360M-Instruct", "/stores/s"), "SmolLM2-360M-Instruct");
  EXPECT_EQ(model_name("hf:/models/Llama-3.2-1B/", "/stores/s"), "Llama-3.2-1B");
  EXPECT_EQ(model_name("gguf:/dl/smollm2-360m-instruct-q8_0.gguf", "/stores/s"), "smollm2-360m-instruct-q8_0");
  EXPECT_EQ(model_name("random:tiny seed=1", "/stores/tiny-store/"), "tiny-store");
}

TEST(OpenAiSecret, ComparesWholeTexts) {
  EXPECT_TRUE(equal_secret("abc", "abc"));
  EXPECT_FALSE(equal_secret("abc", "abd"));
  EXPECT_FALSE(equal_secret("abc", "abcd"));
  EXPECT_FALSE(equal_secret("", "a"));
  EXPECT_TRUE(equal_secret("", ""));
}

}  // namespace
}  // namespace ringllama
