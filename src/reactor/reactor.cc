#include "reactor/reactor.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>

#include "base/check.h"
#include "base/hop_trace.h"

namespace sidecar::reactor {

// The eventfd read that is always pending in the ring. Its CQE only says "look at
// wakeRequested_"; the flag, not the counter value, carries the information.
class Reactor::WakeCompletion final : public Completion {
 public:
  explicit WakeCompletion(Reactor& reactor) : reactor_(reactor) {}
  void complete(int32_t result, uint32_t) override {
    pending = false;
    if (!reactor_.stopping_) reactor_.armWakeRead();
  }
  Reactor& reactor_;
  uint64_t buffer = 0;
  bool pending = false;
};

Reactor::Reactor(ReactorOptions options) {
  io_uring_params params{};
  // The CQ is twice the SQ so that a full batch of submissions plus the multishot operations'
  // extra completions fit without overflow. IORING_SETUP_SUBMIT_ALL keeps submitting the batch
  // when one SQE fails early, so unrelated operations are never dropped.
  params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
  params.cq_entries = options.ringEntries * 2;
  int rc = -EINVAL;
  // A diagnostic switch (A/B measurements, or a kernel whose DEFER_TASKRUN misbehaves).
  if (const char* env = getenv("SIDECAR_IO_URING_DEFER_TASKRUN"); env != nullptr && env[0] == '0') {
    options.deferTaskrun = false;
  }
  if (options.deferTaskrun) {
    // Completions of socket operations are finished by "task work" on this thread. By default the
    // kernel interrupts the thread for it (an IPI when it runs on another CPU, a VM exit on these
    // hosts), even while it spins and would look anyway. DEFER_TASKRUN runs that work only when
    // we enter the ring to collect completions; TASKRUN_FLAG tells us (through the SQ flags, which
    // liburing's peek reads) when there is some, so a poll enters the kernel only then.
    io_uring_params deferred = params;
    deferred.flags |=
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    rc = io_uring_queue_init_params(options.ringEntries, &ring_, &deferred);
    deferTaskrun_ = rc == 0;
  }
  // Kernels before 6.1 refuse DEFER_TASKRUN with -EINVAL: run with the default task work.
  if (rc == -EINVAL) rc = io_uring_queue_init_params(options.ringEntries, &ring_, &params);
  SIDECAR_CHECK(rc == 0, "io_uring_queue_init_params(%u): %d (is io_uring disabled? see "
                         "/proc/sys/kernel/io_uring_disabled)", options.ringEntries, rc);
  wakeFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  SIDECAR_CHECK(wakeFd_ >= 0, "eventfd: errno %d", errno);
  wakeCompletion_ = new WakeCompletion(*this);
  armWakeRead();
}

Reactor::~Reactor() {
  stopping_ = true;
  if (wakeCompletion_->pending) cancel(wakeCompletion_);
  // Drain whatever the kernel still reports, so no completion outlives the ring unseen.
  io_uring_submit(&ring_);
  dispatchCompletions();
  io_uring_queue_exit(&ring_);
  delete wakeCompletion_;
  close(wakeFd_);
}

io_uring_sqe& Reactor::prepare(Completion* completion) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    ReactorStats::bump(stats_.submits);
    SIDECAR_CHECK_SYSCALL(io_uring_submit(&ring_));
    sqe = io_uring_get_sqe(&ring_);
    SIDECAR_CHECK(sqe != nullptr, "no SQE after submitting the full queue");
  }
  io_uring_prep_nop(sqe);
  io_uring_sqe_set_data(sqe, completion);
  return *sqe;
}

void Reactor::cancel(Completion* completion) {
  io_uring_sync_cancel_reg reg{};
  reg.addr = reinterpret_cast<uint64_t>(completion);
  reg.fd = -1;
  reg.flags = IORING_ASYNC_CANCEL_ALL;
  reg.timeout.tv_sec = -1;
  reg.timeout.tv_nsec = -1;
  // The operation may still sit unsubmitted in the SQ: submit first so the kernel knows it.
  if (io_uring_sq_ready(&ring_) > 0) io_uring_submit(&ring_);
  int rc = io_uring_register_sync_cancel(&ring_, &reg);
  // -ENOENT: it already completed (its CQE is in the ring); -EALREADY cannot happen with a
  // sync cancel. Anything else means the kernel lacks sync cancel (older than 6.0).
  SIDECAR_CHECK(rc >= 0 || rc == -ENOENT, "io_uring sync cancel: %d", rc);
}

void Reactor::queueFlush(Flushable& flushable) {
  if (flushable.flushQueued_) return;
  flushable.flushQueued_ = true;
  flushes_.push_back(&flushable);
}

