#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace ringllama {

void init_logging(const std::string& process_name, bool verbose) {
  auto logger = spdlog::get(process_name);
  if (!logger) logger = spdlog::stderr_color_mt(process_name);
  logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %n %^%l%$: %v");
  logger->set_level(verbose ? spdlog::level::debug : spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace ringllama
