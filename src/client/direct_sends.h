#pragma once
// Direct sends (docs/PROTOCOL.md, "Direct sends"): a small tensor for ranks that all live on one
// other node goes from this process straight to that node's daemon, as the delivery its own
// daemon would have sent (in the packed layout, base/packed_deliver.h), over this process's UCX
// worker (DirectWire). The send request
// that follows (lane or call) names the message, and the daemon stores the chunk as usual and
// awaits the peer's ack instead of forwarding it: the client -> daemon -> wire hops leave the
// latency path, while the send's completion, failures and the sender's copy stay the daemon's.
//
// Routes come from the daemon (Session.directRoute), cached per destination list and asked again
// after their retryMs, in the background: a send never waits for a route. Whatever goes wrong
// here (no route yet, UCX busy or failing, a message too large) means "send it the usual way";
// a stale route costs a message the peer drops and the daemon's own send, never data.
//
// Threading: the thread that owns the Sidecar.

#include <kj/async.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/direct_wire.h"
#include "sidecar.capnp.h"

namespace sidecar::client {

class DirectSends final : private kj::TaskSet::ErrorHandler {
 public:
  using Groups = std::vector<std::vector<int32_t>>;
  // The largest tensor sent directly: the daemons' inline limit for deliver messages.
  static constexpr uint64_t kTensorMaxBytes = 64 << 10;

  // `makeWire` runs once, when the first route is known (so that a process that never sends to
  // another node never starts UCX); null from it (UCX unavailable) makes every trySend say no.
  using MakeWire = std::function<std::unique_ptr<DirectWire>()>;
  DirectSends(proto::Session::Client session, int32_t rank, MakeWire makeWire);

  struct Tensor {
    proto::Dtype dtype;
    const std::vector<int64_t>& shape;
    const void* bytes;  // contiguous
    uint64_t sizeBytes;
  };
  struct Sent {
    uint32_t link = 0;
    uint32_t seq = 0;
  };
  // Puts the chunk on the wire when a route is known and UCX takes the message at once: name
  // `Sent` in the send request. Otherwise none (and perhaps a route is asked for meanwhile).
  std::optional<Sent> trySend(const Groups& destinations, const std::string& dataId,
                              uint32_t chunkId, uint32_t numChunks, const Tensor& tensor);

  uint64_t sentCount() const { return sent_; }

 private:
  struct Route {
    bool ready = false;
    bool asking = false;
    std::chrono::steady_clock::time_point askAfter{};
    std::string workerAddress;
    uint64_t deliverTag = 0;
    uint32_t link = 0;
    uint32_t seqBase = 0;
    uint32_t nextSeq = 0;
    uint32_t seqEnd = 0;  // exclusive (as uint64 arithmetic: seqBase + seqCount)
    uint64_t messageMaxBytes = 0;
    uint32_t endpointFailures = 0;  // in a row, of endpoints that never worked (the backoff)
  };
  void ask(const Groups& destinations, Route& route, bool renew);
  void taskFailed(kj::Exception&& e) override;

  proto::Session::Client session_;
  int32_t rank_;
  MakeWire makeWire_;
  std::unique_ptr<DirectWire> wire_;
  bool wireMade_ = false;
  bool unsupported_ = false;  // the daemon answered `unimplemented`
  std::map<Groups, Route> routes_;
  uint64_t sent_ = 0;
  // The deliver message's buffer, kept across sends (8-byte aligned): as large as the largest
  // message sent, at most the peer's limit (messageMaxBytes, 128 KiB).
  kj::Array<capnp::word> buffer_;
  kj::TaskSet asks_;  // last: cancelled first
};

// Whether this process sends directly: SIDECAR_DIRECT_SENDS=0 says no (default yes).
bool directSendsWanted();

}  // namespace sidecar::client
