#include <ucp/api/ucp.h>

#include <chrono>
#include <map>

#include "client/direct_wire.h"

namespace sidecar::client {
namespace {

// While an endpoint is not known to work, and otherwise at most this often, a send first lets
// UCX progress (wire-up answers, errors): a system call, kept off the usual send.
constexpr auto kProgressEvery = std::chrono::milliseconds(100);
constexpr int kProgressCallsMax = 64;

class UcxDirectWire final : public DirectWire {
 public:
  UcxDirectWire(ucp_context_h context, ucp_worker_h worker) : context_(context), worker_(worker) {}

  ~UcxDirectWire() override {
    for (auto& [address, endpoint] : endpoints_) close(*endpoint);
    endpoints_.clear();
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }

  Sent send(const std::string& workerAddress, uint64_t tag, const void* bytes, uint64_t sizeBytes,
            std::string& error) override {
    Endpoint* e = endpoint(workerAddress, error);
    if (e == nullptr) return Sent::kFailed;
    auto now = std::chrono::steady_clock::now();
    if (!e->proven || now - lastProgress_ > kProgressEvery) {
      lastProgress_ = now;
      // Bounded: a worker with a failing endpoint may report work on every call.
      for (int i = 0; i < kProgressCallsMax && ucp_worker_progress(worker_) != 0; ++i) {
      }
    }
    if (e->failed) {
      error = e->why;
      return e->proven ? Sent::kLost : Sent::kFailed;
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
    ucs_status_ptr_t request = ucp_tag_send_nbx(e->ep, bytes, sizeBytes, tag, &param);
    if (request == nullptr) {
      e->proven = true;
      return Sent::kYes;
    }
    if (UCS_PTR_IS_ERR(request)) {
      ucs_status_t status = UCS_PTR_STATUS(request);
      if (status == UCS_ERR_NO_RESOURCE) return Sent::kBusy;
      error = ucs_status_string(status);
      return e->proven ? Sent::kLost : Sent::kFailed;
    }
    // Forced immediate completion never leaves a request; should one come, the message must
    // not be freed under UCX: finish it here (bounded, then cancelled), as a send that happened.
    ucs_status_t status = progressWhileBusy(request, std::chrono::seconds(1));
    if (status == UCS_INPROGRESS) {
      ucp_request_cancel(worker_, request);
      status = progressWhileBusy(request, std::chrono::hours(1));  // a cancelled one ends
    }
    ucp_request_free(request);
    if (status == UCS_OK) return Sent::kYes;
    error = ucs_status_string(status);
    return Sent::kFailed;
  }

  void forget(const std::string& workerAddress) override {
    auto it = endpoints_.find(workerAddress);
    if (it == endpoints_.end()) return;
    close(*it->second);
    endpoints_.erase(it);
  }

 private:
  struct Endpoint {
    ucp_ep_h ep = nullptr;
    bool proven = false;  // a send went through
    bool failed = false;  // UCX reported it dead
    std::string why;
  };

  Endpoint* endpoint(const std::string& address, std::string& error) {
    auto it = endpoints_.find(address);
    if (it != endpoints_.end()) return it->second.get();
    auto e = std::make_unique<Endpoint>();
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = reinterpret_cast<const ucp_address_t*>(address.data());
    // Peer mode: a dead peer or a cut network fails the endpoint (reported to onError) instead
    // of being fatal to this process.
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &UcxDirectWire::onError;
    params.err_handler.arg = e.get();
    ucs_status_t status = ucp_ep_create(worker_, &params, &e->ep);
    if (status != UCS_OK) {
      error = std::string("cannot reach the peer's UCX worker: ") + ucs_status_string(status);
      return nullptr;
    }
    return endpoints_.emplace(address, std::move(e)).first->second.get();
  }

  static void onError(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* e = static_cast<Endpoint*>(arg);
    e->failed = true;
    e->why = std::string("the UCX endpoint failed: ") + ucs_status_string(status);
  }

  void close(Endpoint& e) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t request = ucp_ep_close_nbx(e.ep, &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) return;
    (void)progressWhileBusy(request, std::chrono::seconds(1));
    ucp_request_free(request);
  }

  // Progresses the worker while `request` is in progress, for at most `limit`; its status then.
  ucs_status_t progressWhileBusy(void* request, std::chrono::steady_clock::duration limit) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (ucp_request_check_status(request) == UCS_INPROGRESS &&
           std::chrono::steady_clock::now() < deadline) {
      ucp_worker_progress(worker_);
    }
    return ucp_request_check_status(request);
  }

  ucp_context_h context_;
  ucp_worker_h worker_;
  std::map<std::string, std::unique_ptr<Endpoint>> endpoints_;
  std::chrono::steady_clock::time_point lastProgress_{};
};

}  // namespace

std::unique_ptr<DirectWire> DirectWire::create(std::string& why) {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) {
    why = std::string("UCX configuration: ") + ucs_status_string(status);
    return nullptr;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG;
  ucp_context_h context = nullptr;
  status = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (status != UCS_OK) {
    why = std::string("UCX did not start: ") + ucs_status_string(status);
    return nullptr;
  }
  ucp_worker_params_t workerParams{};
  workerParams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  workerParams.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  status = ucp_worker_create(context, &workerParams, &worker);
  if (status != UCS_OK) {
    ucp_cleanup(context);
    why = std::string("no UCX worker: ") + ucs_status_string(status);
    return nullptr;
  }
  return std::make_unique<UcxDirectWire>(context, worker);
}

}  // namespace sidecar::client
