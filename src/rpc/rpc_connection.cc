#include "rpc/rpc_connection.h"

namespace sidecar::rpc {

namespace {
capnp::ReaderOptions readerOptions() {
  capnp::ReaderOptions options;
  // 8 Mi words (64 MiB): far above any control message (bodies of transfers never travel here)
  // and a bound on what one hostile peer can make the daemon read per message.
  options.traversalLimitInWords = 8ull << 20;
  return options;
}
}  // namespace

RpcConnection::RpcConnection(kj::Own<kj::AsyncCapabilityStream> stream,
                             capnp::Capability::Client bootstrap)
    : stream_(kj::mv(stream)),
      network_(static_cast<kj::AsyncCapabilityStream&>(*stream_), kMaxFdsPerMessage,
               capnp::rpc::twoparty::Side::SERVER, readerOptions()),
      rpcSystem_(capnp::makeRpcServer(network_, kj::mv(bootstrap))) {}

RpcConnection::RpcConnection(kj::Own<kj::AsyncIoStream> stream,
                             capnp::Capability::Client bootstrap)
    : stream_(kj::mv(stream)),
      network_(*stream_, capnp::rpc::twoparty::Side::SERVER, readerOptions()),
      rpcSystem_(capnp::makeRpcServer(network_, kj::mv(bootstrap))) {}

kj::Promise<void> RpcConnection::onDisconnect() {
  return network_.onDisconnect().catch_([](kj::Exception&&) {});
}

}  // namespace sidecar::rpc
