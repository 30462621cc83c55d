#include "daemon/node_transfers.h"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <kj/debug.h>

#include "base/clock.h"

namespace sidecar::daemon {

using rpc::transferError;

namespace {

std::string groupText(const transfer::Group& group) {
  std::string out = "[";
  for (size_t i = 0; i < group.size(); ++i) out += (i ? "," : "") + std::to_string(group[i]);
  return out + "]";
}

// The error kind a client sees for an allocator failure.
const char* allocationErrorKind(shm::ShmErrc code) {
  switch (code) {
    case shm::ShmErrc::ArenaFull: return "arena-full";
    case shm::ShmErrc::TooLarge: return "too-large";
    default: return "invalid-argument";
  }
}

bool processAlive(int32_t pid) { return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM); }

template <typename T>
T take(transfer::Result<T>&& result) {
  if (auto* error = std::get_if<transfer::Error>(&result)) throw transferError(*error);
  return std::get<T>(std::move(result));
}

}  // namespace

// Bridges a queued allocation to a promise; its destructor withdraws the request.
class NodeTransfers::AllocateWaiter final : public shm::AllocationWaiter {
 public:
  AllocateWaiter(kj::PromiseFulfiller<shm::Allocation>& fulfiller, shm::SlabAllocator& allocator,
                 uint64_t bytes, uint64_t hint, shm::ShmTimePoint deadline)
      : fulfiller_(fulfiller), allocator_(allocator) {
    auto now = allocator_.allocateOrWait(bytes, hint, deadline, *this);
    if (!now.ok()) {
      fulfiller_.reject(transferError(allocationErrorKind(now.code()), now.error().message));
    } else if (now.value()) {
      fulfiller_.fulfill(kj::cp(*now.value()));
    }  // else queued: complete() runs when a free makes room or the deadline passes
  }
  ~AllocateWaiter() {
    if (queued()) allocator_.cancelWait(*this);
  }
  void complete(shm::Result<shm::Allocation> result) override {
    if (result.ok()) {
      fulfiller_.fulfill(kj::cp(result.value()));
    } else {
      fulfiller_.reject(transferError(allocationErrorKind(result.code()), result.error().message));
    }
  }

 private:
  kj::PromiseFulfiller<shm::Allocation>& fulfiller_;
  shm::SlabAllocator& allocator_;
};

// Bridges a queued recv to a promise; its destructor withdraws the recv.
class NodeTransfers::RecvAdapter final : public transfer::RecvWaiter {
 public:
  RecvAdapter(kj::PromiseFulfiller<rpc::RecvReply>& fulfiller, transfer::TransferTable& table,
              transfer::Rank rank, const std::string& dataId, uint32_t chunkId)
      : fulfiller_(fulfiller), table_(table) {
    table_.recv(rank, dataId, chunkId, *this);
  }
  ~RecvAdapter() {
    if (!completed_) table_.cancel(*this);
  }
  void complete(transfer::Result<transfer::RecvValue> result) override {
    completed_ = true;
    if (auto* error = std::get_if<transfer::Error>(&result)) {
      fulfiller_.reject(transferError(*error));
      return;
    }
    auto& value = std::get<transfer::RecvValue>(result);
    if (auto* tensor = std::get_if<const transfer::TensorChunk*>(&value)) {
      const transfer::TensorChunk& t = **tensor;
      fulfiller_.fulfill(rpc::TensorDescriptor{t.dtype, t.shape, t.allocation.offset, t.sizeBytes});
    } else if (auto* object = std::get_if<const transfer::ObjectChunk*>(&value)) {
      fulfiller_.fulfill(**object);
    } else {
      fulfiller_.fulfill(transfer::EndOfStream{});
    }
  }

 private:
  kj::PromiseFulfiller<rpc::RecvReply>& fulfiller_;
  transfer::TransferTable& table_;
  bool completed_ = false;
};

