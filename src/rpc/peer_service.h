#pragma once
// The receiving end of a peer link (schema: interface Peer): translates another daemon's calls into
// PeerBackend calls. One per link; its destructor (the link's connection closed or broke) tells
// the backend, which fails what depended on the link.

#include "rpc/peer_backend.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc {

class PeerService final : public proto::Peer::Server {
 public:
  PeerService(PeerBackend& backend, uint32_t linkId) : backend_(backend), linkId_(linkId) {}
  ~PeerService();

 protected:
  kj::Promise<void> deliver(DeliverContext context) override;
  kj::Promise<void> closeStream(CloseStreamContext context) override;
  kj::Promise<void> heartbeat(HeartbeatContext context) override;

 private:
  PeerBackend& backend_;
  uint32_t linkId_;
};

// A chunk as a peer describes it (a Peer.deliver call, or a PeerMessage over UCX). Throws the
// transfer error "[invalid-argument]" when inline bytes disagree with the size, or a capnp
// exception for a malformed message. `viewInline`: inline tensor bytes are a view into the
// message (PeerTensor::inlineView), not copied.
PeerChunk readPeerChunk(proto::PeerChunk::Reader chunk, bool viewInline = false);

// PeerHello <-> PeerIdentity.
PeerIdentity readHello(proto::PeerHello::Reader hello);
void writeHello(const PeerIdentity& identity, proto::PeerHello::Builder hello);

}  // namespace sidecar::rpc
