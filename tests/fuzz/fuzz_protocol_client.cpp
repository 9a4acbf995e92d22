// The client <-> worker messages (common/protocol.h), as worker/zmq_server.cpp handles a frame:
// parse_client_request with the max_request_bytes limit, the vocabulary check of a generate,
// and for a bad frame the error reply built from the ProtocolError, which a client must be able
// to parse. Replies a client reads are fuzzed too. Whatever parses must survive encode -> parse.
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "common/protocol.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

// Below libFuzzer's default input length, so both sides of the limit are reached.
constexpr size_t kMaxRequestBytes = 2048;
constexpr int64_t kVocab = 32000;

void check_error_reply(const ProtocolError& e) {
  const std::string wire = encode(ClientReply{bad_request(e)});
  try {
    const ClientReply back = parse_client_reply(wire);
    const auto* r = std::get_if<ErrorReply>(&back);
    fuzz::expect(r && r->id == e.id() && r->code == ErrorCode::BadRequest,
                 "client: the error reply of a bad request reads back differently\n" + wire);
  } catch (const ProtocolError& bad) {
    fuzz::finding(std::string("client: the error reply of a bad request does not parse: ") + bad.what() + "\n" + wire);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view frame(reinterpret_cast<const char*>(data), size);
  fuzz::run_expecting<std::monostate>("client request", [&] {
    try {
      const ClientRequest req = parse_client_request(frame, kMaxRequestBytes);
      if (const auto* g = std::get_if<GenerateRequest>(&req)) g->check_vocab(kVocab);
      const std::string once = encode(req);
      std::string twice;
      try {
        twice = encode(parse_client_request(once));
      } catch (const ProtocolError& e) {
        fuzz::finding(std::string("client request: its own encoding does not parse: ") + e.what() + "\n" + once);
      }
      fuzz::expect(once == twice, "client request: round trip changed the message\n" + once + "\n" + twice);
    } catch (const ProtocolError& e) {
      check_error_reply(e);
    }
  });
  fuzz::run_expecting<ProtocolError>("client reply", [&] {
    const ClientReply reply = parse_client_reply(frame);
    const std::string once = encode(reply);
    std::string twice;
    try {
      twice = encode(parse_client_reply(once));
    } catch (const ProtocolError& e) {
      fuzz::finding(std::string("client reply: its own encoding does not parse: ") + e.what() + "\n" + once);
    }
    fuzz::expect(once == twice, "client reply: round trip changed the message\n" + once + "\n" + twice);
  });
  return 0;
}
