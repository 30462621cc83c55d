// Time for the allocator's waiter deadlines, swappable for a manual clock in tests.
//
// The allocator reads the clock only when a waiter is queued or granted (to report how long it
// waited); deadlines are checked in expireWaiters(now), which takes the time from the caller.
#pragma once

#include <chrono>

namespace sidecar::shm {

using ShmTimePoint = std::chrono::steady_clock::time_point;

class ShmClock {
 public:
  virtual ~ShmClock() = default;
  virtual ShmTimePoint now() const noexcept = 0;
};

class SteadyShmClock final : public ShmClock {
 public:
  ShmTimePoint now() const noexcept override { return std::chrono::steady_clock::now(); }
  static const SteadyShmClock& instance() noexcept {
    static const SteadyShmClock clock;
    return clock;
  }
};

// A clock that moves only when told to. Not thread-safe: tests drive it from the owner thread.
class ManualShmClock final : public ShmClock {
 public:
  ShmTimePoint now() const noexcept override { return now_; }
  void advance(std::chrono::milliseconds by) noexcept { now_ += by; }
  void set(ShmTimePoint to) noexcept { now_ = to; }

 private:
  ShmTimePoint now_{std::chrono::seconds(1000)};
};

}  // namespace sidecar::shm
