#include "daemon/daemon.h"

#include <spdlog/spdlog.h>
#include <sys/random.h>
#include <unistd.h>

#include <kj/debug.h>

#include "base/clock.h"
#include "reactor/socket.h"
#include "sidecar_build_config.h"

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
  // Bind first, so a taken socket or port fails before any thread starts.
  kj::AutoCloseFd unixFd = reactor::listenUnix(config_.socketPath, 0660);
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
    cores_.push_back(std::make_unique<Core>(options, *this));
    cores_.back()->start();
  }
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
  if (stopped_.exchange(true)) return;
  // Core 0 first: it owns the listeners, so nothing new arrives while the others stop.
  for (auto& core : cores_) {
    core->requestStop();
    core->join();
  }
  cores_.clear();
  if (!config_.socketPath.empty()) unlink(config_.socketPath.c_str());
  spdlog::info("sidecard stopped");
}

void Daemon::fillInfo(proto::NodeInfo::Builder info) {
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
    if (const auto* stats = cores_[i]->reactorStats()) {
      core.setCompletions(stats->completions.load(std::memory_order_relaxed));
      core.setSleeps(stats->sleeps.load(std::memory_order_relaxed));
    }
  }
  info.setCudaAvailable(false);  // the CUDA copy engine arrives with the GPU issue
  info.setUcxAvailable(false);   // the UCX transport arrives with the cross-node issue
}

}  // namespace sidecar::daemon
