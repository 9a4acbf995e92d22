// The daemon <-> worker messages (common/protocol.h): control requests the daemon reads from
// workers, control replies and PUB notices a worker reads from the daemon. Each parser is total:
// any frame gives a message or a ProtocolError. Whatever parses must encode to a frame that parses
// again to the same encoding.
#include <cstdint>
#include <string>
#include <string_view>

#include "common/protocol.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

template <typename Parse>
void round_trip(const char* what, std::string_view frame, Parse parse) {
  fuzz::run_expecting<ProtocolError>(what, [&] {
    const auto msg = parse(frame);
    const std::string once = encode(msg);
    std::string twice;
    try {
      twice = encode(parse(once));
    } catch (const ProtocolError& e) {
      fuzz::finding(std::string(what) + ": its own encoding does not parse: " + e.what() + "\n" + once);
    }
    fuzz::expect(once == twice, std::string(what) + ": round trip changed the message\n" + once + "\n" + twice);
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view frame(reinterpret_cast<const char*>(data), size);
  round_trip("control request", frame, [](std::string_view f) { return parse_control_request(f); });
  round_trip("control reply", frame, [](std::string_view f) { return parse_control_reply(f); });
  round_trip("notice", frame, [](std::string_view f) { return parse_notice(f); });
  return 0;
}
