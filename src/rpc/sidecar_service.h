#pragma once
// The bootstrap capability every connection gets: the Sidecar interface of schema/sidecar.capnp.
// One per connection, so it knows whether its connection can carry file descriptors.

#include "rpc/node_state.h"
#include "rpc/peer_backend.h"
#include "rpc/lane_service.h"
#include "rpc/transfer_backend.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc {

class SidecarService final : public proto::Sidecar::Server {
 public:
  // Pings larger than this are refused: a ping is a probe, not a transfer.
  static constexpr size_t kPingBytesMax = 64 * 1024;

  // `transfers` may be null (a node without transfers, tests): register then fails clearly.
  // `fdPassing`: the connection is a unix socket and can carry the arena's fd.
  // `peerPid`: the client's process when known (0 otherwise), to tell a dead rank holder.
  // `peers` may be null (peer links refused clearly).
  explicit SidecarService(NodeState& node, TransferBackend* transfers = nullptr,
                          bool fdPassing = true, int32_t peerPid = 0, PeerBackend* peers = nullptr,
                          LaneHost lanes = {})
      : node_(node),
        transfers_(transfers),
        fdPassing_(fdPassing),
        peerPid_(peerPid),
        peers_(peers),
        lanes_(lanes) {}

 protected:
  kj::Promise<void> ping(PingContext context) override;
  kj::Promise<void> info(InfoContext context) override;
  kj::Promise<void> register_(RegisterContext context) override;
  kj::Promise<void> transfers(TransfersContext context) override;
  kj::Promise<void> inspect(InspectContext context) override;
  kj::Promise<void> peer(PeerContext context) override;

 private:
  TransferBackend& backend();

  NodeState& node_;
  TransferBackend* transfers_;
  bool fdPassing_;
  int32_t peerPid_;
  PeerBackend* peers_;
  LaneHost lanes_;  // this connection's core, for its sessions' lanes (no reactor: none)
};

// The unit in bytes of a memory hint: prod(rowShape) elements of dtype. Throws [invalid-argument]
// for a dimension < 1, an unknown dtype or an overflow.
uint64_t hintBytes(proto::MemoryHint::Reader hint, const char* which);

}  // namespace sidecar::rpc
