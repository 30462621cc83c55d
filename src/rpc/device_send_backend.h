#pragma once
// What the Session service needs for GPU tensors (Session.sendDevice, issue 6). The daemon
// implements it over the CUDA copy engine (daemon/device_sends.h); a daemon without one returns
// null from NodeState::deviceSends() and sendDevice fails with [gpu-unavailable].

#include <kj/async.h>

#include <functional>
#include <string>
#include <vector>

#include "rpc/transfer_backend.h"

namespace sidecar::rpc {

struct DeviceTensorDescriptor {
  transfer::Dtype dtype = transfer::Dtype::kUint8;
  std::vector<int64_t> shape;
  uint64_t sizeBytes = 0;
  std::string memHandle;    // 64 bytes
  uint64_t offsetBytes = 0;
  uint64_t allocationBytes = 0;
  std::string deviceUuid;   // 16 bytes
  std::string eventHandle;  // 64 bytes, or empty
};

struct DeviceSendRequest {
  // The sender as registered (filled by the session, not the client's call).
  transfer::Rank senderRank = 0;
  transfer::Group senderGroup;
  bool concurrentCopy = false;  // each member copies its slice (daemon/group_copies.h)
  std::string dataId;
  uint32_t chunkId = 0;
  uint32_t numChunks = 1;
  std::vector<transfer::Group> destinations;
  DeviceTensorDescriptor tensor;
};

class DeviceSendBackend {
 public:
  // From any core's loop; resolves when the chunk is stored (as TransferBackend::send).
  virtual kj::Promise<void> sendDevice(SessionId session, DeviceSendRequest request) = 0;
  // From any thread, instead of TransferBackend::unregister: the session's copies still queued
  // write into its allocations, so `unregister` runs once they are done.
  virtual void endSession(SessionId session, std::function<void()> unregister) = 0;

 protected:
  ~DeviceSendBackend() = default;
};

}  // namespace sidecar::rpc
