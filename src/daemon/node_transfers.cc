#include "daemon/node_transfers.h"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <capnp/serialize.h>
#include <kj/debug.h>

#include "base/clock.h"
#include "base/hop_trace.h"
#include "daemon/peer_messages.h"
#include "rpc/peer_service.h"

#include <cstring>
#include <optional>
#include <type_traits>

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

// What a recv answers for a chunk the table gave it (a view: copied out here).
rpc::RecvReply replyOf(const transfer::RecvValue& value) {
  if (auto* tensor = std::get_if<const transfer::TensorChunk*>(&value)) {
    const transfer::TensorChunk& t = **tensor;
    return rpc::TensorDescriptor{t.dtype, t.shape, t.allocation.offset, t.sizeBytes};
  }
  if (auto* object = std::get_if<const transfer::ObjectChunk*>(&value)) return **object;
  return transfer::EndOfStream{};
}

template <typename T>
T take(transfer::Result<T>&& result) {
  if (auto* error = std::get_if<transfer::Error>(&result)) throw transferError(*error);
  return std::get<T>(std::move(result));
}

// A warning about a UCX message dropped as garbage, unless `limiter` says too many came lately (a
// flood of them must not flood the log); the next one written says how many were left out.
template <typename... Args>
void warnPeerInput(base::LogLimiter& limiter, spdlog::format_string_t<Args...> format, Args&&... args) {
  uint64_t suppressed = 0;
  if (!limiter.allow(monotonicNs(), suppressed)) return;
  std::string line = fmt::format(format, std::forward<Args>(args)...);
  if (suppressed != 0) line += "; " + std::to_string(suppressed) + " more dropped messages not logged";
  spdlog::warn("{}", line);
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

// The answer of a recv, given once: by the table (the chunk came, or the recv failed) or by
// the timeout, whichever is first.
class NodeTransfers::RecvOnce {
 public:
  explicit RecvOnce(RecvAnswer answer) : answer_(kj::mv(answer)) {}
  void give(kj::Maybe<rpc::RecvReply&> reply, const kj::Exception* failure) {
    if (given_) return;
    given_ = true;
    hop::mark(hop::Point::kRecvAnswering);
    // It runs inside the table's store: an exception must not cross it.
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { answer_(reply, failure); })) {
      spdlog::error("answering a recv failed (a bug): {}", e->getDescription().cStr());
    }
  }

 private:
  RecvAnswer answer_;
  bool given_ = false;
};

// A recv's place in the table: answers from inside the table's call that completes it, then
// resolves its promise. Its destructor withdraws the recv.
class NodeTransfers::RecvCallback final : public transfer::RecvWaiter {
 public:
  RecvCallback(kj::PromiseFulfiller<void>& fulfiller, transfer::TransferTable& table,
               transfer::Rank rank, const std::string& dataId, uint32_t chunkId,
               std::shared_ptr<RecvOnce> answer)
      : fulfiller_(fulfiller), table_(table), answer_(std::move(answer)) {
    table_.recv(rank, dataId, chunkId, *this);
  }
  ~RecvCallback() {
    if (!completed_) table_.cancel(*this);
  }
  void complete(transfer::Result<transfer::RecvValue> result) override {
    completed_ = true;
    if (auto* error = std::get_if<transfer::Error>(&result)) {
      auto failure = transferError(*error);
      answer_->give(nullptr, &failure);
    } else {
      auto reply = replyOf(std::get<transfer::RecvValue>(result));
      answer_->give(reply, nullptr);
    }
    fulfiller_.fulfill();
  }

 private:
  kj::PromiseFulfiller<void>& fulfiller_;
  transfer::TransferTable& table_;
  std::shared_ptr<RecvOnce> answer_;
  bool completed_ = false;
};

// Acks for the deliveries a peer sent as UCX messages, to that peer's worker. The encoded acks
// live here until UCX is done with them; the endpoint, destroyed first, force-closes so no send
// reads one afterwards.
class NodeTransfers::AckChannel final : private kj::TaskSet::ErrorHandler {
 public:
  AckChannel(kj::Own<BodyEndpoint> endpoint, uint32_t senderLinkId)
      : tasks_(*this), endpoint_(kj::mv(endpoint)), tag_(peerAckTag(senderLinkId)) {}

  void send(uint32_t seq, std::string_view error) {
    uint64_t key = next_++;
    auto bytes = outgoing_.emplace(key, encodePeerAck(seq, error)).first->second.asBytes();
    tasks_.add(endpoint_->send(tag_, bytes.begin(), bytes.size()).then([this, key]() {
      outgoing_.erase(key);
    }, [this, key](kj::Exception&& e) {
      outgoing_.erase(key);
      spdlog::debug("an ack to a peer was not sent: {}", e.getDescription().cStr());
    }));
  }

 private:
  void taskFailed(kj::Exception&&) override {}

  std::map<uint64_t, kj::Array<capnp::word>> outgoing_;
  uint64_t next_ = 0;
  kj::TaskSet tasks_;
  kj::Own<BodyEndpoint> endpoint_;
  uint64_t tag_;
};

NodeTransfers::NodeTransfers(const shm::Arena& arena, shm::SlabAllocator& allocator,
                             TransferOptions options)
    : arena_(arena),
      allocator_(allocator),
      options_(options),
      table_(*this, options.limits),
      directory_(options.peers) {}

NodeTransfers::~NodeTransfers() noexcept {}

