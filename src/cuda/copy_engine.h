#pragma once
// The daemon's GPU copy engine: copies device memory that producers share through CUDA IPC into
// the node's arena, on the daemon's own copy streams, and reports completion through the reactor.
//
// Contract:
// - Everything but create() runs on the thread of the reactor it was created with (core 0).
// - No call blocks on GPU work: the producer's event and the pieces' events are queried by poll()
//   while the core is busy; arm(), called only when the core is about to sleep, launches host
//   functions that write an eventfd. A copy starts once the producer's event has fired, so the
//   received data is what the producer's kernels wrote.
// - A copy is cut into pieces (Options::pieceBytes); `onPiece` runs once per piece as it lands in
//   the arena, in order, so a caller can put piece k on the network while k+1 is still copying.
//   `onDone` runs once after the last piece (or the first failure).
// - Without CUDA (built without it, no driver, no GPU) create() returns an engine whose
//   available() is false and whose copies fail at once with unavailableReason().
//
// This header has no CUDA types: callers need no #ifdefs.

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "reactor/reactor.h"

namespace sidecar::cuda {

using IpcHandleBytes = std::array<uint8_t, 64>;  // cudaIpcMemHandle_t / cudaIpcEventHandle_t
using DeviceUuid = std::array<uint8_t, 16>;

// Where a producer's tensor is.
struct DeviceSource {
  IpcHandleBytes memHandle{};
  uint64_t offsetBytes = 0;        // from the allocation's base
  uint64_t allocationBytes = 0;    // 0: unknown (not checked)
  DeviceUuid deviceUuid{};
  std::optional<IpcHandleBytes> eventHandle;  // wait for it before copying
};

struct CopyCallbacks {
  // (arena offset, bytes) of one piece that has landed.
  std::function<void(uint64_t arenaOffset, uint64_t sizeBytes)> onPiece;
  // Empty string: every piece landed. Otherwise what failed, for a person.
  std::function<void(const std::string& error)> onDone;
};

struct CopyEngineOptions {
  uint32_t streamsPerDevice = 2;
  uint64_t pieceBytes = 16ull << 20;
};

struct CopyEngineStats {
  uint64_t copies = 0;
  uint64_t pieces = 0;
  uint64_t bytes = 0;
  uint64_t hostFunctionsArmed = 0;  // sleeps with copies pending (host function or watcher armed)
  uint64_t handlesOpen = 0;
  uint64_t copiesDropped = 0;  // copies dropped: the producer ended while they waited
};

class CopyEngine {
 public:
  // Never null. Registers the arena with CUDA once (cudaHostRegister) so the copies are DMA.
  static std::unique_ptr<CopyEngine> create(reactor::Reactor& reactor, void* arenaBase,
                                            uint64_t arenaBytes, CopyEngineOptions options = {});
  virtual ~CopyEngine() = default;  // waits for queued copies, closes every handle

  virtual bool available() const = 0;
  virtual const std::string& unavailableReason() const = 0;  // "" when available
  virtual int deviceCount() const = 0;

  // Copies `sizeBytes` from `source` into the arena at `arenaOffset`. `session` scopes the IPC
  // handle cache. Errors (bad handle, unknown GPU) are reported through onDone, possibly before
  // this returns.
  virtual void copyToArena(uint64_t session, const DeviceSource& source, uint64_t sizeBytes,
                           uint64_t arenaOffset, CopyCallbacks callbacks) = 0;

  // The session ended: its handles are closed once its queued copies are done. `whenIdle` runs
  // (on the reactor thread) when nothing of the session is queued any more.
  virtual void dropSession(uint64_t session, std::function<void()> whenIdle) = 0;

  virtual CopyEngineStats stats() const = 0;
};

}  // namespace sidecar::cuda
