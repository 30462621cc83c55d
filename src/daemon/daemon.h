#pragma once
// sidecard's wiring: identity, cores, listeners, shutdown. main() parses the configuration and
// hands it here.

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "daemon/config.h"
#include "daemon/core.h"
#include "rpc/node_state.h"

namespace sidecar::daemon {

class Daemon final : public rpc::NodeState {
 public:
  explicit Daemon(Config config);
  ~Daemon();

  // Binds the sockets and starts the cores. Throws with a message naming the socket or address
  // and the reason when that fails (the caller prints it and exits non-zero).
  void start();

  // Thread-safe: closes the listeners and every connection, and stops the cores.
  void stop();

  // The bound TCP port (useful when the config asked for port 0), or 0 when TCP is off.
  uint16_t tcpPort() const { return tcpPort_; }
  uint64_t incarnation() const { return incarnation_; }

  void fillInfo(proto::NodeInfo::Builder info) override;

 private:
  Config config_;
  uint64_t incarnation_;
  int64_t startedAtUnixMs_;
  uint64_t startedAtNs_;
  uint16_t tcpPort_ = 0;
  std::string tcpAddress_;
  std::vector<std::unique_ptr<Core>> cores_;
  std::atomic<bool> stopped_{false};
};

}  // namespace sidecar::daemon
