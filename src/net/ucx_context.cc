#include "net/ucx_context.h"

#include <string>

#include "net/ucx_error.h"
#include "net/ucx_operation.h"

namespace sidecar::net {

UcxContext::UcxContext(void* regionBase, size_t regionBytes) {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) {
    throw UcxError(status, "UCX could not read its configuration; check the UCX_* environment "
                           "variables (ucx_info -c lists them)");
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_REQUEST_SIZE |
                      UCP_PARAM_FIELD_REQUEST_INIT |
                      UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  params.request_size = kRequestSlotBytes;
  params.request_init = &UcxOperation::requestInit;
  // Each worker is driven by its own reactor thread alone (UCS_THREAD_MODE_SINGLE), but the
  // context (its registration cache, the arena's handle) is shared by the workers of all cores.
  params.mt_workers_shared = 1;
  status = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (status != UCS_OK) {
    const char* tls = getenv("UCX_TLS");
    throw UcxError(status, std::string("UCX failed to initialize (UCX_TLS=") +
                               (tls ? tls : "<unset>") +
                               "); check that UCX_TLS names transports this host has "
                               "(ucx_info -d lists them), or unset it");
  }
  if (regionBytes > 0) {
    ucp_mem_map_params_t map{};
    map.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    map.address = regionBase;
    map.length = regionBytes;
    status = ucp_mem_map(context_, &map, &regionMemh_);
    if (status != UCS_OK) {
      ucp_cleanup(context_);
      throw UcxError(status, "UCX could not register the arena (" + std::to_string(regionBytes) +
                                 " bytes); with RDMA transports raise the locked-memory limit "
                                 "(ulimit -l) or use a smaller arena");
    }
    regionBegin_ = reinterpret_cast<uintptr_t>(regionBase);
    regionBytes_ = regionBytes;
  }
}

UcxContext::~UcxContext() {
  if (regionMemh_ != nullptr) ucp_mem_unmap(context_, regionMemh_);
  ucp_cleanup(context_);
}

}  // namespace sidecar::net
