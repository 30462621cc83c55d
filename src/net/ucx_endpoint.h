#pragma once
// A connection to one remote UCX worker (made by UcxWorker::connect). Sends are tagged; the peer
// receives them with UcxWorker::tagRecv. Same thread rules as the worker.

#include <kj/async.h>
#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>
#include <optional>

#include "net/ucx_error.h"

namespace sidecar::net {

class UcxWorker;

class UcxEndpoint {
 public:
  // Force-closes the endpoint if close() was not awaited: UCX completes every outstanding send on
  // it with UCS_ERR_CANCELED before this returns, so no buffer is read afterwards.
  ~UcxEndpoint();
  UcxEndpoint(const UcxEndpoint&) = delete;
  UcxEndpoint& operator=(const UcxEndpoint&) = delete;

  // Sends [buffer, buffer + sizeBytes) with `tag`; resolves when UCX is done with the buffer (not
  // when the peer has it). Rejects when the endpoint fails (dead peer, link cut) or is closed.
  //
  // The buffer must stay valid until the promise resolves or rejects, or, if the promise is
  // dropped first, until this endpoint is closed or destroyed: UCX cannot take back a send that
  // has started, so dropping the promise detaches it (it runs to completion or fails with the
  // endpoint) rather than waiting, which could block forever on a peer that never receives.
  kj::Promise<void> tagSend(uint64_t tag, const void* buffer, size_t sizeBytes);

  // Rejects (UcxError) when the endpoint fails: the peer died, the network was cut, or UCX's
  // keep-alive timed out. Never resolves otherwise. May be called many times.
  kj::Promise<void> whenFailed();

  // The error once the endpoint has failed.
  const std::optional<UcxError>& failure() const { return failure_; }

  // Gives up on the peer now: force-closes the endpoint, so every pending send on it rejects
  // (DISCONNECTED, UCS_ERR_CANCELED) at once, and whenFailed() rejects with `reason`. For the
  // daemon's own peer deadline: over TCP, UCX notices a cut link only through TCP itself (keep-
  // alive after UCX_TCP_KEEPIDLE when idle; with data in flight, the kernel's retransmission
  // limit, minutes), so a bounded failure time needs a timer that calls this. Receives are
  // worker-level: drop their promises. Idempotent.
  void abort(const char* reason);

  // Orderly close: flushes outstanding sends, then closes. Resolves when done (or when the peer is
  // found dead: a failed endpoint closes by force). The endpoint may not send afterwards.
  kj::Promise<void> close();

 private:
  friend class UcxWorker;
  UcxEndpoint(UcxWorker& worker, ucp_ep_h endpoint);
  static void onError(void* arg, ucp_ep_h endpoint, ucs_status_t status);
  static void onClosed(void* request, ucs_status_t status, void* self);
  // Starts ucp_ep_close_nbx; closeRequest_ holds its request until UCX completes it.
  void closeNow(uint32_t flags);

  UcxWorker& worker_;
  ucp_ep_h endpoint_;
  std::optional<UcxError> failure_;
  kj::ForkedPromise<void> failed_;
  kj::Own<kj::PromiseFulfiller<void>> failedFulfiller_;
  bool closed_ = false;
  void* closeRequest_ = nullptr;
  kj::ForkedPromise<void> closeDone_{nullptr};
  kj::Own<kj::PromiseFulfiller<void>> closeFulfiller_;
};

}  // namespace sidecar::net
