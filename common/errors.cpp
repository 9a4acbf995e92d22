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
