// Logging: spdlog to stderr, one line per event, with the process name as prefix.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace ringllama {

// Call once at start; verbose turns on debug lines.
void init_logging(const std::string& process_name, bool verbose);

}  // namespace ringllama
