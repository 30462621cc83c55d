#pragma once
// The node's transfer service: the rank registry, the sessions' unsent allocations, the slab
// allocator and the transfer table, all owned by one core (core 0) and reached from every core
// through that core's executor. Implements rpc::TransferBackend for the RPC layer.
//
// Backpressure: allocate() waits (bounded by the call's timeout, else sendTimeoutMs) for space in
// the arena and then fails with [arena-full]; nothing is ever dropped to make room.

#include <kj/async.h>
#include <kj/timer.h>

#include <map>
#include <thread>
#include <unordered_map>

#include "rpc/transfer_backend.h"
#include "shm/arena.h"
#include "shm/slab_allocator.h"
#include "transfer/transfer_table.h"

namespace sidecar::daemon {

struct TransferOptions {
  uint32_t sendTimeoutMs = 30'000;    // default wait for arena space
  transfer::TransferLimits limits;
};

class NodeTransfers final : public rpc::TransferBackend, private transfer::TransferTable::Hooks {
 public:
  NodeTransfers(const shm::Arena& arena, shm::SlabAllocator& allocator, TransferOptions options);
  ~NodeTransfers() noexcept;

  // Called on the owner core's thread once its loop runs: from then on, calls from other cores
  // are forwarded there. Starts the periodic expiry of holds.
  void attachOwner(kj::Timer& timer);
  // Called on the owner core before its loop stops: fails waiters, frees everything.
  void detachOwner();

  kj::Promise<rpc::SessionId> registerRank(rpc::RankRegistration registration) override;
  void unregister(rpc::SessionId session) override;
  kj::Promise<shm::Allocation> allocate(rpc::SessionId session, uint64_t sizeBytes,
                                        uint32_t timeoutMs) override;
  kj::Promise<void> release(rpc::SessionId session, uint64_t offset) override;
  kj::Promise<void> send(rpc::SessionId session, rpc::SendRequest request) override;
  kj::Promise<void> closeStream(rpc::SessionId session, std::string dataId, uint32_t numChunks,
                                std::vector<transfer::Group> destinations) override;
  kj::Promise<rpc::RecvReply> recv(rpc::SessionId session, std::string dataId, uint32_t chunkId,
                                   uint32_t timeoutMs) override;
  kj::Promise<void> markDone(rpc::SessionId session, std::string dataId,
                             uint32_t chunkId) override;
  kj::Promise<rpc::TransferSummary> summary() override;
  kj::Promise<std::string> inspect(std::string dataId) override;
  int arenaFd() const override { return arena_.fd(); }
  uint64_t arenaBytes() const override { return arena_.sizeBytes(); }

 private:
  struct Session {
    rpc::RankRegistration registration;
    std::map<uint64_t, shm::Allocation> allocations;  // by offset: allocated, not yet sent
    uint64_t bytesAllocated = 0;
  };
  class AllocateWaiter;
  class RecvAdapter;

  template <typename Func>
  kj::PromiseForResult<Func, void> onOwner(Func&& func);
  Session& session(rpc::SessionId id);
  void dropSession(rpc::SessionId id);
  kj::Promise<void> expireLoop();

  void release(const shm::Allocation& allocation) override;
  uint64_t nowMs() override;

  const shm::Arena& arena_;
  shm::SlabAllocator& allocator_;
  TransferOptions options_;
  transfer::TransferTable table_;

  std::thread::id ownerThread_;
  kj::Own<const kj::Executor> ownerExecutor_;
  kj::Timer* timer_ = nullptr;
  kj::Promise<void> expiry_ = nullptr;

  rpc::SessionId nextSession_ = 1;
  std::unordered_map<rpc::SessionId, Session> sessions_;
  std::unordered_map<transfer::Rank, rpc::SessionId> ranks_;
};

}  // namespace sidecar::daemon
