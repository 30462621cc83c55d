#pragma once
// The client's side of its session's lane (docs/LANES.md): send, recv and markDone travel as
// records in shared memory instead of Cap'n Proto calls. Each request reserves room for its
// largest completion before it goes out, so the daemon can always answer; when the lane has no
// room (or is closed) request() returns null and the caller makes the call instead, which means
// the same to the daemon.

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/async.h>
#include <kj/io.h>

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "lane/lane_credits.h"
#include "lane/lane_endpoint.h"
#include "shm/lane_ring.h"
#include "sidecar.capnp.h"

namespace sidecar::client {

// A completion as received: the copied record and its reader.
class LaneAnswer {
 public:
  LaneAnswer(std::vector<uint64_t> words, uint64_t size);
  proto::LaneCompletion::Reader get() { return reader_.getRoot<proto::LaneCompletion>(); }

 private:
  std::vector<uint64_t> words_;
  capnp::FlatArrayMessageReader reader_;
};

class LaneClient {
 public:
  LaneClient(reactor::Reactor& reactor, shm::LaneMemory memory, kj::AutoCloseFd requestBell,
             kj::AutoCloseFd completionBell, uint32_t objectMaxBytes);
  ~LaneClient();

  // Sends the LaneRequest in `message` (its seq is set here). `recv`: the answer may carry an
  // object of up to objectMaxBytes(). Null when the lane cannot take it now: make the call.
  // The promise rejects with the daemon's "[kind] message" for a failed request, or with
  // `failAll`'s exception.
  // `seq`, when given, gets the request's seq (for cancel()).
  kj::Maybe<kj::Promise<kj::Own<LaneAnswer>>> request(capnp::MallocMessageBuilder& message, bool recv,
                                                      uint64_t* seq = nullptr);

  // The recv request `recvSeq` lost its caller (its handle was dropped): if it is still waiting,
  // asks the daemon to withdraw it, which answers it [cancelled] and so frees its credits on
  // both sides (a waiting recv holds ~17 KiB of them until its data or timeout). Best effort:
  // nothing when the lane has no room for the request.
  void cancel(uint64_t recvSeq);

  // A blocking wait for the answer of request `seq` that bypasses KJ (the latency path of a
  // blocking recv): spins on the completion ring for up to `spinUs`, taking every record as the
  // reactor would, and returns the answer once it is there, failed or not, with its credits
  // returned and its promise left unfulfilled (the caller drops it). Null when the request is not
  // pending any more (its promise has the answer), when the answer is "use a call" (the promise
  // makes the call), after `spinUs`, or when the lane failed: the promise then carries the
  // outcome as usual. When an answer is returned, the promise resolves
  // to a null answer: drop it. Other events (calls, timers) wait until this returns.
  kj::Maybe<kj::Own<LaneAnswer>> awaitAnswer(uint64_t seq, uint32_t spinUs);

  // Rejects every pending request (the connection broke) and takes no more.
  void failAll(const kj::Exception& exception);

  uint32_t objectMaxBytes() const { return objectMaxBytes_; }

  // Reads this lane, or null once it is destroyed: for callbacks that may outlive it (a
  // dropped recv's cancel runs when its promise goes, perhaps after the Sidecar's lane).
  std::shared_ptr<LaneClient* const> self() const { return self_; }

 private:
  struct Pending {
    kj::Own<kj::PromiseFulfiller<kj::Own<LaneAnswer>>> fulfiller;
    uint64_t reservedBytes;
  };
  void onCompletion(const std::vector<uint64_t>& words, uint64_t size);

  shm::LaneMemory memory_;
  std::shared_ptr<LaneClient*> self_ = std::make_shared<LaneClient*>(this);
  uint32_t objectMaxBytes_;
  uint64_t nextSeq_ = 1;
  bool closed_ = false;
  uint64_t claimedSeq_ = 0;          // awaitAnswer's request: its answer is parked, not fulfilled
  kj::Own<LaneAnswer> claimedAnswer_;
  std::unordered_map<uint64_t, Pending> pending_;
  lane::LaneEndpoint endpoint_;
  lane::LaneCredits credits_;
};

}  // namespace sidecar::client
