#include "net/ucx_endpoint.h"

#include <kj/debug.h>

#include <string>

#include "net/ucx_operation.h"
#include "net/ucx_worker.h"

namespace sidecar::net {
UcxEndpoint::UcxEndpoint(UcxWorker& worker, ucp_ep_h endpoint)
    : worker_(worker), endpoint_(endpoint), failed_(nullptr) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  failed_ = paf.promise.fork();
  failedFulfiller_ = kj::mv(paf.fulfiller);
}

UcxEndpoint::~UcxEndpoint() {
  if (!closed_) {
    closed_ = true;
    closeNow(UCP_EP_CLOSE_FLAG_FORCE);
  }
  // A close() in progress (or the forced one above) must finish before the error handler's
  // argument, this object, goes away.
  worker_.progressUntil([this] { return closeRequest_ == nullptr; });
}

kj::Promise<void> UcxEndpoint::tagSend(uint64_t tag, const void* buffer, size_t sizeBytes) {
  if (failure_) {
    return KJ_EXCEPTION(DISCONNECTED, "UCX tag send on a failed endpoint", failure_->what());
  }
  if (closed_) return KJ_EXCEPTION(FAILED, "UCX tag send on a closed endpoint");
  return kj::newAdaptedPromise<TagCompletion, UcxOperation>(
             worker_, UcxOperation::Kind::kSend, endpoint_, tag, ~uint64_t{0},
             const_cast<void*>(buffer), sizeBytes)
      .ignoreResult();
}

kj::Promise<void> UcxEndpoint::whenFailed() { return failed_.addBranch(); }

kj::Promise<void> UcxEndpoint::close() {
  if (closed_) return closeFulfiller_ ? closeDone_.addBranch() : kj::Promise<void>(kj::READY_NOW);
  closed_ = true;
  auto paf = kj::newPromiseAndFulfiller<void>();
  closeDone_ = paf.promise.fork();
  closeFulfiller_ = kj::mv(paf.fulfiller);
  // A failed endpoint cannot flush: UCX requires a forced close.
  closeNow(failure_ ? UCP_EP_CLOSE_FLAG_FORCE : 0);
  if (closeRequest_ == nullptr) closeFulfiller_->fulfill();
  return closeDone_.addBranch();
}

void UcxEndpoint::abort(const char* reason) {
  if (!failure_) {
    failure_.emplace(UCS_ERR_CANCELED, std::string("UCX endpoint aborted: ") + reason);
    failedFulfiller_->reject(KJ_EXCEPTION(DISCONNECTED, "UCX endpoint aborted", reason));
  }
  if (closed_) return;
  closed_ = true;
  closeNow(UCP_EP_CLOSE_FLAG_FORCE);
}

void UcxEndpoint::closeNow(uint32_t flags) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                       UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = flags;
  param.cb.send = &UcxEndpoint::onClosed;
  param.user_data = this;
  ucs_status_ptr_t request = ucp_ep_close_nbx(endpoint_, &param);
  // NULL or an error: closed already (an error on close means the peer is gone; nothing to undo).
  if (request != nullptr && !UCS_PTR_IS_ERR(request)) closeRequest_ = request;
}

void UcxEndpoint::onClosed(void* request, ucs_status_t, void* self) {
  auto* endpoint = static_cast<UcxEndpoint*>(self);
  endpoint->closeRequest_ = nullptr;
  ucp_request_free(request);
  if (endpoint->closeFulfiller_) endpoint->closeFulfiller_->fulfill();
}

void UcxEndpoint::onError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* endpoint = static_cast<UcxEndpoint*>(arg);
  if (endpoint->failure_) return;
  endpoint->failure_.emplace(status, "UCX endpoint failed: the peer daemon died or the network to "
                                     "it is cut");
  endpoint->failedFulfiller_->reject(
      KJ_EXCEPTION(DISCONNECTED, "UCX endpoint failed", endpoint->failure_->what()));
}

}  // namespace sidecar::net
