#pragma once
// GPU tensors on the daemon (Session.sendDevice, issue 6): the orchestration of one device send.
//
//   allocate(session, bytes)  ->  copy engine: device -> arena at that offset, piece by piece
//                             ->  send(session, tensor at that offset)   (NodeTransfers, unchanged)
//
// The copy engine lives on core 0 (the owner core) and completes through its reactor; calls from
// other cores hop there through core 0's executor. A failed copy releases the allocation.
//
// Pipelining onto the network (cross-node): the send starts while the copy runs; the engine's
// per-piece callbacks feed a LandingBody, and a delivery to another node puts each UCX body piece
// on the wire as soon as it has landed (NodeTransfers::sendLanding). Local receivers get the
// chunk when all of it landed.
//
// Groups with concurrent copy (registered per rank): each member copies only its slice of its
// replica into one shared allocation, gathered by GroupCopies on the owner core (see
// daemon/group_copies.h). Without it, every member's replica is copied whole and the table keeps
// the first (dedup).
//
// Sessions: a session's allocations must outlive the copies that write into them, so the end of a
// session goes through endSession(): the engine closes the session's IPC handles and then the rank
// is unregistered (which frees what it had not sent).

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "cuda/copy_engine.h"
#include "daemon/core.h"
#include "daemon/group_copies.h"
#include "rpc/device_send_backend.h"
#include "shm/arena.h"

namespace sidecar::daemon {

class DeviceSends final : public rpc::DeviceSendBackend, private GroupCopies::Hooks {
 public:
  // `groupGatherTimeoutMs`: how long the members of a group with concurrent copy have, from the
  // first member's send, to send theirs (the daemon passes its send timeout).
  DeviceSends(rpc::TransferBackend& transfers, const shm::Arena& arena,
              cuda::CopyEngineOptions options = {}, uint32_t groupGatherTimeoutMs = 30'000);
  ~DeviceSends();

  // On the owner core's thread, once its loop runs: creates the copy engine (registers the arena
  // with CUDA, which takes time proportional to its size).
  void attachOwner(Core& owner);
  // On the owner core's thread before its loop stops: waits for queued copies, closes handles.
  void detachOwner();

  // Thread-safe, for `info`.
  bool available() const { return available_.load(std::memory_order_acquire); }
  std::string unavailableReason() const;

  kj::Promise<void> sendDevice(rpc::SessionId session, rpc::DeviceSendRequest request) override;
  void endSession(rpc::SessionId session, std::function<void()> unregister) override;

  // On the owner core: copies `bytes` of `source` into the arena at `arenaOffset`; `onPiece` is
  // called per piece as it lands. Resolves when all landed.
  kj::Promise<void> copyPieces(rpc::SessionId session, const cuda::DeviceSource& source,
                               uint64_t bytes, uint64_t arenaOffset,
                               std::function<void(uint64_t, uint64_t)> onPiece);

 private:
  // GroupCopies::Hooks, on the owner core.
  kj::Promise<shm::Allocation> allocate(rpc::SessionId session, uint64_t sizeBytes) override;
  kj::Promise<void> copySlice(const GroupMemberSend& member, GroupSlice slice,
                              uint64_t arenaOffset) override;
  kj::Promise<void> store(const GroupMemberSend& member, uint64_t arenaOffset) override;
  kj::Promise<void> storeReplica(const GroupMemberSend& member) override;
  kj::Promise<void> release(rpc::SessionId session, uint64_t arenaOffset) override;

  // On the owner core: copies the tensor into its allocation at `offset` and sends it, pieces
  // reaching other nodes as they land (rpc::TransferBackend::sendLanding).
  kj::Promise<void> copyAndSend(rpc::SessionId session, const cuda::DeviceSource& source,
                                const rpc::DeviceSendRequest& request, uint64_t offset,
                                uint64_t allocatedNs);
  // The plain send of the tensor once its bytes are at `arenaOffset`.
  static rpc::SendRequest sendRequest(const rpc::DeviceSendRequest& request, uint64_t arenaOffset);

  rpc::TransferBackend& transfers_;
  const shm::Arena& arena_;
  cuda::CopyEngineOptions options_;
  Core* owner_ = nullptr;  // set on attach, before available_
  std::unique_ptr<cuda::CopyEngine> engine_;  // owner core only
  uint32_t groupGatherTimeoutMs_;
  std::unique_ptr<GroupCopies> groups_;       // owner core only
  std::atomic<bool> available_{false};
  std::atomic<bool> attached_{false};
  // Where the time of a device send goes, summed in µs (logged when the daemon stops).
  struct PhaseTotals {
    std::atomic<uint64_t> sends{0}, allocateUs{0}, copyUs{0}, storeUs{0};
    std::atomic<uint64_t> piecesEarly{0};  // released to the network before their copy finished
  };
  PhaseTotals phases_;
  mutable std::mutex reasonMutex_;
  std::string reason_ = "the GPU copy engine is starting";
};

}  // namespace sidecar::daemon
