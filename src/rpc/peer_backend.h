#pragma once
// What the Peer service (the receiving end of a link from another node's daemon) needs from the
// node's transfer machinery. The daemon implements it next to TransferBackend; every method may
// be called from any core's event loop and answers there. Failures are "[kind] message" kj
// exceptions as for TransferBackend.

#include <kj/async.h>

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "transfer/transfer_table.h"

namespace sidecar::rpc {

// Who is at either end of a link (PeerHello in the schema).
struct PeerIdentity {
  uint32_t protocolVersion = 0;
  std::string nodeId;
  uint64_t incarnation = 0;
  std::string address;     // host:port where it accepts peers; "" when it does not
  std::string ucxAddress;  // its UCX worker address; "" without UCX
  uint32_t linkId = 0;     // in answers: the receiver's id for the link (top bits of UCX tags);
                           // in requests: the sender's (low bits of UCX ack tags)
  uint64_t ucxMessageMaxBytes = 0;  // largest PeerMessage it takes over UCX; 0: none
};

// A tensor body arriving from a peer: inline bytes, or UCX pieces tagged tag + i.
struct PeerTensor {
  transfer::Dtype dtype = transfer::Dtype::kUint8;
  std::vector<int64_t> shape;
  uint64_t sizeBytes = 0;
  bool viaUcx = false;
  std::string inlineBytes;  // when !viaUcx, unless inlineView is set
  // Instead of inlineBytes: the bytes where the message holds them, valid only while the caller
  // holds the message (a UCX delivery read in place; PeerBackend::deliver copies them before it
  // waits for anything).
  kj::ArrayPtr<const kj::byte> inlineView;
  kj::ArrayPtr<const kj::byte> inlineData() const {
    if (inlineView.begin() != nullptr) return inlineView;
    return kj::arrayPtr(reinterpret_cast<const kj::byte*>(inlineBytes.data()), inlineBytes.size());
  }
  uint64_t tag = 0;         // when viaUcx
  uint32_t pieces = 1;
  uint64_t pieceBytes = 0;
};

struct PeerChunk {
  std::string dataId;
  uint32_t chunkId = 0;
  uint32_t numChunks = 1;
  transfer::Rank senderRank = 0;
  transfer::Group senderGroup;
  std::vector<transfer::Group> destinations;  // the groups on the receiving node
  std::variant<PeerTensor, transfer::ObjectChunk> payload;
};

class PeerBackend {
 public:
  // A peer opened a link: returns this node's identity with the link's id filled in.
  virtual kj::Promise<PeerIdentity> openPeerLink(PeerIdentity peer) = 0;
  // Fire and forget, from any thread: the link's connection is gone. Its pending deliveries fail
  // and receivers waiting for data that was coming over it are told ([peer-lost]).
  virtual void closePeerLink(uint32_t linkId) = 0;
  virtual kj::Promise<void> deliver(uint32_t linkId, PeerChunk chunk) = 0;
  virtual kj::Promise<void> peerCloseStream(uint32_t linkId, std::string dataId, uint32_t numChunks,
                                            transfer::Rank senderRank,
                                            std::vector<transfer::Group> destinations) = 0;
  virtual kj::Promise<void> heartbeat(uint32_t linkId) = 0;

 protected:
  ~PeerBackend() = default;
};

}  // namespace sidecar::rpc
