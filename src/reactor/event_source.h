#pragma once
// The contract every source of events that is not a plain ring operation implements: UCX workers,
// CUDA copy completions, mailboxes. The reactor spins on poll() while the core is busy and calls
// arm() before it sleeps in io_uring, so a source can switch from polling to a notification (an
// eventfd the ring watches) only when the core is about to sleep. Seastar's pollers follow the
// same shape (poll / try_enter_interrupt_mode / exit_interrupt_mode).

namespace sidecar::reactor {

class EventSource {
 public:
  // Does any ready work (delivers completions, runs callbacks) without blocking.
  // Returns true when it did something, which keeps the reactor from sleeping.
  virtual bool poll() = 0;

  // Called when the reactor wants to sleep. The source must make sure that new work wakes the
  // ring (e.g. by arming an eventfd notification whose read is pending in the ring).
  // Returns false when work is already pending and the reactor must poll again instead of
  // sleeping; in that case the source is not armed and disarm() is not called.
  virtual bool arm() = 0;

  // Called after the reactor woke up, for every source whose arm() returned true.
  virtual void disarm() = 0;

 protected:
  ~EventSource() = default;
};

}  // namespace sidecar::reactor
