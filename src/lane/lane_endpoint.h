#pragma once
// One side of a lane (shm/lane_ring.h) bound to the calling thread's reactor: it consumes its
// inbox ring as an event source (polled while the reactor spins, woken through the inbox's
// doorbell eventfd when it sleeps) and produces into its outbox ring, ringing the peer's doorbell
// only when the peer armed itself to sleep. The daemon's session and the client library each own
// one; what the records mean is theirs (schema/lane.capnp).

#include <kj/io.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "reactor/event_source.h"
#include "reactor/eventfd_source.h"
#include "reactor/reactor.h"
#include "shm/lane_ring.h"

namespace sidecar::lane {

class LaneEndpoint final : public reactor::EventSource {
 public:
  // A record as copied out of the inbox: `words` holds `size` bytes, 8-byte aligned.
  using OnRecord = std::function<void(const std::vector<uint64_t>& words, uint64_t size)>;
  // The peer broke the ring's format: the endpoint stops reading and writing.
  using OnBroken = std::function<void(const std::string& why)>;

  LaneEndpoint(reactor::Reactor& reactor, shm::LaneRing inbox, kj::AutoCloseFd inboxBell,
               shm::LaneRing outbox, kj::AutoCloseFd outboxBell, OnRecord onRecord,
               OnBroken onBroken);
  ~LaneEndpoint();
  LaneEndpoint(const LaneEndpoint&) = delete;
  LaneEndpoint& operator=(const LaneEndpoint&) = delete;

  // Appends a record to the outbox and wakes the peer if it sleeps. False when the outbox has no
  // room now, the record is over the ring's maximum, or the lane is broken.
  bool push(const void* bytes, uint64_t size);
  bool broken() const { return broken_; }
  // Records wait in the inbox (two loads of shared positions; what they hold is checked when
  // they are taken).
  bool recordsWaiting() const { return !broken_ && !inbox_.empty(); }
  // Stops reading and writing (the owner found the peer misbehaving).
  void shutDown() { broken_ = true; }
  const shm::LaneRing& outbox() const { return outbox_; }

  bool poll() override;
  bool arm() override;
  void disarm() override;

 private:
  bool drain();

  shm::LaneRing inbox_;
  shm::LaneRing outbox_;
  kj::AutoCloseFd outboxBell_;
  OnRecord onRecord_;
  OnBroken onBroken_;
  std::vector<uint64_t> record_;
  bool broken_ = false;
  bool draining_ = false;
  reactor::Reactor& reactor_;
  reactor::EventFdSource inboxBell_;  // last: its reads may still complete while the rest exists
};

}  // namespace sidecar::lane
