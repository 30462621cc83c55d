// The CUDA side of libsidecar (see device_export.h).
//
// Allocation lookup: cuPointerGetAttributes (reached through cudaGetDriverEntryPointByVersion, so
// libsidecar does not link libcuda) gives the allocation's range and its process-wide unique
// buffer id. The IPC handle cache is keyed by that id: an allocation freed and another made at
// the same address gets a new id, so a stale handle is never sent.
//
// Events: one interprocess event per (device, stream), re-recorded at every send. The daemon
// calls cudaStreamWaitEvent when the send arrives, which waits for the latest record: never
// earlier than the work this send needs (a later record on the same stream only adds waiting).

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <utility>

#include "cuda/device_export.h"

namespace sidecar::cuda {

namespace {

using PointerGetAttributes = CUresult (*)(unsigned int, CUpointer_attribute*, void**, CUdeviceptr);

std::string cudaText(const char* what, cudaError_t rc) {
  return std::string(what) + ": " + cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) + ")";
}

[[noreturn]] void fail(const char* what, cudaError_t rc) {
  bool unavailable = rc == cudaErrorNoDevice || rc == cudaErrorInsufficientDriver;
  throw DeviceError(unavailable, cudaText(what, rc));
}

// Restores the caller's current device: libsidecar must not change it behind their back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    cudaError_t rc = cudaSetDevice(device);
    if (rc != cudaSuccess) fail("cudaSetDevice", rc);
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

struct CachedAllocation {
  uintptr_t base = 0;
  uint64_t sizeBytes = 0;
  std::array<uint8_t, 64> handle{};
};

class CudaDeviceExporter final : public DeviceExporter {
 public:
  ~CudaDeviceExporter() override {
    for (auto& [key, event] : events_) cudaEventDestroy(event);
    if (registeredArena_ != nullptr) cudaHostUnregister(registeredArena_);
  }

  ExportedTensor exportTensor(const void* data, uint64_t sizeBytes, int device,
                              void* stream) override {
    DeviceScope scope(device);
    ExportedTensor out;
    const CachedAllocation& allocation = lookup(data);
    uintptr_t address = reinterpret_cast<uintptr_t>(data);
    out.memHandle = allocation.handle;
    out.offsetBytes = address - allocation.base;
    out.allocationBytes = allocation.sizeBytes;
    if (out.offsetBytes + sizeBytes > allocation.sizeBytes) {
      throw DeviceError(false, "the tensor reaches past the end of its device allocation");
    }
    if (allocation.sizeBytes < kIpcMinAllocationBytes) {
      out.stage = true;
      return out;
    }
    out.deviceUuid = uuid(device);
    cudaEvent_t event = streamEvent(device, stream, out.eventHandle);
    cudaError_t rc = cudaEventRecord(event, static_cast<cudaStream_t>(stream));
    if (rc != cudaSuccess) fail("cudaEventRecord on the producer's stream", rc);
    return out;
  }

  void stageToArena(void* arenaData, const void* deviceData, uint64_t sizeBytes, int device,
                    void* stream, void* arenaBase, uint64_t arenaBytes) override {
    DeviceScope scope(device);
    registerArena(arenaBase, arenaBytes);
    cudaError_t rc = cudaMemcpyAsync(arenaData, deviceData, sizeBytes, cudaMemcpyDeviceToHost,
                                     static_cast<cudaStream_t>(stream));
    if (rc == cudaSuccess) rc = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    if (rc != cudaSuccess) fail("copying a small device tensor into the arena", rc);
  }

  void copyToDevice(void* deviceData, const void* arenaData, uint64_t sizeBytes, int device,
                    void* stream, void* arenaBase, uint64_t arenaBytes) override {
    DeviceScope scope(device);
    registerArena(arenaBase, arenaBytes);
    cudaError_t rc = cudaMemcpyAsync(deviceData, arenaData, sizeBytes, cudaMemcpyHostToDevice,
                                     static_cast<cudaStream_t>(stream));
    if (rc != cudaSuccess) fail("cudaMemcpyAsync from the arena to the device", rc);
  }

 private:
  void registerArena(void* arenaBase, uint64_t arenaBytes) {
    if (registeredArena_ == nullptr && !registerTried_) {
      registerTried_ = true;
      // Pinned once: host-to-device copies from it are DMA and truly asynchronous. If it fails
      // (e.g. RLIMIT_MEMLOCK), copies still work, staged by the driver.
      if (cudaHostRegister(arenaBase, arenaBytes, cudaHostRegisterPortable) == cudaSuccess) {
        registeredArena_ = arenaBase;
      } else {
        cudaGetLastError();
      }
    }
  }

