#include "daemon/core.h"

#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>

#include <sys/socket.h>

#include <latch>

#include "reactor/kj_event_port.h"
#include "reactor/mailbox.h"
#include "reactor/socket.h"
#include "reactor/uring_stream.h"
#include "rpc/rpc_connection.h"
#include "rpc/sidecar_service.h"

namespace sidecar::daemon {

namespace {

// The accept loop of one listening socket.
class Listener {
 public:
  Listener(reactor::Reactor& reactor, kj::Timer& timer, kj::AutoCloseFd fd, bool unixSocket,
           Core::Dispatch dispatch)
      : acceptor_(reactor, kj::mv(fd)),
        timer_(timer),
        unixSocket_(unixSocket),
        dispatch_(std::move(dispatch)) {}

  kj::Promise<void> run() {
    return acceptor_.accept().then(
        [this](kj::AutoCloseFd fd) {
          if (!unixSocket_) reactor::setNoDelay(fd.get());
          dispatch_(kj::mv(fd), unixSocket_);
          return run();
        },
        [this](kj::Exception&& e) -> kj::Promise<void> {
          // Out of fds or similar: keep serving the connections we have and try again after a
          // pause (retrying at once would spin while the condition lasts).
          spdlog::error("accept on the {} socket failed: {}; retrying in {} ms",
                        unixSocket_ ? "unix" : "tcp", e.getDescription().cStr(), kRetryMs);
          return timer_.afterDelay(kRetryMs * kj::MILLISECONDS).then([this]() { return run(); });
        });
  }

 private:
  static constexpr int64_t kRetryMs = 100;
  reactor::Acceptor acceptor_;
  kj::Timer& timer_;
  bool unixSocket_;
  Core::Dispatch dispatch_;
};

}  // namespace

// The core's loop is created, run and destroyed on the core's thread, so its ring can defer task
// work to that thread (see ReactorOptions::deferTaskrun).
static reactor::ReactorOptions threadBound(reactor::ReactorOptions options) {
  options.deferTaskrun = true;
  return options;
}

// Everything that lives on the core's thread. Built and destroyed on that thread.
struct Core::Loop final : public kj::TaskSet::ErrorHandler {
  Loop(Core& core)
      : core(core),
        loop(threadBound(core.options_.reactor), core.options_.spinUs),
        mailbox(loop.reactor()),
        connections(kj::heap<kj::TaskSet>(*this)), listeners(kj::heap<kj::TaskSet>(*this)) {
    auto paf = kj::newPromiseAndFulfiller<void>();
    stopped = kj::mv(paf.promise);
    stopFulfiller = kj::mv(paf.fulfiller);
  }

  void taskFailed(kj::Exception&& exception) override {
    spdlog::warn("core {}: connection task failed: {}", core.options_.index,
                 exception.getDescription().cStr());
  }

  void adopt(kj::AutoCloseFd fd, bool unixSocket) {
    int32_t peerPid = 0;
    if (unixSocket) {
      ucred credentials{};
      socklen_t length = sizeof credentials;
      if (getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0) {
        peerPid = credentials.pid;
      }
    }
    // One bootstrap service per connection: it knows whether its connection carries fds.
    capnp::Capability::Client service =
        kj::heap<rpc::SidecarService>(core.node_, core.transfers_, unixSocket, peerPid, core.peers_,
                                      rpc::LaneHost{&loop.reactor(), &core.lanes_});
    auto stream = kj::heap<reactor::UringStream>(loop.reactor(), kj::mv(fd));
    kj::Own<rpc::RpcConnection> connection =
        unixSocket ? kj::heap<rpc::RpcConnection>(
                         kj::Own<kj::AsyncCapabilityStream>(kj::mv(stream)), kj::mv(service))
                   : kj::heap<rpc::RpcConnection>(kj::Own<kj::AsyncIoStream>(kj::mv(stream)),
                                                  kj::mv(service));
    uint32_t now = core.connections_.fetch_add(1, std::memory_order_relaxed) + 1;
    spdlog::debug("core {}: {} connection opened ({} open)", core.options_.index,
                  unixSocket ? "unix" : "tcp", now);
    auto done = connection->onDisconnect();
    connections->add(done.attach(kj::mv(connection)).then([this]() {
      uint32_t left = core.connections_.fetch_sub(1, std::memory_order_relaxed) - 1;
      spdlog::debug("core {}: connection closed ({} open)", core.options_.index, left);
    }));
  }

