#pragma once
// A tensor body that is still being written into the arena by a GPU copy, piece by piece (issue 6,
// item 2: pipelining): says which prefix of it is final, so a cross-node delivery can put piece k
// on the network while piece k+1 is still being copied.
//
// Pieces may land out of order (the copy engine spreads them over several streams); the landed
// prefix is the longest run of landed bytes from the start. landed(n) resolves once the prefix
// reaches n; after fail() every pending and later landed() rejects with the copy's error. Owned
// and used on one thread (the owner core); no locks.

#include <kj/async.h>

#include <cstdint>
#include <map>
#include <optional>

namespace sidecar::daemon {

class LandingBody {
 public:
  explicit LandingBody(uint64_t sizeBytes) : sizeBytes_(sizeBytes) {}

  // Bytes [offsetBytes, offsetBytes + sizeBytes) of the body are final.
  void piece(uint64_t offsetBytes, uint64_t sizeBytes);
  // Every byte is final (the copy finished).
  void finish() { piece(0, sizeBytes_); }
  // The copy failed: nothing more will land.
  void fail(kj::Exception error);

  // Resolves once bytes [0, n) are final (at once if they are); rejects if the copy failed.
  kj::Promise<void> landed(uint64_t n);

  uint64_t prefixBytes() const { return prefix_; }
  size_t waiting() const { return waiters_.size(); }
  // Waiters released while part of the body had still not landed: the pieces that went on (to
  // the network) before the copy finished, i.e. the pipelining that happened.
  uint64_t releasedEarly() const { return releasedEarly_; }

 private:
  uint64_t sizeBytes_;
  uint64_t prefix_ = 0;
  std::map<uint64_t, uint64_t> ahead_;  // landed beyond the prefix: offset -> end
  std::multimap<uint64_t, kj::Own<kj::PromiseFulfiller<void>>> waiters_;  // by bytes awaited
  std::optional<kj::Exception> error_;
  uint64_t releasedEarly_ = 0;
};

}  // namespace sidecar::daemon
