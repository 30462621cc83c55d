#include "reactor/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/file.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace sidecar::reactor {

namespace {

[[noreturn]] void fail(const std::string& what, int error) {
  KJ_FAIL_REQUIRE(kj::str(what.c_str(), ": ", strerror(error)));
}

sockaddr_un unixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (!(!path.empty() && path.size() < sizeof(addr.sun_path))) KJ_FAIL_REQUIRE(kj::str("unix socket path '", path.c_str(), "' must be 1 to ",
                     sizeof(addr.sun_path) - 1, " bytes long"));
  memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

void setNonBlocking(int fd) {
  int flags = fcntl(fd, F_GETFL);
  KJ_SYSCALL(fcntl(fd, F_SETFL, flags | O_NONBLOCK));
}

struct ResolvedAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
};

ResolvedAddress resolve(const HostPort& address, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* result = nullptr;
  std::string port = std::to_string(address.port);
  const char* host = address.host.empty() ? nullptr : address.host.c_str();
  int rc = getaddrinfo(host, port.c_str(), &hints, &result);
  if (!(rc == 0)) KJ_FAIL_REQUIRE(kj::str("cannot resolve '", address.host.c_str(), "': ", gai_strerror(rc)));
  ResolvedAddress out;
  memcpy(&out.storage, result->ai_addr, result->ai_addrlen);
  out.length = result->ai_addrlen;
  freeaddrinfo(result);
  return out;
}

}  // namespace

HostPort parseHostPort(const std::string& text) {
  auto colon = text.rfind(':');
  if (!(colon != std::string::npos)) KJ_FAIL_REQUIRE(kj::str("'", text.c_str(), "' is not host:port (e.g. 0.0.0.0:7650 or [::1]:7650)"));
  HostPort out;
  out.host = text.substr(0, colon);
  if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  std::string port = text.substr(colon + 1);
  char* end = nullptr;
  errno = 0;
  long value = std::strtol(port.c_str(), &end, 10);
  if (!(!port.empty() && *end == '\0' && errno == 0 && value >= 0 && value <= 65535)) KJ_FAIL_REQUIRE(kj::str("'", text.c_str(), "': port must be a number from 0 to 65535"));
  out.port = static_cast<uint16_t>(value);
  return out;
}

kj::AutoCloseFd lockUnixSocketPath(const std::string& path) {
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) {
      KJ_FAIL_REQUIRE(kj::str("cannot create directory '", parent.c_str(), "' for the socket: ",
                              ec.message().c_str()));
    }
  }
  std::string lockPath = path + ".lock";
  int fd = open(lockPath.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0660);
  if (fd < 0) fail("cannot open lock file '" + lockPath + "'", errno);
  kj::AutoCloseFd owned(fd);
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK) {
      KJ_FAIL_REQUIRE(kj::str("another process is already serving unix socket '", path.c_str(),
                              "' (it holds ", lockPath.c_str(),
                              "); stop it or choose another path (--socket)"));
    }
    fail("cannot lock '" + lockPath + "'", errno);
  }
  return owned;
}

kj::AutoCloseFd listenUnix(const std::string& path, unsigned mode, int backlog, bool pathLocked) {
  sockaddr_un addr = unixAddress(path);
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (!(!ec)) KJ_FAIL_REQUIRE(kj::str("cannot create directory '", parent.c_str(), "' for the socket: ",
                            ec.message().c_str()));
  }
  struct stat existing {};
  if (pathLocked) {
    if (lstat(path.c_str(), &existing) == 0 && S_ISSOCK(existing.st_mode)) unlink(path.c_str());
  } else {
    // Refuse to steal the socket of a live daemon; remove a stale one.
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    KJ_SYSCALL(probe);
    kj::AutoCloseFd probeFd(probe);
    if (connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      KJ_FAIL_REQUIRE(kj::str("another process is already serving unix socket '", path.c_str(),
                              "'; stop it or choose another path (--socket)"));
    }
    // Only a socket is a stale socket: connect() also says ECONNREFUSED for a regular file,
    // which must not be deleted (bind() below then reports the path as in use).
    struct stat st {};
    if (errno == ECONNREFUSED && lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      unlink(path.c_str());
    }
  }
  // Whatever is still at the path (not a stale socket: e.g. a regular file) is not ours to
  // replace; the rename below would.
  struct stat left {};
  if (lstat(path.c_str(), &left) == 0) {
    fail("cannot bind unix socket '" + path + "': the path exists and is not a stale socket",
         EADDRINUSE);
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  KJ_SYSCALL(fd);
  kj::AutoCloseFd owned(fd);
  // The path appears only once the socket listens: bound and listening under a temporary name,
  // then renamed into place (atomic). A client that connects as soon as it sees the path (a test,
  // an orchestrator polling for it) is never refused for connecting between bind and listen.
  // Without room for the temporary name in sun_path, the socket is bound at its path directly.
  std::string staged = path + ".new" + std::to_string(getpid());
  bool stage = staged.size() < sizeof(addr.sun_path);
  sockaddr_un bound = stage ? unixAddress(staged) : addr;
  const std::string& boundPath = stage ? staged : path;
  if (stage) unlink(staged.c_str());  // left by a crashed daemon of the same pid
  if (bind(fd, reinterpret_cast<sockaddr*>(&bound), sizeof bound) < 0) {
    fail("cannot bind unix socket '" + boundPath + "'", errno);
  }
  if (chmod(boundPath.c_str(), mode) < 0) {
    int err = errno;
    if (stage) unlink(staged.c_str());
    fail("cannot chmod unix socket '" + boundPath + "'", err);
  }
  if (listen(fd, backlog) < 0) {
    int err = errno;
    if (stage) unlink(staged.c_str());
    fail("cannot listen on unix socket '" + boundPath + "'", err);
  }
  if (stage && rename(staged.c_str(), path.c_str()) < 0) {
    int err = errno;
    unlink(staged.c_str());
    fail("cannot move unix socket '" + staged + "' to '" + path + "'", err);
  }
  return owned;
}

