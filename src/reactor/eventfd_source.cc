#include "reactor/eventfd_source.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

#include "base/check.h"

namespace sidecar::reactor {

EventFdSource::EventFdSource(Reactor& reactor, std::function<void()> onSignal)
    : EventFdSource(reactor, eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), std::move(onSignal)) {}

EventFdSource::EventFdSource(Reactor& reactor, int eventFd, std::function<void()> onSignal)
    : reactor_(reactor), onSignal_(std::move(onSignal)), fd_(eventFd) {
  SIDECAR_CHECK(fd_ >= 0, "eventfd: errno %d", errno);
  submitRead();
  reactor_.addSource(*this);
}

EventFdSource::~EventFdSource() {
  reactor_.removeSource(*this);
  closing_ = true;
  if (readPending_) {
    reactor_.cancel(this);
    // The CQE of the cancelled read must be consumed while this object still exists.
    while (readPending_) reactor_.poll();
  }
  close(fd_);
}

void EventFdSource::signal() const {
  uint64_t one = 1;
  // EAGAIN only when the counter would overflow, i.e. signals are already pending.
  [[maybe_unused]] ssize_t n = ::write(fd_, &one, sizeof one);
}

void EventFdSource::submitRead() {
  io_uring_sqe& sqe = reactor_.prepare(this);
  io_uring_prep_read(&sqe, fd_, &buffer_, sizeof buffer_, 0);
  readPending_ = true;
}

void EventFdSource::complete(int32_t result, uint32_t) {
  readPending_ = false;
  // While closing, the read may have completed before the cancel reached it: re-submitting it
  // would leave the destructor polling forever for a read nobody completes.
  if (result == -ECANCELED || closing_) return;
  SIDECAR_CHECK(result == sizeof(uint64_t) || result == -EAGAIN || result == -EINTR,
                "eventfd read: %d", result);
  if (result > 0) fired_ = true;
  submitRead();
}

bool EventFdSource::poll() {
  if (!fired_) return false;
  fired_ = false;
  // Consume signals that arrived after the ring's read took the counter: they happened before
  // this handler runs, so this call covers them (signals coalesce), instead of a second call.
  // Signals after this read complete the pending ring read as usual.
  uint64_t pending;
  [[maybe_unused]] ssize_t n = ::read(fd_, &pending, sizeof pending);
  handled_++;
  onSignal_();
  return true;
}

bool EventFdSource::arm() {
  if (fired_) return false;
  if (!readPending_) submitRead();
  return true;
}

}  // namespace sidecar::reactor
