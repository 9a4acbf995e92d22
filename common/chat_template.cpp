#include "common/chat_template.h"

#include <nlohmann/json.hpp>

#include <filesystem>

#include "common/errors.h"
#include "common/store.h"

namespace ringllama {

using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxConfigBytes = 64ull << 20;  // tokenizer_config.json holds the added tokens too
constexpr const char* kRoleError = "Conversation roles must alternate user/assistant/user/assistant/...";

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

// One code point of UTF-8 at s[at] (its length in *len); an invalid byte reads as itself, length 1,
// which is never whitespace.
uint32_t code_point(const std::string& s, size_t at, size_t* len) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = b(at);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
  if (n == 0 || at + n > s.size()) {
    *len = 1;
    return 0xFFFFFFFF;
  }
  uint32_t cp = n == 1 ? c : c & (0x7f >> n);
  for (size_t i = 1; i < n; ++i) {
    if ((b(at + i) & 0xc0) != 0x80) {
      *len = 1;
      return 0xFFFFFFFF;
    }
    cp = (cp << 6) | (b(at + i) & 0x3f);
  }
  *len = n;
  return cp;
}

// Python's str.isspace(): what str.strip() with no argument removes.
bool python_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// A token string of tokenizer_config.json: "<s>", or {"content": "<s>", ...} (an AddedToken as
// older transformers wrote it), or null.
std::string token_string(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  fail("tokenizer_config.json: '{}' must be a string or an object with a string 'content'", key);
}

// The text of one Jinja string literal starting at s[at] (a quote); Python's escapes.
std::string jinja_literal(const std::string& s, size_t at, size_t* end) {
  const char q = s[at];
  std::string out;
  size_t i = at + 1;
  for (; i < s.size() && s[i] != q; ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char e = s[++i];
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      default: out += e; break;  // \\ \' \" and anything else as itself
    }
  }
  *end = i;
  return out;
}

// ChatML templates write their default system turn as one literal:
// '<|im_start|>system\nYou are ...<|im_end|>\n'. The first literal that holds a whole system turn
// is it; a template whose system turn is built from the messages has none.
std::string chatml_default_system(const std::string& text) {
  const std::string open = "<|im_start|>system\n", close = "<|im_end|>";
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\'' && text[i] != '"') continue;
    size_t end = 0;
    const std::string lit = jinja_literal(text, i, &end);
    if (lit.compare(0, open.size(), open) == 0) {
      const size_t c = lit.find(close, open.size());
      if (c != std::string::npos) return lit.substr(open.size(), c - open.size());
    }
    i = end;
  }
  return {};
}

// The template starts by writing bos_token: {{ bos_token }}, {{- bos_token }}, {{bos_token}}.
bool starts_with_bos(const std::string& text) {
  size_t i = text.find_first_not_of(" \t\r\n");
  if (i == std::string::npos || text.compare(i, 2, "{{") != 0) return false;
  i = text.find_first_not_of(" -", i + 2);
  return i != std::string::npos && text.compare(i, 9, "bos_token") == 0;
}

// Llama 3.1's date: {%- set date_string = "26 Jul 2024" %}.
std::string default_date(const std::string& text, const std::string& dflt) {
  const std::string key = "set date_string = ";
  size_t at = text.find(key);
  if (at == std::string::npos) return dflt;
  at += key.size();
  if (at >= text.size() || (text[at] != '"' && text[at] != '\'')) return dflt;
  size_t end = 0;
  return jinja_literal(text, at, &end);
}

// Text from outside, shortened for an error message (a 1 MiB role must not make a 1 MiB reply).
std::string shown(const std::string& s) { return s.size() <= 40 ? s : s.substr(0, 37) + "..."; }

void set_family_tokens(ChatTemplate& t) {
  if (t.family == ChatFamily::Llama3 || t.family == ChatFamily::Llama31) {
    t.bos_token = "<|begin_of_text|>";
    t.eos_token = "<|eot_id|>";
  } else if (t.family == ChatFamily::Llama2) {
    t.bos_token = "<s>";
    t.eos_token = "</s>";
  } else {
    t.eos_token = "<|im_end|>";
  }
}

}  // namespace

const char* chat_template_names() { return "llama3, llama3.1, chatml, llama2"; }

