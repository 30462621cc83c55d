#pragma once
// Monotonic time in the units the reactor and timers use. CLOCK_MONOTONIC never jumps, so
// deadlines computed from it survive wall-clock changes.

#include <cstdint>
#include <ctime>

namespace sidecar {

inline uint64_t monotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(ts.tv_nsec);
}

// Wall-clock milliseconds since the epoch, for reporting only (never for deadlines).
inline int64_t unixTimeMs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1'000'000;
}

}  // namespace sidecar