  void listen(kj::AutoCloseFd fd, bool unixSocket, Dispatch dispatch) {
    auto listener = kj::heap<Listener>(loop.reactor(), loop.timer(), kj::mv(fd), unixSocket,
                                      std::move(dispatch));
    auto running = listener->run();
    listeners->add(running.attach(kj::mv(listener)));
  }

  Core& core;
  reactor::ReactorLoop loop;
  reactor::Mailbox mailbox;
  kj::Own<kj::TaskSet> connections;
  kj::Own<kj::TaskSet> listeners;
  kj::Promise<void> stopped = nullptr;
  kj::Own<kj::PromiseFulfiller<void>> stopFulfiller;
};

Core::Core(CoreOptions options, rpc::NodeState& node, rpc::TransferBackend* transfers,
           rpc::PeerBackend* peers)
    : options_(options), node_(node), transfers_(transfers), peers_(peers) {}

kj::Timer& Core::timer() { return loop_.load()->loop.timer(); }

reactor::Reactor& Core::reactor() { return loop_.load()->loop.reactor(); }

Core::~Core() {
  if (thread_.joinable()) {
    requestStop();
    join();
  }
}

void Core::start() {
  std::latch ready(1);
  thread_ = std::thread([this, &ready]() {
    if (options_.cpu >= 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(options_.cpu, &set);
      int rc = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
      if (rc != 0) {
        spdlog::warn("core {}: cannot pin to CPU {}: {}; running unpinned", options_.index,
                     options_.cpu, strerror(rc));
        options_.cpu = -1;
      }
    }
    std::string name = "sidecar-core" + std::to_string(options_.index);
    pthread_setname_np(pthread_self(), name.c_str());
    Loop loop(*this);
    stats_.store(&loop.loop.reactor().stats());
    executor_ = kj::getCurrentThreadExecutor().addRef();
    loop_.store(&loop);
    ready.count_down();
    run();
    // Close listeners and connections while the loop is still alive, then make the core
    // unreachable.
    loop.listeners = nullptr;
    loop.connections = nullptr;
    {
      std::unique_lock<std::shared_mutex> lock(loopMutex_);
      loop_.store(nullptr);
    }
    stats_.store(nullptr);
  });
  ready.wait();
}

void Core::run() {
  Loop& loop = *loop_.load();
  spdlog::debug("core {}: running on CPU {}", options_.index, options_.cpu);
  loop.stopped.wait(loop.loop.waitScope());
}

void Core::post(std::function<void()> task) {
  std::shared_lock<std::shared_mutex> lock(loopMutex_);
  Loop* loop = loop_.load();
  if (loop != nullptr) loop->mailbox.post(std::move(task));
}

void Core::adopt(kj::AutoCloseFd fd, bool unixSocket) {
  // std::function needs a copyable callable; carry the fd as a plain int and re-own it there.
  int raw = fd.release();
  post([this, raw, unixSocket]() { loop_.load()->adopt(kj::AutoCloseFd(raw), unixSocket); });
}

void Core::listen(kj::AutoCloseFd listenFd, bool unixSocket, Dispatch dispatch) {
  int raw = listenFd.release();
  post([this, raw, unixSocket, dispatch = std::move(dispatch)]() mutable {
    loop_.load()->listen(kj::AutoCloseFd(raw), unixSocket, std::move(dispatch));
  });
}

void Core::requestStop() {
  post([this]() {
    auto& fulfiller = loop_.load()->stopFulfiller;
    if (fulfiller->isWaiting()) fulfiller->fulfill();
  });
}

void Core::join() {
  if (thread_.joinable()) thread_.join();
}

}  // namespace sidecar::daemon
