#include "daemon/landing_body.h"

#include <algorithm>

namespace sidecar::daemon {

void LandingBody::piece(uint64_t offsetBytes, uint64_t sizeBytes) {
  if (error_ || sizeBytes == 0) return;
  uint64_t end = std::min(offsetBytes + sizeBytes, sizeBytes_);
  if (offsetBytes > prefix_) {
    uint64_t& known = ahead_[offsetBytes];
    known = std::max(known, end);
    return;
  }
  prefix_ = std::max(prefix_, end);
  // Pieces that landed earlier beyond the old prefix may now join it.
  for (auto it = ahead_.begin(); it != ahead_.end() && it->first <= prefix_;) {
    prefix_ = std::max(prefix_, it->second);
    it = ahead_.erase(it);
  }
  while (!waiters_.empty() && waiters_.begin()->first <= prefix_) {
    auto fulfiller = kj::mv(waiters_.begin()->second);
    waiters_.erase(waiters_.begin());
    if (prefix_ < sizeBytes_) ++releasedEarly_;
    fulfiller->fulfill();
  }
}

void LandingBody::fail(kj::Exception error) {
  if (error_) return;
  error_.emplace(kj::mv(error));
  auto waiters = kj::mv(waiters_);
  waiters_.clear();
  for (auto& [bytes, fulfiller] : waiters) fulfiller->reject(kj::cp(*error_));
}

kj::Promise<void> LandingBody::landed(uint64_t n) {
  if (error_) return kj::cp(*error_);
  if (std::min(n, sizeBytes_) <= prefix_) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  waiters_.emplace(std::min(n, sizeBytes_), kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

}  // namespace sidecar::daemon
