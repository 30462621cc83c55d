#include "net/ucx_worker.h"

#include <poll.h>

#include <cerrno>

#include "net/ucx_endpoint.h"
#include "net/ucx_error.h"
#include "net/ucx_operation.h"

namespace sidecar::net {

UcxWorker::UcxWorker(UcxContext& context, reactor::Reactor& reactor)
    : context_(context), reactor_(reactor) {
  ucp_worker_params_t params{};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  params.thread_mode = UCS_THREAD_MODE_SINGLE;  // one reactor thread drives it: no locks in UCX
  ucs_status_t status = ucp_worker_create(context.handle(), &params, &worker_);
  if (status != UCS_OK) throw UcxError(status, "UCX could not create a worker");
  status = ucp_worker_get_efd(worker_, &eventFd_);
  if (status != UCS_OK) {
    ucp_worker_destroy(worker_);
    throw UcxError(status, "UCX worker has no event fd (a transport in UCX_TLS lacks wakeup "
                           "support; try UCX_TLS=tcp)");
  }
  ucp_address_t* address = nullptr;
  size_t addressBytes = 0;
  status = ucp_worker_get_address(worker_, &address, &addressBytes);
  if (status != UCS_OK) {
    ucp_worker_destroy(worker_);
    throw UcxError(status, "UCX could not report the worker address");
  }
  auto* bytes = reinterpret_cast<const uint8_t*>(address);
  address_.assign(bytes, bytes + addressBytes);
  ucp_worker_release_address(worker_, address);
  reactor_.addSource(*this);
}

UcxWorker::~UcxWorker() {
  reactor_.removeSource(*this);
  if (pollPending_) {
    reactor_.cancel(this);
    while (pollPending_) reactor_.poll();  // the cancelled poll's CQE names this object
  }
  ucp_worker_destroy(worker_);
}

std::unique_ptr<UcxEndpoint> UcxWorker::connect(kj::ArrayPtr<const uint8_t> remoteAddress) {
  if (remoteAddress.size() == 0) {
    throw UcxError(UCS_ERR_INVALID_PARAM, "UCX connect: the peer's worker address is empty");
  }
  std::unique_ptr<UcxEndpoint> endpoint(new UcxEndpoint(*this, nullptr));
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(remoteAddress.begin());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &UcxEndpoint::onError;
  params.err_handler.arg = endpoint.get();
  ucs_status_t status = ucp_ep_create(worker_, &params, &endpoint->endpoint_);
  if (status != UCS_OK) {
    endpoint->closed_ = true;  // nothing to close
    throw UcxError(status, "UCX could not connect to the peer worker (is the address from a "
                           "worker of the same UCX version, reachable over UCX_TLS?)");
  }
  return endpoint;
}

kj::Promise<size_t> UcxWorker::tagRecv(uint64_t tag, void* buffer, size_t sizeBytes) {
  return tagRecvMasked(tag, ~uint64_t{0}, buffer, sizeBytes).then([](TagCompletion done) {
    return done.sizeBytes;
  });
}

kj::Promise<TagCompletion> UcxWorker::tagRecvMasked(uint64_t tag, uint64_t tagMask, void* buffer,
                                                    size_t sizeBytes, TagArrival onArrival) {
  return kj::newAdaptedPromise<TagCompletion, UcxOperation>(*this, UcxOperation::Kind::kRecv,
                                                            nullptr, tag, tagMask, buffer, sizeBytes,
                                                            kj::mv(onArrival));
}

bool UcxWorker::poll() { return ucp_worker_progress(worker_) != 0; }

bool UcxWorker::arm() {
  ucs_status_t status = ucp_worker_arm(worker_);
  // BUSY: events arrived since the last progress; any other failure: keep polling rather than
  // sleep on a notification that may never come.
  if (status != UCS_OK) return false;
  if (!pollPending_) {
    io_uring_sqe& sqe = reactor_.prepare(this);
    io_uring_prep_poll_add(&sqe, eventFd_, POLLIN);
    pollPending_ = true;
  }
  return true;
}

void UcxWorker::complete(int32_t, uint32_t) {
  // Readable, cancelled or failed: either way the next poll() progresses the worker and the next
  // arm() re-adds the poll.
  pollPending_ = false;
}

}  // namespace sidecar::net
