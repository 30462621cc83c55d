#include "lane/lane_endpoint.h"

#include <unistd.h>

namespace sidecar::lane {

LaneEndpoint::LaneEndpoint(reactor::Reactor& reactor, shm::LaneRing inbox, kj::AutoCloseFd inboxBell,
                           shm::LaneRing outbox, kj::AutoCloseFd outboxBell, OnRecord onRecord,
                           OnBroken onBroken)
    : inbox_(inbox),
      outbox_(outbox),
      outboxBell_(kj::mv(outboxBell)),
      onRecord_(std::move(onRecord)),
      onBroken_(std::move(onBroken)),
      reactor_(reactor),
      inboxBell_(reactor, inboxBell.release(), [this]() { drain(); }) {
  reactor_.addSource(*this);
}

LaneEndpoint::~LaneEndpoint() { reactor_.removeSource(*this); }

bool LaneEndpoint::push(const void* bytes, uint64_t size) {
  if (broken_ || !outbox_.tryPush(bytes, size)) return false;
  if (outbox_.takeDoorbell()) {
    uint64_t one = 1;
    // EAGAIN only when the counter would overflow: the peer has wake-ups pending anyway.
    [[maybe_unused]] ssize_t n = ::write(outboxBell_.get(), &one, sizeof one);
  }
  return true;
}

bool LaneEndpoint::drain() {
  // A handler may push (and so never re-enter here), but it may also destroy nothing of ours:
  // the owner destroys the endpoint only outside its callbacks.
  if (broken_ || draining_) return false;
  draining_ = true;
  bool any = false;
  for (;;) {
    uint64_t size = 0;
    std::string why;
    auto result = inbox_.tryPop(record_, size, &why);
    if (result == shm::LaneRing::Pop::kEmpty) break;
    if (result == shm::LaneRing::Pop::kCorrupt) {
      broken_ = true;
      draining_ = false;
      onBroken_(why);
      return true;
    }
    any = true;
    onRecord_(record_, size);
    if (broken_) break;  // the owner shut the lane down: read nothing more
  }
  draining_ = false;
  return any;
}

bool LaneEndpoint::poll() { return drain(); }

bool LaneEndpoint::arm() {
  if (broken_) return true;  // nothing more will come: sleep
  return inbox_.arm();
}

void LaneEndpoint::disarm() {
  if (!broken_) inbox_.disarm();
}

}  // namespace sidecar::lane
