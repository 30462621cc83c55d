#pragma once
// libsidecar's side of GPU tensors: shares a device tensor with the daemon (CUDA IPC handle of
// its allocation, cached per allocation, plus an interprocess event recorded on the producer's
// stream), and copies received tensors from the arena to a device (the arena is registered with
// CUDA lazily, once). One per Sidecar; not thread-safe (a Sidecar belongs to one thread).
//
// Failures throw DeviceError; `unavailable` tells "no CUDA or no GPU here" from bad input.
// This header has no CUDA types: the client builds the same with and without CUDA.

#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace sidecar::cuda {

class DeviceError : public std::runtime_error {
 public:
  DeviceError(bool unavailable, const std::string& message)
      : std::runtime_error(message), unavailable_(unavailable) {}
  bool unavailable() const { return unavailable_; }

 private:
  bool unavailable_;
};

struct ExportedTensor {
  std::array<uint8_t, 64> memHandle{};
  uint64_t offsetBytes = 0;       // from the allocation's base
  uint64_t allocationBytes = 0;
  std::array<uint8_t, 16> deviceUuid{};
  std::array<uint8_t, 64> eventHandle{};  // recorded on the stream at export time
  // The allocation is under kIpcMinAllocationBytes: the driver may carve several such allocations
  // out of one block, and a block opened twice by the daemon fails (cudaErrorAlreadyMapped). Such
  // tensors are staged by the client instead (stageToArena); nothing else above is set.
  bool stage = false;
};

// PyTorch's caching allocator asks cudaMalloc for segments of at least this size.
constexpr uint64_t kIpcMinAllocationBytes = 2ull << 20;

class DeviceExporter {
 public:
  static std::unique_ptr<DeviceExporter> create();
  virtual ~DeviceExporter() = default;

  // `data` .. data+sizeBytes must lie in one cudaMalloc allocation on `device`; records the
  // event on `stream` (a cudaStream_t; nullptr: the legacy default stream).
  virtual ExportedTensor exportTensor(const void* data, uint64_t sizeBytes, int device,
                                      void* stream) = 0;

  // For a staged tensor: copies it into the arena on `stream` and waits for that stream (the
  // tensor is small; this is the only GPU call of libsidecar that synchronizes).
  virtual void stageToArena(void* arenaData, const void* deviceData, uint64_t sizeBytes,
                            int device, void* stream, void* arenaBase, uint64_t arenaBytes) = 0;

  // Queues a host-to-device copy from the arena on `stream` (asynchronous). `arenaBase` and
  // `arenaBytes` describe this process's mapping; registered with CUDA on first use.
  virtual void copyToDevice(void* deviceData, const void* arenaData, uint64_t sizeBytes, int device,
                            void* stream, void* arenaBase, uint64_t arenaBytes) = 0;
};

}  // namespace sidecar::cuda
