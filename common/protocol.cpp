#include "common/protocol.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>

namespace ringllama {

using json = nlohmann::json;

namespace {

template <class... Ts>
struct overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
overloaded(Ts...) -> overloaded<Ts...>;

// Text that may come from outside goes into messages shortened and with bad UTF-8 replaced.
std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 48) s = s.substr(0, 45) + "...";
  return s;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// nlohmann's parser keeps its own stack, but a value nested a million deep still costs a million
// allocations and a recursive destructor: refuse deep nesting before parsing.
void check_depth(std::string_view f, const char* what) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : f) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) throw ProtocolError(fmt::format("{}: nested deeper than {}", what, kMaxJsonDepth));
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

json parse_object(std::string_view frame, const char* what) {
  if (frame.empty()) throw ProtocolError(fmt::format("{}: empty frame", what));
  check_depth(frame, what);
  json j;
  try {
    j = json::parse(frame.begin(), frame.end());
  } catch (const json::parse_error& e) {
    throw ProtocolError(fmt::format("{}: not valid JSON (at byte {})", what, e.byte));
  } catch (const json::exception&) {
    throw ProtocolError(fmt::format("{}: not valid JSON", what));
  }
  if (!j.is_object()) throw ProtocolError(fmt::format("{}: a frame is one JSON object, got {}", what, j.type_name()));
  return j;
}

// Checked access to the fields of one message; every failure names the message and the key.
class Fields {
 public:
  Fields(const json& j, std::string what, std::string id = {}) : j_(j), what_(std::move(what)), id_(std::move(id)) {}

  template <typename... Args>
  [[noreturn]] void bad(fmt::format_string<Args...> f, Args&&... args) const {
    throw ProtocolError(what_ + ": " + fmt::format(f, std::forward<Args>(args)...), id_);
  }

  void allow(std::initializer_list<const char*> keys) const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      const std::string& k = it.key();
      if (std::none_of(keys.begin(), keys.end(), [&](const char* a) { return k == a; }))
        bad("unknown key {}", show(json(k)));
    }
  }

  // Present and not null.
  const json* find(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  const json& need(const char* key) const {
    const json* v = find(key);
    if (!v) bad("'{}' is required", key);
    return *v;
  }

  std::string str(const char* key, size_t max_len = 4096) const {
    const json& v = need(key);
    if (!v.is_string()) bad("'{}' must be a string, got {}", key, show(v));
    const std::string& s = v.get_ref<const std::string&>();
    if (s.size() > max_len) bad("'{}' is {} bytes, at most {}", key, s.size(), max_len);
    return s;
  }
  std::string opt_str(const char* key, const std::string& dflt) const { return find(key) ? str(key) : dflt; }

  int64_t integer(const json& v, const char* key, int64_t lo, int64_t hi) const {
    int64_t x = 0;
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) bad("'{}' is out of range: {}", key, show(v));
      x = static_cast<int64_t>(u);
    } else if (v.is_number_integer()) {
      x = v.get<int64_t>();
    } else {
      bad("'{}' must be an integer, got {}", key, show(v));
    }
    if (x < lo || x > hi) {
      if (hi == std::numeric_limits<int64_t>::max()) bad("'{}' must be >= {}, got {}", key, lo, x);
      bad("'{}' must be in [{}, {}], got {}", key, lo, hi, x);
    }
    return x;
  }
  int64_t integer(const char* key, int64_t lo, int64_t hi) const { return integer(need(key), key, lo, hi); }
  int64_t opt_integer(const char* key, int64_t lo, int64_t hi, int64_t dflt) const {
    const json* v = find(key);
    return v ? integer(*v, key, lo, hi) : dflt;
  }
  uint64_t opt_unsigned(const char* key, uint64_t dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (v->is_number_unsigned()) return v->get<uint64_t>();
    if (v->is_number_integer()) bad("'{}' must be >= 0, got {}", key, show(*v));
    bad("'{}' must be an integer, got {}", key, show(*v));
  }
  // A number in [lo, hi] (or (lo, hi] with lo_open); integers count as numbers.
  double number(const json& v, const char* key, double lo, double hi, bool lo_open) const {
    if (!v.is_number()) bad("'{}' must be a number, got {}", key, show(v));
    const double x = v.get<double>();
    if (!std::isfinite(x) || (lo_open ? x <= lo : x < lo) || x > hi)
      bad("'{}' must be in {}{}, {}], got {}", key, lo_open ? "(" : "[", lo, hi, show(v));
    return x;
  }
  double opt_number(const char* key, double lo, double hi, bool lo_open, double dflt) const {
    const json* v = find(key);
    return v ? number(*v, key, lo, hi, lo_open) : dflt;
  }
  bool opt_bool(const char* key, bool dflt) const {
    const json* v = find(key);
    if (!v) return dflt;
    if (!v->is_boolean()) bad("'{}' must be true or false, got {}", key, show(*v));
    return v->get<bool>();
  }
  std::vector<int64_t> ints(const json& v, const char* key, int64_t lo, int64_t hi, bool non_empty) const {
    if (!v.is_array()) bad("'{}' must be an array of integers, got {}", key, show(v));
    if (non_empty && v.empty()) bad("'{}' must not be empty", key);
    std::vector<int64_t> out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const json& e = v[i];
      if (!e.is_number_integer()) bad("'{}'[{}] must be an integer, got {}", key, i, show(e));
      if (e.is_number_unsigned() && e.get<uint64_t>() > static_cast<uint64_t>(hi))
        bad("'{}'[{}] must be in [{}, {}], got {}", key, i, lo, hi, show(e));
      const int64_t x = e.get<int64_t>();
      if (x < lo || x > hi) bad("'{}'[{}] must be in [{}, {}], got {}", key, i, lo, hi, x);
      out.push_back(x);
    }
    return out;
  }
  const json& object(const char* key) const {
    const json& v = need(key);
    if (!v.is_object()) bad("'{}' must be an object, got {}", key, show(v));
    return v;
  }
  uint64_t hex64(const char* key) const {
    const std::string s = str(key, 16);
    if (s.empty() || s.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      bad("'{}' must be up to 16 hex digits, got {}", key, show(json(s)));
    return std::stoull(s, nullptr, 16);
  }

 private:
  const json& j_;
  std::string what_;
  std::string id_;
};