const char* ChatTemplate::name() const {
  switch (family) {
    case ChatFamily::Llama3: return "llama3";
    case ChatFamily::Llama31: return "llama3.1";
    case ChatFamily::ChatML: return "chatml";
    case ChatFamily::Llama2: return "llama2";
  }
  return "?";
}

std::string ChatTemplate::end_of_turn() const {
  switch (family) {
    case ChatFamily::Llama3:
    case ChatFamily::Llama31: return "<|eot_id|>";
    case ChatFamily::ChatML: return "<|im_end|>";
    case ChatFamily::Llama2: return eos_token;
  }
  return {};
}

std::string python_strip(const std::string& s) {
  size_t b = 0, len = 0;
  while (b < s.size() && python_space(code_point(s, b, &len))) b += len;
  size_t e = s.size();
  while (e > b) {
    size_t start = e - 1;
    // Back to the first byte of the last character (at most 3 continuation bytes).
    while (start > b && e - start < 4 && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    if (!python_space(code_point(s, start, &len)) || start + len != e) break;
    e = start;
  }
  return s.substr(b, e - b);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (messages.empty()) fail("chat template {}: the conversation has no messages", name());
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      fail("chat template {}: message {} has role '{}'; the roles are system, user and assistant", name(), i,
           shown(r));
  }
  const bool has_system = messages[0].role == "system";
  std::string out;
  switch (family) {
    case ChatFamily::Llama3:
      // Every turn's content trimmed; bos_token before the first turn.
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0) out += bos_token;
        out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + python_strip(messages[i].content) +
               "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatFamily::Llama31:
      // The system turn is always there, with the knowledge cut-off and the date before the
      // conversation's own (trimmed) system message.
      out = bos_token + "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: " +
            date_string + "\n\n" + (has_system ? python_strip(messages[0].content) : std::string()) + "<|eot_id|>";
      for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i)
        out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + python_strip(messages[i].content) +
               "<|eot_id|>";
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatFamily::ChatML:
      // Content as it is (no trim).
      if (chatml_bos) out += bos_token;
      if (!default_system.empty() && !has_system) out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case ChatFamily::Llama2: {
      // The system message goes into the first user turn; after it the roles alternate, user
      // first. A system message elsewhere at an odd place is dropped, as the template drops it.
      for (size_t i = has_system ? 1 : 0, k = 0; i < messages.size(); ++i, ++k) {
        const ChatMessage& m = messages[i];
        if ((m.role == "user") != (k % 2 == 0)) fail("chat template llama2: {}", kRoleError);
        std::string content = m.content;
        if (k == 0 && has_system) content = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + content;
        if (m.role == "user") out += bos_token + "[INST] " + python_strip(content) + " [/INST]";
        else if (m.role == "assistant") out += " " + python_strip(content) + " " + eos_token;
      }
      break;
    }
  }
  return out;
}

ChatTemplate named_chat_template(const std::string& name) {
  ChatTemplate t;
  if (name == "llama3") t.family = ChatFamily::Llama3;
  else if (name == "llama3.1") t.family = ChatFamily::Llama31;
  else if (name == "chatml") t.family = ChatFamily::ChatML;
  else if (name == "llama2") t.family = ChatFamily::Llama2;
  else fail("--chat-template '{}': unknown; the names are {}", name, chat_template_names());
  set_family_tokens(t);
  t.source = "--chat-template " + name;
  return t;
}

ChatTemplate detect_chat_template(const std::string& text, const std::string& where) {
  ChatTemplate t;
  if (contains(text, "<|start_header_id|>") && contains(text, "<|eot_id|>")) {
    t.family = contains(text, "Cutting Knowledge Date") ? ChatFamily::Llama31 : ChatFamily::Llama3;
    if (t.family == ChatFamily::Llama31) t.date_string = default_date(text, t.date_string);
  } else if (contains(text, "<|im_start|>") && contains(text, "<|im_end|>")) {
    t.family = ChatFamily::ChatML;
    t.default_system = chatml_default_system(text);
    t.chatml_bos = starts_with_bos(text);
  } else if (contains(text, "[INST]") && contains(text, "<<SYS>>")) {
    t.family = ChatFamily::Llama2;
  } else {
    fail("{}: the chat template is of no known family ({}); pass --chat-template NAME to choose one", where,
         chat_template_names());
  }
  set_family_tokens(t);
  t.source = where;
  return t;
}

