#pragma once
// What the RPC service needs to know about the daemon it runs in. The daemon implements it; tests
// use a fake, so the service can be tested without cores or sockets.

#include "sidecar.capnp.h"

namespace sidecar::rpc {

class NodeState {
 public:
  // Fills `info` with the node's identity and current statistics. Called on the core that serves
  // the request; implementations read other cores' statistics through their atomics.
  virtual void fillInfo(proto::NodeInfo::Builder info) = 0;

 protected:
  ~NodeState() = default;
};

}  // namespace sidecar::rpc
