// sidecard's logging: spdlog's default logger, writing one line per record to stderr.
//
//   [2026-11-22 03:14:59.123] [info] [t:1234] message
//
// The thread id is the kernel's (gettid), so a line can be matched to a reactor thread in top -H
// or perf. stderr is what systemd's journal captures; colors appear only when it is a terminal.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <spdlog/common.h>

namespace sidecar::daemon {

inline constexpr const char* kLogPattern = "[%Y-%m-%d %H:%M:%S.%e] [%l] [t:%t] %v";

std::optional<spdlog::level::level_enum> parseLogLevel(std::string_view name);
// trace|debug|info|warn|error|critical|off, case-insensitive; also "warning" and "err".

void setupLogging(const std::string& level, spdlog::sink_ptr sink = nullptr);
// Replaces spdlog's default logger with one named "sidecard" at `level`, writing to `sink`
// (default: stderr) with kLogPattern, flushing at warn and above. Throws std::invalid_argument
// for an unknown level (loadConfig() has already rejected those). Call it once, early in main(),
// before any other thread logs: spdlog's default-logger swap is not synchronized with readers.

}  // namespace sidecar::daemon