NodeTransfers::NodeTransfers(const shm::Arena& arena, shm::SlabAllocator& allocator,
                             TransferOptions options)
    : arena_(arena), allocator_(allocator), options_(options), table_(*this, options.limits) {}

NodeTransfers::~NodeTransfers() noexcept {}

void NodeTransfers::attachOwner(kj::Timer& timer) {
  ownerThread_ = std::this_thread::get_id();
  ownerExecutor_ = kj::getCurrentThreadExecutor().addRef();
  timer_ = &timer;
  expiry_ = expireLoop().eagerlyEvaluate([](kj::Exception&& e) {
    spdlog::error("transfer expiry stopped: {}", e.getDescription().cStr());
  });
}

void NodeTransfers::detachOwner() {
  expiry_ = nullptr;
  for (auto& [id, s] : sessions_) {
    for (auto& [offset, allocation] : s.allocations) allocator_.free(allocation);
  }
  sessions_.clear();
  ranks_.clear();
}

kj::Promise<void> NodeTransfers::expireLoop() {
  return timer_->afterDelay(1 * kj::SECONDS).then([this]() {
    table_.expire();
    allocator_.poll();
    return expireLoop();
  });
}

template <typename Func>
kj::PromiseForResult<Func, void> NodeTransfers::onOwner(Func&& func) {
  // On the owner already: run on the next turn of this loop (exceptions become rejections).
  if (std::this_thread::get_id() == ownerThread_) {
    return kj::Promise<void>(kj::READY_NOW).then(kj::fwd<Func>(func));
  }
  return ownerExecutor_->executeAsync(kj::fwd<Func>(func));
}

void NodeTransfers::release(const shm::Allocation& allocation) {
  auto freed = allocator_.free(allocation);
  if (!freed.ok()) spdlog::error("transfer table released a bad allocation: {}", freed.error().message);
}

uint64_t NodeTransfers::nowMs() { return monotonicNs() / 1'000'000; }

NodeTransfers::Session& NodeTransfers::session(rpc::SessionId id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    throw transferError("not-registered", "this session's rank was unregistered; register again");
  }
  return it->second;
}

kj::Promise<rpc::SessionId> NodeTransfers::registerRank(rpc::RankRegistration registration) {
  return onOwner([this, registration = std::move(registration)]() mutable {
    int32_t worldSize = options_.limits.worldSize;
    if (worldSize > 0) {
      for (transfer::Rank r : registration.group) {
        if (r >= worldSize) {
          throw transferError("invalid-argument",
                              "rank " + std::to_string(r) + " is outside the world of " +
                                  std::to_string(worldSize) + " ranks (world_size)");
        }
      }
    }
    auto it = ranks_.find(registration.rank);
    if (it != ranks_.end()) {
      Session& existing = sessions_.at(it->second);
      if (processAlive(existing.registration.peerPid) ||
          existing.registration.peerPid == registration.peerPid) {
        throw transferError(
            "already-registered",
            "rank " + std::to_string(registration.rank) + " is already registered by a live client (pid " +
                std::to_string(existing.registration.peerPid) +
                "); stop it first or use another rank");
      }
      // Its client died and the daemon has not noticed the broken connection yet: take over.
      spdlog::info("rank {}: previous client (pid {}) is gone; re-registering", registration.rank,
                   existing.registration.peerPid);
      dropSession(it->second);
    }
    rpc::SessionId id = nextSession_++;
    transfer::Rank rank = registration.rank;
    spdlog::info("rank {} registered: group {}, send hint {} B, recv hint {} B, pid {}", rank,
                 groupText(registration.group), registration.sendHintBytes,
                 registration.recvHintBytes, registration.peerPid);
    sessions_.emplace(id, Session{std::move(registration), {}, 0});
    ranks_[rank] = id;
    table_.rankRegistered(rank);
    return id;
  });
}