std::string tag_of(const json& j, const char* tag, const char* what) {
  auto it = j.find(tag);
  if (it == j.end()) throw ProtocolError(fmt::format("{}: '{}' is required", what, tag));
  if (!it->is_string()) throw ProtocolError(fmt::format("{}: '{}' must be a string, got {}", what, tag, show(*it)));
  return it->get<std::string>();
}

DoneReason parse_reason(const Fields& f, const std::string& s) {
  if (s == "length") return DoneReason::Length;
  if (s == "stop") return DoneReason::Stop;
  if (s == "eos") return DoneReason::Eos;
  if (s == "cancelled") return DoneReason::Cancelled;
  f.bad("'reason' must be length, stop, eos or cancelled, got {}", show(json(s)));
}

ErrorCode parse_code(const Fields& f, const std::string& s) {
  if (s == "bad_request") return ErrorCode::BadRequest;
  if (s == "overloaded") return ErrorCode::Overloaded;
  if (s == "internal") return ErrorCode::Internal;
  if (s == "unavailable") return ErrorCode::Unavailable;
  f.bad("'code' must be bad_request, overloaded, internal or unavailable, got {}", show(json(s)));
}

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
// Text fields: the frame's own limit (max_request_bytes) is what bounds them.
constexpr size_t kMaxTextBytes = size_t{1} << 30;

}  // namespace

const char* done_reason_name(DoneReason r) {
  switch (r) {
    case DoneReason::Length: return "length";
    case DoneReason::Stop: return "stop";
    case DoneReason::Eos: return "eos";
    case DoneReason::Cancelled: return "cancelled";
  }
  return "?";
}

const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::BadRequest: return "bad_request";
    case ErrorCode::Overloaded: return "overloaded";
    case ErrorCode::Internal: return "internal";
    case ErrorCode::Unavailable: return "unavailable";
  }
  return "?";
}

void GenerateRequest::check_vocab(int64_t vocab_size) const {
  for (size_t i = 0; i < prompt_ids.size(); ++i)
    if (prompt_ids[i] >= vocab_size)
      throw ProtocolError(fmt::format("generate: 'prompt_ids'[{}] = {} is outside the vocabulary of {} tokens", i,
                                      prompt_ids[i], vocab_size),
                          id);
  for (size_t i = 0; i < stop_ids.size(); ++i)
    if (stop_ids[i] >= vocab_size)
      throw ProtocolError(fmt::format("generate: 'stop_ids'[{}] = {} is outside the vocabulary of {} tokens", i,
                                      stop_ids[i], vocab_size),
                          id);
}

// ---- encoding ----

