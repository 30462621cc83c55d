#pragma once
// One io_uring per core, driven by one thread. The ring is the only place the thread sleeps
// (io_uring_submit_and_wait_timeout); there is no epoll anywhere. Operations are prepared with
// prepare(), which hands out an SQE whose user_data is the caller-owned Completion; the SQEs are
// submitted in a batch the next time the reactor polls or sleeps, so the kernel is entered once per
// turn of the loop, not once per operation.
//
// Threading: everything but wake() must be called on the thread that owns the reactor.

#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "reactor/completion.h"
#include "reactor/event_source.h"

namespace sidecar::reactor {

// Output buffered during a run of the event loop (UringStream coalesces the messages written in
// one run into one sendmsg). The reactor calls flush() before it polls or sleeps, so nothing stays
// buffered while the thread waits.
class Flushable {
 public:
  virtual void flush() = 0;

 protected:
  ~Flushable() = default;

 private:
  friend class Reactor;
  bool flushQueued_ = false;
};

struct ReactorOptions {
  unsigned ringEntries = 256;  // SQ size; the CQ is twice that. Power of two.
  // IORING_SETUP_DEFER_TASKRUN (kernel 6.1+; silently off before): no interrupts for completed
  // socket operations; they are collected when the reactor polls or sleeps. Only for a reactor
  // that is created, driven and destroyed by one thread (the daemon's cores, libsidecar's
  // per-thread loop), never touched by a forked child: the kernel refuses submissions from any
  // other thread. $SIDECAR_IO_URING_DEFER_TASKRUN=0 turns it off everywhere.
  bool deferTaskrun = false;
};

// Counters written only by the owning thread and readable from any thread (statistics for
// `info`). Relaxed atomics written with load+store: a plain add on x86, no locked instruction.
struct ReactorStats {
  std::atomic<uint64_t> sleeps{0};       // times the thread slept in io_uring
  std::atomic<uint64_t> completions{0};  // CQEs dispatched
  std::atomic<uint64_t> submits{0};      // io_uring_enter calls made to submit

  static void bump(std::atomic<uint64_t>& counter, uint64_t by = 1) {
    counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
  }
};

class Reactor {
 public:
  explicit Reactor(ReactorOptions options = {});
  ~Reactor();
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;

  // An SQE to fill in for one operation that reports to `completion` (nullptr: nobody is told).
  // When the submission queue is full, pending SQEs are submitted first. The SQE is zeroed except
  // for user_data; fill it with io_uring_prep_*() and then call setCompletion() again if the prep
  // helper overwrote user_data (the liburing prep helpers do not).
  io_uring_sqe& prepare(Completion* completion);

  // Asks the kernel to cancel the operation reporting to `completion`, and waits until it has
  // stopped touching its buffers (IORING_REGISTER_SYNC_CANCEL, kernel 6.0+). The completion is still
  // called afterwards (with -ECANCELED or its real result), so it must stay alive until then.
  void cancel(Completion* completion);

  // Has `flushable` flushed before the next poll or sleep (once, however often it is queued).
  // A Flushable that goes away while queued must call cancelFlush() first.
  void queueFlush(Flushable& flushable);
  void cancelFlush(Flushable& flushable);
  // Flushes what is queued now (poll() and sleep() start with this).
  void flush();

  void addSource(EventSource& source);
  void removeSource(EventSource& source);

  // Submits what is prepared (unless `submit` is false), dispatches every available CQE and
  // polls every source, without sleeping. Returns true when anything happened. A caller about to
  // sleep() passes submit = false: sleep() submits and waits in one io_uring_enter.
  bool poll(bool submit = true);

  // Arms the sources and sleeps in io_uring until at least one CQE arrives, wake() is called, or
  // `timeoutNs` passes (nullopt: no limit); then dispatches what arrived. If a source refuses to
  // arm, polls instead of sleeping.
  void sleep(std::optional<uint64_t> timeoutNs);

  // Wakes the reactor's thread from any thread. Cheap when called repeatedly before the thread
  // notices: one eventfd write per sleep at most.
  void wake() const;

  // True once per wake(): tells the caller (the KJ event port) that a cross-thread wake happened.
  bool takeWake();

  const ReactorStats& stats() const { return stats_; }
  int ringFd() const { return ring_.ring_fd; }
  // Whether the ring runs with IORING_SETUP_DEFER_TASKRUN (ReactorOptions::deferTaskrun).
  bool deferTaskrun() const { return deferTaskrun_; }

 private:
  class WakeCompletion;
  bool dispatchCompletions();
  void armWakeRead();

  io_uring ring_;
  std::vector<Flushable*> flushes_;
  std::vector<Flushable*> flushing_;  // flush()'s working copy, kept to reuse its capacity
  std::vector<EventSource*> sources_;
  std::vector<EventSource*> armed_;
  ReactorStats stats_;

  // Cross-thread wake-up: an eventfd whose read is always pending in the ring. wakeRequested_
  // turns repeated wake() calls into one eventfd write, and lets a spinning reactor notice a wake
  // without waiting for the eventfd's CQE.
  int wakeFd_ = -1;
  mutable std::atomic<bool> wakeRequested_{false};
  WakeCompletion* wakeCompletion_ = nullptr;
  bool stopping_ = false;
  bool deferTaskrun_ = false;
};

}  // namespace sidecar::reactor
