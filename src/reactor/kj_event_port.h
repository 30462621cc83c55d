#pragma once
// Runs KJ's event loop (and so Cap'n Proto RPC) on a Reactor: the bridge between KJ promises and
// io_uring. This is the one place a reactor thread sleeps.
//
// Spin-then-sleep: after the last event the port keeps polling the ring for `spinUs` before it
// sleeps in io_uring. Waking a sleeping CPU costs 25-35 us on these machines, far more than a
// request round trip, so a core that is busy stays hot; an idle core sleeps (no CPU use) once the
// spin window has passed. spinUs = 0 sleeps at once.

#include <kj/async.h>
#include <kj/timer.h>

#include <cstdint>

#include "base/spin_pacer.h"
#include "reactor/reactor.h"

namespace sidecar::reactor {

class KjEventPort final : public kj::EventPort {
 public:
  KjEventPort(Reactor& reactor, uint32_t spinUs);

  // The timer that KJ code on this thread uses (kj::Timer::afterDelay etc.).
  kj::Timer& timer() { return timer_; }
  Reactor& reactor() { return reactor_; }

  bool wait() override;
  bool poll() override;
  void wake() const override { reactor_.wake(); }

 private:
  kj::TimePoint now() const;
  // Polls the reactor and fires due timers; true when anything happened.
  bool collect(bool submit);

  Reactor& reactor_;
  kj::TimerImpl timer_;
  uint64_t spinNs_;
  uint64_t lastEventNs_ = 0;
  SpinPacer pacer_;
};

// A reactor, its port and a KJ event loop for the calling thread, bundled: what every reactor
// thread (and every test) sets up first.
class ReactorLoop {
 public:
  explicit ReactorLoop(ReactorOptions options = {}, uint32_t spinUs = 0)
      : reactor_(options), port_(reactor_, spinUs), loop_(port_), waitScope_(loop_) {}

  Reactor& reactor() { return reactor_; }
  KjEventPort& port() { return port_; }
  kj::Timer& timer() { return port_.timer(); }
  kj::WaitScope& waitScope() { return waitScope_; }
  kj::EventLoop& loop() { return loop_; }

 private:
  Reactor reactor_;
  KjEventPort port_;
  kj::EventLoop loop_;
  kj::WaitScope waitScope_;
};

}  // namespace sidecar::reactor
