#include "reactor/uring_stream.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <algorithm>
#include <memory>
#include <vector>

#include <kj/debug.h>

#include "base/check.h"

namespace sidecar::reactor {

namespace {

kj::Exception errnoException(int error, const char* what) {
  auto type = (error == EPIPE || error == ECONNRESET || error == ENOTCONN || error == ESHUTDOWN)
                  ? kj::Exception::Type::DISCONNECTED
                  : kj::Exception::Type::FAILED;
  return kj::Exception(type, __FILE__, __LINE__,
                       kj::str(what, ": ", strerror(error), " (errno ", error, ")"));
}

// Closes every fd in the SCM_RIGHTS messages of `msg` (used when nobody will take them).
void closeReceivedFds(msghdr& msg) {
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    auto* fds = reinterpret_cast<int*>(CMSG_DATA(c));
    for (size_t i = 0; i < count; ++i) close(fds[i]);
  }
}

}  // namespace

// Base of the three operation records. An operation is in flight from its SQE's preparation to
// its CQE. An orphaned record (its stream or promise is gone) deletes itself at its CQE.
class RingOp : public Completion {
 public:
  explicit RingOp(Reactor& reactor, int fd) : reactor(reactor), fd(fd) {}
  virtual ~RingOp() = default;

  void complete(int32_t result, uint32_t flags) final {
    // A multishot operation (the hang-up poll) stays in flight while its CQEs carry F_MORE.
    inflight = (flags & IORING_CQE_F_MORE) != 0;
    if (orphaned) {
      onOrphanedResult(result);
      deleteIfUnused();
      return;
    }
    onResult(result);
  }

  // Called by the stream when it goes away. The record lives on while the kernel or a promise
  // adapter may still touch it.
  void release() {
    orphaned = true;
    if (inflight) reactor.cancel(this);
    deleteIfUnused();
  }

  // Called by a promise adapter's destructor.
  void detachAdapter() {
    attached = false;
    deleteIfUnused();
  }

  Reactor& reactor;
  int fd;
  bool inflight = false;
  bool orphaned = false;
  bool attached = false;  // a promise adapter refers to this record

 protected:
  virtual void onResult(int32_t result) = 0;
  virtual void onOrphanedResult(int32_t result) {}

 private:
  void deleteIfUnused() {
    if (orphaned && !inflight && !attached) delete this;
  }
};

class UringStream::ReadOp final : public RingOp {
 public:
  using RingOp::RingOp;

  // `alreadyGot` bytes were served from the read-ahead buffer before the ring was needed.
  void start(kj::PromiseFulfiller<ReadResult>& f, void* buf, size_t minBytes, size_t maxBytes,
             kj::AutoCloseFd* fds, size_t maxFds, size_t alreadyGot, ReadAhead& ahead) {
    fulfiller = &f;
    buffer = static_cast<kj::byte*>(buf);
    min = minBytes;
    max = maxBytes;
    got = alreadyGot;
    fdBuffer = fds;
    fdMax = maxFds;
    fdCount = 0;
    readAhead = &ahead;
    submit();
  }

  void submit() {
    // A large read goes straight into the caller's buffer; a small one reads ahead into the
    // stream's buffer, so the next small reads (Cap'n Proto reads a message's header, then its
    // segment table, then its segments) cost no trip through the ring.
    size_t wanted = max - got;
    direct = !readAhead->enabled || wanted >= kDirectReadBytes;
    if (direct) {
      iov.iov_base = buffer + got;
      iov.iov_len = wanted;
    } else {
      readAhead->start = readAhead->end = 0;
      iov.iov_base = readAhead->data.get();
      iov.iov_len = kReadAheadBytes;
    }
    msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    io_uring_sqe& sqe = reactor.prepare(this);
    io_uring_prep_recvmsg(&sqe, fd, &msg, MSG_CMSG_CLOEXEC);
    inflight = true;
  }

