// Chat templates (common/chat_template.h): recognising the family of the real templates under
// tests/data/chat_templates, what a store without one or with an unknown one says, the override,
// and the rules the templates enforce. The byte-for-byte comparison with jinja2 is
// tests/chat_template_test.py.
#include "common/chat_template.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <functional>
#include <tuple>

#include "common/errors.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

using json = nlohmann::json;

std::string fixture(const std::string& name) { return test::data_dir() + "/chat_templates/" + name + ".json"; }

// A store folder holding only the fixture as its tokenizer_config.json.
std::string store_with(const test::TempDir& dir, const std::string& name) {
  test::write_file(dir / "tokenizer_config.json", test::read_file(fixture(name)));
  return dir.path();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ChatTemplate, RecognisesTheRealTemplates) {
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"llama3", "llama3", "<|eot_id|>"},       {"llama31", "llama3.1", "<|eot_id|>"},
      {"llama32", "llama3.1", "<|eot_id|>"},    {"smollm2", "chatml", "<|im_end|>"},
      {"qwen2", "chatml", "<|im_end|>"},        {"qwen25", "chatml", "<|im_end|>"},
      {"hermes2", "chatml", "<|im_end|>"},      {"chatml", "chatml", "<|im_end|>"},
      {"llama2", "llama2", "</s>"}};
  for (const auto& [file, family, eot] : cases) {
    test::TempDir dir;
    const ChatTemplate t = load_chat_template(store_with(dir, file));
    EXPECT_STREQ(t.name(), family.c_str()) << file;
    EXPECT_EQ(t.end_of_turn(), eot) << file;
  }
  test::TempDir a, b, c, d;
  EXPECT_EQ(load_chat_template(store_with(a, "smollm2")).default_system,
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_EQ(load_chat_template(store_with(b, "qwen25")).default_system,
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  EXPECT_EQ(load_chat_template(store_with(c, "chatml")).default_system, "");
  // Llama 2's bos is an AddedToken object in its config.
  EXPECT_EQ(load_chat_template(store_with(d, "llama2")).bos_token, "<s>");
}

TEST(ChatTemplate, UnknownOrMissingTemplateNamesTheOverride) {
  test::TempDir dir;
  const std::string msg = error_of([&] { load_chat_template(store_with(dir, "mistral")); });
  EXPECT_NE(msg.find("no known family"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--chat-template"), std::string::npos) << msg;
  // The override renders it as llama2, with the model's own bos/eos strings.
  const ChatTemplate t = load_chat_template(dir.path(), "llama2");
  EXPECT_EQ(t.render({{"user", "hi"}}), "<s>[INST] hi [/INST]");

  test::TempDir empty;
  const std::string none = error_of([&] { load_chat_template(empty.path()); });
  EXPECT_NE(none.find("no chat template"), std::string::npos) << none;
  EXPECT_NE(none.find("--chat-template"), std::string::npos) << none;
  EXPECT_STREQ(load_chat_template(empty.path(), "llama3").name(), "llama3");
  const std::string bad = error_of([&] { load_chat_template(empty.path(), "vicuna"); });
  EXPECT_NE(bad.find("llama3, llama3.1, chatml, llama2"), std::string::npos) << bad;

  test::write_file(empty / "tokenizer_config.json", "{\"chat_template\": 3}");
  EXPECT_NE(error_of([&] { load_chat_template(empty.path()); }).find("must be a string"), std::string::npos);
  test::write_file(empty / "tokenizer_config.json", "{not json");
  EXPECT_NE(error_of([&] { load_chat_template(empty.path()); }).find("not valid JSON"), std::string::npos);
}

// transformers' list form, and chat_template.jinja beside a config without one.
TEST(ChatTemplate, ListFormAndJinjaFile) {
  test::TempDir dir;
  const json llama3 = json::parse(test::read_file(fixture("llama3")));
  json cfg = {{"bos_token", "<|begin_of_text|>"},
              {"chat_template", json::array({{{"name", "tool_use"}, {"template", "{{ '<|im_start|>' }}"}},
                                             {{"name", "default"}, {"template", llama3["chat_template"]}}})}};
  test::write_file(dir / "tokenizer_config.json", cfg.dump());
  EXPECT_STREQ(load_chat_template(dir.path()).name(), "llama3");
  cfg.erase("chat_template");
  test::write_file(dir / "tokenizer_config.json", cfg.dump());
  test::write_file(dir / "chat_template.jinja", json::parse(test::read_file(fixture("qwen25")))["chat_template"].get<std::string>());
  EXPECT_STREQ(load_chat_template(dir.path()).name(), "chatml");
}

TEST(ChatTemplate, RulesOfTheTemplates) {
  const ChatTemplate l2 = named_chat_template("llama2");
  EXPECT_NE(error_of([&] { l2.render({{"user", "a"}, {"user", "b"}}); }).find("must alternate"), std::string::npos);
  EXPECT_NE(error_of([&] { l2.render({{"system", "s"}, {"assistant", "a"}}); }).find("must alternate"),
            std::string::npos);
  EXPECT_EQ(l2.render({{"system", " sys "}, {"user", "q "}, {"assistant", " a"}}),
            "<s>[INST] <<SYS>>\n sys \n<</SYS>>\n\nq [/INST] a </s>");
  const ChatTemplate l3 = named_chat_template("llama3");
  EXPECT_NE(error_of([&] { l3.render({}); }).find("no messages"), std::string::npos);
  EXPECT_NE(error_of([&] { l3.render({{"tool", "x"}}); }).find("roles are system, user and assistant"),
            std::string::npos);
  EXPECT_EQ(l3.render({{"user", "hi"}}, false), "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>");
}

TEST(ChatTemplate, PythonStrip) {
  EXPECT_EQ(python_strip(" \t\n a b \r\v\f"), "a b");
  EXPECT_EQ(python_strip("\u3000\u00a0日本\u2028\u205f"), "日本");
  EXPECT_EQ(python_strip("\x1c\x1f x \x85"), "x \x85");  // a lone \x85 byte is not UTF-8: kept
  EXPECT_EQ(python_strip("\xc2\x85x\xc2\x85"), "x");     // U+0085 (NEL) is whitespace
  EXPECT_EQ(python_strip("\u200b x \u200b"), "\u200b x \u200b");  // zero-width space is not whitespace
  EXPECT_EQ(python_strip("   "), "");
  EXPECT_EQ(python_strip(""), "");
}

TEST(ChatTemplate, MessagesAreChecked) {
  EXPECT_EQ(parse_chat_messages(json::parse(R"([{"role":"user","content":""}])"), "m").size(), 1u);
  for (const char* bad : {R"({"role":"user"})", R"([])", R"([{"role":"user"}])", R"([{"role":"user","content":1}])",
                          R"([{"role":"bot","content":"x"}])", R"([{"role":"user","content":"x","name":"n"}])", R"([3])"})
    EXPECT_THROW(parse_chat_messages(json::parse(bad), "m"), Error) << bad;
  // Outside text in an error is shortened: a huge role must not make a huge error reply.
  const std::string long_role(100000, 'x');
  const std::string msg = error_of([&] { parse_chat_messages(json::array({{{"role", long_role}, {"content", ""}}}), "m"); });
  EXPECT_LT(msg.size(), 200u) << msg.size();
  const ChatTemplate t = named_chat_template("chatml");
  EXPECT_EQ(render_chat_json(t, R"({"messages":[{"role":"user","content":"x"}],"add_generation_prompt":false})"),
            "<|im_start|>user\nx<|im_end|>\n");
  EXPECT_THROW(render_chat_json(t, R"({"messages":[{"role":"user","content":"x"}],"tools":[]})"), Error);
  EXPECT_THROW(render_chat_json(t, "[{"), Error);
}

}  // namespace
}  // namespace ringllama
