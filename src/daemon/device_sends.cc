#include "daemon/device_sends.h"

#include <spdlog/spdlog.h>

#include <cstring>
#include <optional>

#include "base/clock.h"
#include "daemon/landing_body.h"

namespace sidecar::daemon {

namespace {

cuda::DeviceSource toSource(const rpc::DeviceTensorDescriptor& tensor) {
  if (tensor.memHandle.size() != 64) {
    throw rpc::transferError("invalid-argument", "the device tensor's memHandle must be the 64 "
                                                 "bytes of a cudaIpcMemHandle_t");
  }
  if (tensor.deviceUuid.size() != 16) {
    throw rpc::transferError("invalid-argument", "the device tensor's deviceUuid must be the 16 "
                                                 "bytes of the GPU's CUDA UUID");
  }
  if (!tensor.eventHandle.empty() && tensor.eventHandle.size() != 64) {
    throw rpc::transferError("invalid-argument", "the device tensor's eventHandle must be empty or "
                                                 "the 64 bytes of a cudaIpcEventHandle_t");
  }
  cuda::DeviceSource source;
  memcpy(source.memHandle.data(), tensor.memHandle.data(), 64);
  memcpy(source.deviceUuid.data(), tensor.deviceUuid.data(), 16);
  if (!tensor.eventHandle.empty()) {
    cuda::IpcHandleBytes event;
    memcpy(event.data(), tensor.eventHandle.data(), 64);
    source.eventHandle = event;
  }
  source.offsetBytes = tensor.offsetBytes;
  source.allocationBytes = tensor.allocationBytes;
  return source;
}

}  // namespace

DeviceSends::DeviceSends(rpc::TransferBackend& transfers, const shm::Arena& arena,
                         cuda::CopyEngineOptions options, uint32_t groupGatherTimeoutMs)
    : transfers_(transfers),
      arena_(arena),
      options_(options),
      groupGatherTimeoutMs_(groupGatherTimeoutMs) {}

DeviceSends::~DeviceSends() = default;

void DeviceSends::attachOwner(Core& owner) {
  uint64_t startNs = monotonicNs();
  owner_ = &owner;
  engine_ = cuda::CopyEngine::create(owner.reactor(), arena_.base(), arena_.sizeBytes(), options_);
  GroupCopies::Hooks& hooks = *this;
  groups_ = std::make_unique<GroupCopies>(hooks, owner.timer(), groupGatherTimeoutMs_);
  {
    std::lock_guard<std::mutex> lock(reasonMutex_);
    reason_ = engine_->unavailableReason();
  }
  attached_.store(true, std::memory_order_release);
  available_.store(engine_->available(), std::memory_order_release);
  if (engine_->available()) {
    spdlog::info("GPU copy engine: {} GPU(s), arena registered with CUDA in {} ms",
                 engine_->deviceCount(), (monotonicNs() - startNs) / 1'000'000);
  } else {
    spdlog::info("GPU copy engine unavailable: {}", engine_->unavailableReason());
  }
}

void DeviceSends::detachOwner() {
  uint64_t sends = phases_.sends.load();
  if (sends > 0 && engine_ != nullptr) {
    auto stats = engine_->stats();
    spdlog::info("device sends: {} stored; mean per send: allocate {} us, copy {} us (with the "
                 "wait for the producer), store {} us; {} pieces, {} MiB, {} sleeps with copies "
                 "pending, {} copies dropped (their producer went away while they waited); {} "
                 "body pieces went to other nodes before their tensor's copy finished",
                 sends, phases_.allocateUs.load() / sends, phases_.copyUs.load() / sends,
                 phases_.storeUs.load() / sends, stats.pieces, stats.bytes >> 20,
                 stats.hostFunctionsArmed, stats.copiesDropped, phases_.piecesEarly.load());
  }
  available_.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(reasonMutex_);
    reason_ = "the daemon is stopping";
  }
  if (groups_ != nullptr && (groups_->stored() > 0 || groups_->failed() > 0)) {
    spdlog::info("group copies: {} chunks stored, {} failed", groups_->stored(), groups_->failed());
  }
  engine_.reset();  // first: waits for the copies still writing into the arena
  groups_.reset();
}

std::string DeviceSends::unavailableReason() const {
  std::lock_guard<std::mutex> lock(reasonMutex_);
  return reason_;
}

