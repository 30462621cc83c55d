#pragma once
// One Cap'n Proto two-party RPC connection served by a daemon core, over any KJ stream (the
// io_uring streams in the daemon, in-memory pipes in tests). Unix-socket connections carry file
// descriptors (SCM_RIGHTS); TCP connections never do.

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

namespace sidecar::rpc {

class RpcConnection {
 public:
  // At most this many fds are accepted from a client in one message; more are closed on arrival.
  static constexpr unsigned kMaxFdsPerMessage = 4;

  RpcConnection(kj::Own<kj::AsyncCapabilityStream> stream, capnp::Capability::Client bootstrap);
  RpcConnection(kj::Own<kj::AsyncIoStream> stream, capnp::Capability::Client bootstrap);

  // Resolves when the peer disconnects (cleanly or not). Never rejects: a broken peer is the
  // peer's problem and must not stop the core.
  kj::Promise<void> onDisconnect();

 private:
  kj::Own<kj::AsyncIoStream> stream_;
  capnp::TwoPartyVatNetwork network_;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpcSystem_;
};

}  // namespace sidecar::rpc
