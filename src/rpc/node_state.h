#pragma once
// What the RPC service needs to know about the daemon it runs in. The daemon implements it; tests
// use a fake, so the service can be tested without cores or sockets.

#include <kj/async.h>

#include "rpc/device_send_backend.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc {

class NodeState {
 public:
  // Fills `info` with the node's identity and current statistics. Called on the core that serves
  // the request; state owned by another core (the allocator) is read on that core, hence the
  // promise. `info` stays valid until the promise resolves.
  virtual kj::Promise<void> fillInfo(proto::NodeInfo::Builder info) = 0;

  // GPU tensors (issue 6); null: this node cannot take device tensors.
  virtual DeviceSendBackend* deviceSends() { return nullptr; }

 protected:
  ~NodeState() = default;
};

}  // namespace sidecar::rpc