  kj::PromiseFulfiller<ReadResult>* fulfiller = nullptr;

 private:
  void onResult(int32_t result) override {
    // Cancelled first: a cancelled read must never be re-submitted (its caller may have freed
    // the buffer as soon as the synchronous cancel returned), even when it ended with -EINTR.
    if (fulfiller == nullptr) {  // cancelled: nobody takes what arrived
      if (result > 0) closeReceivedFds(msg);
      return;
    }
    if (result == -EINTR || result == -EAGAIN) return submit();
    if (result < 0) {
      // A reset peer is end-of-stream for a reader, as with KJ's own streams.
      if (result == -ECONNRESET) return finish();
      fulfiller->reject(errnoException(-result, "recvmsg"));
      fulfiller = nullptr;
      return;
    }
    // Fds belong to the first byte of what this recvmsg returned, which this read consumes.
    takeFds();
    auto n = static_cast<size_t>(result);
    if (direct) {
      got += n;
    } else {
      size_t take = std::min(n, max - got);
      memcpy(buffer + got, readAhead->data.get(), take);
      got += take;
      readAhead->start = take;
      readAhead->end = n;
    }
    if (result == 0 || got >= min) return finish();
    submit();
  }

  void onOrphanedResult(int32_t result) override {
    if (result > 0) closeReceivedFds(msg);
  }

  void takeFds() {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      auto* fds = reinterpret_cast<int*>(CMSG_DATA(c));
      for (size_t i = 0; i < count; ++i) {
        if (fdCount < fdMax) {
          fdBuffer[fdCount++] = kj::AutoCloseFd(fds[i]);
        } else {
          close(fds[i]);  // more than the caller accepts: never leak them into the process
        }
      }
    }
  }

  void finish() {
    fulfiller->fulfill(ReadResult{got, fdCount});
    fulfiller = nullptr;
  }

  kj::byte* buffer = nullptr;
  size_t min = 0, max = 0, got = 0;
  kj::AutoCloseFd* fdBuffer = nullptr;
  size_t fdMax = 0, fdCount = 0;
  ReadAhead* readAhead = nullptr;
  bool direct = false;
  iovec iov{};
  msghdr msg{};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerRead)];
};

class UringStream::WriteOp final : public RingOp {
 public:
  using RingOp::RingOp;

  // Sends what is left of `iovs` (starting `skipBytes` in) through the ring, with `fds` attached
  // to the first byte when given.
  void start(kj::PromiseFulfiller<void>& f, std::vector<iovec>&& pieces,
             kj::ArrayPtr<const int> fds) {
    fulfiller = &f;
    iovs = std::move(pieces);
    next = 0;
    fdCount = fds.size();
    if (fdCount > 0) memcpy(CMSG_DATA(reinterpret_cast<cmsghdr*>(control)), fds.begin(),
                            fdCount * sizeof(int));
    submit();
  }

  kj::PromiseFulfiller<void>* fulfiller = nullptr;

 private:
  void submit() {
    msg = {};
    msg.msg_iov = iovs.data() + next;
    msg.msg_iovlen = iovs.size() - next;
    if (fdCount > 0) {
      auto* c = reinterpret_cast<cmsghdr*>(control);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(fdCount * sizeof(int));
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(fdCount * sizeof(int));
    }
    io_uring_sqe& sqe = reactor.prepare(this);
    io_uring_prep_sendmsg(&sqe, fd, &msg, MSG_NOSIGNAL);
    inflight = true;
  }

  void onResult(int32_t result) override {
    if (fulfiller == nullptr) return;  // cancelled: never re-submit (see ReadOp::onResult)
    if (result == -EINTR || result == -EAGAIN) return submit();
    if (result < 0) {
      fulfiller->reject(errnoException(-result, "sendmsg"));
      fulfiller = nullptr;
      return;
    }
    fdCount = 0;  // attached to the bytes just sent
    auto sent = static_cast<size_t>(result);
    while (next < iovs.size() && sent >= iovs[next].iov_len) sent -= iovs[next++].iov_len;
    if (next == iovs.size()) {
      fulfiller->fulfill();
      fulfiller = nullptr;
      return;
    }
    iovs[next].iov_base = static_cast<char*>(iovs[next].iov_base) + sent;
    iovs[next].iov_len -= sent;
    submit();
  }

