#pragma once
// The sending side of links to other nodes' daemons: one link per remote node, opened lazily on
// first use (no mesh at start-up), kept alive by heartbeats, and dropped when the peer dies, the
// network is cut or the peer restarts. Owned by the transfer owner core and used only there.
//
// Failure model: every call made over a link is tied to the link. When the link is lost (the
// connection closed, or a heartbeat went unanswered for timeoutMs), every pending call on it
// fails with [peer-lost] at once; a later call opens a new link (to the peer's new incarnation
// if it restarted). Connecting is bounded by timeoutMs too ([peer-unreachable]).
//
// Bodies: a tensor of at most inlineBytesMax rides inside the deliver call (one message, the
// latency path); a larger one moves over the BodyTransport (UCX) in pieces, tied to the call by
// its tag, while the call carries the descriptor. Without a transport every body rides inline
// (up to kInlineHardMaxBytes, which the control connection's message limit allows).
//
// Small deliveries over UCX: when both ends take PeerMessages (self.ucxMessageMaxBytes and the
// peer's hello say so), an object or inline-sized tensor goes as one UCX tagged message instead
// of a deliver call, and the peer answers with an ack message (peer_messages.h). The link's
// failure model is the same: a pending delivery waits for its ack and fails with the link.

#include <capnp/common.h>
#include <kj/async.h>
#include <kj/timer.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "daemon/body_transport.h"
#include "reactor/reactor.h"
#include "rpc/peer_backend.h"
#include "rpc/transfer_backend.h"
#include "transfer/transfer_table.h"

namespace sidecar::daemon {

// A chunk to hand to another node. Tensor bytes are read from `body` until the returned promise
// settles; the caller keeps them alive (the transfer table's hold does).
struct OutgoingChunk {
  std::string dataId;
  uint32_t chunkId = 0;
  uint32_t numChunks = 1;
  transfer::Rank senderRank = 0;
  transfer::Group senderGroup;
  std::vector<transfer::Group> destinations;  // the groups on that node
  bool isTensor = false;
  transfer::Dtype dtype = transfer::Dtype::kUint8;
  std::vector<int64_t> shape;
  uint64_t sizeBytes = 0;
  const void* body = nullptr;
  transfer::ObjectChunk object;  // when !isTensor
  // A body still being written into the arena (a GPU copy): resolves once bytes [0, n) are final,
  // rejects if they never will be (which fails the delivery and cancels it at the peer). Each
  // UCX piece goes out as soon as it has landed; an inline body waits for all of it. Null: the
  // body is complete.
  std::function<kj::Promise<void>(uint64_t n)> landed;
  // Non-zero: the sending client put this chunk on the wire itself (a direct send), as deliver
  // message directSeq on the link it was given as directLink; its session is directSession.
  uint32_t directLink = 0;
  uint32_t directSeq = 0;
  uint64_t directSession = 0;
};

// Direct sends (docs/PROTOCOL.md, "Direct sends"): deliver seqs from kDirectSeqFirst up are
// handed to sessions in blocks of kDirectSeqBlock; this daemon's own messages count from 1.
inline constexpr uint32_t kDirectSeqFirst = 0x8000'0000u;
inline constexpr uint32_t kDirectSeqBlock = 1u << 16;
// Acks of direct sends that came before the client's send named them, kept per link (oldest
// dropped beyond this: the client died between its message and its send).
inline constexpr size_t kEarlyAcksMax = 4096;

struct PeerLinkOptions {
  rpc::PeerIdentity self;             // what this daemon says in its hello
  uint32_t timeoutMs = 5'000;         // connect, handshake, and heartbeat silence
  uint64_t inlineBytesMax = 64 << 10; // larger tensors go over the body transport
  uint64_t pieceBytes = 8 << 20;      // UCX piece size (at most 255 pieces per chunk)
  // How long a direct send's ack may take before the send fails [timeout]: longer than the peer
  // can legitimately take (its wait for arena space, then its ack), so an ack that has not come
  // by then means the executor's message never reached the peer: a client that names a seq it
  // did not send, or a message lost on the way. The chunk is then freed, not held forever.
  uint32_t directAckTimeoutMs = 40'000;
};

class PeerLinks {
 public:
  static constexpr uint64_t kInlineHardMaxBytes = 48ull << 20;

  // With `bodies` and options.self.ucxMessageMaxBytes > 0, posts a receive for acks at once.
  PeerLinks(reactor::Reactor& reactor, kj::Timer& timer, PeerLinkOptions options,
            BodyTransport* bodies);
  ~PeerLinks();

  // Resolves once the node at `address` has stored the chunk for its destination groups.
  kj::Promise<void> deliver(const std::string& address, OutgoingChunk chunk);
  kj::Promise<void> closeStream(const std::string& address, std::string dataId,
                                uint32_t numChunks, transfer::Rank senderRank,
                                std::vector<transfer::Group> destinations);

  // Session.directRoute for the node at `address`: once its link is up (opened now if need be),
  // the route when it takes UCX messages, with the session's block of deliver seqs on it (a new
  // one when `renew`; the one before stays valid). Otherwise none, saying why.
  kj::Promise<rpc::DirectRoute> directRoute(const std::string& address, uint64_t session, bool renew);
  // The session ended: its seq blocks are no longer its.
  void forgetSession(uint64_t session);

  // Links that are up or connecting, for status.
  std::vector<rpc::PeerLinkSummary> summary() const;

 private:
  struct Link;
  kj::Promise<kj::Own<Link>> link(const std::string& address);
  // deliver() once the link is there.
  kj::Promise<void> deliverOn(const std::string& address, kj::Own<Link> link, OutgoingChunk chunk);
  kj::Promise<void> open(Link& link);
  kj::Promise<void> heartbeatLoop(Link& link);
  // Never from inside a chain the link's canceler wraps (it cancels them: see link()).
  void lose(Link& link, const std::string& why);
  // `message` is encodePeerDeliver(seq, chunk); seq is taken from the link's sequence already.
  kj::Promise<void> deliverMessage(kj::Own<Link> link, const OutgoingChunk& chunk, uint32_t seq,
                                   kj::Array<capnp::word> message);
  // Resolves when delivery `seq` on the link is acked (at once if its ack came already).
  kj::Promise<void> awaitAck(kj::Own<Link> link, uint32_t seq, uint64_t tensorBytes, bool direct);
  // Whether `chunk`'s direct send may be awaited on `link`: its link, and a seq of its session.
  bool directOwned(const Link& link, const OutgoingChunk& chunk) const;
  // Small deliveries on `link` go as UCX messages (both ends take them).
  bool takesMessages(const Link& link) const;
  rpc::DirectRoute directRouteOn(Link& link, uint64_t session, bool renew);
  kj::Promise<void> ackLoop();
  void takeAck(uint64_t tag, kj::ArrayPtr<const capnp::word> message);
  kj::Exception peerError(const Link& link, kj::Exception&& e) const;

  reactor::Reactor& reactor_;
  kj::Timer& timer_;
  PeerLinkOptions options_;
  BodyTransport* bodies_;
  std::map<std::string, kj::Own<Link>> links_;
  std::vector<kj::Own<Link>> graveyard_;  // lost links, destroyed on a later turn
  kj::Promise<void> burial_ = nullptr;
  bool burialPending_ = false;
  uint32_t nextSerial_ = 1;  // each link's id on this side (PeerHello.linkId of our requests)
  kj::Array<capnp::word> ackBuffer_;
  bool takesAcks_ = false;  // acks_ is posted: deliveries may go as UCX messages
  kj::Promise<void> acks_ = nullptr;
};

}  // namespace sidecar::daemon
