#include "daemon/logging.h"

#include <algorithm>
#include <cctype>
#include <memory>
#include <stdexcept>

#include <spdlog/logger.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace sidecar::daemon {

std::optional<spdlog::level::level_enum> parseLogLevel(std::string_view name) {
  std::string l(name);
  std::transform(l.begin(), l.end(), l.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  using spdlog::level::level_enum;
  if (l == "trace") return level_enum::trace;
  if (l == "debug") return level_enum::debug;
  if (l == "info") return level_enum::info;
  if (l == "warn" || l == "warning") return level_enum::warn;
  if (l == "error" || l == "err") return level_enum::err;
  if (l == "critical") return level_enum::critical;
  if (l == "off") return level_enum::off;
  return std::nullopt;
}

void setupLogging(const std::string& level, spdlog::sink_ptr sink) {
  std::optional<spdlog::level::level_enum> parsed = parseLogLevel(level);
  if (!parsed) throw std::invalid_argument("unknown log level \"" + level + "\"");
  if (!sink) sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("sidecard", std::move(sink));
  logger->set_pattern(kLogPattern);
  logger->set_level(*parsed);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(std::move(logger));
}

}  // namespace sidecar::daemon
