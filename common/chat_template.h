// Chat messages -> the prompt text a model was tuned on, byte for byte what Hugging Face's
// `apply_chat_template` renders from the model's Jinja template (trim_blocks, lstrip_blocks), for
// the families that cover the Llama-shaped models this project runs:
//
//   llama3    Llama 3 (<|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>), bos first
//   llama3.1  Llama 3.1 / 3.2 / 3.3: the same turns after a system turn that always starts with
//             "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
//   chatml    <|im_start|>role\n ... <|im_end|>\n (SmolLM2, Qwen); the template's default system
//             message when the conversation has none
//   llama2    <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n ... [/INST] answer </s> (roles must alternate)
//
// The template text is not interpreted: the family is recognised from it (markers such as
// <|start_header_id|>, <|im_start|>, [INST] with <<SYS>>) and rendered by code written after the
// real templates, which the tests render with jinja2 and compare with. A template of no known
// family is refused, and `--chat-template NAME` picks a family instead. Tools, images and other
// roles are not supported: messages are system, user and assistant with text content.
//
// The date is the templates' own default ("26 Jul 2024", what transformers renders when no
// date_string is passed and the template does not read the clock), so a prompt is reproducible.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <vector>

namespace ringllama {

struct ChatMessage {
  std::string role;     // system, user or assistant
  std::string content;  // UTF-8 text (may be empty)
};

enum class ChatFamily { Llama3, Llama31, ChatML, Llama2 };

// The names --chat-template takes, for messages: "llama3, llama3.1, chatml, llama2".
const char* chat_template_names();

struct ChatTemplate {
  ChatFamily family = ChatFamily::Llama3;
  std::string bos_token;        // the strings the template writes for bos_token / eos_token
  std::string eos_token;
  std::string default_system;   // chatml: the system turn's text when the conversation has none ("" = none)
  bool chatml_bos = false;      // chatml: the template writes bos_token first
  std::string date_string = "26 Jul 2024";  // llama3.1: the "Today Date" line
  std::string source;           // where it came from, for messages

  const char* name() const;     // llama3, llama3.1, chatml or llama2
  // The token that ends an assistant turn, which generation stops at: <|eot_id|>, <|im_end|>, or
  // eos_token for llama2.
  std::string end_of_turn() const;
  // The prompt. add_generation_prompt: end with the assistant's header so that the model answers
  // (llama2's template has none: its prompt ends with [/INST]). Throws Error where the template
  // would raise (llama2: roles that do not alternate) and for an empty conversation or a role
  // other than system, user and assistant.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true) const;
};

// The template of a store: `override_name` ("" = none) picks a family by name; otherwise the
// family is recognised from tokenizer_config.json's chat_template (a string, or the entry named
// "default" of a list), else from chat_template.jinja. bos/eos strings come from
// tokenizer_config.json where it names them. Throws Error when there is no template, when it is of
// no known family (the message names --chat-template), or for a bad override name.
ChatTemplate load_chat_template(const std::string& store_dir, const std::string& override_name = "");

// The family of one template text; `where` names it in errors. Throws Error for an unknown one.
ChatTemplate detect_chat_template(const std::string& template_text, const std::string& where);
// A family by name (llama3, llama3.1, chatml, llama2), with the family's usual bos/eos strings.
ChatTemplate named_chat_template(const std::string& name);

// [{"role": ..., "content": ...}, ...]: every role system, user or assistant, content a string, no
// other keys. `what` names the value in errors. Throws Error.
std::vector<ChatMessage> parse_chat_messages(const nlohmann::json& messages, const std::string& what);

// The text of ringllama-tokenize --chat: `input` is a JSON list of messages, or an object
// {"messages": [...], "add_generation_prompt": true}; the result is the rendered prompt.
std::string render_chat_json(const ChatTemplate& t, const std::string& input);

// Python's str.strip() (which Jinja's trim filter and .strip() are): Unicode whitespace off both
// ends of UTF-8 text.
std::string python_strip(const std::string& s);

}  // namespace ringllama
