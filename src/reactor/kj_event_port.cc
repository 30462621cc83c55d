#include "reactor/kj_event_port.h"

#include <kj/time.h>

#include <limits>

#include "base/clock.h"

namespace sidecar::reactor {

KjEventPort::KjEventPort(Reactor& reactor, uint32_t spinUs)
    : reactor_(reactor), timer_(now()), spinNs_(uint64_t{spinUs} * 1000) {}

kj::TimePoint KjEventPort::now() const {
  return kj::origin<kj::TimePoint>() + monotonicNs() * kj::NANOSECONDS;
}

bool KjEventPort::collect(bool submit) {
  bool happened = reactor_.poll(submit);
  kj::TimePoint t = now();
  KJ_IF_MAYBE(next, timer_.nextEvent()) {
    if (*next <= t) happened = true;  // advanceTo() below fires it
  }
  timer_.advanceTo(t);
  return happened;
}

bool KjEventPort::poll() {
  collect(true);
  return reactor_.takeWake();
}

bool KjEventPort::wait() {
  // Without a spin window, new operations are submitted by the io_uring_enter that also waits:
  // one system call per sleep instead of two.
  bool submit = spinNs_ > 0;
  for (;;) {
    if (collect(submit)) {
      lastEventNs_ = monotonicNs();
      return reactor_.takeWake();
    }
    uint64_t t = monotonicNs();
    if (t - lastEventNs_ < spinNs_) {
      // Yields while a client shares this CPU (it gets to run and send the next request instead
      // of waiting for our spin window to end); alone on it, pauses without a system call.
      pacer_.pause(t, monotonicNs);
      continue;
    }
    break;
  }
  // Idle past the spin window: sleep in io_uring until a completion, a wake or the next timer.
  auto timeoutNs = timer_.timeoutToNextEvent(now(), kj::NANOSECONDS,
                                             std::numeric_limits<int64_t>::max());
  std::optional<uint64_t> timeout;
  KJ_IF_MAYBE(ns, timeoutNs) { timeout = *ns; }
  reactor_.sleep(timeout);
  timer_.advanceTo(now());
  lastEventNs_ = monotonicNs();
  return reactor_.takeWake();
}

}  // namespace sidecar::reactor
