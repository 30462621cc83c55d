#pragma once
// What the RPC services need from the node's transfer machinery. The daemon implements it on the
// core that owns the arena's allocator and the transfer table; every method may be called from any
// core's event loop and answers there. Failures are kj exceptions whose description starts with
// "[kind] " (see schema/sidecar.capnp), made by transferError().

#include <kj/async.h>
#include <kj/exception.h>
#include <kj/function.h>

#include <cstdint>
#include <functional>
#include <string>
#include <variant>
#include <vector>

#include "transfer/transfer_table.h"

namespace sidecar::rpc {

struct RankRegistration {
  transfer::Rank rank = 0;
  transfer::Group group;
  uint64_t sendHintBytes = 0;  // unit of allocation for this rank's sends
  uint64_t recvHintBytes = 0;
  bool concurrentCopy = false;
  int32_t peerPid = 0;  // the client's process (SO_PEERCRED); 0 when unknown
};

struct TensorDescriptor {
  transfer::Dtype dtype = transfer::Dtype::kUint8;
  std::vector<int64_t> shape;
  uint64_t offset = 0;
  uint64_t sizeBytes = 0;
};

struct SendRequest {
  std::string dataId;
  uint32_t chunkId = 0;
  uint32_t numChunks = 1;
  std::vector<transfer::Group> destinations;
  std::variant<TensorDescriptor, transfer::ObjectChunk> payload;
  // Non-zero: the client already put this chunk on the wire to its node itself, as deliver
  // message `directSeq` on link `directLink` (LaneRequest.send; docs/PROTOCOL.md, "Direct sends").
  uint32_t directLink = 0;
  uint32_t directSeq = 0;
};

// Session.directRoute's answer: where the session may send small deliveries for a set of
// destinations itself. `none` empty: the route is given.
struct DirectRoute {
  std::string none;
  std::string workerAddress;  // the remote daemon's UCX worker
  uint64_t deliverTag = 0;
  uint32_t linkSerial = 0;
  uint32_t seqBase = 0;
  uint32_t seqCount = 0;
  uint64_t messageMaxBytes = 0;
  uint32_t retryMs = 0;
};

using RecvReply = std::variant<TensorDescriptor, transfer::ObjectChunk, transfer::EndOfStream>;

struct RankSummary {
  transfer::Rank rank = 0;
  transfer::Group group;
  uint64_t bytesAllocated = 0;  // allocated, not yet sent
  uint64_t bytesHeld = 0;       // received data its group has not marked done
};

struct PeerLinkSummary {
  bool outgoing = false;
  std::string nodeId;
  std::string address;
  uint64_t incarnation = 0;
  bool up = false;
  std::string bodies;
  uint64_t chunks = 0;
  uint64_t bytes = 0;
  uint64_t directChunks = 0;  // of `chunks`, those the sending clients sent themselves
};

struct TransferSummary {
  std::vector<std::string> dataIds;
  transfer::TransferStats stats;
  std::vector<RankSummary> ranks;
  std::vector<PeerLinkSummary> peers;
};

using SessionId = uint64_t;

// A tensor whose bytes are still being written into its allocation (a GPU copy, issue 6).
struct Landing {
  // Resolves once bytes [0, n) of the tensor are final; rejects if the copy failed.
  std::function<kj::Promise<void>(uint64_t n)> landed;
  // A new promise that resolves (never rejects) once nothing writes into the allocation any more.
  std::function<kj::Promise<void>()> finished;
};

class TransferBackend {
 public:
  virtual kj::Promise<SessionId> registerRank(RankRegistration registration) = 0;
  // Fire and forget, from any thread: the session's rank is gone (client closed or died).
  virtual void unregister(SessionId session) = 0;

  virtual kj::Promise<shm::Allocation> allocate(SessionId session, uint64_t sizeBytes,
                                                uint32_t timeoutMs) = 0;
  virtual kj::Promise<void> release(SessionId session, uint64_t offset) = 0;
  virtual kj::Promise<void> send(SessionId session, SendRequest request) = 0;
  // As send() for a tensor that is still landing: resolves as send() would. Takes the allocation
  // in every case: on failure it is released once `landing.finished` resolved. By default it
  // waits for the whole tensor, then sends; the daemon forwards pieces to other nodes as they land.
  virtual kj::Promise<void> sendLanding(SessionId session, SendRequest request, Landing landing);
  virtual kj::Promise<void> closeStream(SessionId session, std::string dataId, uint32_t numChunks,
                                        std::vector<transfer::Group> destinations) = 0;
  virtual kj::Promise<RecvReply> recv(SessionId session, std::string dataId, uint32_t chunkId,
                                      uint32_t timeoutMs) = 0;
  virtual kj::Promise<void> markDone(SessionId session, std::string dataId, uint32_t chunkId) = 0;

  // recv() answered through a callback instead of a promise's continuations (the lane's path):
  // `answer` runs exactly once, on the calling thread, with the reply or with the failure (the
  // other null), unless the returned promise is dropped first, which withdraws the recv. Called
  // on the core that owns the transfers, the answer runs inside the store of the chunk it
  // waited for, so it leaves in that very turn (a promise's continuations take two more). The
  // promise resolves once `answer` ran. By default: recv() and a continuation.
  using RecvAnswer = kj::Function<void(kj::Maybe<RecvReply&> reply, const kj::Exception* failure)>;
  virtual kj::Promise<void> recvInto(SessionId session, std::string dataId, uint32_t chunkId,
                                     uint32_t timeoutMs, RecvAnswer answer);

  // Session.directRoute. By default none: this daemon forwards every chunk itself.
  virtual kj::Promise<DirectRoute> directRoute(SessionId session,
                                               std::vector<transfer::Group> destinations, bool renew);

  virtual kj::Promise<TransferSummary> summary() = 0;
  virtual kj::Promise<std::string> inspect(std::string dataId) = 0;

  virtual int arenaFd() const = 0;
  virtual uint64_t arenaBytes() const = 0;
  // Where the arena is mapped in this process (the daemon copies inline tensors there).
  virtual std::byte* arenaBase() const = 0;

 protected:
  ~TransferBackend() = default;
};

// "[kind] message" as a kj exception (FAILED), the one shape clients parse.
kj::Exception transferError(const char* kind, const std::string& message);
kj::Exception transferError(const transfer::Error& error);

}  // namespace sidecar::rpc