std::string encode(const ControlRequest& m) {
  return dump(std::visit(overloaded{
                             [](const Hello& h) { return json{{"op", "hello"}, {"pid", h.pid}, {"worker", h.worker}}; },
                             [](const Progress& p) {
                               json j{{"op", "progress"}, {"pass", p.pass}, {"copied", p.copied}};
                               if (p.held > p.copied) j["held"] = p.held;
                               return j;
                             },
                             [](const Heartbeat&) { return json{{"op", "heartbeat"}}; },
                             [](const Bye&) { return json{{"op", "bye"}}; },
                             [](const StatsRequest&) { return json{{"op", "stats"}}; },
                         },
                         m));
}

std::string encode(const ControlReply& m) {
  return dump(std::visit(overloaded{
                             [](const Welcome& w) {
                               return json{{"type", "welcome"},
                                           {"segment", w.segment},
                                           {"layout_version", w.layout_version},
                                           {"instance_id", w.instance_id},
                                           {"store", w.store},
                                           {"store_identity", fmt::format("{:016x}", w.store_identity)},
                                           {"n_layers", w.n_layers},
                                           {"n_slots", w.n_slots},
                                           {"heartbeat_ms", w.heartbeat_ms},
                                           {"pub", w.pub},
                                           {"worker_id", w.worker_id},
                                           {"hold_max", w.hold_max}};
                             },
                             [](const StatsReply& s) { return json{{"type", "stats"}, {"stats", s.stats}}; },
                             [](const ControlError& e) { return json{{"type", "error"}, {"message", e.message}}; },
                         },
                         m));
}

std::string encode(const Notice& m) {
  return dump(std::visit(overloaded{
                             [](const SlotReady& r) {
                               return json{{"type", "slot_ready"},
                                           {"slot", r.slot},
                                           {"layer", r.layer},
                                           {"generation", r.generation}};
                             },
                             [](const SlotErrorNotice& e) {
                               return json{{"type", "slot_error"},
                                           {"slot", e.slot},
                                           {"layer", e.layer},
                                           {"message", e.message}};
                             },
                         },
                         m));
}

std::string encode(const ClientRequest& m) {
  return dump(std::visit(overloaded{
                             [](const GenerateRequest& g) {
                               json j{{"op", "generate"},           {"id", g.id},
                                      {"max_tokens", g.max_tokens}, {"temperature", g.temperature},
                                      {"top_k", g.top_k},           {"top_p", g.top_p},
                                      {"seed", g.seed},             {"stop_ids", g.stop_ids},
                                      {"ignore_eos", g.ignore_eos}};
                               if (g.form == GenerateRequest::Form::Ids) j["prompt_ids"] = g.prompt_ids;
                               if (g.form == GenerateRequest::Form::Text) j["prompt"] = g.prompt;
                               if (g.form == GenerateRequest::Form::Chat) {
                                 j["messages"] = json::array();
                                 for (const ChatMessage& m : g.messages)
                                   j["messages"].push_back({{"role", m.role}, {"content", m.content}});
                               }
                               return j;
                             },
                             [](const CancelRequest& c) { return json{{"op", "cancel"}, {"id", c.id}}; },
                             [](const ClientStatsRequest&) { return json{{"op", "stats"}}; },
                             [](const HealthRequest&) { return json{{"op", "health"}}; },
                         },
                         m));
}

std::string encode(const ClientReply& m) {
  return dump(std::visit(
      overloaded{
          [](const TokenReply& t) {
            json j{{"type", "token"}, {"id", t.id}, {"index", t.index}, {"token", t.token}};
            if (t.text) j["text"] = *t.text;
            if (t.logprobs) {
              j["logprob"] = t.logprobs->logprob;
              json top = json::array();
              for (const auto& [id, lp] : t.logprobs->top) top.push_back({id, lp});
              j["top_logprobs"] = std::move(top);
            }
            return j;
          },
          [](const DoneReply& d) {
            json j{{"type", "done"},
                   {"id", d.id},
                   {"reason", done_reason_name(d.reason)},
                   {"usage", {{"prompt_tokens", d.prompt_tokens}, {"completion_tokens", d.completion_tokens}}},
                   {"timing", {{"ttft_ms", d.ttft_ms}, {"tpot_ms", d.tpot_ms}}}};
            if (d.text) j["text"] = *d.text;
            return j;
          },
          [](const ErrorReply& e) {
            return json{{"type", "error"},
                        {"id", e.id.empty() ? json(nullptr) : json(e.id)},
                        {"code", error_code_name(e.code)},
                        {"message", e.message}};
          },
          [](const StatsReply& s) { return json{{"type", "stats"}, {"stats", s.stats}}; },
          [](const HealthReply& h) { return json{{"type", "health"}, {"status", h.status}, {"detail", h.detail}}; },
      },
      m));
}

// ---- decoding ----

