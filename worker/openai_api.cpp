#include "worker/openai_api.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <random>

#include "worker/generation.h"

namespace ringllama::openai {

namespace {

using json = nlohmann::json;

// Nesting beyond this is refused before parsing: nlohmann's parser recurses.
bool too_deep(std::string_view body) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char ch : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return false;
}

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// The body's fields, each read with its type checked; a null field counts as not given.
class Body {
 public:
  explicit Body(const json& j) : j_(j) {}
  const json* find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  bool boolean(const char* key, bool dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_boolean()) throw bad_param(key, fmt::format("'{}' must be a boolean, not {}", key, type_name(*v)));
    return v->get<bool>();
  }
  double number(const char* key, double dflt, double lo, double hi) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_number()) throw bad_param(key, fmt::format("'{}' must be a number, not {}", key, type_name(*v)));
    const double x = v->get<double>();
    if (!(x >= lo && x <= hi)) throw bad_param(key, fmt::format("'{}' must be between {} and {} (got {})", key, lo, hi, x));
    return x;
  }
  // Integers may come as 3.0 from some clients; 3.5 may not.
  int64_t integer(const char* key, int64_t dflt, int64_t lo, int64_t hi) const {
    const json* v = find(key);
    if (!v) return dflt;
    int64_t x = 0;
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      x = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                                        : static_cast<int64_t>(u);
    } else if (v->is_number_integer()) {
      x = v->get<int64_t>();
    } else if (v->is_number_float() && std::abs(v->get<double>()) < 9e18 &&
               v->get<double>() == std::trunc(v->get<double>())) {
      x = static_cast<int64_t>(v->get<double>());
    } else {
      throw bad_param(key, fmt::format("'{}' must be an integer, not {}", key, type_name(*v)));
    }
    if (x < lo || x > hi) throw bad_param(key, fmt::format("'{}' must be between {} and {} (got {})", key, lo, hi, x));
    return x;
  }
  std::string string(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    if (!v->is_string()) throw bad_param(key, fmt::format("'{}' must be a string, not {}", key, type_name(*v)));
    return v->get<std::string>();
  }

 private:
  const json& j_;
};

bool is_id_list(const json& v) {
  return v.is_array() && !v.empty() && std::all_of(v.begin(), v.end(), [](const json& x) { return x.is_number_integer(); });
}

void read_prompt(const json& p, GenerateRequest& g) {
  const json* one = &p;
  if (p.is_array() && !p.empty() && !is_id_list(p)) {
    // A list of prompts: one is served, several are not (n and batched prompts are not supported).
    if (p.size() > 1) throw bad_param("prompt", fmt::format("several prompts ({}) in one request are not supported: send one", p.size()));
    one = &p[0];
  }
  if (one->is_string()) {
    g.form = GenerateRequest::Form::Text;
    g.prompt = one->get<std::string>();
    if (g.prompt.empty()) throw bad_param("prompt", "'prompt' is empty");
    return;
  }
  if (is_id_list(*one)) {
    g.form = GenerateRequest::Form::Ids;
    for (const json& x : *one) {
      if (!x.is_number_unsigned() || x.get<uint64_t>() > static_cast<uint64_t>(kMaxTokenId))
        throw bad_param("prompt", fmt::format("'prompt' token id {} is not a valid token id", x.dump()));
      g.prompt_ids.push_back(x.get<int64_t>());
    }
    return;
  }
  throw bad_param("prompt", "'prompt' must be a string or a list of token ids");
}

void read_messages(const json& m, GenerateRequest& g) {
  if (!m.is_array()) throw bad_param("messages", fmt::format("'messages' must be an array, not {}", type_name(m)));
  if (m.empty()) throw bad_param("messages", "'messages' is empty");
  g.form = GenerateRequest::Form::Chat;
  for (size_t i = 0; i < m.size(); ++i) {
    const json& x = m[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!x.is_object()) throw bad_param("messages", fmt::format("{} must be an object", where));
    auto role = x.find("role");
    if (role == x.end() || !role->is_string()) throw bad_param("messages", fmt::format("{}.role must be a string", where));
    ChatMessage msg;
    msg.role = role->get<std::string>();
    if (msg.role == "developer") msg.role = "system";  // OpenAI's newer name for it
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant")
      throw bad_param("messages", fmt::format("{}.role '{}' is not supported (system, user or assistant)", where,
                                              msg.role.substr(0, 64)));
    auto content = x.find("content");
    if (content == x.end() || content->is_null()) {
      // An assistant turn may have no content (OpenAI allows it with tool calls): empty text.
      if (msg.role != "assistant") throw bad_param("messages", fmt::format("{}.content is missing", where));
    } else if (content->is_string()) {
      msg.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (const json& part : *content) {
        auto type = part.is_object() ? part.find("type") : part.end();
        auto text = part.is_object() ? part.find("text") : part.end();
        if (type == part.end() || *type != "text" || text == part.end() || !text->is_string())
          throw bad_param("messages", fmt::format("{}.content: only parts of type text with a string text are supported",
                                                  where));
        msg.content += text->get<std::string>();
      }
    } else {
      throw bad_param("messages", fmt::format("{}.content must be a string or a list of text parts", where));
    }
    g.messages.push_back(std::move(msg));
  }
}

