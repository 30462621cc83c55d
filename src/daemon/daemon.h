#pragma once
// sidecard's wiring: identity, cores, listeners, shutdown. main() parses the configuration and
// hands it here.

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <kj/io.h>

#include "daemon/config.h"
#include "daemon/core.h"
#include "daemon/body_transport.h"
#include "daemon/device_sends.h"
#include "daemon/node_transfers.h"
#include "rpc/node_state.h"
#include "shm/arena.h"
#include "shm/slab_allocator.h"

namespace sidecar::daemon {

class Daemon final : public rpc::NodeState {
 public:
  explicit Daemon(Config config);
  ~Daemon();

  // Creates the arena, binds the sockets and starts the cores. Throws with a message naming the
  // arena setting, socket or address and the reason when that fails (the caller prints it and
  // exits non-zero).
  void start();

  // Thread-safe: closes the listeners and every connection, and stops the cores.
  void stop();

  // The bound TCP port (useful when the config asked for port 0), or 0 when TCP is off.
  uint16_t tcpPort() const { return tcpPort_; }
  uint64_t incarnation() const { return incarnation_; }

  kj::Promise<void> fillInfo(proto::NodeInfo::Builder info) override;
  rpc::DeviceSendBackend* deviceSends() override { return deviceSends_.get(); }

  // The node's transfer memory. The allocator is owned by core 0: call it only there.
  const shm::Arena& arena() const { return *arena_; }

 private:
  Config config_;
  kj::AutoCloseFd socketLock_;  // flock on "<socket>.lock" for the daemon's life
  uint64_t incarnation_;
  int64_t startedAtUnixMs_;
  uint64_t startedAtNs_;
  uint16_t tcpPort_ = 0;
  std::string tcpAddress_;
  std::optional<shm::Arena> arena_;
  std::unique_ptr<shm::SlabAllocator> allocator_;
  std::unique_ptr<NodeTransfers> transfers_;
  // Cross-node bodies over UCX (absent without UCX, or when it failed to start: bodies then ride
  // inline in control messages). The context is the daemon's; the transport (its worker) lives
  // on core 0 and is created and destroyed there.
  std::shared_ptr<void> ucxContext_;
  std::unique_ptr<BodyTransport> bodies_;
  std::unique_ptr<DeviceSends> deviceSends_;  // GPU tensors (issue 6)
  std::vector<std::unique_ptr<Core>> cores_;
  std::atomic<bool> stopped_{false};
};

}  // namespace sidecar::daemon
