#pragma once
// How tensor bodies cross between nodes when they do not ride inline in the control message:
// tagged messages on a data transport (UCX in the daemon, fakes in tests). Owned and called on
// the transfer owner core only.
//
// Contract: receive() posted for a tag completes once a send with that tag from any endpoint has
// filled the buffer (sends may come before the receive is posted). Dropping a receive's promise
// cancels it and guarantees the buffer is not written afterwards. Dropping a send's promise
// abandons it; the transport keeps the buffer's memory in use until its own completion (callers
// keep the arena allocation alive until the send's promise settles, or the endpoint is gone).

#include <kj/async.h>
#include <kj/memory.h>

#include <cstdint>
#include <functional>
#include <string>

namespace sidecar::daemon {

class BodyEndpoint {
 public:
  virtual ~BodyEndpoint() = default;
  virtual kj::Promise<void> send(uint64_t tag, const void* buffer, uint64_t sizeBytes) = 0;
};

// A message taken by BodyTransport::receiveAny.
struct BodyMessage {
  uint64_t sizeBytes = 0;
  uint64_t tag = 0;  // the sender's full tag
};

class BodyTransport {
 public:
  virtual ~BodyTransport() = default;
  // This side's address, to give peers in PeerHello.ucxAddress.
  virtual std::string address() const = 0;
  // An endpoint to the transport at `remoteAddress` (a peer's PeerHello.ucxAddress).
  virtual kj::Own<BodyEndpoint> connect(const std::string& remoteAddress) = 0;
  virtual kj::Promise<void> receive(uint64_t tag, void* buffer, uint64_t sizeBytes) = 0;
  // Receives the next message whose tag matches `tag` in the bits of `tagMask`, of at most
  // `maxBytes` (a larger one rejects). Same cancellation rule as receive(). `onArrival`, if any,
  // runs the moment the message is in, before the promise's continuation (a turn later): it must
  // neither throw nor use the transport.
  virtual kj::Promise<BodyMessage> receiveAny(uint64_t tag, uint64_t tagMask, void* buffer,
                                              uint64_t maxBytes,
                                              std::function<void(const BodyMessage&)> onArrival = nullptr) = 0;
  // A short name for logs and info ("ucx tcp", "fake").
  virtual std::string describe() const = 0;
};

}  // namespace sidecar::daemon
