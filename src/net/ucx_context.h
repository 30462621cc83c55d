#pragma once
// One UCX context per daemon: the transports UCX may use and the one registered memory region
// (the arena). Workers (ucx_worker.h), one per reactor core, are made from it.
//
// Transports come from UCX's own environment, read by ucp_config_read at construction:
//   UCX_TLS=tcp            TCP only (what the tests force: works in any namespace)
//   UCX_TLS=rc,sm,self     RDMA + shared memory, where the hardware has it
//   UCX_NET_DEVICES=eth0   restrict to one interface
// Unset, UCX picks by itself, and on one machine it picks shared memory (posix/sysv/cma) even
// between two network namespaces: it tells hosts apart by host name and boot id, not by network
// namespace, and /dev/shm is shared. Measured with bench/cross_node/perftest between two
// namespaces on the dev VM: UCX default 8.2 GB/s (1 MiB), 0.6 us (4 KiB) against UCX_TLS=tcp
// 1.2 GB/s, 15 us: the default never touches the veth. So cross-node tests and benchmarks in
// namespaces must force UCX_TLS=tcp, or they neither measure the network nor see a cut link.
// The tests in tests/net pass with UCX_TLS=tcp and with UCX_TLS=sm,self,tcp (shared memory
// wakes the reactor too). `ucx_info -d` lists what this host offers.
//
// Registration: the arena is registered once with ucp_mem_map, so sends and receives inside it
// pass the handle (UCP_OP_ATTR_FIELD_MEMH) and skip UCX's registration cache lookup; with RDMA
// transports this is what makes zero-copy rendezvous cheap. Memory outside the region still works
// (UCX registers or copies it per operation, at a cost).

#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>

namespace sidecar::net {

class UcxContext {
 public:
  // Initializes UCX with the tag and wakeup features and registers [regionBase, regionBase +
  // regionBytes) when regionBytes > 0 (the memory must already be mapped and stay mapped for the
  // context's lifetime). Throws UcxError saying what to check when UCX cannot start (no usable
  // transport for UCX_TLS, a bad UCX_* variable) or the region cannot be registered.
  UcxContext(void* regionBase = nullptr, size_t regionBytes = 0);
  ~UcxContext();
  UcxContext(const UcxContext&) = delete;
  UcxContext& operator=(const UcxContext&) = delete;

  ucp_context_h handle() const { return context_; }

  // The registration handle when [buffer, buffer + sizeBytes) lies inside the region, else
  // nullptr. Two compares: cheap enough for every operation.
  ucp_mem_h regionHandleFor(const void* buffer, size_t sizeBytes) const {
    auto begin = reinterpret_cast<uintptr_t>(buffer);
    if (regionMemh_ == nullptr || begin < regionBegin_ || sizeBytes > regionBytes_ ||
        begin - regionBegin_ > regionBytes_ - sizeBytes) {
      return nullptr;
    }
    return regionMemh_;
  }

  // Every UCX request has this many bytes of ours in front of UCX's (ucp_params.request_size):
  // the per-operation record lives there, so an operation allocates nothing beyond the request
  // UCX takes from its own pool.
  static constexpr size_t kRequestSlotBytes = sizeof(void*);

 private:
  ucp_context_h context_ = nullptr;
  ucp_mem_h regionMemh_ = nullptr;
  uintptr_t regionBegin_ = 0;
  size_t regionBytes_ = 0;
};

}  // namespace sidecar::net
