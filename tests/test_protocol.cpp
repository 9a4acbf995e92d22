// Wire messages: round trips, every malformed case with its message, and a fuzz loop over
// mutated frames that must only ever give a message or a ProtocolError.
#include <gtest/gtest.h>

#include <random>

#include "common/protocol.h"

namespace ringllama {
namespace {

template <typename T, typename V>
T as(const V& v) {
  EXPECT_TRUE(std::holds_alternative<T>(v));
  return std::get<T>(v);
}

// The message of the ProtocolError `fn` throws ("" when it throws none).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "";
}

std::string request_error(const std::string& frame) {
  return error_of([&] { parse_client_request(frame, 1 << 20); });
}

TEST(Protocol, ControlRoundTrips) {
  const std::vector<ControlRequest> reqs = {Hello{4242, "gpu0"}, Progress{7, 12}, Heartbeat{}, Bye{}, StatsRequest{}};
  for (const auto& m : reqs) {
    const std::string frame = encode(m);
    ControlRequest back = parse_control_request(frame);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_EQ(encode(back), frame);
  }
  EXPECT_EQ(encode(ControlRequest{Hello{1, "w"}}), R"({"op":"hello","pid":1,"worker":"w"})");
  const Progress p = as<Progress>(parse_control_request(R"({"op":"progress","pass":3,"copied":80})"));
  EXPECT_EQ(p.pass, 3);
  EXPECT_EQ(p.copied, 80);
  EXPECT_EQ(p.held, 80) << "no held: nothing beyond the next layer";
  // A hold ahead of the copies: sent only when there is one.
  const Progress h = as<Progress>(parse_control_request(encode(ControlRequest{Progress{4, 6, 8}})));
  EXPECT_EQ(h.held, 8);
  EXPECT_EQ(encode(ControlRequest{Progress{4, 6, 6}}), R"({"copied":6,"op":"progress","pass":4})");

  Welcome w;
  w.segment = "/ringllama-main";
  w.layout_version = 1;
  w.instance_id = "main";
  w.store = "/srv/llama-70b";
  w.store_identity = 0xfedcba9876543210ull;
  w.n_layers = 80;
  w.n_slots = 12;
  w.heartbeat_ms = 1000;
  StatsReply stats;
  stats.stats = {{"convoy_waits", 3}, {"gib_per_s", 6.5}};
  const std::vector<ControlReply> replies = {w, stats, ControlError{"layout version 2, this build reads 1"}};
  for (const auto& m : replies) {
    const std::string frame = encode(m);
    ControlReply back = parse_control_reply(frame);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_EQ(encode(back), frame);
  }
  EXPECT_EQ(as<Welcome>(parse_control_reply(encode(ControlReply{w}))).store_identity, 0xfedcba9876543210ull);

  const std::vector<Notice> notices = {SlotReady{3, 17, 42}, SlotReady{-1, -1, 1},
                                       SlotErrorNotice{3, 17, "checksum mismatch in layer 17 attn"}};
  for (const auto& m : notices) {
    const std::string frame = encode(m);
    Notice back = parse_notice(frame);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_EQ(encode(back), frame);
  }
}

TEST(Protocol, ClientRoundTrips) {
  const GenerateRequest g = as<GenerateRequest>(
      parse_client_request(R"({"op":"generate","id":"r1","prompt_ids":[1,2,3],"max_tokens":16})"));
  EXPECT_EQ(g.id, "r1");
  EXPECT_EQ(g.prompt_ids, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(g.max_tokens, 16);
  EXPECT_EQ(g.temperature, 0.0);
  EXPECT_EQ(g.top_k, 0);
  EXPECT_EQ(g.top_p, 1.0);
  EXPECT_EQ(g.seed, 0u);
  EXPECT_TRUE(g.stop_ids.empty());
  EXPECT_FALSE(g.ignore_eos);

  const GenerateRequest full = as<GenerateRequest>(parse_client_request(
      R"({"op":"generate","id":"x","prompt_ids":[5],"max_tokens":1,"temperature":0.7,"top_k":40,"top_p":0.9,)"
      R"("seed":18446744073709551615,"stop_ids":[2,3],"ignore_eos":true})"));
  EXPECT_DOUBLE_EQ(full.temperature, 0.7);
  EXPECT_EQ(full.top_k, 40);
  EXPECT_DOUBLE_EQ(full.top_p, 0.9);
  EXPECT_EQ(full.seed, 18446744073709551615ull);
  EXPECT_EQ(full.stop_ids, (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(full.ignore_eos);
  // Integers are numbers too; null is "not given".
  EXPECT_EQ(as<GenerateRequest>(parse_client_request(
                R"({"op":"generate","id":"y","prompt_ids":[5],"max_tokens":2,"temperature":1,"top_p":null})"))
                .temperature,
            1.0);

  // Text and chat prompts.
  const GenerateRequest text = as<GenerateRequest>(
      parse_client_request(R"({"op":"generate","id":"t","prompt":"Hello \u00e9\ud83d\ude00","max_tokens":4})"));
  EXPECT_EQ(text.form, GenerateRequest::Form::Text);
  EXPECT_EQ(text.prompt, "Hello \xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(text.prompt_ids.empty());
  const GenerateRequest chat = as<GenerateRequest>(parse_client_request(
      R"({"op":"generate","id":"c","messages":[{"role":"system","content":""},{"role":"user","content":"hi"}],)"
      R"("max_tokens":4})"));
  EXPECT_EQ(chat.form, GenerateRequest::Form::Chat);
  ASSERT_EQ(chat.messages.size(), 2u);
  EXPECT_EQ(chat.messages[1].role, "user");
  EXPECT_EQ(chat.messages[1].content, "hi");

  for (const ClientRequest& m : std::vector<ClientRequest>{full, text, chat, CancelRequest{"r1"}, ClientStatsRequest{},
                                                           HealthRequest{}}) {
    const std::string frame = encode(m);
    ClientRequest back = parse_client_request(frame);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_EQ(encode(back), frame);
  }

  DoneReply d{"r1", DoneReason::Stop, 3, 16, 41.2, 12.3};
  EXPECT_NE(encode(ClientReply{d}).find(R"("usage":{"completion_tokens":16,"prompt_tokens":3})"), std::string::npos);
  HealthReply h;
  h.detail = {{"daemon", "up"}};
  DoneReply with_text = d;
  with_text.text = "caf\xc3\xa9";
  const std::vector<ClientReply> replies = {TokenReply{"r1", 0, 523, {}}, TokenReply{"r1", 1, 7, "\xc3\xa9"}, with_text,
                                            d, DoneReply{"r2", DoneReason::Cancelled, 3, 2, 1, 0, {}},
                                            ErrorReply{"r1", ErrorCode::Overloaded, "queue full (64 waiting)"},
                                            ErrorReply{"", ErrorCode::BadRequest, "not valid JSON"},
                                            StatsReply{{{"queued", 2}}}, h};
  for (const auto& m : replies) {
    const std::string frame = encode(m);
    ClientReply back = parse_client_reply(frame);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_EQ(encode(back), frame);
  }
  EXPECT_NE(encode(ClientReply{ErrorReply{"", ErrorCode::Internal, "x"}}).find(R"("id":null)"), std::string::npos);
  EXPECT_EQ(encode(ClientReply{d}).find("\"text\""), std::string::npos);  // no tokenizer: no text key
  EXPECT_EQ(as<TokenReply>(parse_client_reply(encode(ClientReply{TokenReply{"r1", 1, 7, "\xc3\xa9"}}))).text, "\xc3\xa9");
}

TEST(Protocol, MalformedRequestsSayWhatIsWrong) {
  struct Case {
    const char* frame;
    const char* says;
  };
  const Case cases[] = {
      {"", "empty frame"},
      {"{", "not valid JSON"},
      {"[1,2]", "one JSON object, got array"},
      {"\"generate\"", "got string"},
      {R"({"id":"r1"})", "'op' is required"},
      {R"({"op":7})", "'op' must be a string"},
      {R"({"op":"generat"})", "unknown op \"generat\""},
      {R"({"op":"generate","prompt_ids":[1],"max_tokens":1})", "'id' is required"},
      {R"({"op":"generate","id":"","prompt_ids":[1],"max_tokens":1})", "'id' must not be empty"},
      {R"({"op":"generate","id":5,"prompt_ids":[1],"max_tokens":1})", "'id' must be a string"},
      {R"({"op":"generate","id":"r","max_tokens":1})", "exactly one of 'prompt_ids', 'prompt' (text) or 'messages'"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"prompt":"x","max_tokens":1})", "exactly one of"},
      {R"({"op":"generate","id":"r","prompt":"","max_tokens":1})", "'prompt' must not be empty"},
      {R"({"op":"generate","id":"r","prompt":["x"],"max_tokens":1})", "'prompt' must be a string"},
      {R"({"op":"generate","id":"r","messages":[],"max_tokens":1})", "'messages' is empty"},
      {R"({"op":"generate","id":"r","messages":"hi","max_tokens":1})", "'messages' must be a list"},
      {R"({"op":"generate","id":"r","messages":[{"role":"tool","content":"x"}],"max_tokens":1})", "role 'tool'"},
      {R"({"op":"generate","id":"r","messages":[{"role":"user"}],"max_tokens":1})", "'content' must be a string"},
      {R"({"op":"generate","id":"r","prompt_ids":[],"max_tokens":1})", "'prompt_ids' must not be empty"},
      {R"({"op":"generate","id":"r","prompt_ids":"1,2","max_tokens":1})", "'prompt_ids' must be an array"},
      {R"({"op":"generate","id":"r","prompt_ids":[1,2.5],"max_tokens":1})", "'prompt_ids'[1] must be an integer"},
      {R"({"op":"generate","id":"r","prompt_ids":[1,"2"],"max_tokens":1})", "'prompt_ids'[1] must be an integer"},
      {R"({"op":"generate","id":"r","prompt_ids":[-1],"max_tokens":1})", "'prompt_ids'[0] must be in [0, 2147483647]"},
      {R"({"op":"generate","id":"r","prompt_ids":[99999999999],"max_tokens":1})", "'prompt_ids'[0] must be in"},
      {R"({"op":"generate","id":"r","prompt_ids":[18446744073709551615],"max_tokens":1})", "'prompt_ids'[0] must be in"},
      {R"({"op":"generate","id":"r","prompt_ids":[1]})", "'max_tokens' is required"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":0})", "'max_tokens' must be in [1,"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1.5})", "'max_tokens' must be an integer"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":"16"})", "'max_tokens' must be an integer"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":18446744073709551615})", "out of range"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"temperature":-0.1})", "'temperature' must be in [0, 100]"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"temperature":"hot"})", "'temperature' must be a number"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"top_k":-1})", "'top_k' must be in [0,"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"top_p":0})", "'top_p' must be in (0, 1]"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"top_p":1.01})", "'top_p' must be in (0, 1]"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"seed":-3})", "'seed' must be >= 0"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"seed":1.5})", "'seed' must be an integer"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"stop_ids":[1,-2]})", "'stop_ids'[1] must be in"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"stop_ids":3})", "'stop_ids' must be an array"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"ignore_eos":"yes"})", "'ignore_eos' must be true or false"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1,"max_token":3})", "unknown key \"max_token\""},
      {R"({"op":"cancel"})", "'id' is required"},
      {R"({"op":"cancel","id":"r","now":true})", "unknown key \"now\""},
      {"{\"op\":\"generate\",\"id\":\"r\xff\"}", "not valid JSON"},
      {R"({"op":"generate","id":"r","prompt_ids":[1],"max_tokens":1} trailing)", "not valid JSON"},
  };
  for (const Case& c : cases) {
    std::string msg = request_error(c.frame);
    EXPECT_NE(msg.find(c.says), std::string::npos) << "frame: " << c.frame << "\nmessage: " << msg;
  }

  // The id comes back with the error where it could be read.
  try {
    parse_client_request(R"({"op":"generate","id":"r9","prompt_ids":[],"max_tokens":1})");
    FAIL();
  } catch (const ProtocolError& e) {
    EXPECT_EQ(e.id(), "r9");
    ErrorReply r = bad_request(e);
    EXPECT_EQ(r.id, "r9");
    EXPECT_EQ(r.code, ErrorCode::BadRequest);
  }
  try {
    parse_client_request(R"({"id":"r8"})");
    FAIL();
  } catch (const ProtocolError& e) {
    EXPECT_EQ(e.id(), "r8");
  }

  // Too big, too deep.
  std::string big = R"({"op":"generate","id":"r","prompt_ids":[)" + std::string(2000, '1') + "],\"max_tokens\":1}";
  EXPECT_NE(error_of([&] { parse_client_request(big, 1000); }).find("over max_request_bytes (1000)"),
            std::string::npos);
  std::string deep = R"({"op":"stats","x":)" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_NE(request_error(deep).find("nested deeper than"), std::string::npos);
  // Brackets inside strings do not count as nesting.
  EXPECT_EQ(request_error(R"({"op":"cancel","id":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["})"),
            "");

  // Vocabulary limits are checked where the model is known.
  const GenerateRequest g = as<GenerateRequest>(
      parse_client_request(R"({"op":"generate","id":"v","prompt_ids":[1,500],"max_tokens":1,"stop_ids":[2]})"));
  EXPECT_NO_THROW(g.check_vocab(501));
  EXPECT_NE(error_of([&] { g.check_vocab(500); }).find("'prompt_ids'[1] = 500 is outside the vocabulary of 500"),
            std::string::npos);
}