kj::AutoCloseFd listenTcp(const HostPort& address, int backlog) {
  ResolvedAddress resolved = resolve(address, true);
  int fd = socket(resolved.storage.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  KJ_SYSCALL(fd);
  kj::AutoCloseFd owned(fd);
  int one = 1;
  KJ_SYSCALL(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
  if (bind(fd, reinterpret_cast<sockaddr*>(&resolved.storage), resolved.length) < 0) {
    fail("cannot bind TCP " + address.host + ":" + std::to_string(address.port), errno);
  }
  KJ_SYSCALL(listen(fd, backlog));
  return owned;
}

uint16_t localPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
  if (addr.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  return 0;
}

void setNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

kj::AutoCloseFd connectUnix(const std::string& path) {
  sockaddr_un addr = unixAddress(path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  KJ_SYSCALL(fd);
  kj::AutoCloseFd owned(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
    int error = errno;
    KJ_FAIL_REQUIRE(kj::str("cannot connect to sidecard at unix socket '", path.c_str(), "': ",
                            strerror(error),
                            error == ENOENT || error == ECONNREFUSED
                                ? " (is sidecard running? set SIDECAR_SOCKET or --socket)"
                                : ""));
  }
  setNonBlocking(fd);
  return owned;
}

kj::AutoCloseFd connectTcp(const HostPort& address) {
  ResolvedAddress resolved = resolve(address, false);
  int fd = socket(resolved.storage.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  KJ_SYSCALL(fd);
  kj::AutoCloseFd owned(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&resolved.storage), resolved.length) < 0) {
    fail("cannot connect to sidecard at " + address.host + ":" + std::to_string(address.port),
         errno);
  }
  setNoDelay(fd);
  setNonBlocking(fd);
  return owned;
}

Acceptor::Acceptor(Reactor& reactor, kj::AutoCloseFd listenFd)
    : reactor_(reactor), listenFd_(kj::mv(listenFd)) {}

Acceptor::~Acceptor() {
  fulfiller_ = nullptr;
  if (inflight_) {
    reactor_.cancel(this);
    while (inflight_) reactor_.poll();
  }
}

kj::Promise<kj::AutoCloseFd> Acceptor::accept() {
  auto paf = kj::newPromiseAndFulfiller<kj::AutoCloseFd>();
  fulfiller_ = kj::mv(paf.fulfiller);
  if (!inflight_) submit();
  return kj::mv(paf.promise);
}

void Acceptor::submit() {
  io_uring_sqe& sqe = reactor_.prepare(this);
  io_uring_prep_accept(&sqe, listenFd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  inflight_ = true;
}

void Acceptor::complete(int32_t result, uint32_t) {
  inflight_ = false;
  if (result >= 0) {
    kj::AutoCloseFd fd(result);
    if (fulfiller_ && fulfiller_->isWaiting()) {
      fulfiller_->fulfill(kj::mv(fd));
    }  // else: nobody wants it any more; closing it is the honest answer to the client
    return;
  }
  if (result == -ECANCELED) return;
  // Transient failures (a client that reset before we accepted, fd exhaustion) must not stop the
  // listener: retry. EMFILE/ENFILE would spin, so they are reported to the caller instead.
  if (result == -ECONNABORTED || result == -EINTR || result == -EAGAIN) {
    if (fulfiller_ && fulfiller_->isWaiting()) submit();
    return;
  }
  if (fulfiller_ && fulfiller_->isWaiting()) {
    fulfiller_->reject(KJ_EXCEPTION(FAILED, "accept failed", strerror(-result)));
  }
}

}  // namespace sidecar::reactor