void NodeTransfers::attachOwner(kj::Timer& timer, reactor::Reactor& reactor) {
  ownerThread_ = std::this_thread::get_id();
  ownerExecutor_ = kj::getCurrentThreadExecutor().addRef();
  timer_ = &timer;
  // Small deliveries as UCX messages: taken here, and sent by our links, when both ends say so.
  if (bodies_ != nullptr && options_.peers.ucxMessages) {
    options_.self.ucxMessageMaxBytes = kPeerMessageMaxBytes;
    messageBuffer_ = kj::heapArray<capnp::word>(kPeerMessageMaxBytes / sizeof(capnp::word));
    messageDeliveries_ = kj::heap<kj::TaskSet>(static_cast<kj::TaskSet::ErrorHandler&>(*this));
    messages_ = messageLoop().eagerlyEvaluate([](kj::Exception&& e) {
      spdlog::error("taking small deliveries from peers stopped: {}", e.getDescription().cStr());
    });
  }
  PeerLinkOptions linkOptions;
  linkOptions.self = options_.self;
  linkOptions.self.ucxAddress = bodies_ != nullptr ? bodies_->address() : "";
  linkOptions.timeoutMs = options_.peers.timeoutMs;
  linkOptions.inlineBytesMax = options_.inlineBytesMax;
  linkOptions.pieceBytes = options_.pieceBytes;
  // The peer waits up to its send timeout for space (ours, as a stand-in: peers share a config),
  // then acks; two heartbeat silences on top cover the rest.
  linkOptions.directAckTimeoutMs = options_.sendTimeoutMs + 2 * options_.peers.timeoutMs;
  links_ = kj::heap<PeerLinks>(reactor, timer, kj::mv(linkOptions), bodies_);
  expiry_ = expireLoop().eagerlyEvaluate([](kj::Exception&& e) {
    spdlog::error("transfer expiry stopped: {}", e.getDescription().cStr());
  });
}

void NodeTransfers::detachOwner() {
  expiry_ = nullptr;
  ackFlush_ = nullptr;
  messages_ = nullptr;            // cancels the posted receive
  messageDeliveries_ = nullptr;
  for (auto& [id, link] : incoming_) link.pending->cancel("the daemon is stopping");
  incoming_.clear();
  links_ = nullptr;
  for (auto& [id, s] : sessions_) {
    for (auto& [offset, allocation] : s.allocations) release(allocation);
  }
  sessions_.clear();
  ranks_.clear();
}

kj::Promise<void> NodeTransfers::expireLoop() {
  return timer_->afterDelay(1 * kj::SECONDS).then([this]() {
    // Links from peers that stopped talking (a heartbeat comes every timeout/3).
    uint64_t now = nowMs();
    std::vector<uint32_t> silent;
    for (auto& [id, link] : incoming_) {
      if (now - link.lastHeardMs > options_.peers.timeoutMs) silent.push_back(id);
    }
    for (uint32_t id : silent) {
      loseIncoming(id, "silent for more than " + std::to_string(options_.peers.timeoutMs) +
                           " ms (peers.timeout_ms)");
    }
    table_.expire();
    // Ids a link delivered into that need it no more (the rest arrived through another path, or
    // the id expired): a delivery that failed half-way leaves its id here until then.
    for (auto& [id, link] : incoming_) {
      std::erase_if(link.dataIds,
                    [this](const std::string& dataId) { return table_.allChunksArrived(dataId); });
    }
    allocator_.poll();
    return expireLoop();
  });
}

template <typename Func>
kj::PromiseForResult<Func, void> NodeTransfers::onOwner(Func&& func) {
  // On the owner already: run now (exceptions become rejections). Not on a later turn: every
  // request comes through here, and a turn is a few promise nodes on the latency path.
  if (std::this_thread::get_id() == ownerThread_) {
    if constexpr (std::is_void_v<std::invoke_result_t<Func>>) {
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { func(); })) { return kj::mv(*e); }
      return kj::READY_NOW;
    } else {
      return kj::evalNow(kj::fwd<Func>(func));  // (KJ's evalNow takes no void function)
    }
  }
  return ownerExecutor_->executeAsync(kj::fwd<Func>(func));
}

void NodeTransfers::release(const shm::Allocation& allocation) {
  auto freed = allocator_.free(allocation);
  if (!freed.ok()) spdlog::error("freeing an allocation failed (a bug: its memory stays reserved): {}",
                                 freed.error().message);
}

uint64_t NodeTransfers::nowMs() { return monotonicNs() / 1'000'000; }

void NodeTransfers::taskFailed(kj::Exception&& e) {
  spdlog::error("a peer's delivery message was not answered (a bug): {}", e.getDescription().cStr());
}

