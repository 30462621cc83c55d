#pragma once
// The client's wait: poll for a bounded time, then sleep.
//
// A client waits only while it expects an answer (a send's acknowledgement, a recv's data, a
// control reply), and most answers come within tens of microseconds. Sleeping in io_uring at
// once puts the wake-up of this thread on the critical path: 25-35 us when its CPU has gone idle
// on the virtual machines we measured (docs/PERFORMANCE.md), more than the round trip itself.
// Polling the ring first keeps the CPU busy, so the daemon's answer is picked up without that
// wake-up; after `spinUs` the thread sleeps as before, so a long recv costs at most `spinUs` of
// CPU per call.
//
// Between polls the thread yields while a process shares this CPU (the other rank, or the
// daemon's core), so that it runs at once instead of waiting for the window to end; alone on the
// CPU it pauses without a system call (base/spin_pacer.h).
//
// Cost per poll: a KJ turn, a peek at the completion queue (no system call unless there is
// something to submit), a clock read, and a CPU pause or (at most every 20 us when alone) a
// sched_yield().

#include <kj/async.h>
#include <sched.h>

#include <cstdint>

#include "base/clock.h"
#include "base/spin_pacer.h"

namespace sidecar::client {

// Largest accepted RankConfig::waitSpinUs: beyond 10 ms a busy wait is a bug, not a tuning.
constexpr uint32_t kWaitSpinUsMax = 10'000;

// Runs the event loop until `promise` is ready or `spinUs` passed, then waits for it (sleeping).
template <typename T>
T spinThenWait(kj::Promise<T>&& promise, kj::WaitScope& waitScope, uint32_t spinUs) {
  if (spinUs > 0) {
    uint64_t endNs = monotonicNs() + uint64_t{spinUs} * 1000;
    SpinPacer pacer;
    for (;;) {
      if (promise.poll(waitScope)) break;
      uint64_t t = monotonicNs();
      if (t >= endNs) break;
      pacer.pause(t, monotonicNs);
    }
  }
  return promise.wait(waitScope);
}

}  // namespace sidecar::client