void NodeTransfers::dropSession(rpc::SessionId id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = it->second;
  transfer::Rank rank = s.registration.rank;
  for (auto& [offset, allocation] : s.allocations) allocator_.free(allocation);
  if (!s.allocations.empty()) {
    spdlog::info("rank {}: freed {} unsent allocation(s), {} bytes", rank, s.allocations.size(),
                 s.bytesAllocated);
  }
  sessions_.erase(it);
  auto r = ranks_.find(rank);
  if (r != ranks_.end() && r->second == id) {
    ranks_.erase(r);
    table_.rankGone(rank);
    spdlog::info("rank {} unregistered", rank);
  }
}

void NodeTransfers::unregister(rpc::SessionId id) {
  if (ownerExecutor_.get() == nullptr) return;
  if (std::this_thread::get_id() == ownerThread_) {
    dropSession(id);
    return;
  }
  // Fire and forget on the owner; the promise is owned by the requesting loop, so detach it.
  // While the daemon stops, the owner's loop may be gone already (it freed everything then).
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    ownerExecutor_->executeAsync([this, id]() { dropSession(id); }).detach([](kj::Exception&&) {});
  })) {
    spdlog::debug("session {} ended while the daemon stops: {}", id, e->getDescription().cStr());
  }
}

kj::Promise<shm::Allocation> NodeTransfers::allocate(rpc::SessionId id, uint64_t sizeBytes,
                                                     uint32_t timeoutMs) {
  return onOwner([this, id, sizeBytes, timeoutMs]() -> kj::Promise<shm::Allocation> {
    Session& s = session(id);
    uint64_t hint = s.registration.sendHintBytes;
    uint32_t waitMs = timeoutMs != 0 ? timeoutMs : options_.sendTimeoutMs;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(waitMs);
    // The allocator fails a queued request in expireWaiters() once its deadline passed; a timer
    // just after the deadline makes sure that runs. It never resolves by itself.
    auto expiry = timer_->afterDelay((waitMs + 1) * kj::MILLISECONDS)
                      .then([this]() -> kj::Promise<shm::Allocation> {
                        allocator_.expireWaiters(std::chrono::steady_clock::now());
                        return kj::NEVER_DONE;
                      });
    auto granted = kj::newAdaptedPromise<shm::Allocation, AllocateWaiter>(allocator_, sizeBytes,
                                                                          hint, deadline)
                       .exclusiveJoin(kj::mv(expiry));
    return granted.then([this, id](shm::Allocation allocation) {
      auto it = sessions_.find(id);
      if (it == sessions_.end()) {  // the client left while we waited
        allocator_.free(allocation);
        throw transferError("cancelled", "the session ended while waiting for arena space");
      }
      it->second.allocations.emplace(allocation.offset, allocation);
      it->second.bytesAllocated += allocation.sizeBytes;
      return allocation;
    });
  });
}

kj::Promise<void> NodeTransfers::release(rpc::SessionId id, uint64_t offset) {
  return onOwner([this, id, offset]() {
    Session& s = session(id);
    auto it = s.allocations.find(offset);
    if (it == s.allocations.end()) {
      throw transferError("invalid-argument", "offset " + std::to_string(offset) +
                                                  " is not an unsent allocation of rank " +
                                                  std::to_string(s.registration.rank));
    }
    s.bytesAllocated -= it->second.sizeBytes;
    allocator_.free(it->second);
    s.allocations.erase(it);
  });
}