NodeTransfers::Session& NodeTransfers::session(rpc::SessionId id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    throw transferError("not-registered", "this session's rank was unregistered; register again");
  }
  if (it->second.orphaned) {
    throw transferError("not-registered", "rank " + std::to_string(it->second.registration.rank) +
                                              " was taken over by a new client");
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
      // Not dropSession(): its connection's teardown frees its allocations, after any GPU copy
      // still writing into them has finished (DeviceSendBackend::endSession).
      Session& old = sessions_.at(it->second);
      old.orphaned = true;
      ranks_.erase(it);
      table_.rankGone(registration.rank);
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
  for (auto& [offset, allocation] : s.allocations) release(allocation);
  if (!s.allocations.empty()) {
    spdlog::info("rank {}: freed {} unsent allocation(s), {} bytes", rank, s.allocations.size(),
                 s.bytesAllocated);
  }
  sessions_.erase(it);
  if (links_) links_->forgetSession(id);
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

kj::Promise<shm::Allocation> NodeTransfers::allocateBytes(uint64_t sizeBytes, uint64_t hint,
                                                          uint32_t waitMs) {
  // The usual case, space now: no waiter and no timer (the latency path of small deliveries).
  // ArenaFull here also means others wait already (FIFO): then queue behind them.
  auto now = allocator_.tryAllocate(sizeBytes, hint);
  if (now.ok()) return now.value();
  if (now.code() != shm::ShmErrc::ArenaFull) {
    return transferError(allocationErrorKind(now.code()), now.error().message);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(waitMs);
  // The allocator fails a queued request in expireWaiters() once its deadline passed; a timer
  // just after the deadline makes sure that runs. It never resolves by itself.
  auto expiry = timer_->afterDelay((waitMs + 1) * kj::MILLISECONDS)
                    .then([this]() -> kj::Promise<shm::Allocation> {
                      allocator_.expireWaiters(std::chrono::steady_clock::now());
                      return kj::NEVER_DONE;
                    });
  return kj::newAdaptedPromise<shm::Allocation, AllocateWaiter>(allocator_, sizeBytes, hint,
                                                                deadline)
      .exclusiveJoin(kj::mv(expiry));
}

kj::Promise<shm::Allocation> NodeTransfers::allocate(rpc::SessionId id, uint64_t sizeBytes,
                                                     uint32_t timeoutMs) {
  return onOwner([this, id, sizeBytes, timeoutMs]() -> kj::Promise<shm::Allocation> {
    Session& s = session(id);
    uint64_t hint = s.registration.sendHintBytes;
    uint32_t waitMs = timeoutMs != 0 ? timeoutMs : options_.sendTimeoutMs;
    return allocateBytes(sizeBytes, hint, waitMs).then([this, id](shm::Allocation allocation) {
      auto it = sessions_.find(id);
      if (it == sessions_.end()) {  // the client left while we waited
        release(allocation);
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
    release(it->second);
    s.allocations.erase(it);
  });
}

kj::Promise<void> NodeTransfers::send(rpc::SessionId id, rpc::SendRequest request) {
  return onOwner([this, id, request = std::move(request)]() mutable -> kj::Promise<void> {
    Session& s = session(id);
    std::optional<shm::Allocation> allocation;
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
      allocation = it->second;
      // The allocation is the daemon's from here on, whatever the outcome.
      s.bytesAllocated -= allocation->sizeBytes;
      s.allocations.erase(it);
      payload = transfer::TensorChunk{tensor->dtype, std::move(tensor->shape), tensor->sizeBytes,
                                      *allocation};
    } else {
      payload = std::get<transfer::ObjectChunk>(std::move(request.payload));
    }
    Placement placement;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { placement = place(request.destinations); })) {
      if (allocation) release(*allocation);
      kj::throwFatalException(kj::mv(*e));
    }
    if (!placement.remote.empty()) registerProxies(placement);
    // What a forward needs, taken before the table owns the payload (object bytes are small).
    std::optional<transfer::Payload> forwarded;
    if (!placement.remote.empty()) {
      if (auto* t = std::get_if<transfer::TensorChunk>(&payload)) {
        forwarded = transfer::TensorChunk{t->dtype, t->shape, t->sizeBytes, t->allocation};
      } else {
        forwarded = payload;
      }
    }
    uint64_t droppedBefore = table_.stats().duplicatesDropped;
    auto result = table_.send(s.registration.rank, s.registration.group, request.dataId,
                              request.chunkId, request.numChunks, request.destinations,
                              std::move(payload));
    if (auto* error = std::get_if<transfer::Error>(&result)) {
      if (allocation) release(*allocation);
      throw transferError(*error);
    }
    // A replica another member of the group already delivered was dropped: already forwarded.
    if (!forwarded || table_.stats().duplicatesDropped != droppedBefore) return kj::READY_NOW;
    return forwardChunk(s.registration.group, s.registration.rank, request.dataId,
                        request.chunkId, request.numChunks, placement, *forwarded, nullptr,
                        DirectSent{request.directLink, request.directSeq, id});
  });
}

kj::Promise<rpc::DirectRoute> NodeTransfers::directRoute(rpc::SessionId id,
                                                         std::vector<transfer::Group> destinations,
                                                         bool renew) {
  return onOwner([this, id, destinations = std::move(destinations), renew]() -> kj::Promise<rpc::DirectRoute> {
    Session& s = session(id);
    rpc::DirectRoute none;
    none.retryMs = 60'000;
    if (!options_.peers.directSends || !options_.peers.ucxMessages || bodies_ == nullptr || !links_) {
      none.none = "this daemon sends every chunk itself ([peers] direct_sends, ucx_messages, UCX)";
      return none;
    }
    if (s.registration.group.size() > 1) {
      // A group's replicas are deduplicated on this node before one goes out.
      none.none = "the sender is a group of " + std::to_string(s.registration.group.size());
      return none;
    }
    Placement placement = place(destinations);
    if (!placement.local.empty() || placement.remote.size() != 1) {
      none.none = placement.remote.empty() ? "every destination lives on this node"
                                           : "the destinations are not all on one other node";
      return none;
    }
    return links_->directRoute(placement.remote.begin()->first, id, renew);
  });
}

kj::Promise<void> NodeTransfers::sendLanding(rpc::SessionId id, rpc::SendRequest request,
                                             rpc::Landing landing) {
  return onOwner([this, id, request = std::move(request),
                  landing = std::move(landing)]() mutable -> kj::Promise<void> {
    auto* tensor = std::get_if<rpc::TensorDescriptor>(&request.payload);
    Session& s = session(id);
    std::optional<Placement> placement;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { placement = place(request.destinations); })) {
      (void)e;  // the default path reports the same error, after the copy
    }
    bool pipelined = tensor != nullptr && placement && placement->local.empty() &&
                     !placement->remote.empty() && bodies_ != nullptr &&
                     tensor->sizeBytes > options_.inlineBytesMax &&
                     s.registration.group.size() == 1 && s.allocations.count(tensor->offset) != 0;
    if (!pipelined) return TransferBackend::sendLanding(id, std::move(request), std::move(landing));

    auto it = s.allocations.find(tensor->offset);
    shm::Allocation allocation = it->second;
    s.bytesAllocated -= allocation.sizeBytes;
    s.allocations.erase(it);
    registerProxies(*placement);
    transfer::Payload payload = transfer::TensorChunk{tensor->dtype, tensor->shape,
                                                      tensor->sizeBytes, allocation};
    transfer::Payload forwarded = transfer::TensorChunk{tensor->dtype, tensor->shape,
                                                        tensor->sizeBytes, allocation};
    // A group of one never has a replica dropped here (only the same rank could send the chunk,
    // which is kAlreadySent): on success the table holds the allocation for the proxies.
    auto result = table_.send(s.registration.rank, s.registration.group, request.dataId,
                              request.chunkId, request.numChunks, request.destinations,
                              std::move(payload));
    if (auto* error = std::get_if<transfer::Error>(&result)) {
      // The copy may still write into it: free it once it stopped.
      landing.finished()
          .then([this, allocation]() { release(allocation); })
          .detach([](kj::Exception&&) {});
      throw transferError(*error);
    }
    return forwardChunk(s.registration.group, s.registration.rank, request.dataId,
                        request.chunkId, request.numChunks, *placement, forwarded, &landing);
  });
}

