#pragma once
// The cross-core mailbox: any thread posts a task, the owning reactor's thread runs it. A
// lock-free multi-producer list (one CAS per post) that the owner takes whole with one exchange
// and runs in posting order. Posting wakes the owner through Reactor::wake(), which coalesces
// wake-ups, so a burst of posts costs one eventfd write.
//
// Cost: one heap node per task. This is the control path (connection hand-off, shutdown,
// statistics); the data path passes pre-allocated objects instead.

#include <atomic>
#include <cstdint>
#include <functional>

#include "reactor/event_source.h"
#include "reactor/reactor.h"

namespace sidecar::reactor {

class Mailbox final : public EventSource {
 public:
  explicit Mailbox(Reactor& owner);
  ~Mailbox();  // runs nothing; drops (and destroys) tasks still queued
  Mailbox(const Mailbox&) = delete;
  Mailbox& operator=(const Mailbox&) = delete;

  // Thread-safe. The task runs on the owner's thread, inside its reactor's poll().
  void post(std::function<void()> task);

  uint64_t delivered() const { return delivered_; }

  bool poll() override;
  bool arm() override { return head_.load(std::memory_order_acquire) == nullptr; }
  void disarm() override {}

 private:
  struct Node {
    std::function<void()> task;
    Node* next;
  };
  Reactor& owner_;
  std::atomic<Node*> head_{nullptr};
  uint64_t delivered_ = 0;
};

}  // namespace sidecar::reactor