  std::vector<iovec> iovs;
  size_t next = 0;
  size_t fdCount = 0;
  msghdr msg{};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
};

class UringStream::HangupOp final : public RingOp {
 public:
  using RingOp::RingOp;
  void start(kj::PromiseFulfiller<void>& f) {
    fulfiller = &f;
    submit();
  }
  kj::PromiseFulfiller<void>* fulfiller = nullptr;

 private:
  void submit() {
    io_uring_sqe& sqe = reactor.prepare(this);
    // Only HUP and ERR: POLLRDHUP would fire on a peer's shutdown(SHUT_WR), which is not a
    // disconnect for writing. io_uring reports POLLRDHUP even when not asked for (it is in the
    // kernel's always-reported set), and keeps reporting it, so a one-shot poll re-armed after
    // it would spin. A multishot poll reports again only when the socket's state changes.
    io_uring_prep_poll_multishot(&sqe, fd, POLLHUP | POLLERR);
    inflight = true;
  }

  void onResult(int32_t result) override {
    if (fulfiller == nullptr || result == -ECANCELED) return;
    if (result > 0 && (result & (POLLHUP | POLLERR)) == 0) {
      if (!inflight) submit();  // the kernel ended the multishot poll: keep watching
      return;
    }
    fulfiller->fulfill();
    fulfiller = nullptr;
    if (inflight) reactor.cancel(this);  // nothing more to report; its last CQE follows
  }
};

// Adapters tie an operation to a KJ promise; their destructor is the cancellation hook.
template <typename Op, typename T>
static Op* takeOp(Op*& slot, Reactor& reactor, int fd) {
  // A previous operation that was cancelled may still await its CQE: leave it to delete itself.
  if (slot->inflight || slot->attached) {
    slot->release();
    slot = new Op(reactor, fd);
  }
  return slot;
}

class UringStream::ReadAdapter {
 public:
  ReadAdapter(kj::PromiseFulfiller<ReadResult>& fulfiller, UringStream& stream, void* buffer,
              size_t minBytes, size_t maxBytes, kj::AutoCloseFd* fds, size_t maxFds,
              size_t alreadyGot)
      : op_(takeOp<ReadOp, ReadResult>(stream.readOp_, stream.reactor_, stream.fd_.get())),
        fulfiller_(fulfiller) {
    op_->attached = true;
    op_->start(fulfiller, buffer, minBytes, maxBytes, fds, maxFds, alreadyGot,
               stream.readAhead_);
  }
  ~ReadAdapter() {
    if (op_->fulfiller == &fulfiller_) {
      op_->fulfiller = nullptr;
      if (op_->inflight) op_->reactor.cancel(op_);
    }
    op_->detachAdapter();
  }

 private:
  ReadOp* op_;
  kj::PromiseFulfiller<ReadResult>& fulfiller_;
};

class UringStream::WriteAdapter {
 public:
  WriteAdapter(kj::PromiseFulfiller<void>& fulfiller, UringStream& stream,
               std::vector<iovec>&& iovs, kj::ArrayPtr<const int> fds)
      : op_(takeOp<WriteOp, void>(stream.writeOp_, stream.reactor_, stream.fd_.get())),
        fulfiller_(fulfiller) {
    op_->attached = true;
    op_->start(fulfiller, std::move(iovs), fds);
  }
  ~WriteAdapter() {
    if (op_->fulfiller == &fulfiller_) {
      op_->fulfiller = nullptr;
      if (op_->inflight) op_->reactor.cancel(op_);
    }
    op_->detachAdapter();
  }