std::string token_string(const Tokenizer& tok, int32_t id) {
  try {
    return tok.decode({id}, false);
  } catch (const std::exception&) {
    return {};  // an id of the model's vocabulary beyond the tokenizer's
  }
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

const char* object_of(const ResponseHead& h, bool chunk) {
  if (h.endpoint == Endpoint::Chat) return chunk ? "chat.completion.chunk" : "chat.completion";
  return "text_completion";
}

json head_json(const ResponseHead& h, bool chunk) {
  return json{{"id", h.id}, {"object", object_of(h, chunk)}, {"created", h.created}, {"model", h.model}};
}

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

}  // namespace

ApiError bad_param(const std::string& param, const std::string& message) {
  return ApiError(400, "invalid_request_error", message, param);
}

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.what()},
            {"type", e.type},
            {"param", e.param.empty() ? json() : json(e.param)},
            {"code", e.code.empty() ? json() : json(e.code)}}}};
}

ApiError from_reply(const ErrorReply& e) {
  switch (e.code) {
    case ErrorCode::BadRequest: return ApiError(400, "invalid_request_error", e.message);
    case ErrorCode::Overloaded: return ApiError(429, "rate_limit_error", e.message, "", "overloaded");
    case ErrorCode::Unavailable: return ApiError(503, "service_unavailable", e.message, "", "unavailable");
    case ErrorCode::Internal: break;
  }
  return ApiError(500, "internal_error", e.message, "", "internal");
}

ApiRequest parse_request(Endpoint endpoint, std::string_view body) {
  if (too_deep(body)) throw ApiError(400, "invalid_request_error", fmt::format("the body nests deeper than {}", kMaxJsonDepth));
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    throw ApiError(400, "invalid_request_error", fmt::format("the body is not valid JSON: {}", e.what()));
  }
  if (!j.is_object()) throw ApiError(400, "invalid_request_error", "the body must be a JSON object");
  const Body b(j);
  ApiRequest r;
  r.endpoint = endpoint;
  r.model = b.string("model");
  GenerateRequest& g = r.gen;
  if (endpoint == Endpoint::Completions) {
    const json* p = b.find("prompt");
    if (!p) throw bad_param("prompt", "'prompt' is required");
    read_prompt(*p, g);
  } else {
    const json* m = b.find("messages");
    if (!m) throw bad_param("messages", "'messages' is required");
    read_messages(*m, g);
  }
  const int64_t kMaxTokens = int64_t(1) << 30;
  g.max_tokens = b.integer("max_tokens", 0, 1, kMaxTokens);
  g.max_tokens = b.integer("max_completion_tokens", g.max_tokens, 1, kMaxTokens);
  // OpenAI's defaults: temperature 1, top_p 1.
  g.temperature = b.number("temperature", 1.0, 0.0, 100.0);
  g.top_p = b.number("top_p", 1.0, 0.0, 1.0);
  if (b.find("top_p") && g.top_p == 0) throw bad_param("top_p", "'top_p' must be greater than 0");
  // vLLM's extensions: top_k (-1 or 0 = off) and ignore_eos.
  g.top_k = std::max<int64_t>(0, b.integer("top_k", 0, -1, int64_t(1) << 30));
  g.ignore_eos = b.boolean("ignore_eos", false);
  g.seed = static_cast<uint64_t>(b.integer("seed", 0, 0, std::numeric_limits<int64_t>::max()));
  if (const json* n = b.find("n"); n && b.integer("n", 1, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()) != 1)
    throw bad_param("n", fmt::format("only n = 1 is supported (got {}): send the request {} times", n->dump(), n->dump()));
  if (const json* s = b.find("stop")) {
    std::vector<std::string> stops;
    if (s->is_string()) {
      stops.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      if (s->size() > kMaxStops) throw bad_param("stop", fmt::format("'stop' holds at most {} strings (got {})", kMaxStops, s->size()));
      for (const json& x : *s) {
        if (!x.is_string()) throw bad_param("stop", "'stop' must be a string or a list of strings");
        stops.push_back(x.get<std::string>());
      }
    } else {
      throw bad_param("stop", fmt::format("'stop' must be a string or a list of strings, not {}", type_name(*s)));
    }
    for (std::string& x : stops)
      if (!x.empty()) r.stop.push_back(std::move(x));  // an empty stop string would match at once: ignored
  }
  if (endpoint == Endpoint::Completions) {
    r.logprobs = b.integer("logprobs", -1, 0, kMaxTopLogprobs);
  } else if (b.boolean("logprobs", false)) {
    r.logprobs = b.integer("top_logprobs", 0, 0, kMaxTopLogprobs);
  } else if (b.find("top_logprobs")) {
    (void)b.integer("top_logprobs", 0, 0, kMaxTopLogprobs);
    throw bad_param("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  }
  r.stream = b.boolean("stream", false);
  if (const json* so = b.find("stream_options")) {
    if (!so->is_object()) throw bad_param("stream_options", "'stream_options' must be an object");
    auto iu = so->find("include_usage");
    if (iu != so->end() && !iu->is_null()) {
      if (!iu->is_boolean()) throw bad_param("stream_options", "'stream_options.include_usage' must be a boolean");
      r.include_usage = iu->get<bool>();
    }
  }
  (void)b.string("user");  // checked for its type, otherwise ignored
  return r;
}

std::string model_name(const std::string& source, const std::string& store_dir) {
  namespace fs = std::filesystem;
  auto last = [](const std::string& p) {
    fs::path path = fs::path(p).lexically_normal();
    if (path.filename().empty()) path = path.parent_path();
    return path.filename().string();
  };
  std::string name;
  if (source.rfind("hf:", 0) == 0) name = last(source.substr(3));
  else if (source.rfind("gguf:", 0) == 0) name = fs::path(last(source.substr(5))).replace_extension().string();
  if (name.empty()) name = last(fs::absolute(store_dir).string());
  return name.empty() ? "ringllama" : name;
}

std::string new_response_id(Endpoint endpoint) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return fmt::format("{}{:016x}{:08x}", endpoint == Endpoint::Chat ? "chatcmpl-" : "cmpl-", rng(),
                     static_cast<uint32_t>(rng()));
}