kj::Promise<void> NodeTransfers::send(rpc::SessionId id, rpc::SendRequest request) {
  return onOwner([this, id, request = std::move(request)]() mutable {
    Session& s = session(id);
    transfer::Payload payload;
    if (auto* tensor = std::get_if<rpc::TensorDescriptor>(&request.payload)) {
      auto it = s.allocations.find(tensor->offset);
      if (it == s.allocations.end()) {
        throw transferError("invalid-argument",
                            "tensor at offset " + std::to_string(tensor->offset) +
                                " is not an unsent allocation of rank " +
                                std::to_string(s.registration.rank) +
                                "; allocate it first (each allocation is sent once)");
      }
      shm::Allocation allocation = it->second;
      // The allocation is the daemon's from here on, whatever the outcome.
      s.bytesAllocated -= allocation.sizeBytes;
      s.allocations.erase(it);
      payload = transfer::TensorChunk{tensor->dtype, std::move(tensor->shape), tensor->sizeBytes,
                                      allocation};
      auto result = table_.send(s.registration.rank, s.registration.group, request.dataId,
                                request.chunkId, request.numChunks, request.destinations,
                                std::move(payload));
      if (auto* error = std::get_if<transfer::Error>(&result)) {
        allocator_.free(allocation);
        throw transferError(*error);
      }
      return;
    }
    payload = std::get<transfer::ObjectChunk>(std::move(request.payload));
    take(table_.send(s.registration.rank, s.registration.group, request.dataId, request.chunkId,
                     request.numChunks, request.destinations, std::move(payload)));
  });
}

kj::Promise<void> NodeTransfers::closeStream(rpc::SessionId id, std::string dataId,
                                             uint32_t numChunks,
                                             std::vector<transfer::Group> destinations) {
  return onOwner([this, id, dataId = std::move(dataId), numChunks,
                  destinations = std::move(destinations)]() {
    Session& s = session(id);
    take(table_.closeStream(s.registration.rank, dataId, numChunks, destinations));
  });
}

kj::Promise<rpc::RecvReply> NodeTransfers::recv(rpc::SessionId id, std::string dataId,
                                                uint32_t chunkId, uint32_t timeoutMs) {
  return onOwner([this, id, dataId = std::move(dataId), chunkId,
                  timeoutMs]() -> kj::Promise<rpc::RecvReply> {
    Session& s = session(id);
    auto waiting = kj::newAdaptedPromise<rpc::RecvReply, RecvAdapter>(
        table_, s.registration.rank, dataId, chunkId);
    if (timeoutMs == 0) return waiting;
    return waiting.exclusiveJoin(timer_->afterDelay(timeoutMs * kj::MILLISECONDS)
                                     .then([dataId, chunkId, timeoutMs]() -> rpc::RecvReply {
                                       throw transferError(
                                           "timeout", "chunk " + std::to_string(chunkId) +
                                                          " of id '" + dataId + "' did not arrive within " +
                                                          std::to_string(timeoutMs) + " ms");
                                     }));
  });
}

kj::Promise<void> NodeTransfers::markDone(rpc::SessionId id, std::string dataId, uint32_t chunkId) {
  return onOwner([this, id, dataId = std::move(dataId), chunkId]() {
    Session& s = session(id);
    take(table_.markDone(s.registration.rank, dataId, chunkId));
  });
}

kj::Promise<rpc::TransferSummary> NodeTransfers::summary() {
  return onOwner([this]() {
    rpc::TransferSummary out;
    out.dataIds = table_.dataIds();
    out.stats = table_.stats();
    auto held = table_.heldBytesByRank();
    for (auto& [id, s] : sessions_) {
      transfer::Rank rank = s.registration.rank;
      auto h = held.find(rank);
      out.ranks.push_back(rpc::RankSummary{rank, s.registration.group, s.bytesAllocated,
                                           h == held.end() ? 0 : h->second});
    }
    std::sort(out.ranks.begin(), out.ranks.end(),
              [](const auto& a, const auto& b) { return a.rank < b.rank; });
    return out;
  });
}

kj::Promise<std::string> NodeTransfers::inspect(std::string dataId) {
  return onOwner([this, dataId = std::move(dataId)]() {
    auto description = table_.describe(dataId);
    if (!description) {
      throw transferError("invalid-argument", "no data id '" + dataId + "' is in flight on this node");
    }
    return *description;
  });
}

}  // namespace sidecar::daemon