 private:
  WriteOp* op_;
  kj::PromiseFulfiller<void>& fulfiller_;
};

class UringStream::HangupAdapter {
 public:
  HangupAdapter(kj::PromiseFulfiller<void>& fulfiller, UringStream& stream)
      : op_(takeOp<HangupOp, void>(stream.hangupOp_, stream.reactor_, stream.fd_.get())),
        fulfiller_(fulfiller) {
    op_->attached = true;
    op_->start(fulfiller);
  }
  ~HangupAdapter() {
    if (op_->fulfiller == &fulfiller_) {
      op_->fulfiller = nullptr;
      if (op_->inflight) op_->reactor.cancel(op_);
    }
    op_->detachAdapter();
  }

 private:
  HangupOp* op_;
  kj::PromiseFulfiller<void>& fulfiller_;
};

UringStream::UringStream(Reactor& reactor, kj::AutoCloseFd fd)
    : reactor_(reactor),
      fd_(kj::mv(fd)),
      readOp_(new ReadOp(reactor, fd_.get())),
      writeOp_(new WriteOp(reactor, fd_.get())),
      hangupOp_(new HangupOp(reactor, fd_.get())) {
  readAhead_.data = std::make_unique<kj::byte[]>(kReadAheadBytes);
}

UringStream::~UringStream() noexcept(false) {
  reactor_.cancelFlush(*this);
  // Best effort for what was written but not yet flushed (e.g. a last answer before the daemon
  // drops a connection): whatever the socket takes without blocking.
  if (!output_.empty() && !flushBusy_ && writeError_ == nullptr) {
    (void)::send(fd_.get(), output_.data(), output_.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  flushing_ = nullptr;  // cancels a flush in the ring before its buffer goes
  hangup_ = nullptr;
  readOp_->release();
  writeOp_->release();
  hangupOp_->release();
}

kj::Promise<size_t> UringStream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  return tryReadWithFds(buffer, minBytes, maxBytes, nullptr, 0)
      .then([](ReadResult r) { return r.byteCount; });
}

kj::Promise<UringStream::ReadResult> UringStream::tryReadWithFds(void* buffer, size_t minBytes,
                                                                 size_t maxBytes,
                                                                 kj::AutoCloseFd* fdBuffer,
                                                                 size_t maxFds) {
  if (maxBytes == 0) return ReadResult{0, 0};
  // Serve what was read ahead first; its fds were delivered with the read that took its first
  // byte.
  size_t got = std::min(readAhead_.end - readAhead_.start, maxBytes);
  if (got > 0) {
    memcpy(buffer, readAhead_.data.get() + readAhead_.start, got);
    readAhead_.start += got;
    if (got >= minBytes) return ReadResult{got, 0};
  }
  return kj::newAdaptedPromise<ReadResult, ReadAdapter>(*this, buffer, minBytes, maxBytes,
                                                         fdBuffer, maxFds, got);
}

kj::Promise<UringStream::ReadResult> UringStream::tryReadWithStreams(
    void* buffer, size_t minBytes, size_t maxBytes, kj::Own<kj::AsyncCapabilityStream>* streamBuffer,
    size_t maxStreams) {
  auto fds = kj::heapArray<kj::AutoCloseFd>(maxStreams);
  auto promise = tryReadWithFds(buffer, minBytes, maxBytes, fds.begin(), maxStreams);
  return promise.then([this, fds = kj::mv(fds), streamBuffer](ReadResult result) mutable {
    for (size_t i = 0; i < result.capCount; ++i) {
      streamBuffer[i] = kj::heap<UringStream>(reactor_, kj::mv(fds[i]));
    }
    return result;
  });
}

kj::Promise<void> UringStream::write(const void* buffer, size_t size) {
  return writeInternal(kj::arrayPtr(static_cast<const kj::byte*>(buffer), size), nullptr, nullptr);
}

kj::Promise<void> UringStream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  if (pieces.size() == 0) return kj::READY_NOW;
  return writeInternal(pieces[0], pieces.slice(1, pieces.size()), nullptr);
}