kj::Promise<void> DeviceSends::copyPieces(rpc::SessionId session, const cuda::DeviceSource& source,
                                          uint64_t bytes, uint64_t arenaOffset,
                                          std::function<void(uint64_t, uint64_t)> onPiece) {
  if (engine_ == nullptr) {
    return rpc::transferError("gpu-unavailable", "the daemon is stopping");
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto fulfiller = kj::mv(paf.fulfiller);
  cuda::CopyCallbacks callbacks;
  callbacks.onPiece = std::move(onPiece);
  // std::function must be copyable: share the fulfiller.
  auto shared = std::make_shared<kj::Own<kj::PromiseFulfiller<void>>>(kj::mv(fulfiller));
  callbacks.onDone = [shared, session](const std::string& error) {
    if (!error.empty()) spdlog::warn("session {}: device copy failed: {}", session, error);
    if (!(*shared)->isWaiting()) return;
    if (error.empty()) {
      (*shared)->fulfill();
    } else {
      (*shared)->reject(rpc::transferError("gpu-copy-failed", error));
    }
  };
  engine_->copyToArena(session, source, bytes, arenaOffset, std::move(callbacks));
  return kj::mv(paf.promise);
}

kj::Promise<void> DeviceSends::sendDevice(rpc::SessionId session, rpc::DeviceSendRequest request) {
  if (!available()) {
    return rpc::transferError("gpu-unavailable",
                              "this daemon cannot copy from GPUs: " + unavailableReason() +
                                  "; send host tensors instead");
  }
  cuda::DeviceSource source = toSource(request.tensor);
  std::optional<uint64_t> counted = transfer::tensorBytes(request.tensor.dtype, request.tensor.shape);
  if (counted != request.tensor.sizeBytes) {
    return rpc::transferError(
        "invalid-argument",
        "sizeBytes " + std::to_string(request.tensor.sizeBytes) + " is not prod(shape) * dtype size" +
            (counted ? " = " + std::to_string(*counted)
                     : " (a negative dimension, an unknown dtype or a size over 64 bits)"));
  }
  uint64_t bytes = *counted;
  if (request.concurrentCopy && request.senderGroup.size() > 1) {
    GroupMemberSend member{session, request.senderRank, request.senderGroup, std::move(request)};
    return owner_->executor().executeAsync([this, member = std::move(member)]() mutable {
      if (groups_ == nullptr) {
        return kj::Promise<void>(rpc::transferError("gpu-unavailable", "the daemon is stopping"));
      }
      return groups_->add(std::move(member));
    });
  }
  uint64_t startNs = monotonicNs();
  return transfers_.allocate(session, std::max<uint64_t>(bytes, 1), 0)
      .then([this, session, source, bytes, startNs,
             request = std::move(request)](shm::Allocation allocation) mutable {
        uint64_t offset = allocation.offset;
        uint64_t allocatedNs = monotonicNs();
        phases_.allocateUs += (allocatedNs - startNs) / 1000;
        return owner_->executor().executeAsync(
            [this, session, source, bytes, offset, allocatedNs,
             request = std::move(request)]() mutable {
              return copyAndSend(session, source, request, offset, allocatedNs);
            });
      });
}

kj::Promise<void> DeviceSends::copyAndSend(rpc::SessionId session,
                                           const cuda::DeviceSource& source,
                                           const rpc::DeviceSendRequest& request, uint64_t offset,
                                           uint64_t allocatedNs) {
  // The send starts now, while the copy runs: a cross-node delivery puts each piece on the
  // network as it lands (NodeTransfers::sendLanding); a local one waits for all of it.
  uint64_t bytes = request.tensor.sizeBytes;
  auto body = std::make_shared<LandingBody>(bytes);
  auto copiedNs = std::make_shared<uint64_t>(0);
  auto copy = copyPieces(session, source, bytes, offset,
                         [body, offset](uint64_t arenaOffset, uint64_t pieceBytes) {
                           body->piece(arenaOffset - offset, pieceBytes);
                         })
                  .then(
                      [this, body, copiedNs, allocatedNs]() -> kj::Promise<void> {
                        *copiedNs = monotonicNs();
                        phases_.copyUs += (*copiedNs - allocatedNs) / 1000;
                        phases_.piecesEarly += body->releasedEarly();
                        body->finish();
                        return kj::READY_NOW;
                      },
                      [body](kj::Exception&& e) -> kj::Promise<void> {
                        body->fail(kj::cp(e));
                        return kj::mv(e);
                      });
  auto copied = std::make_shared<kj::ForkedPromise<void>>(copy.fork());
  rpc::Landing landing;
  landing.landed = [body](uint64_t n) { return body->landed(n); };
  landing.finished = [copied]() {
    return copied->addBranch().then([]() {}, [](kj::Exception&&) {});
  };
  return transfers_.sendLanding(session, sendRequest(request, offset), std::move(landing))
      .then(
          [this, copiedNs, bytes, allocatedNs]() -> kj::Promise<void> {
            uint64_t storedNs = monotonicNs();
            if (*copiedNs != 0) phases_.storeUs += (storedNs - *copiedNs) / 1000;
            ++phases_.sends;
            spdlog::debug("device send of {} B: copy {} us, stored {} us after the copy", bytes,
                          (*copiedNs - allocatedNs) / 1000, (storedNs - *copiedNs) / 1000);
            return kj::READY_NOW;
          },
          [copied](kj::Exception&& e) -> kj::Promise<void> {
            // A failed copy says more than the failure it caused (a delivery cancelled midway).
            return copied->addBranch().then(
                [e = kj::mv(e)]() mutable -> kj::Promise<void> { return kj::mv(e); },
                [](kj::Exception&& copyError) -> kj::Promise<void> { return kj::mv(copyError); });
          })
      .attach(kj::mv(copied));
}

rpc::SendRequest DeviceSends::sendRequest(const rpc::DeviceSendRequest& request,
                                          uint64_t arenaOffset) {
  rpc::SendRequest send;
  send.dataId = request.dataId;
  send.chunkId = request.chunkId;
  send.numChunks = request.numChunks;
  send.destinations = request.destinations;
  rpc::TensorDescriptor tensor;
  tensor.dtype = request.tensor.dtype;
  tensor.shape = request.tensor.shape;
  tensor.offset = arenaOffset;
  tensor.sizeBytes = request.tensor.sizeBytes;
  send.payload = std::move(tensor);
  return send;
}

// ---- GroupCopies::Hooks (owner core) ----------------------------------------------------------

kj::Promise<shm::Allocation> DeviceSends::allocate(rpc::SessionId session, uint64_t sizeBytes) {
  return transfers_.allocate(session, sizeBytes, 0);
}

kj::Promise<void> DeviceSends::copySlice(const GroupMemberSend& member, GroupSlice slice,
                                         uint64_t arenaOffset) {
  cuda::DeviceSource source = toSource(member.request.tensor);
  source.offsetBytes += slice.offsetBytes;
  return copyPieces(member.session, source, slice.sizeBytes, arenaOffset, nullptr);
}

kj::Promise<void> DeviceSends::store(const GroupMemberSend& member, uint64_t arenaOffset) {
  return transfers_.send(member.session, sendRequest(member.request, arenaOffset));
}

kj::Promise<void> DeviceSends::storeReplica(const GroupMemberSend& member) {
  // An empty object as this member's replica: the table has the chunk already and drops it as a
  // duplicate (or as a replica it still owed, once the chunk is done), which records that this
  // member delivered it, as a full replica would.
  rpc::SendRequest send;
  send.dataId = member.request.dataId;
  send.chunkId = member.request.chunkId;
  send.numChunks = member.request.numChunks;
  send.destinations = member.request.destinations;
  send.payload = transfer::ObjectChunk{};
  return transfers_.send(member.session, std::move(send));
}

kj::Promise<void> DeviceSends::release(rpc::SessionId session, uint64_t arenaOffset) {
  return transfers_.release(session, arenaOffset);
}

void DeviceSends::endSession(rpc::SessionId session, std::function<void()> unregister) {
  if (!attached_.load(std::memory_order_acquire)) return unregister();
  owner_->post([this, session, unregister = std::move(unregister)]() {
    if (engine_ == nullptr) return unregister();
    // First the session's own copies (those waiting for a producer that went away are dropped,
    // which fails their groups), then the group copies that write into its allocations.
    engine_->dropSession(session, [this, session, unregister]() {
      if (groups_ == nullptr) return unregister();
      groups_->sessionEnded(session, unregister);
    });
  });
}

}  // namespace sidecar::daemon
