#include "common/errors.h"

#include <cstring>

namespace ringllama {

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer, which may not be buf.
  const char* msg = strerror_r(err, buf, sizeof buf);
  return std::string(msg);
}

}  // namespace ringllama

#include <cstdio>
#include <exception>

namespace ringllama {

int run_main(const char* program, int (*body)(int, char**), int argc, char** argv) {
  try {
    return body(argc, argv);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    for (char& c : msg)
      if (c == '\n') c = ' ';
    std::fprintf(stderr, "%s: error: %s\n", program, msg.c_str());
    return 1;
  }
}

}  // namespace ringllama