kj::Promise<void> UringStream::writeWithFds(kj::ArrayPtr<const kj::byte> data,
                                            kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> more,
                                            kj::ArrayPtr<const int> fds) {
  KJ_REQUIRE(fds.size() <= 253, "at most 253 fds per message (SCM_MAX_FD)");
  return writeInternal(data, more, fds);
}

kj::Promise<void> UringStream::writeWithStreams(
    kj::ArrayPtr<const kj::byte> data, kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> more,
    kj::Array<kj::Own<kj::AsyncCapabilityStream>> streams) {
  auto fds = kj::heapArray<int>(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) {
    KJ_IF_MAYBE(fd, streams[i]->getFd()) {
      fds[i] = *fd;
    } else {
      KJ_FAIL_REQUIRE("only streams backed by a socket fd can be passed");
    }
  }
  auto promise = writeInternal(data, more, fds);
  // The streams (and so their fds) must stay open until the kernel has taken the message.
  return promise.attach(kj::mv(fds), kj::mv(streams));
}

kj::Promise<void> UringStream::writeInternal(kj::ArrayPtr<const kj::byte> first,
                                             kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> rest,
                                             kj::ArrayPtr<const int> fds) {
  KJ_IF_MAYBE(e, writeError_) { return kj::cp(*e); }
  std::vector<iovec> iovs;
  iovs.reserve(rest.size() + 1);
  size_t total = 0;
  auto add = [&](kj::ArrayPtr<const kj::byte> piece) {
    if (piece.size() == 0) return;
    iovs.push_back(iovec{const_cast<kj::byte*>(piece.begin()), piece.size()});
    total += piece.size();
  };
  add(first);
  for (auto piece : rest) add(piece);
  if (total == 0) {
    KJ_REQUIRE(fds.size() == 0, "fds must travel with at least one byte of data");
    return kj::READY_NOW;
  }

  return writeIovs(std::move(iovs), total, fds);
}

kj::Promise<void> UringStream::writeIovs(std::vector<iovec>&& iovs, size_t total,
                                         kj::ArrayPtr<const int> fds) {
  // A flush is waiting for room in the socket: this write goes after it. The caller keeps its
  // bytes valid until our promise resolves, so the iovecs stay good; the fds are copied.
  if (flushBusy_) {
    auto& fork = KJ_ASSERT_NONNULL(flushing_);
    std::vector<int> fdCopy(fds.begin(), fds.end());
    return fork.addBranch().then(
        [this, iovs = std::move(iovs), total, fdCopy = std::move(fdCopy)]() mutable {
          KJ_IF_MAYBE(e, writeError_) { return kj::Promise<void>(kj::cp(*e)); }
          auto fdView = kj::arrayPtr(fdCopy.data(), fdCopy.size());
          return writeIovs(std::move(iovs), total, fdView).attach(kj::mv(fdCopy));
        });
  }

  // Coalesce: copy it into the output buffer; the reactor flushes before it polls or sleeps.
  if (fds.size() == 0 && total <= kCoalesceBytes) {
    for (const iovec& v : iovs) {
      auto* p = static_cast<const kj::byte*>(v.iov_base);
      output_.insert(output_.end(), p, p + v.iov_len);
    }
    if (output_.size() >= kFlushAtBytes) {
      reactor_.cancelFlush(*this);
      flush();
    } else {
      reactor_.queueFlush(*this);
    }
    return kj::READY_NOW;
  }

  // Large, or with fds: what is buffered goes first.
  if (!output_.empty()) {
    reactor_.cancelFlush(*this);
    flush();
    KJ_IF_MAYBE(e, writeError_) { return kj::cp(*e); }
    if (flushBusy_) return writeIovs(std::move(iovs), total, fds);  // waits behind it (above)
  }
  return writeNow(std::move(iovs), total, fds);
}