void Reactor::cancelFlush(Flushable& flushable) {
  if (!flushable.flushQueued_) return;
  flushable.flushQueued_ = false;
  flushes_.erase(std::remove(flushes_.begin(), flushes_.end(), &flushable), flushes_.end());
  // A flush() in progress skips it too (it checks flushQueued_ before calling).
}

void Reactor::flush() {
  // A flush may queue again (or cancel another): work on a copy, and call only those still queued.
  if (flushes_.empty()) return;
  flushing_.swap(flushes_);
  for (size_t i = 0; i < flushing_.size(); ++i) {
    Flushable* f = flushing_[i];
    if (!f->flushQueued_) continue;
    f->flushQueued_ = false;
    f->flush();
  }
  flushing_.clear();
}

void Reactor::addSource(EventSource& source) { sources_.push_back(&source); }

void Reactor::removeSource(EventSource& source) {
  sources_.erase(std::remove(sources_.begin(), sources_.end(), &source), sources_.end());
  armed_.erase(std::remove(armed_.begin(), armed_.end(), &source), armed_.end());
}

void Reactor::armWakeRead() {
  io_uring_sqe& sqe = prepare(wakeCompletion_);
  io_uring_prep_read(&sqe, wakeFd_, &wakeCompletion_->buffer, sizeof(uint64_t), 0);
  wakeCompletion_->pending = true;
}

bool Reactor::dispatchCompletions() {
  // Completions may prepare new operations (re-arming reads); they are submitted on the next
  // turn, so this loop never enters the kernel.
  unsigned dispatched = 0;
  io_uring_cqe* cqe;
  while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
    auto* completion = static_cast<Completion*>(io_uring_cqe_get_data(cqe));
    int32_t result = cqe->res;
    uint32_t flags = cqe->flags;
    io_uring_cqe_seen(&ring_, cqe);
    ++dispatched;
    if (completion != nullptr) completion->complete(result, flags);
  }
  if (dispatched > 0) ReactorStats::bump(stats_.completions, dispatched);
  return dispatched > 0;
}

bool Reactor::poll(bool submit) {
  flush();
  bool didWork = false;
  if (submit && io_uring_sq_ready(&ring_) > 0) {
    ReactorStats::bump(stats_.submits);
    SIDECAR_CHECK_SYSCALL(io_uring_submit(&ring_));
  }
  didWork |= dispatchCompletions();
  // By index, not by iterator: a source's poll() may add or remove sources (a mailbox task that
  // creates or destroys an EventFdSource), which would invalidate iterators or leave the loop
  // calling a destroyed source.
  for (size_t i = 0; i < sources_.size(); ++i) didWork |= sources_[i]->poll();
  didWork |= wakeRequested_.load(std::memory_order_acquire);
  return didWork;
}

void Reactor::sleep(std::optional<uint64_t> timeoutNs) {
  flush();
  bool allArmed = true;
  for (EventSource* source : sources_) {
    if (source->arm()) {
      armed_.push_back(source);
    } else {
      allArmed = false;
      break;
    }
  }
  // A wake() that raced with arming is seen here: its eventfd write may have happened before the
  // read was pending, so we must not sleep on it.
  if (wakeRequested_.load(std::memory_order_acquire)) allArmed = false;

  if (allArmed && io_uring_cq_ready(&ring_) == 0) {
    __kernel_timespec ts{};
    __kernel_timespec* tsp = nullptr;
    if (timeoutNs) {
      ts.tv_sec = static_cast<long long>(*timeoutNs / 1'000'000'000u);
      ts.tv_nsec = static_cast<long long>(*timeoutNs % 1'000'000'000u);
      tsp = &ts;
    }
    io_uring_cqe* cqe = nullptr;
    ReactorStats::bump(stats_.sleeps);
    hop::mark(hop::Point::kSleeping);
    int rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, tsp, nullptr);
    // -ETIME: the timeout passed; -EINTR: a signal (the daemon's signal handling runs elsewhere).
    hop::mark(hop::Point::kWoke);
    SIDECAR_CHECK(rc >= 0 || rc == -ETIME || rc == -EINTR || rc == -EBUSY,
                  "io_uring_submit_and_wait_timeout: %d", rc);
  } else if (io_uring_sq_ready(&ring_) > 0) {
    ReactorStats::bump(stats_.submits);
    SIDECAR_CHECK_SYSCALL(io_uring_submit(&ring_));
  }
  for (EventSource* source : armed_) source->disarm();
  armed_.clear();
  dispatchCompletions();
}

void Reactor::wake() const {
  if (!wakeRequested_.exchange(true, std::memory_order_acq_rel)) {
    uint64_t one = 1;
    ssize_t n = ::write(wakeFd_, &one, sizeof one);
    SIDECAR_CHECK(n == sizeof one || errno == EAGAIN, "eventfd write: errno %d", errno);
  }
}

bool Reactor::takeWake() { return wakeRequested_.exchange(false, std::memory_order_acq_rel); }

}  // namespace sidecar::reactor