kj::Promise<void> NodeTransfers::closeStream(rpc::SessionId id, std::string dataId,
                                             uint32_t numChunks,
                                             std::vector<transfer::Group> destinations) {
  return onOwner([this, id, dataId = std::move(dataId), numChunks,
                  destinations = std::move(destinations)]() -> kj::Promise<void> {
    Session& s = session(id);
    Placement placement = place(destinations);
    if (!placement.remote.empty()) registerProxies(placement);
    take(table_.closeStream(s.registration.rank, dataId, numChunks, destinations));
    if (placement.remote.empty()) return kj::READY_NOW;
    auto forwards = kj::heapArrayBuilder<kj::Promise<void>>(placement.remote.size());
    for (auto& [address, groups] : placement.remote) {
      forwards.add(links_->closeStream(address, dataId, numChunks, s.registration.rank, groups));
    }
    return kj::joinPromises(forwards.finish());
  });
}

kj::Promise<rpc::RecvReply> NodeTransfers::recv(rpc::SessionId id, std::string dataId,
                                                uint32_t chunkId, uint32_t timeoutMs) {
  return onOwner([this, id, dataId = std::move(dataId), chunkId,
                  timeoutMs]() mutable -> kj::Promise<rpc::RecvReply> {
    auto reply = kj::newPromiseAndFulfiller<rpc::RecvReply>();
    auto waiting = recvOnOwner(
        id, std::move(dataId), chunkId, timeoutMs,
        [fulfiller = kj::mv(reply.fulfiller)](kj::Maybe<rpc::RecvReply&> answer,
                                              const kj::Exception* failure) mutable {
          KJ_IF_MAYBE(r, answer) {
            fulfiller->fulfill(kj::cp(*r));
          } else {
            fulfiller->reject(kj::cp(*failure));
          }
        });
    // Dropping the reply withdraws the recv (and its timeout) with it.
    return reply.promise.attach(waiting.eagerlyEvaluate(nullptr));
  });
}

kj::Exception NodeTransfers::recvTimeout(const std::string& dataId, uint32_t chunkId,
                                         uint32_t timeoutMs) {
  return transferError("timeout", "chunk " + std::to_string(chunkId) + " of id '" + dataId +
                                      "' did not arrive within " + std::to_string(timeoutMs) +
                                      " ms");
}

kj::Promise<void> NodeTransfers::recvInto(rpc::SessionId id, std::string dataId, uint32_t chunkId,
                                          uint32_t timeoutMs, RecvAnswer answer) {
  if (std::this_thread::get_id() != ownerThread_) {
    return TransferBackend::recvInto(id, std::move(dataId), chunkId, timeoutMs, kj::mv(answer));
  }
  return recvOnOwner(id, std::move(dataId), chunkId, timeoutMs, kj::mv(answer));
}

kj::Promise<void> NodeTransfers::recvOnOwner(rpc::SessionId id, std::string dataId, uint32_t chunkId,
                                             uint32_t timeoutMs, RecvAnswer answer) {
  auto once = std::make_shared<RecvOnce>(kj::mv(answer));
  kj::Maybe<kj::Promise<void>> waiting;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    Session& s = session(id);
    waiting = kj::newAdaptedPromise<void, RecvCallback>(table_, s.registration.rank, dataId,
                                                        chunkId, once);
  })) {
    once->give(nullptr, e);
    return kj::READY_NOW;
  }
  auto answered = kj::mv(KJ_ASSERT_NONNULL(waiting));
  if (timeoutMs == 0) return answered;
  return answered.exclusiveJoin(
      timer_->afterDelay(timeoutMs * kj::MILLISECONDS)
          .then([once, dataId = std::move(dataId), chunkId, timeoutMs]() {
            auto failure = recvTimeout(dataId, chunkId, timeoutMs);
            once->give(nullptr, &failure);
          }));
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
      if (s.orphaned) continue;
      transfer::Rank rank = s.registration.rank;
      auto h = held.find(rank);
      out.ranks.push_back(rpc::RankSummary{rank, s.registration.group, s.bytesAllocated,
                                           h == held.end() ? 0 : h->second});
    }
    std::sort(out.ranks.begin(), out.ranks.end(),
              [](const auto& a, const auto& b) { return a.rank < b.rank; });
    if (links_) out.peers = links_->summary();
    for (auto& [id, link] : incoming_) {
      bool ucx = !link.peer.ucxAddress.empty() && bodies_ != nullptr;
      std::string bodies = ucx ? bodies_->describe() : "inline";
      if (ucx && messageDeliveries_.get() != nullptr && link.peer.ucxMessageMaxBytes > 0) bodies += kSmallAsMessages;
      out.peers.push_back(rpc::PeerLinkSummary{false, link.peer.nodeId, link.peer.address,
                                               link.peer.incarnation, true, bodies, link.chunks,
                                               link.bytes});
    }
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