void UringStream::flush() {
  if (output_.empty() || flushBusy_ || writeError_ != nullptr) return;
  ssize_t n = ::send(fd_.get(), output_.data(), output_.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      writeError_ = errnoException(errno, "sendmsg");
      output_.clear();
      return;
    }
    n = 0;
  }
  if (static_cast<size_t>(n) == output_.size()) {
    output_.clear();
    return;
  }
  // The socket is full: the rest waits in the ring, and so do later writes (backpressure).
  sending_.assign(output_.begin() + n, output_.end());
  output_.clear();
  std::vector<iovec> iovs{iovec{sending_.data(), sending_.size()}};
  flushBusy_ = true;
  flushing_ = kj::newAdaptedPromise<void, WriteAdapter>(*this, std::move(iovs), nullptr)
                  .then([this]() { sending_.clear(); },
                        [this](kj::Exception&& e) {
                          sending_.clear();
                          writeError_ = kj::mv(e);
                        })
                  .then([this]() {
                    flushBusy_ = false;
                    if (shutdownPending_) ::shutdown(fd_.get(), SHUT_WR);
                  })
                  .fork();
}

kj::Promise<void> UringStream::writeNow(std::vector<iovec>&& iovs, size_t total,
                                        kj::ArrayPtr<const int> fds) {
  // Most control messages fit the socket buffer; send them without the ring.
  msghdr msg{};
  msg.msg_iov = iovs.data();
  msg.msg_iovlen = iovs.size();
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
  if (fds.size() > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(fds.size() * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size() * sizeof(int));
    memcpy(CMSG_DATA(c), fds.begin(), fds.size() * sizeof(int));
  }
  ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return kj::Promise<void>(errnoException(errno, "sendmsg"));
    }
    n = 0;
  }
  if (static_cast<size_t>(n) == total) return kj::READY_NOW;

  // The rest waits for room in the ring. Fds went with the first byte if any byte went.
  auto sent = static_cast<size_t>(n);
  size_t next = 0;
  while (sent >= iovs[next].iov_len) sent -= iovs[next++].iov_len;
  iovs.erase(iovs.begin(), iovs.begin() + static_cast<long>(next));
  iovs[0].iov_base = static_cast<char*>(iovs[0].iov_base) + sent;
  iovs[0].iov_len -= sent;
  kj::ArrayPtr<const int> pendingFds = n == 0 ? fds : nullptr;
  return kj::newAdaptedPromise<void, WriteAdapter>(*this, std::move(iovs), pendingFds);
}

kj::Promise<void> UringStream::whenWriteDisconnected() {
  KJ_IF_MAYBE(fork, hangup_) { return fork->addBranch(); }
  auto fork = kj::newAdaptedPromise<void, HangupAdapter>(*this).fork();
  auto branch = fork.addBranch();
  hangup_ = kj::mv(fork);
  return branch;
}

void UringStream::shutdownWrite() {
  // Buffered bytes go before the end of the stream; a flush waiting for room ends it itself.
  reactor_.cancelFlush(*this);
  flush();
  if (flushBusy_) {
    shutdownPending_ = true;  // after the flush in the ring (see flush())
    return;
  }
  ::shutdown(fd_.get(), SHUT_WR);
}

void UringStream::abortRead() { ::shutdown(fd_.get(), SHUT_RD); }

void UringStream::getsockopt(int level, int option, void* value, kj::uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getsockopt(fd_.get(), level, option, value, &len));
  *length = len;
}

void UringStream::setsockopt(int level, int option, const void* value, kj::uint length) {
  KJ_SYSCALL(::setsockopt(fd_.get(), level, option, value, length));
}

void UringStream::getsockname(struct sockaddr* addr, kj::uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getsockname(fd_.get(), addr, &len));
  *length = len;
}

void UringStream::getpeername(struct sockaddr* addr, kj::uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getpeername(fd_.get(), addr, &len));
  *length = len;
}

}  // namespace sidecar::reactor
