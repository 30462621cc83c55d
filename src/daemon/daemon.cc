#include "daemon/daemon.h"

#include <spdlog/spdlog.h>
#include <sys/random.h>
#include <unistd.h>

#include <kj/debug.h>

#include "base/clock.h"
#include "reactor/socket.h"
#include "shm/shm_stats.h"
#include "shm/sizes.h"
#include "sidecar_build_config.h"
#if SIDECAR_HAVE_UCX
#include "daemon/ucx_bodies.h"
#include "net/ucx_context.h"
#endif

namespace sidecar::daemon {

namespace {

uint64_t randomIncarnation() {
  uint64_t value = 0;
  while (value == 0) {
    if (getrandom(&value, sizeof value, 0) != sizeof value) value = monotonicNs() ^ getpid();
  }
  return value;
}

}  // namespace

Daemon::Daemon(Config config)
    : config_(std::move(config)),
      incarnation_(randomIncarnation()),
      startedAtUnixMs_(unixTimeMs()),
      startedAtNs_(monotonicNs()) {}

Daemon::~Daemon() { stop(); }

void Daemon::start() {
  // The socket's lock first: a second daemon on the same path must fail before it takes an arena.
  socketLock_ = reactor::lockUnixSocketPath(config_.socketPath);
  // The arena next: it is the largest resource and the likeliest to be refused.
  shm::ArenaOptions arenaOptions;
  arenaOptions.sizeBytes =
      config_.arenaBytes != 0 ? config_.arenaBytes : shm::defaultArenaSizeBytes();
  auto kind = shm::parsePageKind(config_.arenaPages);
  if (!(kind.ok())) KJ_FAIL_REQUIRE(kj::str("arena pages: ", kind.error().message.c_str()));
  arenaOptions.pageKind = *kind;
  arenaOptions.lockMemory = config_.arenaLock;
  arenaOptions.populate = config_.arenaPopulate;
  if (arenaOptions.populate) {
    // Start-up waits for it (about 0.3-0.5 s per GiB of 4 KiB pages): say why.
    spdlog::info("arena: faulting in all {} ([arena] populate)", shm::formatBytes(arenaOptions.sizeBytes));
  }
  auto arena = shm::Arena::create(arenaOptions);
  if (!(arena.ok())) KJ_FAIL_REQUIRE(kj::str("cannot create the arena of ",
                                 shm::formatBytes(arenaOptions.sizeBytes).c_str(), ": ",
                                 arena.error().message.c_str()));
  arena_.emplace(std::move(arena).value());
  shm::SlabAllocatorOptions allocatorOptions;
  allocatorOptions.capacityBytes = arena_->sizeBytes();
  auto allocator = shm::SlabAllocator::create(allocatorOptions);
  if (!(allocator.ok())) KJ_FAIL_REQUIRE(kj::str("cannot create the slab allocator: ",
                                     allocator.error().message.c_str()));
  allocator_ = std::move(allocator).value();
  TransferOptions transferOptions;
  transferOptions.sendTimeoutMs = config_.sendTimeoutMs;
  transferOptions.limits.objectBytesMax = config_.objectBytesMax;
  transferOptions.limits.ttlMs = config_.transferTtlMs;
  transferOptions.limits.worldSize = config_.worldSize;
  transferOptions.peers = config_.peers;
  transferOptions.self.protocolVersion = proto::PROTOCOL_VERSION;
  transferOptions.self.nodeId = config_.nodeId;
  transferOptions.self.incarnation = incarnation_;
  transferOptions.self.address = config_.peers.advertise;
  transfers_ = std::make_unique<NodeTransfers>(*arena_, *allocator_, transferOptions);
#if SIDECAR_HAVE_UCX
  try {
    // The arena is registered once; every body moves between arena slabs.
    ucxContext_ = std::make_shared<net::UcxContext>(arena_->base(), arena_->sizeBytes());
  } catch (const std::exception& e) {
    spdlog::warn("UCX unavailable, cross-node bodies will ride in control messages (at most 48 "
                 "MiB each): {}",
                 e.what());
  }
#else
  spdlog::info("built without UCX: cross-node bodies ride in control messages (at most 48 MiB each)");
#endif
  deviceSends_ = std::make_unique<DeviceSends>(*transfers_, *arena_, cuda::CopyEngineOptions{},
                                               config_.sendTimeoutMs);
  spdlog::info("arena: {} of {} pages{}{}; {}", shm::formatBytes(arena_->sizeBytes()),
               shm::pageKindName(arena_->pageKind()), arena_->mlocked() ? ", locked in RAM" : "",
               config_.arenaPopulate ? ", populated" : "", arena_->pageKindReason());

  // Bind next, so a taken socket or port fails before any thread starts.
  kj::AutoCloseFd unixFd = reactor::listenUnix(config_.socketPath, 0660, 512, /*pathLocked=*/true);
  kj::AutoCloseFd tcpFd;
  if (!config_.tcpListen.empty()) {
    auto address = reactor::parseHostPort(config_.tcpListen);
    tcpFd = reactor::listenTcp(address);
    tcpPort_ = reactor::localPort(tcpFd.get());
    tcpAddress_ = address.host + ":" + std::to_string(tcpPort_);
  }

  std::vector<int> cpus = resolveReactorCpus(config_);
  for (uint32_t i = 0; i < config_.cores; ++i) {
    CoreOptions options;
    options.index = i;
    options.cpu = i < cpus.size() ? cpus[i] : -1;
    options.reactor.ringEntries = config_.ringEntries;
    options.spinUs = config_.spinUs;
    cores_.push_back(std::make_unique<Core>(options, *this, transfers_.get(), transfers_.get()));
    cores_.back()->start();
  }
  // Core 0 owns the allocator and the transfer table.
  cores_[0]->post([this]() {
#if SIDECAR_HAVE_UCX
    if (ucxContext_ != nullptr) {
      try {
        bodies_ = std::make_unique<UcxBodies>(*static_cast<net::UcxContext*>(ucxContext_.get()),
                                              cores_[0]->reactor());
        transfers_->setBodyTransport(bodies_.get());
        spdlog::info("cross-node bodies: {}", bodies_->describe());
      } catch (const std::exception& e) {
        spdlog::warn("UCX worker unavailable, cross-node bodies will ride in control messages: {}",
                     e.what());
      }
    }
#endif
    transfers_->attachOwner(cores_[0]->timer(), cores_[0]->reactor());
  });
  cores_[0]->post([this]() { deviceSends_->attachOwner(*cores_[0]); });
  // Core 0 accepts on both sockets and deals connections out to the cores in turn.
  auto dispatch = [this, next = size_t{0}](kj::AutoCloseFd fd, bool unixSocket) mutable {
    cores_[next++ % cores_.size()]->adopt(kj::mv(fd), unixSocket);
  };
  cores_[0]->listen(kj::mv(unixFd), true, dispatch);
  if (tcpFd != nullptr) cores_[0]->listen(kj::mv(tcpFd), false, dispatch);

  spdlog::info("sidecard {} node '{}' incarnation {:016x}: {} core(s), unix socket {}, tcp {}",
               SIDECAR_VERSION, config_.nodeId, incarnation_, cores_.size(), config_.socketPath,
               tcpAddress_.empty() ? "off" : tcpAddress_);
}

void Daemon::stop() {
  if (stopped_.exchange(true) || cores_.empty()) return;
  // Core 0 first: it owns the listeners, so nothing new arrives while the others stop; it frees
  // what the transfer service holds before its loop ends.
  cores_[0]->post([this]() { deviceSends_->detachOwner(); });  // first: copies write the arena
  cores_[0]->post([this]() {
    transfers_->detachOwner();
    bodies_.reset();  // after the links that used its worker
  });
  for (auto& core : cores_) {
    core->requestStop();
    core->join();
  }
  cores_.clear();
  if (!config_.socketPath.empty()) unlink(config_.socketPath.c_str());
  spdlog::info("sidecard stopped");
}

kj::Promise<void> Daemon::fillInfo(proto::NodeInfo::Builder info) {
  info.setProtocolVersion(proto::PROTOCOL_VERSION);
  info.setVersion(SIDECAR_VERSION);
  info.setNodeId(config_.nodeId);
  info.setIncarnation(incarnation_);
  info.setStartedAtUnixMs(startedAtUnixMs_);
  info.setUptimeMs((monotonicNs() - startedAtNs_) / 1'000'000);
  info.setPid(getpid());
  info.setSocketPath(config_.socketPath);
  info.setTcpAddress(tcpAddress_);
  auto cores = info.initCores(static_cast<unsigned>(cores_.size()));
  for (size_t i = 0; i < cores_.size(); ++i) {
    auto core = cores[static_cast<unsigned>(i)];
    core.setIndex(cores_[i]->index());
    core.setCpu(cores_[i]->cpu());
    core.setConnections(cores_[i]->connections());
    core.setLanes(cores_[i]->lanes());
    if (const auto* stats = cores_[i]->reactorStats()) {
      core.setCompletions(stats->completions.load(std::memory_order_relaxed));
      core.setSleeps(stats->sleeps.load(std::memory_order_relaxed));
    }
  }
  info.setCudaAvailable(deviceSends_ != nullptr && deviceSends_->available());
  info.setUcxAvailable(bodies_ != nullptr);
  if (bodies_ != nullptr) {
    std::string address = bodies_->address();
    info.setUcxWorkerAddress(kj::arrayPtr(reinterpret_cast<const kj::byte*>(address.data()), address.size()));
  }
  if (allocator_ == nullptr || cores_.empty()) return kj::READY_NOW;

  // The allocator belongs to core 0: take its statistics there and fill them in here.
  return cores_[0]->executor()
      .executeAsync([this]() { return shm::collectShmStats(*arena_, *allocator_); })
      .then([info](shm::ShmStats stats) mutable {
        auto arena = info.initArena();
        arena.setSizeBytes(stats.arenaBytes);
        arena.setPageKind(stats.pageKind);
        arena.setPageKindReason(stats.pageKindReason);
        arena.setLocked(stats.mlocked);
        arena.setSlabBytes(stats.slabSizeBytes);
        arena.setSlabsTotal(static_cast<uint32_t>(stats.slabsTotal));
        arena.setSlabsFree(static_cast<uint32_t>(stats.slabsFree));
        arena.setUsedBytes(stats.usedBytes);
        auto hints = arena.initHints(static_cast<unsigned>(stats.hints.size()));
        for (size_t i = 0; i < stats.hints.size(); ++i) {
          const auto& h = stats.hints[i];
          auto out = hints[static_cast<unsigned>(i)];
          out.setHintBytes(h.hint);
          out.setSlabs(static_cast<uint32_t>(h.slabs));
          out.setUnitsUsed(h.unitsUsed);
          out.setUnitsFree(h.unitsFree);
          out.setLargestFreeRunUnits(h.largestFreeRunUnits);
          out.setFragmentation(h.fragmentation);
          out.setAllocationWaits(h.waits);
          out.setAllocationFailures(h.failures);
        }
      });
}

}  // namespace sidecar::daemon
