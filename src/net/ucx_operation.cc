#include "net/ucx_operation.h"

#include <string>

#include "base/hop_trace.h"
#include "net/ucx_error.h"
#include "net/ucx_worker.h"

namespace sidecar::net {
namespace {

UcxOperation*& slotOf(void* request) { return *static_cast<UcxOperation**>(request); }

kj::Exception toKjException(ucs_status_t status, const std::string& what) {
  UcxError error(status, what);
  auto type = isPeerFailure(status) || status == UCS_ERR_CANCELED ? kj::Exception::Type::DISCONNECTED
                                                                   : kj::Exception::Type::FAILED;
  return kj::Exception(type, __FILE__, __LINE__, kj::str(error.what()));
}

}  // namespace

UcxOperation::UcxOperation(kj::PromiseFulfiller<TagCompletion>& fulfiller, UcxWorker& worker,
                           Kind kind, ucp_ep_h endpoint, uint64_t tag, uint64_t tagMask,
                           void* buffer, size_t sizeBytes, TagArrival onArrival)
    : fulfiller_(fulfiller), onArrival_(std::move(onArrival)), worker_(worker), kind_(kind), tag_(tag), sizeBytes_(sizeBytes) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.user_data = &worker_;  // stable for the request's life, unlike this record
  if (ucp_mem_h memh = worker_.context().regionHandleFor(buffer, sizeBytes)) {
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
    param.memh = memh;
  }
  ucs_status_ptr_t request;
  if (kind == Kind::kSend) {
    param.cb.send = &UcxOperation::onSendDone;
    request = ucp_tag_send_nbx(endpoint, buffer, sizeBytes, tag, &param);
  } else {
    // A message that already arrived (unexpected) completes inside ucp_tag_recv_nbx. Without
    // NO_IMM_CMPL, UCX 1.13 then returns NULL with no callback, so no length or sender tag (and
    // UCP_OP_ATTR_FIELD_RECV_INFO leaves the length unset on that path); with it, the callback
    // runs inside the post, before we could fill the request's slot: worker_.posting_ tells the
    // callback whom it is for.
    param.cb.recv = &UcxOperation::onRecvDone;
    param.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    worker_.posting_ = this;
    request = ucp_tag_recv_nbx(worker_.handle(), buffer, sizeBytes, tag, tagMask, &param);
    worker_.posting_ = nullptr;
    if (finished_) return;  // completed inline: the callback has freed the request
  }
  if (request == nullptr) {
    finish(UCS_OK, sizeBytes, tag);
  } else if (UCS_PTR_IS_ERR(request)) {
    finish(UCS_PTR_STATUS(request), 0, 0);
  } else {
    request_ = request;
    slotOf(request) = this;
    worker_.inFlight_++;
  }
}

UcxOperation::~UcxOperation() {
  if (request_ == nullptr) return;
  dropping_ = true;
  if (kind_ == Kind::kSend) {
    slotOf(request_) = nullptr;  // the callback frees the request when UCX is done
    return;
  }
  // An expected receive not yet matched completes (UCS_ERR_CANCELED) inside ucp_request_cancel.
  // One already matched keeps receiving: wait for it, or the caller's buffer would be written
  // after it was freed.
  ucp_request_cancel(worker_.handle(), request_);
  worker_.progressUntil([this] { return request_ == nullptr; });
}

void UcxOperation::onSendDone(void* request, ucs_status_t status, void* worker) {
  requestDone(request, status, 0, 0, worker);
}

void UcxOperation::onRecvDone(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                              void* worker) {
  requestDone(request, status, status == UCS_OK ? info->length : 0,
              status == UCS_OK ? info->sender_tag : 0, worker);
}

void UcxOperation::requestDone(void* request, ucs_status_t status, size_t lengthBytes,
                               uint64_t senderTag, void* worker) {
  auto* owner = static_cast<UcxWorker*>(worker);
  UcxOperation* op = slotOf(request);
  if (op == nullptr && owner->posting_ != nullptr) {
    op = owner->posting_;  // completed inside the post call (see the constructor)
  } else {
    owner->inFlight_--;
  }
  // Recycled requests start with a null slot (requestInit for fresh ones), so a callback that
  // runs inline never mistakes a stale slot for its owner.
  slotOf(request) = nullptr;
  if (op != nullptr) {
    op->finish(status, op->kind_ == Kind::kSend ? op->sizeBytes_ : lengthBytes,
               op->kind_ == Kind::kSend ? op->tag_ : senderTag);
  }
  ucp_request_free(request);
}

void UcxOperation::requestInit(void* request) { slotOf(request) = nullptr; }

void UcxOperation::finish(ucs_status_t status, size_t lengthBytes, uint64_t senderTag) {
  request_ = nullptr;
  finished_ = true;
  if (dropping_) return;
  if (status == UCS_OK) {
    hop::mark(hop::Point::kUcxDone);
    TagCompletion done{lengthBytes, senderTag};
    if (onArrival_) onArrival_(done);
    fulfiller_.fulfill(kj::mv(done));
    return;
  }
  std::string what = kind_ == Kind::kSend ? "UCX tag send" : "UCX tag receive";
  what += " (tag " + std::to_string(tag_) + ", " + std::to_string(sizeBytes_) + " bytes) failed";
  if (status == UCS_ERR_MESSAGE_TRUNCATED) {
    what += ": the message is larger than the receive buffer; post the receive with the sender's "
            "size";
  }
  fulfiller_.reject(toKjException(status, what));
}

}  // namespace sidecar::net
