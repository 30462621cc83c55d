#pragma once
// The pause between two polls of a spin-wait (the daemon's spin window, a client's wait).
//
// sched_yield() lets another thread on this CPU run at once (a client sharing the daemon's CPU
// sends its next request instead of waiting for the spin window to end), but it is a system
// call: about 1 us on the VMs we measure, so a poll loop that yields every time sees its event
// up to a microsecond late. The pacer yields only while that buys something: a yield that came
// back slowly means another thread ran, so the next poll yields again; one that came back at
// once means nobody else wants this CPU, and the pacer only pauses (a CPU hint, nanoseconds)
// for kAloneYieldEveryNs before it asks again. A thread that becomes runnable meanwhile
// waits at most that long for the CPU (a woken one usually preempts the spinner anyway).

#include <sched.h>

#include <cstdint>

namespace sidecar {

class SpinPacer {
 public:
  // How long a spinner that found itself alone goes without yielding.
  static constexpr uint64_t kAloneYieldEveryNs = 20'000;
  // A yield that took longer than this ran another thread (a bare syscall takes 0.1-1.5 us).
  static constexpr uint64_t kYieldRanOtherNs = 4'000;

  // Between two polls; `nowNs` is the caller's CLOCK_MONOTONIC (it reads it anyway).
  template <typename Clock>
  void pause(uint64_t nowNs, Clock clock) {
    if (nowNs < nextYieldNs_) {
      cpuRelax();
      return;
    }
    sched_yield();
    uint64_t after = clock();
    nextYieldNs_ = after - nowNs > kYieldRanOtherNs ? after : after + kAloneYieldEveryNs;
  }

 private:
  static void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  uint64_t nextYieldNs_ = 0;
};

}  // namespace sidecar