TEST(Protocol, MalformedControlFramesSayWhatIsWrong) {
  EXPECT_NE(error_of([] { parse_control_request(R"({"op":"hello","worker":"w"})"); }).find("'pid' is required"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_request(R"({"op":"hello","pid":0})"); }).find("'pid' must be in [1,"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_request(R"({"op":"progress","pass":-1,"copied":0})"); }).find("'pass'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_request(R"({"op":"nap"})"); }).find("unknown op"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_reply(R"({"type":"welcome","segment":"/x"})"); }).find("is required"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              parse_control_reply(R"({"type":"welcome","segment":"/x","layout_version":1,"instance_id":"i",)"
                                  R"("store":"/s","store_identity":"xyz","n_layers":2,"n_slots":1,"heartbeat_ms":5})");
            }).find("hex digits"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_notice(R"({"type":"slot_ready","slot":1,"layer":2})"); }).find("'generation'"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_notice(R"({"type":"slot_ready","slot":-2,"layer":2,"generation":1})"); })
                .find("'slot' must be in [-1,"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_client_reply(R"({"type":"done","id":"r","reason":"tired","usage":{},"timing":{}})"); })
                .find("'reason' must be length, stop, eos or cancelled"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_client_reply(R"({"type":"error","id":null,"code":"oops","message":"m"})"); })
                .find("'code' must be"),
            std::string::npos);
}