// ---- Cross-node: the sending side ------------------------------------------------------------

NodeTransfers::Placement NodeTransfers::place(const std::vector<transfer::Group>& destinations) {
  Placement out;
  for (const transfer::Group& group : destinations) {
    std::optional<std::string> node;
    for (size_t i = 0; i < group.size(); ++i) {
      std::optional<std::string> address;
      try {
        address = directory_.remoteAddress(group[i]);
      } catch (const std::invalid_argument& e) {
        throw transferError("invalid-argument", e.what());
      }
      if (i == 0) {
        node = address;
      } else if (address != node) {
        throw transferError(
            "invalid-argument",
            "destination group " + groupText(group) + " spans nodes (rank " +
                std::to_string(group[0]) + " on " + (node ? *node : "this node") + ", rank " +
                std::to_string(group[i]) + " on " + (address ? *address : "this node") +
                "); the ranks of one group live on one node");
      }
    }
    if (node) {
      out.remote[*node].push_back(group);
    } else {
      out.local.push_back(group);
    }
  }
  return out;
}

void NodeTransfers::registerProxies(const Placement& placement) {
  // Remote groups hold chunks here until their node stored them. Registered, they never expire
  // by time-to-live while a forward may still read them.
  for (auto& [address, groups] : placement.remote) {
    for (const transfer::Group& group : groups) {
      for (transfer::Rank rank : group) {
        if (proxies_.insert(rank).second) table_.rankRegistered(rank);
      }
    }
  }
}

void NodeTransfers::releaseProxies(const std::string& dataId, uint32_t chunkId,
                                   const std::vector<transfer::Group>& groups) {
  for (const transfer::Group& group : groups) {
    auto done = table_.markDone(group[0], dataId, chunkId);
    if (auto* error = std::get_if<transfer::Error>(&done)) {
      spdlog::debug("proxy hold of {} on chunk {} of '{}': {}", groupText(group), chunkId, dataId,
                    error->message);
    }
  }
}

kj::Promise<void> NodeTransfers::forwardChunk(const transfer::Group& senderGroup,
                                              transfer::Rank sender, const std::string& dataId,
                                              uint32_t chunkId, uint32_t numChunks,
                                              const Placement& placement,
                                              const transfer::Payload& stored,
                                              const rpc::Landing* landing, DirectSent direct) {
  // Releases the remote groups' holds when the forward ends, however it ends (answered, failed,
  // or dropped at shutdown).
  // Built in place on the heap (never copied: a copy's destructor would release the holds).
  struct ProxyHolds {
    ProxyHolds(NodeTransfers& self, std::string dataId, uint32_t chunkId,
               std::vector<transfer::Group> groups)
        : self(self), dataId(std::move(dataId)), chunkId(chunkId), groups(std::move(groups)) {}
    ProxyHolds(const ProxyHolds&) = delete;
    ProxyHolds& operator=(const ProxyHolds&) = delete;
    ~ProxyHolds() { self.releaseProxies(dataId, chunkId, groups); }
    NodeTransfers& self;
    std::string dataId;
    uint32_t chunkId;
    std::vector<transfer::Group> groups;
  };
  auto forwards = kj::heapArrayBuilder<kj::Promise<void>>(placement.remote.size());
  for (auto& [address, groups] : placement.remote) {
    OutgoingChunk chunk;
    chunk.dataId = dataId;
    chunk.chunkId = chunkId;
    chunk.numChunks = numChunks;
    chunk.senderRank = sender;
    chunk.senderGroup = senderGroup;
    chunk.destinations = groups;
    if (auto* t = std::get_if<transfer::TensorChunk>(&stored)) {
      chunk.isTensor = true;
      chunk.dtype = t->dtype;
      chunk.shape = t->shape;
      chunk.sizeBytes = t->sizeBytes;
      chunk.body = arena_.base() + t->allocation.offset;
    } else {
      chunk.object = std::get<transfer::ObjectChunk>(stored);
    }
    if (direct.seq != 0 && placement.remote.size() == 1) {
      chunk.directLink = direct.link;
      chunk.directSeq = direct.seq;
      chunk.directSession = direct.session;
    }
    if (landing == nullptr) {
      auto holds = kj::heap<ProxyHolds>(*this, dataId, chunkId, groups);
      forwards.add(links_->deliver(address, kj::mv(chunk)).attach(kj::mv(holds)));
      continue;
    }
    // Still landing: each body piece goes out as it lands. The holds (and with them the
    // allocation) last until the delivery ended AND the copy stopped writing into it, even when
    // the caller goes away (its call cancelled) before either.
    chunk.landed = landing->landed;
    auto holds = std::make_shared<ProxyHolds>(*this, dataId, chunkId, groups);
    landing->finished().attach(std::shared_ptr<ProxyHolds>(holds)).detach([](kj::Exception&&) {});
    forwards.add(links_->deliver(address, kj::mv(chunk)).attach(kj::mv(holds)));
  }
  return kj::joinPromises(forwards.finish());
}

// ---- Cross-node: the receiving side ----------------------------------------------------------

NodeTransfers::IncomingLink& NodeTransfers::incoming(uint32_t linkId) {
  auto it = incoming_.find(linkId);
  if (it == incoming_.end()) {
    throw transferError("peer-lost",
                        "this daemon dropped the link (silent too long, or restarted); open a new one");
  }
  return it->second;
}