ControlRequest parse_control_request(std::string_view frame) {
  const json j = parse_object(frame, "control request");
  const std::string op = tag_of(j, "op", "control request");
  Fields f(j, op);
  if (op == "hello") {
    f.allow({"op", "pid", "worker"});
    return Hello{f.integer("pid", 1, std::numeric_limits<int32_t>::max()), f.opt_str("worker", "")};
  }
  if (op == "progress") {
    f.allow({"op", "pass", "copied", "held"});
    Progress p{f.integer("pass", 0, kI64Max), f.integer("copied", 0, 1 << 24), 0};
    p.held = f.find("held") ? f.integer("held", 0, 1 << 24) : p.copied;
    return p;
  }
  if (op == "heartbeat") {
    f.allow({"op"});
    return Heartbeat{};
  }
  if (op == "bye") {
    f.allow({"op"});
    return Bye{};
  }
  if (op == "stats") {
    f.allow({"op"});
    return StatsRequest{};
  }
  throw ProtocolError(
      fmt::format("control request: unknown op {} (hello, progress, heartbeat, bye or stats)", show(json(op))));
}

ControlReply parse_control_reply(std::string_view frame) {
  const json j = parse_object(frame, "control reply");
  const std::string type = tag_of(j, "type", "control reply");
  Fields f(j, type);
  if (type == "welcome") {
    f.allow({"type", "segment", "layout_version", "instance_id", "store", "store_identity", "n_layers", "n_slots",
             "heartbeat_ms", "pub", "worker_id", "hold_max"});
    Welcome w;
    w.segment = f.str("segment");
    w.layout_version = static_cast<uint32_t>(f.integer("layout_version", 0, std::numeric_limits<uint32_t>::max()));
    w.instance_id = f.str("instance_id");
    w.store = f.str("store");
    w.store_identity = f.hex64("store_identity");
    w.n_layers = f.integer("n_layers", 1, 1 << 24);
    w.n_slots = f.integer("n_slots", 1, 1 << 24);
    w.heartbeat_ms = f.integer("heartbeat_ms", 1, kI64Max);
    w.pub = f.opt_str("pub", "");
    w.worker_id = f.find("worker_id") ? f.integer("worker_id", -1, 1 << 24) : -1;
    w.hold_max = f.find("hold_max") ? f.integer("hold_max", 1, 1 << 24) : 1;
    return w;
  }
  if (type == "stats") {
    f.allow({"type", "stats"});
    return StatsReply{f.object("stats")};
  }
  if (type == "error") {
    f.allow({"type", "message"});
    return ControlError{f.str("message", 1 << 16)};
  }
  throw ProtocolError(fmt::format("control reply: unknown type {} (welcome, stats or error)", show(json(type))));
}

Notice parse_notice(std::string_view frame) {
  const json j = parse_object(frame, "notice");
  const std::string type = tag_of(j, "type", "notice");
  Fields f(j, type);
  if (type == "slot_ready") {
    f.allow({"type", "slot", "layer", "generation"});
    SlotReady r;
    r.slot = f.integer("slot", -1, 1 << 24);
    r.layer = f.integer("layer", -1, 1 << 24);
    f.need("generation");
    r.generation = f.opt_unsigned("generation", 0);
    return r;
  }
  if (type == "slot_error") {
    f.allow({"type", "slot", "layer", "message"});
    return SlotErrorNotice{f.integer("slot", -1, 1 << 24), f.integer("layer", -1, 1 << 24),
                           f.str("message", 1 << 16)};
  }
  throw ProtocolError(fmt::format("notice: unknown type {} (slot_ready or slot_error)", show(json(type))));
}

