#pragma once
// One reactor core of the daemon: a thread pinned to one CPU, running its own io_uring reactor,
// a KJ event loop on it, a mailbox through which other threads hand it work, and the RPC
// connections it serves. Connections are sharded over cores by the acceptor on core 0; each
// connection then lives on its core alone, so no locks guard its state.

#include <kj/async.h>
#include <kj/timer.h>
#include <kj/io.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <shared_mutex>
#include <thread>

#include "reactor/reactor.h"
#include "rpc/node_state.h"
#include "rpc/peer_backend.h"
#include "rpc/transfer_backend.h"

namespace sidecar::daemon {

struct CoreOptions {
  uint32_t index = 0;
  int cpu = -1;  // -1: do not pin
  reactor::ReactorOptions reactor;
  uint32_t spinUs = 50;
};

class Core {
 public:
  // `transfers` may be null (no transfer service: register fails clearly).
  // `peers` may be null (peer links are then refused).
  Core(CoreOptions options, rpc::NodeState& node, rpc::TransferBackend* transfers = nullptr,
       rpc::PeerBackend* peers = nullptr);
  ~Core();  // stops and joins

  // Starts the thread and returns once its reactor and mailbox exist.
  void start();

  // Thread-safe: runs `task` on this core's thread, inside its event loop.
  void post(std::function<void()> task);

  // Thread-safe: serves Cap'n Proto RPC on a connected socket from now on. `unixSocket` enables
  // fd passing.
  void adopt(kj::AutoCloseFd fd, bool unixSocket);

  // Thread-safe: accepts connections on the listening socket `listenFd` on this core's ring and
  // hands each to `dispatch` (called on this core's thread). Accept failures are logged and the
  // listener keeps going.
  using Dispatch = std::function<void(kj::AutoCloseFd fd, bool unixSocket)>;
  void listen(kj::AutoCloseFd listenFd, bool unixSocket, Dispatch dispatch);

  // Thread-safe: closes every connection and ends the thread's loop. join() waits for it.
  void requestStop();
  void join();

  uint32_t index() const { return options_.index; }
  int cpu() const { return options_.cpu; }
  uint32_t connections() const { return connections_.load(std::memory_order_relaxed); }
  uint32_t lanes() const { return lanes_.load(std::memory_order_relaxed); }
  // Null until start() returned.
  const reactor::ReactorStats* reactorStats() const { return stats_.load(); }
  // The core's timer; use only on the core's own thread (e.g. inside a posted task).
  kj::Timer& timer();
  // The core's reactor (to add event sources); use only on the core's own thread.
  reactor::Reactor& reactor();
  // Runs work on this core from another core's event loop and returns its result there
  // (kj::Executor::executeAsync). Valid between start() and join().
  const kj::Executor& executor() const { return *executor_; }

 private:
  struct Loop;
  void run();

  CoreOptions options_;
  rpc::NodeState& node_;
  rpc::TransferBackend* transfers_;
  rpc::PeerBackend* peers_;
  std::thread thread_;
  // Posting takes this shared; the core's thread takes it exclusively to tear its loop down, so a
  // post never reaches a mailbox being destroyed (posts after that are dropped).
  std::shared_mutex loopMutex_;
  std::atomic<Loop*> loop_{nullptr};
  std::atomic<const reactor::ReactorStats*> stats_{nullptr};
  std::atomic<uint32_t> connections_{0};
  std::atomic<uint32_t> lanes_{0};  // open session lanes on this core (their LaneServices count)
  kj::Own<const kj::Executor> executor_;
};

}  // namespace sidecar::daemon