const char* finish_reason(DoneReason r) { return r == DoneReason::Length ? "length" : "stop"; }

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (std::string& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string StopMatcher::push(const std::string& piece) {
  if (stopped_) return {};
  held_ += piece;
  size_t at = std::string::npos;
  for (const std::string& s : stops_) at = std::min(at, held_.find(s));
  if (at != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, at);
    held_.clear();
    return out;
  }
  // Hold back the longest end of the text that a stop string starts with.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  std::string out;
  out.swap(held_);
  return stopped_ ? std::string() : out;
}

json logprobs_json(Endpoint endpoint, const std::vector<LogprobEntry>& entries, const Tokenizer& tok,
                   int64_t text_offset) {
  if (endpoint == Endpoint::Chat) {
    json content = json::array();
    for (const LogprobEntry& e : entries) {
      const std::string t = token_string(tok, e.token);
      json top = json::array();
      for (const auto& [id, lp] : e.lp.top) {
        const std::string s = token_string(tok, id);
        top.push_back({{"token", s}, {"logprob", lp}, {"bytes", bytes_of(s)}});
      }
      content.push_back({{"token", t}, {"logprob", e.lp.logprob}, {"bytes", bytes_of(t)}, {"top_logprobs", top}});
    }
    return {{"content", content}, {"refusal", nullptr}};
  }
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (const LogprobEntry& e : entries) {
    const std::string t = token_string(tok, e.token);
    tokens.push_back(t);
    lps.push_back(e.lp.logprob);
    json top = json::object();
    // Keyed by text: ids with the same text (byte tokens of no whole character) keep the likeliest.
    for (const auto& [id, lp] : e.lp.top) top.emplace(token_string(tok, id), lp);
    tops.push_back(top);
    offsets.push_back(text_offset);
    text_offset += static_cast<int64_t>(t.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json response_json(const ResponseHead& h, const std::string& text, const char* finish, const json& logprobs,
                   const Usage& usage) {
  json j = head_json(h, false);
  json choice{{"index", 0}, {"logprobs", logprobs}, {"finish_reason", finish ? json(finish) : json()}};
  if (h.endpoint == Endpoint::Chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
  else choice["text"] = text;
  j["choices"] = json::array({choice});
  j["usage"] = usage_json(usage);
  return j;
}

json chunk_json(const ResponseHead& h, const std::string& text, const char* finish, const json& logprobs,
                bool role_only, bool usage_null) {
  json j = head_json(h, true);
  json choice{{"index", 0}, {"logprobs", logprobs}, {"finish_reason", finish ? json(finish) : json()}};
  if (h.endpoint == Endpoint::Chat) {
    if (role_only) choice["delta"] = {{"role", "assistant"}, {"content", ""}};
    else if (finish && text.empty()) choice["delta"] = json::object();
    else choice["delta"] = {{"content", text}};
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  if (usage_null) j["usage"] = nullptr;
  return j;
}

json usage_chunk_json(const ResponseHead& h, const Usage& usage) {
  json j = head_json(h, true);
  j["choices"] = json::array();
  j["usage"] = usage_json(usage);
  return j;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string sse_event(const json& j) { return "data: " + dump(j) + "\n\n"; }

bool equal_secret(std::string_view a, std::string_view b) {
  // Every byte of the longer text is looked at whatever the texts hold.
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

}  // namespace ringllama::openai
