// The HTTP API's request bodies (worker/openai_api.h), as worker/http_server.cpp parses them: for
// both endpoints, any bytes give a request or a 400 ApiError, never another exception; what
// parses keeps its documented bounds. Also stop strings over streamed pieces: the text out is the
// text in, cut before the first stop string. An input is BODY \0 STOP \0 TEXT.
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "tests/fuzz/fuzz_util.h"
#include "worker/generation.h"
#include "worker/openai_api.h"

using namespace ringllama;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> parts = fuzz::split_parts(data, size, 3);
  for (const openai::Endpoint e : {openai::Endpoint::Completions, openai::Endpoint::Chat}) {
    fuzz::run_expecting<std::monostate>("openai request", [&] {
      try {
        const openai::ApiRequest r = openai::parse_request(e, parts[0]);
        fuzz::expect(r.stop.size() <= openai::kMaxStops, "more stop strings than allowed");
        for (const std::string& s : r.stop) fuzz::expect(!s.empty(), "an empty stop string was kept");
        fuzz::expect(r.logprobs >= -1 && r.logprobs <= kMaxTopLogprobs, "logprobs out of range");
        fuzz::expect(r.gen.max_tokens >= 0 && r.gen.temperature >= 0 && r.gen.top_p > 0 && r.gen.top_p <= 1,
                     "a sampling value out of range");
        fuzz::expect(e == openai::Endpoint::Chat ? !r.gen.messages.empty()
                                                 : !r.gen.prompt.empty() || !r.gen.prompt_ids.empty(),
                     "a request without a prompt");
      } catch (const openai::ApiError& err) {
        fuzz::expect(err.status == 400, "a parse error that is not a 400");
        (void)openai::dump(openai::error_body(err));
      }
    });
  }
  const std::string& stop = parts[1];
  const std::string& text = parts[2];
  openai::StopMatcher m({stop});
  std::string out;
  for (size_t at = 0, n = 1; at < text.size() && !m.stopped(); at += n, n = n % 7 + 1) out += m.push(text.substr(at, n));
  out += m.flush();
  const size_t cut = stop.empty() ? std::string::npos : text.find(stop);
  fuzz::expect(out == (cut == std::string::npos ? text : text.substr(0, cut)) && m.stopped() == (cut != std::string::npos),
               "stop strings: the text out is not the text in cut before the first stop");
  return 0;
}