  PointerGetAttributes getAttributes() {
    if (getAttributes_ == nullptr) {
      void* fn = nullptr;
      cudaDriverEntryPointQueryResult status{};
      cudaError_t rc = cudaGetDriverEntryPointByVersion("cuPointerGetAttributes", &fn, 12000,
                                                        cudaEnableDefault, &status);
      if (rc != cudaSuccess || fn == nullptr) fail("cannot reach cuPointerGetAttributes", rc);
      getAttributes_ = reinterpret_cast<PointerGetAttributes>(fn);
    }
    return getAttributes_;
  }

  const CachedAllocation& lookup(const void* data) {
    unsigned long long bufferId = 0;
    CUdeviceptr start = 0;
    size_t size = 0;
    CUmemorytype type{};
    CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_BUFFER_ID,
                                        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                        CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                        CU_POINTER_ATTRIBUTE_MEMORY_TYPE};
    void* values[] = {&bufferId, &start, &size, &type};
    CUresult cr = getAttributes()(4, attributes, values, reinterpret_cast<CUdeviceptr>(data));
    if (cr != CUDA_SUCCESS || type != CU_MEMORYTYPE_DEVICE || bufferId == 0) {
      throw DeviceError(false, "the tensor's data pointer is not device memory of this process "
                               "(give a pointer from cudaMalloc, or send a host tensor)");
    }
    auto found = allocations_.find(bufferId);
    if (found != allocations_.end()) return found->second;
    CachedAllocation allocation;
    allocation.base = static_cast<uintptr_t>(start);
    allocation.sizeBytes = size;
    if (size < kIpcMinAllocationBytes) {  // staged: no handle needed
      return allocations_.emplace(bufferId, allocation).first->second;
    }
    cudaIpcMemHandle_t handle;
    cudaError_t rc = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(start));
    if (rc != cudaSuccess) {
      throw DeviceError(false, cudaText("this allocation cannot be shared with the daemon by "
                                        "CUDA IPC (cudaIpcGetMemHandle; memory from cudaMalloc "
                                        "works, stream-ordered or VMM pools do not)", rc));
    }
    memcpy(allocation.handle.data(), &handle, sizeof handle);
    return allocations_.emplace(bufferId, allocation).first->second;
  }

  std::array<uint8_t, 16> uuid(int device) {
    auto found = uuids_.find(device);
    if (found != uuids_.end()) return found->second;
    cudaDeviceProp props{};
    cudaError_t rc = cudaGetDeviceProperties(&props, device);
    if (rc != cudaSuccess) fail("cudaGetDeviceProperties", rc);
    std::array<uint8_t, 16> out{};
    memcpy(out.data(), &props.uuid, out.size());
    uuids_.emplace(device, out);
    return out;
  }

  cudaEvent_t streamEvent(int device, void* stream, std::array<uint8_t, 64>& handleOut) {
    auto key = std::make_pair(device, stream);
    auto found = events_.find(key);
    if (found == events_.end()) {
      cudaEvent_t event = nullptr;
      cudaError_t rc = cudaEventCreateWithFlags(&event, cudaEventInterprocess | cudaEventDisableTiming);
      if (rc != cudaSuccess) fail("cudaEventCreateWithFlags (interprocess)", rc);
      cudaIpcEventHandle_t handle;
      rc = cudaIpcGetEventHandle(&handle, event);
      if (rc != cudaSuccess) fail("cudaIpcGetEventHandle", rc);
      found = events_.emplace(key, event).first;
      std::array<uint8_t, 64> bytes{};
      memcpy(bytes.data(), &handle, sizeof handle);
      eventHandles_[key] = bytes;
    }
    handleOut = eventHandles_[key];
    return found->second;
  }

  PointerGetAttributes getAttributes_ = nullptr;
  std::map<unsigned long long, CachedAllocation> allocations_;
  std::map<int, std::array<uint8_t, 16>> uuids_;
  std::map<std::pair<int, void*>, cudaEvent_t> events_;
  std::map<std::pair<int, void*>, std::array<uint8_t, 64>> eventHandles_;
  void* registeredArena_ = nullptr;
  bool registerTried_ = false;
};

}  // namespace

std::unique_ptr<DeviceExporter> DeviceExporter::create() {
  return std::make_unique<CudaDeviceExporter>();
}

}  // namespace sidecar::cuda
