#pragma once
// Socket set-up for the reactor: listening and connecting on unix and TCP sockets, and parsing of
// "host:port". Every call either returns a ready fd or throws a kj::Exception whose description
// names the address and the reason (these run at start-up or on the control path, never per
// message). All fds are close-on-exec and non-blocking.

#include <kj/async.h>
#include <kj/debug.h>
#include <kj/io.h>

#include <cstdint>
#include <string>

#include "reactor/completion.h"
#include "reactor/reactor.h"

namespace sidecar::reactor {

struct HostPort {
  std::string host;
  uint16_t port = 0;
};

// Parses "host:port", "[v6]:port" or ":port" (all interfaces). Throws on anything else.
HostPort parseHostPort(const std::string& text);

// Binds and listens on a unix socket at `path` with permissions `mode`. A stale socket file left by
// a dead daemon is replaced; a live one (something accepts connections on it) is an error, so two
// daemons never share a path. The parent directory is created when missing.
// `pathLocked`: the caller holds lockUnixSocketPath(path), so any socket file there is stale
// (its daemon is dead, although the kernel may still accept on it for a few milliseconds while
// it tears the old process's rings down) and is replaced without probing.
kj::AutoCloseFd listenUnix(const std::string& path, unsigned mode, int backlog = 512,
                           bool pathLocked = false);

// Takes an exclusive flock on "<path>.lock" (created when missing), held as long as the returned
// fd is open: the one reliable test that no other daemon serves `path`. Throws "already
// serving" when another process holds it.
kj::AutoCloseFd lockUnixSocketPath(const std::string& path);

// Binds and listens on TCP (SO_REUSEADDR). Port 0 picks a free port; see localPort().
kj::AutoCloseFd listenTcp(const HostPort& address, int backlog = 512);
uint16_t localPort(int fd);

// Blocking connects, for clients and tests (the daemon itself never blocks). The returned fd is
// switched to non-blocking after the connect. TCP sockets get TCP_NODELAY.
kj::AutoCloseFd connectUnix(const std::string& path);
kj::AutoCloseFd connectTcp(const HostPort& address);

void setNoDelay(int fd);

// Accepts connections on a listening socket through the ring (IORING_OP_ACCEPT).
class Acceptor final : private Completion {
 public:
  Acceptor(Reactor& reactor, kj::AutoCloseFd listenFd);
  ~Acceptor();

  // The next connection, non-blocking and close-on-exec. One accept() in flight at a time.
  kj::Promise<kj::AutoCloseFd> accept();
  int fd() const { return listenFd_.get(); }

 private:
  void complete(int32_t result, uint32_t cqeFlags) override;
  void submit();

  Reactor& reactor_;
  kj::AutoCloseFd listenFd_;
  kj::Own<kj::PromiseFulfiller<kj::AutoCloseFd>> fulfiller_;
  bool inflight_ = false;
};

}  // namespace sidecar::reactor
