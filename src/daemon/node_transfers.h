#pragma once
// The node's transfer service: the rank registry, the sessions' unsent allocations, the slab
// allocator and the transfer table, all owned by one core (core 0) and reached from every core
// through that core's executor. Implements rpc::TransferBackend for the RPC layer.
//
// Backpressure: allocate() waits (bounded by the call's timeout, else sendTimeoutMs) for space in
// the arena and then fails with [arena-full]; nothing is ever dropped to make room.

#include <capnp/common.h>
#include <kj/async.h>
#include <kj/timer.h>

#include <map>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/log_limiter.h"
#include "daemon/body_transport.h"
#include "daemon/peer_links.h"
#include "daemon/rank_directory.h"
#include "reactor/reactor.h"
#include "rpc/peer_backend.h"
#include "rpc/transfer_backend.h"
#include "shm/arena.h"
#include "shm/slab_allocator.h"
#include "transfer/transfer_table.h"

namespace sidecar::daemon {

// Acks due on one link are sent together once this many are (without waiting for the delay).
inline constexpr size_t kAckBatchMax = 32;

struct TransferOptions {
  uint32_t sendTimeoutMs = 30'000;    // default wait for arena space
  transfer::TransferLimits limits;
  PeerSettings peers;                 // where ranks live; empty: every rank is local
  rpc::PeerIdentity self;             // this daemon, as it introduces itself to peers
  uint64_t inlineBytesMax = 64 << 10; // cross-node tensors up to this ride in the control message
  uint64_t pieceBytes = 8 << 20;      // larger ones move over the body transport in such pieces
};

// A chunk its client sent to its node itself (SendRequest.directSeq; seq 0: none).
struct DirectSent {
  uint32_t link = 0;
  uint32_t seq = 0;
  rpc::SessionId session = 0;
};

// Cross-node transfers (see docs/PROTOCOL.md, "Between daemons"): a send whose destinations
// include groups on other nodes is stored here like any other (the remote groups hold it as
// proxies), forwarded once per remote node, and the proxies' holds are released when that node
// answered (stored) or failed; the sender's send() resolves only then, so a failure reaches it.
// Incoming chunks from peers are stored after the receiving side allocated their space (waiting
// while the arena is full: the backpressure between nodes) and received their body.
class NodeTransfers final : public rpc::TransferBackend,
                            public rpc::PeerBackend,
                            private transfer::TransferTable::Hooks,
                            private kj::TaskSet::ErrorHandler {
 public:
  NodeTransfers(const shm::Arena& arena, shm::SlabAllocator& allocator, TransferOptions options);
  ~NodeTransfers() noexcept;

  // Called on the owner core's thread once its loop runs: from then on, calls from other cores
  // are forwarded there. Starts the periodic expiry of holds.
  void attachOwner(kj::Timer& timer, reactor::Reactor& reactor);
  // Before attachOwner: the transport for large cross-node bodies (UCX). Without one, bodies
  // ride inline in control messages (up to PeerLinks::kInlineHardMaxBytes).
  void setBodyTransport(BodyTransport* bodies) { bodies_ = bodies; }
  // Called on the owner core before its loop stops: fails waiters, frees everything.
  void detachOwner();

  kj::Promise<rpc::SessionId> registerRank(rpc::RankRegistration registration) override;
  void unregister(rpc::SessionId session) override;
  kj::Promise<shm::Allocation> allocate(rpc::SessionId session, uint64_t sizeBytes,
                                        uint32_t timeoutMs) override;
  kj::Promise<void> release(rpc::SessionId session, uint64_t offset) override;
  kj::Promise<void> send(rpc::SessionId session, rpc::SendRequest request) override;
  // Pipelined when the sender is a group of one and every destination is on other nodes reached
  // with UCX bodies: the chunk is stored at once (held only by the remote groups' proxies, so no
  // one here reads it) and forwarded piece by piece as the copy lands it; the proxies' holds, and
  // with them the allocation, last until the copy stopped writing. Otherwise as the default.
  kj::Promise<void> sendLanding(rpc::SessionId session, rpc::SendRequest request,
                                rpc::Landing landing) override;
  kj::Promise<void> closeStream(rpc::SessionId session, std::string dataId, uint32_t numChunks,
                                std::vector<transfer::Group> destinations) override;
  kj::Promise<rpc::RecvReply> recv(rpc::SessionId session, std::string dataId, uint32_t chunkId,
                                   uint32_t timeoutMs) override;
  // On the owner core the answer is given from inside the store of the chunk (no turns).
  kj::Promise<void> recvInto(rpc::SessionId session, std::string dataId, uint32_t chunkId,
                             uint32_t timeoutMs, RecvAnswer answer) override;
  kj::Promise<void> markDone(rpc::SessionId session, std::string dataId,
                             uint32_t chunkId) override;
  // Given when the session is a group of one and every destination lives on one other node
  // whose link is up and takes UCX messages (docs/PROTOCOL.md, "Direct sends").
  kj::Promise<rpc::DirectRoute> directRoute(rpc::SessionId session,
                                            std::vector<transfer::Group> destinations,
                                            bool renew) override;
  kj::Promise<rpc::TransferSummary> summary() override;
  kj::Promise<std::string> inspect(std::string dataId) override;
  int arenaFd() const override { return arena_.fd(); }

  // rpc::PeerBackend: the receiving end of links from other nodes.
  kj::Promise<rpc::PeerIdentity> openPeerLink(rpc::PeerIdentity peer) override;
  void closePeerLink(uint32_t linkId) override;
  kj::Promise<void> deliver(uint32_t linkId, rpc::PeerChunk chunk) override;
  kj::Promise<void> peerCloseStream(uint32_t linkId, std::string dataId, uint32_t numChunks,
                                    transfer::Rank senderRank,
                                    std::vector<transfer::Group> destinations) override;
  kj::Promise<void> heartbeat(uint32_t linkId) override;
  uint64_t arenaBytes() const override { return arena_.sizeBytes(); }
  std::byte* arenaBase() const override { return arena_.base(); }

 private:
  struct Session {
    rpc::RankRegistration registration;
    std::map<uint64_t, shm::Allocation> allocations;  // by offset: allocated, not yet sent
    uint64_t bytesAllocated = 0;
    // Its rank was taken over by a new client: it no longer owns the rank, but keeps its
    // allocations until its own connection ends (a GPU copy may still be writing into them).
    bool orphaned = false;
  };
  class AllocateWaiter;
  class RecvOnce;
  class RecvCallback;
  class AckChannel;
  // A link from another node's daemon (we are its receiving end).
  struct IncomingLink {
    rpc::PeerIdentity peer;
    uint64_t lastHeardMs = 0;
    // Ids it is delivering into (chunks still to come): their waiters fail if it is lost. An id
    // leaves once all its chunks arrived, so this holds streams in flight, not history.
    std::set<std::string> dataIds;
    kj::Own<kj::Canceler> pending;  // its deliveries in progress
    uint64_t chunks = 0;            // stored from it
    uint64_t bytes = 0;
    kj::Own<AckChannel> acks;       // to the peer's UCX worker, made at its first UCX delivery
    std::vector<uint32_t> acksDue;  // successful deliveries not acked yet (ackDelayUs)
  };
  // The space a delivered tensor lands in, until the table takes it: a delivery that fails or
  // is cancelled before frees it.
  struct IncomingLanding {
    explicit IncomingLanding(shm::SlabAllocator& allocator) : allocator(allocator) {}
    IncomingLanding(const IncomingLanding&) = delete;
    IncomingLanding& operator=(const IncomingLanding&) = delete;
    ~IncomingLanding() {
      if (allocation) (void)allocator.free(*allocation);
    }
    shm::SlabAllocator& allocator;
    std::optional<shm::Allocation> allocation;
  };
  // Destinations split by node: local groups, and per remote node address its groups.
  struct Placement {
    std::vector<transfer::Group> local;
    std::map<std::string, std::vector<transfer::Group>> remote;
  };

  template <typename Func>
  kj::PromiseForResult<Func, void> onOwner(Func&& func);
  Session& session(rpc::SessionId id);
  static kj::Exception recvTimeout(const std::string& dataId, uint32_t chunkId, uint32_t timeoutMs);
  // Every recv, on the owner core: `answer` runs once, from inside the store of the chunk, or
  // with the failure (the timeout included); dropping the promise withdraws the recv.
  kj::Promise<void> recvOnOwner(rpc::SessionId id, std::string dataId, uint32_t chunkId,
                                uint32_t timeoutMs, RecvAnswer answer);
  void dropSession(rpc::SessionId id);
  kj::Promise<void> expireLoop();
  kj::Promise<shm::Allocation> allocateBytes(uint64_t sizeBytes, uint64_t hint, uint32_t waitMs);
  Placement place(const std::vector<transfer::Group>& destinations);
  kj::Promise<void> forwardChunk(const transfer::Group& senderGroup, transfer::Rank sender,
                                 const std::string& dataId, uint32_t chunkId, uint32_t numChunks,
                                 const Placement& placement, const transfer::Payload& stored,
                                 const rpc::Landing* landing = nullptr, DirectSent direct = {});
  void registerProxies(const Placement& placement);
  void releaseProxies(const std::string& dataId, uint32_t chunkId,
                      const std::vector<transfer::Group>& groups);
  IncomingLink& incoming(uint32_t linkId);
  // After `link` stored into (or closed) `dataId`: noted while chunks of it are still to come,
  // forgotten once all arrived.
  void trackDelivering(IncomingLink& link, const std::string& dataId);
  // A delivered tensor whose body is in `land`: into the table (which then owns the space), or
  // throws.
  void storeLanded(uint32_t linkId, const rpc::PeerChunk& chunk, IncomingLanding& land);
  // Small deliveries that arrive as UCX messages (peer_messages.h).
  kj::Promise<void> messageLoop();
  // `message` is only read during the call.
  void takeDeliverMessage(uint32_t linkId, kj::ArrayPtr<const capnp::word> message);
  // Acks a delivery that came as a UCX message: a failure at once, a success within
  // peers.ackDelayUs (with the others due by then) or once kAckBatchMax are due.
  void ack(uint32_t linkId, uint32_t seq, std::string_view error);
  void sendAcksDue(IncomingLink& link);
  void loseIncoming(uint32_t linkId, const std::string& why);
  uint64_t receiveHint(const std::vector<transfer::Group>& destinations) const;

  void release(const shm::Allocation& allocation) override;
  uint64_t nowMs() override;
  void taskFailed(kj::Exception&& e) override;

  const shm::Arena& arena_;
  shm::SlabAllocator& allocator_;
  TransferOptions options_;
  transfer::TransferTable table_;

  std::thread::id ownerThread_;
  kj::Own<const kj::Executor> ownerExecutor_;
  kj::Timer* timer_ = nullptr;
  kj::Promise<void> expiry_ = nullptr;

  RankDirectory directory_;
  BodyTransport* bodies_ = nullptr;
  kj::Own<PeerLinks> links_;             // outgoing, created by attachOwner
  std::set<transfer::Rank> proxies_;     // remote ranks registered in the table as proxies
  uint32_t nextLinkId_ = 1;
  std::map<uint32_t, IncomingLink> incoming_;
  kj::Array<capnp::word> messageBuffer_;
  // Warnings about UCX messages dropped as garbage: at most kPeerInputLines a second.
  static constexpr uint32_t kPeerInputLines = 10;
  base::LogLimiter peerInputLog_{kPeerInputLines, 1'000'000'000};
  kj::Promise<void> messages_ = nullptr;
  kj::Own<kj::TaskSet> messageDeliveries_;  // deliveries that arrived as messages, until acked
  kj::Promise<void> ackFlush_ = nullptr;     // sends the acks due, ackDelayUs after the first
  bool ackFlushArmed_ = false;

  rpc::SessionId nextSession_ = 1;
  std::unordered_map<rpc::SessionId, Session> sessions_;
  std::unordered_map<transfer::Rank, rpc::SessionId> ranks_;
};

}  // namespace sidecar::daemon
