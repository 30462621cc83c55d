#pragma once
// The BodyTransport of the daemon: UCX tagged messages on the transfer owner core's worker.
// Created and destroyed on that core's thread (the worker is an event source of its reactor).
//
// Why one worker, on core 0, and not one per core: every transfer is decided on the core that
// owns the arena's allocator and the transfer table (core 0, see docs/REACTOR.md), and a body
// moves between arena slabs that core hands out, so that core's worker carries every body; a
// worker on the other cores would sit idle. Sharding the table per core is what would make
// per-core workers pay; the context (ucx_context.h) is already shared by workers of any core.

#include <memory>
#include <string>

#include "daemon/body_transport.h"
#include "net/ucx_context.h"
#include "net/ucx_endpoint.h"
#include "net/ucx_worker.h"

namespace sidecar::daemon {

class UcxBodies final : public BodyTransport {
 public:
  UcxBodies(net::UcxContext& context, reactor::Reactor& reactor);
  ~UcxBodies() override;

  std::string address() const override;
  kj::Own<BodyEndpoint> connect(const std::string& remoteAddress) override;
  kj::Promise<void> receive(uint64_t tag, void* buffer, uint64_t sizeBytes) override;
  kj::Promise<BodyMessage> receiveAny(uint64_t tag, uint64_t tagMask, void* buffer,
                                      uint64_t maxBytes,
                                      std::function<void(const BodyMessage&)> onArrival = nullptr) override;
  std::string describe() const override;

 private:
  net::UcxWorker worker_;
};

}  // namespace sidecar::daemon
