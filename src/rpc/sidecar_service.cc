#include "rpc/sidecar_service.h"

#include <kj/debug.h>

#include <algorithm>
#include <limits>

#include "rpc/peer_service.h"
#include "rpc/session_service.h"

namespace sidecar::rpc {

uint64_t hintBytes(proto::MemoryHint::Reader hint, const char* which) {
  uint64_t bytes = transfer::dtypeBytes(fromProto(hint.getDtype()));
  for (int64_t dim : hint.getRowShape()) {
    if (dim < 1) {
      throw transferError("invalid-argument",
                          std::string(which) + " hint: row dimensions must be >= 1 (give the "
                                               "shape without its leading -1), got " +
                              std::to_string(dim));
    }
    if (bytes > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(dim)) {
      throw transferError("invalid-argument", std::string(which) + " hint: the row is too large");
    }
    bytes *= static_cast<uint64_t>(dim);
  }
  return bytes;
}

TransferBackend& SidecarService::backend() {
  if (transfers_ == nullptr) {
    throw transferError("not-registered", "this server has no transfer service");
  }
  return *transfers_;
}

kj::Promise<void> SidecarService::ping(PingContext context) {
  auto payload = context.getParams().getPayload();
  if (payload.size() > kPingBytesMax) {
    return KJ_EXCEPTION(FAILED, "[invalid-argument] ping payload too large; the limit is 64 KiB",
                        payload.size());
  }
  context.getResults().setPayload(payload);
  return kj::READY_NOW;
}

kj::Promise<void> SidecarService::info(InfoContext context) {
  return node_.fillInfo(context.getResults().initInfo());
}

kj::Promise<void> SidecarService::register_(RegisterContext context) {
  TransferBackend& transfers = backend();
  if (!fdPassing_) {
    return transferError("invalid-argument",
                         "register over the node's unix socket: the arena is shared as a file "
                         "descriptor, which TCP cannot carry");
  }
  auto r = context.getParams().getRegistration();
  RankRegistration registration;
  registration.rank = r.getRank();
  for (int32_t rank : r.getGroup()) registration.group.push_back(rank);
  if (registration.group.empty()) registration.group.push_back(registration.rank);
  if (registration.rank < 0) {
    return transferError("invalid-argument",
                         "rank " + std::to_string(registration.rank) + " is negative");
  }
  if (!std::is_sorted(registration.group.begin(), registration.group.end()) ||
      std::adjacent_find(registration.group.begin(), registration.group.end()) !=
          registration.group.end() ||
      !std::binary_search(registration.group.begin(), registration.group.end(),
                          registration.rank)) {
    return transferError("invalid-argument",
                         "the group must be sorted, without repeats, and contain rank " +
                             std::to_string(registration.rank));
  }
  registration.sendHintBytes = hintBytes(r.getSendHint(), "send");
  registration.recvHintBytes = hintBytes(r.getRecvHint(), "receive");
  registration.concurrentCopy = r.getConcurrentCopy();
  registration.peerPid = peerPid_;
  transfer::Rank rank = registration.rank;
  transfer::Group group = registration.group;
  bool concurrentCopy = registration.concurrentCopy;
  return transfers.registerRank(std::move(registration))
      .then([this, context, rank, group = std::move(group), concurrentCopy,
             &transfers](SessionId session) mutable {
        auto results = context.getResults();
        results.setSession(kj::heap<SessionService>(transfers, session, rank, node_.deviceSends(),
                                                    std::move(group), concurrentCopy,
                                                    fdPassing_ ? lanes_ : LaneHost{}));
        results.setArena(kj::heap<ArenaHandleService>(transfers.arenaFd()));
        results.setArenaBytes(transfers.arenaBytes());
        results.setInlineTensorMaxBytes(kInlineTensorMaxBytes);
      });
}

kj::Promise<void> SidecarService::transfers(TransfersContext context) {
  return backend().summary().then([context](TransferSummary summary) mutable {
    auto out = context.getResults().initSummary();
    auto ids = out.initDataIds(static_cast<unsigned>(summary.dataIds.size()));
    for (size_t i = 0; i < summary.dataIds.size(); ++i) ids.set(static_cast<unsigned>(i), summary.dataIds[i]);
    out.setItems(summary.stats.items);
    out.setChunks(summary.stats.chunks);
    out.setBytesHeld(summary.stats.bytesHeld);
    out.setWaiters(summary.stats.waiters);
    out.setDuplicatesDropped(summary.stats.duplicatesDropped);
    out.setExpiredHolds(summary.stats.expiredHolds);
    out.setChunksCompleted(summary.stats.chunksCompleted);
    auto ranks = out.initRanks(static_cast<unsigned>(summary.ranks.size()));
    for (size_t i = 0; i < summary.ranks.size(); ++i) {
      auto rank = ranks[static_cast<unsigned>(i)];
      rank.setRank(summary.ranks[i].rank);
      auto group = rank.initGroup(static_cast<unsigned>(summary.ranks[i].group.size()));
      for (size_t g = 0; g < summary.ranks[i].group.size(); ++g) group.set(static_cast<unsigned>(g), summary.ranks[i].group[g]);
      rank.setBytesAllocated(summary.ranks[i].bytesAllocated);
      rank.setBytesHeld(summary.ranks[i].bytesHeld);
    }
    auto peers = out.initPeers(static_cast<unsigned>(summary.peers.size()));
    for (size_t i = 0; i < summary.peers.size(); ++i) {
      const PeerLinkSummary& p = summary.peers[i];
      auto peer = peers[static_cast<unsigned>(i)];
      peer.setOutgoing(p.outgoing);
      peer.setNodeId(p.nodeId);
      peer.setAddress(p.address);
      peer.setIncarnation(p.incarnation);
      peer.setUp(p.up);
      peer.setBodies(p.bodies);
      peer.setChunks(p.chunks);
      peer.setBytes(p.bytes);
      peer.setDirectChunks(p.directChunks);
    }
  });
}

kj::Promise<void> SidecarService::inspect(InspectContext context) {
  std::string id(context.getParams().getDataId().cStr());
  return backend().inspect(id).then([context](std::string description) mutable {
    context.getResults().setDescription(description);
  });
}

kj::Promise<void> SidecarService::peer(PeerContext context) {
  if (peers_ == nullptr) {
    return transferError("invalid-argument", "this server does not accept peer links");
  }
  if (fdPassing_) {
    return transferError("invalid-argument",
                         "peer links come over TCP (listen.tcp), not the node's unix socket");
  }
  PeerIdentity caller = readHello(context.getParams().getHello());
  if (caller.protocolVersion != proto::PROTOCOL_VERSION) {
    return transferError("version-mismatch",
                         "peer '" + caller.nodeId + "' speaks protocol " +
                             std::to_string(caller.protocolVersion) + ", this daemon " +
                             std::to_string(proto::PROTOCOL_VERSION) +
                             "; run the same sidecar version on every node");
  }
  PeerBackend& peers = *peers_;
  return peers.openPeerLink(kj::mv(caller)).then([context, &peers](PeerIdentity self) mutable {
    auto results = context.getResults();
    writeHello(self, results.initHello());
    results.setPeer(kj::heap<PeerService>(peers, self.linkId));
  });
}

}  // namespace sidecar::rpc
