// Errors every process raises. Runtime failures (bad input, I/O, config) are exceptions with a
// message that names the thing at fault; the binaries print it on one line and exit non-zero.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace ringllama {

// Any failure caused by the outside world: a file, a flag, a peer. Never an internal bug.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A configuration value or key that cannot work; the message names the key and the rule.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A store that is missing, malformed, truncated or fails its checksums.
class StoreError : public Error {
 public:
  using Error::Error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// errno as text, for messages about system calls.
std::string errno_text(int err);

}  // namespace ringllama

// Always-on check for conditions the outside world can break.
#define RL_REQUIRE(cond, ...)                       \
  do {                                              \
    if (!(cond)) ::ringllama::fail(__VA_ARGS__);    \
  } while (0)

namespace ringllama {

// Runs a binary's body and turns any escaping exception into the one-line error every binary
// prints: "<program>: error: <message>" on stderr (newlines folded), exit status 1.
int run_main(const char* program, int (*body)(int, char**), int argc, char** argv);

}  // namespace ringllama