uint64_t NodeTransfers::receiveHint(const std::vector<transfer::Group>& destinations) const {
  for (const transfer::Group& group : destinations) {
    for (transfer::Rank rank : group) {
      auto r = ranks_.find(rank);
      if (r == ranks_.end()) continue;
      auto s = sessions_.find(r->second);
      if (s != sessions_.end() && s->second.registration.recvHintBytes > 0) {
        return s->second.registration.recvHintBytes;
      }
    }
  }
  return 4096;  // no receiver registered yet: page-sized units
}

kj::Promise<rpc::PeerIdentity> NodeTransfers::openPeerLink(rpc::PeerIdentity peer) {
  return onOwner([this, peer = std::move(peer)]() mutable {
    uint32_t id = nextLinkId_++ & 0xffffffu;  // 24 bits: the top of UCX tags
    if (id == 0) id = nextLinkId_++;
    spdlog::info("peer link {} from node '{}' ({}) incarnation {:016x}", id, peer.nodeId,
                 peer.address.empty() ? "no address" : peer.address, peer.incarnation);
    incoming_.emplace(id, IncomingLink{std::move(peer), nowMs(), {}, kj::heap<kj::Canceler>()});
    rpc::PeerIdentity self = options_.self;
    self.ucxAddress = bodies_ != nullptr ? bodies_->address() : "";
    self.linkId = id;
    return self;
  });
}

void NodeTransfers::closePeerLink(uint32_t linkId) {
  if (ownerExecutor_.get() == nullptr) return;
  if (std::this_thread::get_id() == ownerThread_) {
    loseIncoming(linkId, "its connection closed");
    return;
  }
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    ownerExecutor_->executeAsync([this, linkId]() { loseIncoming(linkId, "its connection closed"); })
        .detach([](kj::Exception&&) {});
  })) {
    spdlog::debug("peer link {} ended while the daemon stops: {}", linkId, e->getDescription().cStr());
  }
}

void NodeTransfers::loseIncoming(uint32_t linkId, const std::string& why) {
  auto it = incoming_.find(linkId);
  if (it == incoming_.end()) return;
  IncomingLink link = std::move(it->second);
  incoming_.erase(it);
  std::string who = "node '" + link.peer.nodeId + "'";
  spdlog::warn("peer link {} from {} lost: {}; failing {} id(s) it was delivering", linkId, who,
               why, link.dataIds.size());
  link.pending->cancel(("[peer-lost] the link from " + who + " was lost: " + why).c_str());
  for (const std::string& dataId : link.dataIds) {
    table_.failWaiters(dataId, who + ", which was sending it, was lost (" + why + ")");
  }
}

kj::Promise<void> NodeTransfers::messageLoop() {
  // Each message is taken the moment UCX has it, inside the worker's progress: the recv waiting
  // for it is answered then, not a KJ turn later (~0.5 us on the hosts we measure). Nothing in
  // that path calls into UCX (acks go out a turn later), nor throws out of it.
  auto onArrival = [this](const BodyMessage& message) {
    uint32_t linkId = peerMessageLinkId(message.tag);
    hop::mark(hop::Point::kMessageReceived);
    spdlog::trace("peer message on link {} received", linkId);
    if (message.sizeBytes % sizeof(capnp::word) != 0) {
      // Dropped, not held against the link: see takeDeliverMessage.
      warnPeerInput(peerInputLog_,
                    "peer link {}: a UCX message of {} bytes, which is neither a Cap'n Proto "
                    "message nor a packed deliver (not a PeerMessage deliver, dropped)",
                    linkId, message.sizeBytes);
      return;
    }
    // Read in place: what the delivery keeps (its chunk) is copied out before the next
    // receive reuses the buffer, which is posted only after this returns.
    size_t words = message.sizeBytes / sizeof(capnp::word);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      takeDeliverMessage(linkId, messageBuffer_.asPtr().slice(0, words));
    })) {
      spdlog::error("peer link {}: taking a delivery failed (a bug): {}", linkId, e->getDescription().cStr());
    }
  };
  return bodies_->receiveAny(kPeerDeliverKind, kPeerMessageKindMask, messageBuffer_.begin(),
                             messageBuffer_.size() * sizeof(capnp::word), kj::mv(onArrival))
      .then(
          [](BodyMessage) -> kj::Promise<void> { return kj::READY_NOW; },
          [this](kj::Exception&& e) -> kj::Promise<void> {
            // E.g. a message over kPeerMessageMaxBytes: UCX dropped it. Its sender's delivery
            // fails with its link (no ack comes); keep taking the others, after a pause, so that
            // a receive failing at once every time cannot spin this core or flood the log.
            spdlog::warn("a peer's delivery message could not be received: {}",
                         e.getDescription().cStr());
            return timer_->afterDelay(10 * kj::MILLISECONDS);
          })
      .then([this]() { return messageLoop(); });
}

