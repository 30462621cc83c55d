#pragma once
// An eventfd as an event source: any thread (or a CUDA host function, or a signal handler) calls
// signal(); the owning reactor runs `onSignal` on its own thread. The eventfd's read is kept
// pending in the ring, so a signal wakes a sleeping reactor and costs a spinning one nothing extra.
// Several signals before the handler runs coalesce into one call, as with any eventfd.

#include <cstdint>
#include <functional>

#include "reactor/completion.h"
#include "reactor/event_source.h"
#include "reactor/reactor.h"

namespace sidecar::reactor {

class EventFdSource final : public EventSource, private Completion {
 public:
  EventFdSource(Reactor& reactor, std::function<void()> onSignal);
  // Adopts `eventFd`, an eventfd made elsewhere (e.g. passed by another process); closes it.
  EventFdSource(Reactor& reactor, int eventFd, std::function<void()> onSignal);
  ~EventFdSource();
  EventFdSource(const EventFdSource&) = delete;
  EventFdSource& operator=(const EventFdSource&) = delete;

  // Thread-safe and async-signal-safe.
  void signal() const;
  int fd() const { return fd_; }
  uint64_t handled() const { return handled_; }

  bool poll() override;
  bool arm() override;
  void disarm() override {}

 private:
  void complete(int32_t result, uint32_t cqeFlags) override;
  void submitRead();

  Reactor& reactor_;
  std::function<void()> onSignal_;
  int fd_;
  uint64_t buffer_ = 0;
  bool readPending_ = false;
  bool fired_ = false;
  bool closing_ = false;  // set by the destructor: a late CQE must not re-submit the read
  uint64_t handled_ = 0;
};

}  // namespace sidecar::reactor
