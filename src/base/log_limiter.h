#pragma once
// A budget for log lines that input from outside can trigger (a peer's garbage messages, one line
// each): at most `linesPerWindow` lines per window, the rest only counted. The next line that
// passes says how many were left out, so the log stays readable and bounded under a flood while
// nothing goes unreported. Not thread-safe: one per reactor-owned object.

#include <cstdint>

namespace sidecar::base {

class LogLimiter {
 public:
  LogLimiter(uint32_t linesPerWindow, uint64_t windowNs)
      : linesPerWindow_(linesPerWindow), windowNs_(windowNs) {}

  // Whether a line may be written at `nowNs` (a monotonic clock). When it may, `suppressed` is
  // set to the lines left out since the last one written (to say so in this one).
  bool allow(uint64_t nowNs, uint64_t& suppressed) {
    if (nowNs - windowStartNs_ >= windowNs_ || !started_) {
      started_ = true;
      windowStartNs_ = nowNs;
      linesInWindow_ = 0;
    }
    if (linesInWindow_ >= linesPerWindow_) {
      ++suppressed_;
      return false;
    }
    ++linesInWindow_;
    suppressed = suppressed_;
    suppressed_ = 0;
    return true;
  }

 private:
  uint32_t linesPerWindow_;
  uint64_t windowNs_;
  bool started_ = false;
  uint64_t windowStartNs_ = 0;
  uint32_t linesInWindow_ = 0;
  uint64_t suppressed_ = 0;
};

}  // namespace sidecar::base