void NodeTransfers::takeDeliverMessage(uint32_t linkId, kj::ArrayPtr<const capnp::word> words) {
  auto it = incoming_.find(linkId);
  if (it == incoming_.end()) {
    // A link this daemon dropped (its sender learns it from its next heartbeat), or garbage.
    warnPeerInput(peerInputLog_, "a UCX delivery for peer link {}, which is not open here: dropped", linkId);
    return;
  }
  uint32_t seq = 0;
  rpc::PeerChunk chunk;
  kj::Maybe<kj::Exception> refused;
  // A packed deliver (an executor's direct send) or a Cap'n Proto PeerMessage (a daemon's).
  base::PackedDeliver packed;
  std::string malformed;
  switch (base::readPackedDeliver(std::as_bytes(std::span(words.begin(), words.size())), packed,
                                  malformed)) {
    case base::PackedRead::kOk:
      seq = packed.seq;
      // The body is read where it is: deliver() copies it before it waits for anything.
      refused = kj::runCatchingExceptions([&]() { chunk = readPackedChunk(std::move(packed)); });
      break;
    case base::PackedRead::kMalformed:
      // (Its seq was readable: a packed message is a multiple of 8 bytes, and has at least 8.)
      seq = packed.seq;
      refused = transferError("invalid-argument", malformed);
      break;
    case base::PackedRead::kNotPacked:
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
        capnp::FlatArrayMessageReader reader(words);
        auto root = reader.getRoot<proto::PeerMessage>();
        KJ_REQUIRE(root.isDeliver(), "not a deliver");
        seq = root.getDeliver().getSeq();
        // A descriptor the receiver refuses is answered (the ack carries the error); a message
        // that is not a PeerMessage is dropped: with direct sends any executor of the sending
        // node may have sent it, so it proves nothing against the link and the other
        // deliveries on it. The inline body is read where it is, as above.
        refused = kj::runCatchingExceptions(
            [&]() { chunk = rpc::readPeerChunk(root.getDeliver().getChunk(), /*viewInline=*/true); });
      })) {
        warnPeerInput(peerInputLog_, "peer link {}: a UCX message that is not a PeerMessage deliver, dropped ({})",
                      linkId, e->getDescription().cStr());
        return;
      }
      break;
  }
  if (refused == nullptr) {
    auto* tensor = std::get_if<rpc::PeerTensor>(&chunk.payload);
    if (tensor != nullptr && tensor->viaUcx) {
      refused = transferError("invalid-argument",
                              "a deliver message carries its tensor's body inline, never as UCX pieces");
    }
  }
  KJ_IF_MAYBE(e, refused) {
    // A turn later: this may run inside UCX's progress, which must not send.
    messageDeliveries_->add(kj::evalLater([this, linkId, seq, error = std::string(e->getDescription().cStr())]() {
      ack(linkId, seq, error);
    }));
    return;
  }
  hop::mark(hop::Point::kDeliverParsed);
  // The ack waits until this turn's other work ran (evalLast): storing the chunk answered the
  // local recv waiting for it, and that answer, the latency path, goes out before the ack's send.
  messageDeliveries_->add(deliver(linkId, std::move(chunk))
                              .then([]() { return std::string(); },
                                    [](kj::Exception&& e) {
                                      return std::string(e.getDescription().cStr());
                                    })
                              .then([this, linkId, seq](std::string error) {
                                return kj::evalLast([this, linkId, seq, error = kj::mv(error)]() {
                                  ack(linkId, seq, error);
                                });
                              }));
}

void NodeTransfers::ack(uint32_t linkId, uint32_t seq, std::string_view error) {
  auto it = incoming_.find(linkId);
  if (it == incoming_.end()) return;  // lost meanwhile: its sender fails the delivery itself
  IncomingLink& link = it->second;
  if (!link.acks) {
    if (link.peer.ucxAddress.empty() || link.peer.linkId == 0) {
      loseIncoming(linkId, "it sent a UCX delivery but takes no acks (no UCX address or link id "
                           "in its hello)");
      return;
    }
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      link.acks = kj::heap<AckChannel>(bodies_->connect(link.peer.ucxAddress), link.peer.linkId);
    })) {
      loseIncoming(linkId, std::string("cannot reach its UCX worker to answer: ") +
                               e->getDescription().cStr());
      return;
    }
  }
  // A failure goes at once (rare, and the sender acts on it); a success waits a little, so that
  // its send does not hold this core up while the answer to the delivery (the local recv's, and
  // perhaps the receiver's reply to the sender) is on its way.
  if (!error.empty() || options_.peers.ackDelayUs == 0) {
    link.acks->send(seq, error);
    hop::mark(hop::Point::kAckSent);
    return;
  }
  link.acksDue.push_back(seq);
  if (link.acksDue.size() >= kAckBatchMax) {
    sendAcksDue(link);
    return;
  }
  if (ackFlushArmed_) return;
  ackFlushArmed_ = true;
  ackFlush_ = timer_->afterDelay(options_.peers.ackDelayUs * kj::MICROSECONDS)
                  .then([this]() {
                    ackFlushArmed_ = false;
                    for (auto& [id, l] : incoming_) sendAcksDue(l);
                  })
                  .eagerlyEvaluate([](kj::Exception&& e) {
                    spdlog::error("sending due acks failed (a bug): {}", e.getDescription().cStr());
                  });
}

void NodeTransfers::sendAcksDue(IncomingLink& link) {
  if (link.acksDue.empty()) return;
  for (uint32_t seq : link.acksDue) link.acks->send(seq, "");
  link.acksDue.clear();
  hop::mark(hop::Point::kAckSent);
}

kj::Promise<void> NodeTransfers::heartbeat(uint32_t linkId) {
  return onOwner([this, linkId]() { incoming(linkId).lastHeardMs = nowMs(); });
}

kj::Promise<void> NodeTransfers::peerCloseStream(uint32_t linkId, std::string dataId,
                                                 uint32_t numChunks, transfer::Rank senderRank,
                                                 std::vector<transfer::Group> destinations) {
  return onOwner([this, linkId, dataId = std::move(dataId), numChunks, senderRank,
                  destinations = std::move(destinations)]() {
    IncomingLink& link = incoming(linkId);
    link.lastHeardMs = nowMs();
    if (!place(destinations).remote.empty()) {
      throw transferError("invalid-argument", "closeStream from node '" + link.peer.nodeId +
                                                  "' names ranks that do not live on this node");
    }
    take(table_.closeStream(senderRank, dataId, numChunks, destinations));
    trackDelivering(link, dataId);
  });
}

