#pragma once
// Outgoing TCP connections for the daemon's own event loop (peer links): the connect runs in the
// ring (IORING_OP_CONNECT), so a peer that does not answer never blocks the reactor. Names that are
// not numeric addresses are resolved on a short-lived helper thread (getaddrinfo blocks).

#include <kj/async.h>
#include <kj/io.h>

#include "reactor/reactor.h"
#include "reactor/socket.h"

namespace sidecar::reactor {

// A connected, non-blocking, close-on-exec TCP socket with TCP_NODELAY. Rejects with a message
// naming the address and the reason. Dropping the promise abandons the attempt (the socket is
// closed once the kernel has let go of it). Call on the reactor's own thread.
kj::Promise<kj::AutoCloseFd> connectTcpAsync(Reactor& reactor, const HostPort& address);

}  // namespace sidecar::reactor
