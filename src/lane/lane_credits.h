#pragma once
// A lane's credits (docs/LANES.md, "Credits"): the completion-ring room each request reserves for
// its largest answer. The client takes credit before it pushes a request and makes a call when
// there is none; the daemon keeps the same account, so a client that ignores its credits (and
// could make the daemon hold unbounded work, or answers it cannot write) is caught at once.
//
// Why the capacity is the ring less one largest record: completions are pushed in any order, each
// framed; between the records waiting to be read there is at most one wrap's padding, shorter
// than the largest record. So reservations that add up to the capacity always leave room.

#include <cstdint>

#include "shm/lane_ring.h"

namespace sidecar::lane {

class LaneCredits {
 public:
  // `smallBytes`: the largest answer of a send or markDone (schema laneCompletionBytes); a recv's
  // may carry an object of `objectMaxBytes` more.
  LaneCredits(uint64_t ringBytes, uint64_t objectMaxBytes, uint64_t smallBytes)
      : small_(framed(smallBytes)), recv_(framed(objectMaxBytes + smallBytes)) {
    capacity_ = ringBytes > 2 * recv_ ? ringBytes - recv_ : 0;
  }

  uint64_t reservation(bool recv) const { return recv ? recv_ : small_; }
  // Takes `bytes` of credit; false (and nothing taken) when there is not that much left.
  bool take(uint64_t bytes) {
    if (reserved_ + bytes > capacity_) return false;
    reserved_ += bytes;
    return true;
  }
  void give(uint64_t bytes) { reserved_ -= bytes <= reserved_ ? bytes : reserved_; }
  void reset() { reserved_ = 0; }

 private:
  static uint64_t framed(uint64_t bytes) { return shm::LaneRing::kFrameBytes + ((bytes + 7) & ~uint64_t{7}); }

  uint64_t small_, recv_, capacity_ = 0, reserved_ = 0;
};

}  // namespace sidecar::lane