// Random edits of valid frames: every parser gives a message or a ProtocolError, and a frame
// that parses encodes to a frame that parses to the same encoding.
TEST(Protocol, FuzzedFramesNeverCrash) {
  GenerateRequest g;
  g.id = "req-1";
  g.prompt_ids = {1, 2, 3, 128000};
  g.max_tokens = 16;
  g.temperature = 0.8;
  g.top_k = 40;
  g.top_p = 0.95;
  g.seed = 7;
  g.stop_ids = {2};
  std::vector<std::string> seeds = {
      encode(ClientRequest{g}),
      encode(ClientRequest{CancelRequest{"req-1"}}),
      encode(ClientRequest{ClientStatsRequest{}}),
      encode(ClientRequest{HealthRequest{}}),
      encode(ControlRequest{Hello{1234, "gpu0"}}),
      encode(ControlRequest{Progress{5, 40}}),
      encode(ControlRequest{Bye{}}),
      encode(ControlReply{Welcome{"/ringllama-a", 1, "a", "/s", 0xabcdef, 80, 12, 1000, "ipc:///run/a-pub", 3}}),
      encode(ControlReply{ControlError{"no"}}),
      encode(Notice{SlotReady{1, 2, 3}}),
      encode(Notice{SlotErrorNotice{1, 2, "bad"}}),
      encode(ClientReply{TokenReply{"r", 1, 2}}),
      encode(ClientReply{DoneReply{"r", DoneReason::Eos, 3, 4, 1.5, 2.5}}),
      encode(ClientReply{ErrorReply{"r", ErrorCode::Unavailable, "daemon gone"}}),
  };
  const std::string pieces[] = {"{", "}", "[", "]", ",", ":", "\"", "\\", "null", "true", "-1", "1e400", "0.5",
                                "18446744073709551616", "-9223372036854775809", "\"op\"", "\"id\"", "\xff", "\xc3",
                                "\\u0000", "\\ud800", "[[[[[[[[", " ", "\"generate\"", "\"prompt_ids\""};
  std::mt19937_64 rng(20240611);
  size_t parsed = 0, refused = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::string f = seeds[rng() % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = f.empty() ? 0 : rng() % (f.size() + 1);
      switch (rng() % 7) {
        case 0:  // flip a byte
          if (!f.empty()) f[at % f.size()] = static_cast<char>(rng());
          break;
        case 1:  // insert a random byte
          f.insert(f.begin() + static_cast<std::ptrdiff_t>(at), static_cast<char>(rng()));
          break;
        case 2:  // delete a range
          if (!f.empty()) f.erase(at % f.size(), 1 + rng() % 8);
          break;
        case 3:  // truncate
          f.resize(at);
          break;
        case 4:  // insert a JSON-ish piece
          f.insert(at, pieces[rng() % std::size(pieces)]);
          break;
        case 5: {  // splice in part of another frame
          const std::string& o = seeds[rng() % seeds.size()];
          const size_t from = rng() % o.size();
          f.insert(at, o.substr(from, rng() % (o.size() - from + 1)));
          break;
        }
        case 6:  // duplicate a range
          if (!f.empty()) {
            const size_t from = at % f.size();
            f.insert(at, f.substr(from, 1 + rng() % 16));
          }
          break;
      }
    }
    auto attempt = [&](auto&& parse) {
      try {
        auto m = parse(f);
        ++parsed;
        const std::string again = encode(m);
        EXPECT_EQ(encode(parse(again)), again) << "frame: " << f;
      } catch (const ProtocolError&) {
        ++refused;
      } catch (const std::exception& e) {
        ADD_FAILURE() << "non-protocol exception " << e.what() << " for frame: " << f;
      }
    };
    attempt([](const std::string& s) { return parse_client_request(s, 1 << 20); });
    attempt([](const std::string& s) { return parse_client_reply(s); });
    attempt([](const std::string& s) { return parse_control_request(s); });
    attempt([](const std::string& s) { return parse_control_reply(s); });
    attempt([](const std::string& s) { return parse_notice(s); });
    if (::testing::Test::HasFailure()) return;
  }
  EXPECT_GT(parsed, 100u);  // the mutations leave some frames valid
  EXPECT_GT(refused, 10000u);
}

}  // namespace
}  // namespace ringllama
