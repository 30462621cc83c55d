#pragma once
// The bootstrap capability every connection gets: the Sidecar interface of schema/sidecar.capnp.

#include "rpc/node_state.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc {

class SidecarService final : public proto::Sidecar::Server {
 public:
  // Pings larger than this are refused: a ping is a probe, not a transfer.
  static constexpr size_t kPingBytesMax = 64 * 1024;

  explicit SidecarService(NodeState& node) : node_(node) {}

 protected:
  kj::Promise<void> ping(PingContext context) override;
  kj::Promise<void> info(InfoContext context) override;

 private:
  NodeState& node_;
};

}  // namespace sidecar::rpc