kj::Promise<void> NodeTransfers::deliver(uint32_t linkId, rpc::PeerChunk chunk) {
  // Bytes seen in the caller's message: copied before they could outlive it.
  auto keepInline = [](rpc::PeerChunk& c) {
    auto* t = std::get_if<rpc::PeerTensor>(&c.payload);
    if (t == nullptr || t->inlineView.begin() == nullptr) return;
    t->inlineBytes.assign(reinterpret_cast<const char*>(t->inlineView.begin()), t->inlineView.size());
    t->inlineView = nullptr;
  };
  if (std::this_thread::get_id() != ownerThread_) keepInline(chunk);
  return onOwner([this, linkId, keepInline, chunk = std::move(chunk)]() mutable -> kj::Promise<void> {
    IncomingLink& link = incoming(linkId);
    link.lastHeardMs = nowMs();
    if (!place(chunk.destinations).remote.empty()) {
      throw transferError("invalid-argument", "a chunk from node '" + link.peer.nodeId +
                                                  "' names ranks that do not live on this node");
    }
    if (auto* object = std::get_if<transfer::ObjectChunk>(&chunk.payload)) {
      take(table_.send(chunk.senderRank, chunk.senderGroup, chunk.dataId, chunk.chunkId,
                       chunk.numChunks, chunk.destinations, std::move(*object)));
      trackDelivering(link, chunk.dataId);
      ++link.chunks;
      return kj::READY_NOW;
    }
    auto& tensor = std::get<rpc::PeerTensor>(chunk.payload);
    if (transfer::tensorBytes(tensor.dtype, tensor.shape) != tensor.sizeBytes) {
      throw transferError("invalid-argument", "a peer's tensor header does not add up: shape and "
                                              "dtype disagree with its size");
    }
    if (tensor.viaUcx) {
      if (bodies_ == nullptr) {
        throw transferError("invalid-argument", "a peer sent a UCX body, but this daemon has no UCX");
      }
      if (tensor.pieces == 0 || tensor.pieces > 255 || tensor.pieceBytes == 0 ||
          (tensor.pieces - 1) * tensor.pieceBytes >= tensor.sizeBytes ||
          tensor.pieces * tensor.pieceBytes < tensor.sizeBytes) {
        throw transferError("invalid-argument", "a peer's UCX pieces do not cover its tensor");
      }
    }
    uint64_t bytes = std::max<uint64_t>(tensor.sizeBytes, 1);
    uint64_t hint = receiveHint(chunk.destinations);
    if (!tensor.viaUcx) {
      // The usual small delivery: space now, so the body is copied and stored in this turn (no
      // continuations on the latency path). Otherwise it waits for space below.
      auto now = allocator_.tryAllocate(bytes, hint);
      if (now.ok()) {
        IncomingLanding land(allocator_);
        land.allocation = now.value();
        std::memcpy(arena_.base() + land.allocation->offset, tensor.inlineData().begin(),
                    tensor.sizeBytes);
        storeLanded(linkId, chunk, land);
        return kj::READY_NOW;
      }
    }
    // Waits (for space or the body): the link may be lost meanwhile, and then this id's waiters
    // hear of it (storeLanded tracks the id again once it is stored).
    keepInline(chunk);
    link.dataIds.insert(chunk.dataId);
    // The continuations below refer to the chunk: keep it at a stable address until they ran.
    auto held = kj::heap<rpc::PeerChunk>(std::move(chunk));
    rpc::PeerChunk& kept = *held;
    auto& body = std::get<rpc::PeerTensor>(kept.payload);
    auto space = allocateBytes(bytes, hint, options_.sendTimeoutMs);
    auto landing = kj::heap<IncomingLanding>(allocator_);
    IncomingLanding& land = *landing;
    auto received = space.then([this, &land, &body](shm::Allocation allocation) -> kj::Promise<void> {
      land.allocation = allocation;
      std::byte* destination = arena_.base() + allocation.offset;
      if (!body.viaUcx) {
        std::memcpy(destination, body.inlineData().begin(), body.sizeBytes);
        return kj::READY_NOW;
      }
      auto pieces = kj::heapArrayBuilder<kj::Promise<void>>(body.pieces);
      for (uint32_t i = 0; i < body.pieces; ++i) {
        uint64_t offset = uint64_t{i} * body.pieceBytes;
        uint64_t pieceBytes = std::min(body.pieceBytes, body.sizeBytes - offset);
        pieces.add(bodies_->receive(body.tag + i, destination + offset, pieceBytes));
      }
      return kj::joinPromises(pieces.finish());
    });
    auto stored = link.pending->wrap(kj::mv(received)).then([this, &land, &kept, linkId]() {
      storeLanded(linkId, kept, land);
    });
    return stored.attach(kj::mv(landing), kj::mv(held));
  });
}

void NodeTransfers::storeLanded(uint32_t linkId, const rpc::PeerChunk& chunk,
                                IncomingLanding& land) {
  const auto& tensor = std::get<rpc::PeerTensor>(chunk.payload);
  transfer::TensorChunk stored{tensor.dtype, tensor.shape, tensor.sizeBytes, *land.allocation};
  auto result = table_.send(chunk.senderRank, chunk.senderGroup, chunk.dataId, chunk.chunkId,
                            chunk.numChunks, chunk.destinations, std::move(stored));
  if (auto* error = std::get_if<transfer::Error>(&result)) {
    throw transferError(*error);  // the landing frees the space
  }
  land.allocation.reset();  // the table owns it now
  hop::mark(hop::Point::kChunkStored);
  spdlog::trace("chunk {} of '{}' from link {} stored", chunk.chunkId, chunk.dataId, linkId);
  auto it = incoming_.find(linkId);
  if (it != incoming_.end()) {
    ++it->second.chunks;
    it->second.bytes += tensor.sizeBytes;
    trackDelivering(it->second, chunk.dataId);
  }
}

void NodeTransfers::trackDelivering(IncomingLink& link, const std::string& dataId) {
  if (table_.allChunksArrived(dataId)) {
    link.dataIds.erase(dataId);
  } else {
    link.dataIds.insert(dataId);
  }
}

}  // namespace sidecar::daemon
