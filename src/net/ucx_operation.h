#pragma once
// Internal to src/net: one tag send or receive as the adapter of a KJ promise
// (kj::newAdaptedPromise). The UCX request's slot of ours (UcxContext::kRequestSlotBytes) points
// back at this record while the promise exists, and is cleared when the promise goes away first,
// so a late UCX callback never touches freed memory.

#include <functional>
#include <kj/async.h>
#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>

namespace sidecar::net {

class UcxWorker;

// What a finished operation reports: bytes moved, and for receives the tag the sender used
// (which a masked receive needs to tell messages apart).
struct TagCompletion {
  size_t sizeBytes = 0;
  uint64_t senderTag = 0;
};

// Called the moment a receive completes, inside the worker's progress (or inside the post, for a
// message already there), before the promise's continuation runs a KJ turn later: the latency
// path of small messages. It must neither throw nor call into UCX.
using TagArrival = std::function<void(const TagCompletion&)>;

class UcxOperation {
 public:
  enum class Kind { kSend, kRecv };

  // Posts the operation (ucp_tag_send_nbx on `endpoint`, or ucp_tag_recv_nbx on the worker
  // matching the tag bits set in `tagMask`). When UCX completes it at once (eager data already
  // there) the promise is fulfilled here.
  UcxOperation(kj::PromiseFulfiller<TagCompletion>& fulfiller, UcxWorker& worker, Kind kind,
               ucp_ep_h endpoint, uint64_t tag, uint64_t tagMask, void* buffer, size_t sizeBytes,
               TagArrival onArrival = nullptr);
  // Receive: cancels, then waits until UCX is done with the buffer. Send: detaches (see
  // UcxEndpoint::tagSend for why it cannot wait).
  ~UcxOperation();

  // ucp_params.request_init: a fresh request's slot is null.
  static void requestInit(void* request);
  UcxOperation(const UcxOperation&) = delete;
  UcxOperation& operator=(const UcxOperation&) = delete;

 private:
  static void onSendDone(void* request, ucs_status_t status, void* worker);
  static void onRecvDone(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                         void* worker);
  static void requestDone(void* request, ucs_status_t status, size_t lengthBytes,
                          uint64_t senderTag, void* worker);
  void finish(ucs_status_t status, size_t lengthBytes, uint64_t senderTag);

  kj::PromiseFulfiller<TagCompletion>& fulfiller_;
  TagArrival onArrival_;
  UcxWorker& worker_;
  Kind kind_;
  uint64_t tag_;
  size_t sizeBytes_;
  void* request_ = nullptr;  // the pending UCX request; null once UCX has finished with it
  bool dropping_ = false;    // the promise is being destroyed: do not touch the fulfiller
  bool finished_ = false;
};

}  // namespace sidecar::net
