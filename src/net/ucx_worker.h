#pragma once
// A UCX worker driven by one reactor: the EventSource that makes UCX progress while the core is
// busy and lets it sleep when idle, plus tag receives; UcxEndpoint (ucx_endpoint.h) sends.
//
// Event-source contract (src/reactor/event_source.h, docs/REACTOR.md):
//   poll()  ucp_worker_progress: delivers completions (fulfils promises); true when it did work.
//   arm()   ucp_worker_arm. UCS_ERR_BUSY means events are pending: return false (do not sleep).
//           UCS_OK: the worker's event fd (ucp_worker_get_efd, itself an epoll set UCX keeps over
//           its transports' fds) is watched by a one-shot IORING_OP_POLL_ADD in the ring, so any
//           UCX event wakes the sleeping reactor. An idle worker costs no CPU.
//   disarm() nothing: the POLL_ADD stays pending until it fires and is re-added by the next arm().
//
// Threading: UCS_THREAD_MODE_SINGLE. Every call, and every promise, belongs to the thread of the
// reactor given at construction (its KJ loop). Nothing here is thread-safe.
//
// Operation records: each tag send or receive is one KJ promise node (kj::newAdaptedPromise: one
// heap allocation, unavoidable for a kj::Promise) plus the UCX request, which comes from UCX's own
// pool and carries an 8-byte slot of ours pointing back at the promise node (or null once the
// promise is gone). No other allocation per operation.

#include <kj/async.h>
#include <kj/common.h>
#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "net/ucx_context.h"
#include "net/ucx_operation.h"
#include "reactor/completion.h"
#include "reactor/event_source.h"
#include "reactor/reactor.h"

namespace sidecar::net {

class UcxEndpoint;

class UcxWorker final : public reactor::EventSource, private reactor::Completion {
 public:
  // Creates the worker and adds it to `reactor` as an event source. Throws UcxError.
  UcxWorker(UcxContext& context, reactor::Reactor& reactor);
  // Removes the source and waits for the ring's poll on the event fd to be cancelled. Every
  // endpoint and operation of this worker must be gone first.
  ~UcxWorker();
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  // This worker's address: opaque bytes for a peer's connect(). Carried by the daemons' Cap'n
  // Proto handshake. Stable for the worker's lifetime.
  const std::vector<uint8_t>& address() const { return address_; }

  // Connects to the worker whose address() bytes are given. Peer error handling is on
  // (UCP_ERR_HANDLING_MODE_PEER): when the peer dies or the link is cut, the endpoint fails and
  // every pending send on it is rejected instead of hanging. Throws UcxError for bad bytes.
  std::unique_ptr<UcxEndpoint> connect(kj::ArrayPtr<const uint8_t> remoteAddress);

  // Receives the message sent with exactly `tag` (full 64-bit mask) into [buffer, buffer +
  // sizeBytes); resolves to the byte count received. Rejects (UcxError text) when the message is
  // larger than the buffer (UCS_ERR_MESSAGE_TRUNCATED) or the receive fails.
  //
  // Cancellation: dropping the promise cancels the receive (ucp_request_cancel). If the message
  // was already matched and its data is still arriving (rendezvous, multi-fragment eager), UCX
  // cannot stop it, so the drop progresses this worker until the request has finished: when the
  // promise is gone, UCX will not write to `buffer` again, and the caller may free or reuse it at
  // once. That wait ends when the data is in or the peer is declared failed (UCX's peer timeout).
  // Until then the buffer must stay valid.
  kj::Promise<size_t> tagRecv(uint64_t tag, void* buffer, size_t sizeBytes);

  // The same for the first message whose tag equals `tag` in the bits set in `tagMask` (messages
  // of one kind from any sender, told apart by the rest of the tag): resolves to its size and the
  // sender's full tag. Same cancellation and truncation rules as tagRecv.
  // `onArrival`, if any, runs the moment the message is in (see TagArrival).
  kj::Promise<TagCompletion> tagRecvMasked(uint64_t tag, uint64_t tagMask, void* buffer,
                                           size_t sizeBytes, TagArrival onArrival = nullptr);

  // Operations posted on this worker and not yet completed by UCX (including detached sends).
  size_t inFlight() const { return inFlight_; }

  ucp_worker_h handle() const { return worker_; }
  UcxContext& context() const { return context_; }

  // Polls the reactor (this worker and every other source on this thread, e.g. the worker of the
  // peer when both ends live on one core) until `done()` holds. Only for destructors that must not
  // return while UCX may still touch memory they own; never call from inside a UCX callback.
  template <typename Done>
  void progressUntil(Done done) {
    while (!done()) reactor_.poll();
  }

  // reactor::EventSource
  bool poll() override;
  bool arm() override;
  void disarm() override {}

 private:
  friend class UcxEndpoint;
  friend class UcxOperation;
  void complete(int32_t result, uint32_t cqeFlags) override;  // the ring's poll on the event fd

  UcxContext& context_;
  reactor::Reactor& reactor_;
  ucp_worker_h worker_ = nullptr;
  int eventFd_ = -1;
  bool pollPending_ = false;
  std::vector<uint8_t> address_;
  size_t inFlight_ = 0;
  class UcxOperation* posting_ = nullptr;  // the receive inside ucp_tag_recv_nbx, if any
};

}  // namespace sidecar::net
