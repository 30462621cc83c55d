#include "reactor/connector.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include <kj/debug.h>

#include <memory>
#include <thread>

#include "reactor/completion.h"

namespace sidecar::reactor {
namespace {

struct Resolved {
  sockaddr_storage storage{};
  socklen_t length = 0;
};

// getaddrinfo; with `numericOnly` it never touches the network (AI_NUMERICHOST).
int lookup(const HostPort& address, bool numericOnly, Resolved& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = numericOnly ? AI_NUMERICHOST : 0;
  addrinfo* result = nullptr;
  std::string port = std::to_string(address.port);
  int rc = getaddrinfo(address.host.c_str(), port.c_str(), &hints, &result);
  if (rc != 0) return rc;
  memcpy(&out.storage, result->ai_addr, result->ai_addrlen);
  out.length = result->ai_addrlen;
  freeaddrinfo(result);
  return 0;
}

std::string where(const HostPort& address) {
  return address.host + ":" + std::to_string(address.port);
}

// One IORING_OP_CONNECT. Owns the socket and the address the kernel reads until the CQE.
class Connect final : private Completion {
 public:
  Connect(kj::PromiseFulfiller<kj::AutoCloseFd>& fulfiller, Reactor& reactor, Resolved address,
          HostPort name)
      : reactor_(reactor), fulfiller_(fulfiller), address_(address), name_(std::move(name)) {
    int fd = socket(address_.storage.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      fulfiller_.reject(KJ_EXCEPTION(FAILED, kj::str("cannot create a socket for ", where(name_).c_str(),
                                                     ": ", strerror(errno))));
      return;
    }
    fd_ = kj::AutoCloseFd(fd);
    io_uring_sqe& sqe = reactor_.prepare(this);
    io_uring_prep_connect(&sqe, fd, reinterpret_cast<sockaddr*>(&address_.storage), address_.length);
    inflight_ = true;
  }
  ~Connect() {
    if (inflight_) {
      abandoned_ = true;
      reactor_.cancel(this);
      while (inflight_) reactor_.poll();
    }
  }

 private:
  void complete(int32_t result, uint32_t) override {
    inflight_ = false;
    if (abandoned_) return;
    if (result < 0) {
      fulfiller_.reject(KJ_EXCEPTION(DISCONNECTED, kj::str("cannot connect to ", where(name_).c_str(),
                                                           ": ", strerror(-result))));
      return;
    }
    setNoDelay(fd_.get());
    fulfiller_.fulfill(kj::mv(fd_));
  }

  Reactor& reactor_;
  kj::PromiseFulfiller<kj::AutoCloseFd>& fulfiller_;
  Resolved address_;
  HostPort name_;
  kj::AutoCloseFd fd_;
  bool inflight_ = false;
  bool abandoned_ = false;
};

}  // namespace

kj::Promise<kj::AutoCloseFd> connectTcpAsync(Reactor& reactor, const HostPort& address) {
  Resolved numeric;
  if (lookup(address, true, numeric) == 0) {
    return kj::newAdaptedPromise<kj::AutoCloseFd, Connect>(reactor, numeric, address);
  }
  // A name: resolve it off the loop. The thread owns copies of everything it touches and reports
  // through a cross-thread fulfiller, so dropping the promise early is safe.
  auto paf = kj::newPromiseAndCrossThreadFulfiller<Resolved>();
  struct Holder {  // std::thread needs a callable whose destructor does not throw
    kj::Own<kj::CrossThreadPromiseFulfiller<Resolved>> fulfiller;
    ~Holder() noexcept {}
  };
  auto holder = std::make_shared<Holder>();
  holder->fulfiller = kj::mv(paf.fulfiller);
  std::thread([holder, address]() {
    auto& fulfiller = holder->fulfiller;
    Resolved out;
    int rc = lookup(address, false, out);
    if (rc == 0) {
      fulfiller->fulfill(kj::mv(out));
    } else {
      fulfiller->reject(KJ_EXCEPTION(DISCONNECTED, kj::str("cannot resolve '", address.host.c_str(),
                                                           "': ", gai_strerror(rc))));
    }
  }).detach();
  return paf.promise.then([&reactor, address](Resolved resolved) {
    return kj::newAdaptedPromise<kj::AutoCloseFd, Connect>(reactor, resolved, address);
  });
}

}  // namespace sidecar::reactor