ClientRequest parse_client_request(std::string_view frame, size_t max_bytes) {
  if (max_bytes > 0 && frame.size() > max_bytes)
    throw ProtocolError(fmt::format("request of {} bytes is over max_request_bytes ({})", frame.size(), max_bytes));
  const json j = parse_object(frame, "request");
  // The id first, so that every later error can name the request.
  std::string id;
  if (auto it = j.find("id"); it != j.end() && it->is_string() && it->get_ref<const std::string&>().size() <= kMaxIdBytes)
    id = it->get<std::string>();
  std::string op;
  try {
    op = tag_of(j, "op", "request");
  } catch (const ProtocolError& e) {
    throw ProtocolError(e.what(), id);
  }
  Fields f(j, op, id);
  auto need_id = [&]() {
    std::string s = f.str("id", kMaxIdBytes);
    if (s.empty()) f.bad("'id' must not be empty");
    return s;
  };
  if (op == "generate") {
    f.allow({"op", "id", "prompt_ids", "prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "seed",
             "stop_ids", "ignore_eos"});
    GenerateRequest g;
    g.id = need_id();
    const int forms = (f.find("prompt_ids") ? 1 : 0) + (f.find("prompt") ? 1 : 0) + (f.find("messages") ? 1 : 0);
    if (forms != 1)
      f.bad("exactly one of 'prompt_ids', 'prompt' (text) or 'messages' (a chat) is required, got {}", forms);
    if (f.find("prompt_ids")) {
      g.prompt_ids = f.ints(f.need("prompt_ids"), "prompt_ids", 0, kMaxTokenId, true);
    } else if (f.find("prompt")) {
      g.form = GenerateRequest::Form::Text;
      g.prompt = f.str("prompt", kMaxTextBytes);
      if (g.prompt.empty()) f.bad("'prompt' must not be empty");
    } else {
      g.form = GenerateRequest::Form::Chat;
      try {
        g.messages = parse_chat_messages(f.need("messages"), "'messages'");
      } catch (const ProtocolError&) {
        throw;
      } catch (const Error& e) {
        f.bad("{}", e.what());
      }
    }
    g.max_tokens = f.integer("max_tokens", 1, 1 << 24);
    g.temperature = f.opt_number("temperature", 0.0, 100.0, false, 0.0);
    g.top_k = f.opt_integer("top_k", 0, kMaxTokenId, 0);
    g.top_p = f.opt_number("top_p", 0.0, 1.0, true, 1.0);
    g.seed = f.opt_unsigned("seed", 0);
    if (const json* s = f.find("stop_ids")) g.stop_ids = f.ints(*s, "stop_ids", 0, kMaxTokenId, false);
    g.ignore_eos = f.opt_bool("ignore_eos", false);
    return g;
  }
  if (op == "cancel") {
    f.allow({"op", "id"});
    return CancelRequest{need_id()};
  }
  if (op == "stats") {
    f.allow({"op", "id"});
    return ClientStatsRequest{};
  }
  if (op == "health") {
    f.allow({"op", "id"});
    return HealthRequest{};
  }
  throw ProtocolError(fmt::format("request: unknown op {} (generate, cancel, stats or health)", show(json(op))), id);
}

ClientReply parse_client_reply(std::string_view frame) {
  const json j = parse_object(frame, "reply");
  const std::string type = tag_of(j, "type", "reply");
  Fields f(j, type);
  if (type == "token") {
    f.allow({"type", "id", "index", "token", "text"});
    TokenReply t{f.str("id", kMaxIdBytes), f.integer("index", 0, kI64Max), f.integer("token", 0, kMaxTokenId), {}, {}};
    if (f.find("text")) t.text = f.str("text", kMaxTextBytes);
    return t;
  }
  if (type == "done") {
    f.allow({"type", "id", "reason", "usage", "timing", "text"});
    DoneReply d;
    d.id = f.str("id", kMaxIdBytes);
    d.reason = parse_reason(f, f.str("reason"));
    Fields usage(f.object("usage"), "done usage");
    usage.allow({"prompt_tokens", "completion_tokens"});
    d.prompt_tokens = usage.integer("prompt_tokens", 0, kI64Max);
    d.completion_tokens = usage.integer("completion_tokens", 0, kI64Max);
    Fields timing(f.object("timing"), "done timing");
    timing.allow({"ttft_ms", "tpot_ms"});
    d.ttft_ms = timing.number(timing.need("ttft_ms"), "ttft_ms", 0, 1e300, false);
    d.tpot_ms = timing.number(timing.need("tpot_ms"), "tpot_ms", 0, 1e300, false);
    if (f.find("text")) d.text = f.str("text", kMaxTextBytes);
    return d;
  }
  if (type == "error") {
    f.allow({"type", "id", "code", "message"});
    ErrorReply e;
    e.id = f.find("id") ? f.str("id", kMaxIdBytes) : std::string();
    e.code = parse_code(f, f.str("code"));
    e.message = f.str("message", 1 << 16);
    return e;
  }
  if (type == "stats") {
    f.allow({"type", "stats"});
    return StatsReply{f.object("stats")};
  }
  if (type == "health") {
    f.allow({"type", "status", "detail"});
    HealthReply h;
    h.status = f.str("status", 64);
    if (f.find("detail")) h.detail = f.object("detail");
    return h;
  }
  throw ProtocolError(fmt::format("reply: unknown type {} (token, done, error, stats or health)", show(json(type))));
}

ErrorReply bad_request(const ProtocolError& e) { return ErrorReply{e.id(), ErrorCode::BadRequest, e.what()}; }

}  // namespace ringllama
