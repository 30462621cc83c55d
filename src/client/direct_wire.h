#pragma once
// The client's own UCX worker for direct sends (docs/PROTOCOL.md, "Direct sends"): endpoints to
// other nodes' daemons, and tagged sends that complete at once or not at all. Nothing here ever
// waits: a send UCX cannot finish inside the call is refused (the caller then sends the chunk
// through its daemon), so no message outlives the call and nothing needs progressing in the
// background. The worker is progressed only while an endpoint is still being wired up.
//
// Threading: the thread that owns the Sidecar (UCS_THREAD_MODE_SINGLE).

#include <cstdint>
#include <memory>
#include <string>

namespace sidecar::client {

class DirectWire {
 public:
  // Null when UCX is not built in or cannot start here (the reason goes to `why`).
  static std::unique_ptr<DirectWire> create(std::string& why);
  virtual ~DirectWire() = default;

  enum class Sent {
    kYes,   // on the wire (handed to the transport)
    kBusy,  // not now (the endpoint is still connecting, or the transport is full)
    kLost,  // an endpoint that worked failed (e.g. the peer's side closed it while this process
            // was idle, or the peer restarted): forget it; a new one may work
    kFailed // this endpoint never worked (e.g. the peer's network is not reachable): forget it
  };
  // Sends `bytes` with `tag` to the worker at `workerAddress` (an endpoint is made on first use
  // and kept). `error` says why for kFailed.
  virtual Sent send(const std::string& workerAddress, uint64_t tag, const void* bytes,
                    uint64_t sizeBytes, std::string& error) = 0;
  // Drops the endpoint to `workerAddress` (its peer restarted, or it failed).
  virtual void forget(const std::string& workerAddress) = 0;
};

}  // namespace sidecar::client