ChatTemplate load_chat_template(const std::string& store_dir, const std::string& override_name) {
  namespace fs = std::filesystem;
  const std::string cfg_path = (fs::path(store_dir) / "tokenizer_config.json").string();
  const std::string jinja_path = (fs::path(store_dir) / "chat_template.jinja").string();
  std::error_code ec;
  json cfg = json::object();
  if (fs::exists(cfg_path, ec)) {
    try {
      cfg = json::parse(read_regular_file(cfg_path, kMaxConfigBytes));
    } catch (const json::exception& e) {
      fail("{}: not valid JSON: {}", cfg_path, e.what());
    }
    if (!cfg.is_object()) fail("{}: not a JSON object", cfg_path);
  }
  ChatTemplate t;
  if (!override_name.empty()) {
    t = named_chat_template(override_name);
  } else {
    // transformers takes a list's entry named "default".
    std::string text;
    const auto it = cfg.find("chat_template");
    if (it != cfg.end() && it->is_string()) {
      text = it->get<std::string>();
    } else if (it != cfg.end() && it->is_array()) {
      for (const json& e : *it)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
          text = e["template"].get<std::string>();
      if (text.empty()) fail("{}: chat_template is a list without an entry named default", cfg_path);
    } else if (it != cfg.end() && !it->is_null()) {
      fail("{}: chat_template must be a string or a list of {{name, template}}", cfg_path);
    } else if (fs::exists(jinja_path, ec)) {
      text = read_regular_file(jinja_path, kMaxConfigBytes);
    }
    if (text.empty())
      fail("store {} has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); pass "
           "--chat-template NAME ({})",
           store_dir, chat_template_names());
    t = detect_chat_template(text, "store " + store_dir);
  }
  // The strings the template writes come from the model's own config where it names them.
  const std::string bos = token_string(cfg, "bos_token"), eos = token_string(cfg, "eos_token");
  if (!bos.empty()) t.bos_token = bos;
  if (!eos.empty()) t.eos_token = eos;
  return t;
}

std::vector<ChatMessage> parse_chat_messages(const json& j, const std::string& what) {
  if (!j.is_array()) fail("{} must be a list of {{\"role\", \"content\"}} objects", what);
  if (j.empty()) fail("{} is empty: give at least one message", what);
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& m = j[i];
    if (!m.is_object()) fail("{}[{}] must be an object {{\"role\", \"content\"}}", what, i);
    for (auto it = m.begin(); it != m.end(); ++it)
      if (it.key() != "role" && it.key() != "content")
        fail("{}[{}]: unknown key '{}' (role and content)", what, i, shown(it.key()));
    const auto role = m.find("role"), content = m.find("content");
    if (role == m.end() || !role->is_string()) fail("{}[{}]: 'role' must be a string", what, i);
    if (content == m.end() || !content->is_string()) fail("{}[{}]: 'content' must be a string", what, i);
    ChatMessage c{role->get<std::string>(), content->get<std::string>()};
    if (c.role != "system" && c.role != "user" && c.role != "assistant")
      fail("{}[{}]: role '{}'; the roles are system, user and assistant", what, i, shown(c.role));
    out.push_back(std::move(c));
  }
  return out;
}

std::string render_chat_json(const ChatTemplate& t, const std::string& input) {
  json j;
  try {
    j = json::parse(input);
  } catch (const json::exception& e) {
    fail("--chat: the input is not valid JSON: {}", e.what());
  }
  bool add_generation_prompt = true;
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "messages" && it.key() != "add_generation_prompt")
        fail("--chat: unknown key '{}' (messages, add_generation_prompt)", it.key());
    if (j.contains("add_generation_prompt")) {
      if (!j["add_generation_prompt"].is_boolean()) fail("--chat: add_generation_prompt must be true or false");
      add_generation_prompt = j["add_generation_prompt"].get<bool>();
    }
    if (!j.contains("messages")) fail("--chat: 'messages' is required");
    j = j["messages"];
  }
  return t.render(parse_chat_messages(j, "--chat: messages"), add_generation_prompt);
}

}  // namespace ringllama
