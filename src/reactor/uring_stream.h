#pragma once
// A connected socket (unix or TCP) as a KJ stream whose I/O runs on a Reactor's io_uring, so that
// Cap'n Proto RPC, including file-descriptor passing over unix sockets (SCM_RIGHTS), runs on the
// ring with no epoll.
//
// Reads are IORING_OP_RECVMSG. Writes are coalesced: a small write without fds (up to
// kCoalesceBytes) is copied into the stream's output buffer and completes at once; the reactor
// flushes the buffer with one non-blocking sendmsg() before it next polls or sleeps (Flushable).
// Cap'n Proto writes one message at a time, each after the previous write completed, so the
// messages of one run of the event loop (a call and the Finish of the last answer, several
// pipelined sends, the answers to several requests read together) leave in one system call and
// wake the peer once instead of once per message. Larger writes and writes with fds first flush
// the buffer, then try one non-blocking sendmsg() directly. Only what does not fit the socket
// goes through IORING_OP_SENDMSG, which waits for room in the kernel; while it is in flight, later
// writes wait for it (backpressure).
//
// A buffered write that fails later (the peer went away) fails the next write. Destroying the
// stream sends what is still buffered if the socket takes it without blocking.
//
// Cancellation: dropping a read or write promise cancels the ring operation synchronously
// (Reactor::cancel), so the caller may free its buffer at once. The operation records live until
// their CQE arrives, even past the stream's destruction.
//
// Like every KJ stream: at most one read and one write in flight at a time.

#include <kj/async-io.h>
#include <kj/io.h>
#include <sys/uio.h>

#include <memory>
#include <vector>

#include "reactor/reactor.h"

namespace sidecar::reactor {

class UringStream final : public kj::AsyncCapabilityStream, private Flushable {
 public:
  // `fd` must be a connected, non-blocking stream socket. The stream owns and closes it.
  UringStream(Reactor& reactor, kj::AutoCloseFd fd);
  ~UringStream() noexcept(false);

  // At most this many fds are accepted per read; more are closed by the kernel (MSG_CTRUNC).
  static constexpr size_t kMaxFdsPerRead = 16;
  // Reads of at least this many bytes go straight into the caller's buffer; smaller ones read
  // ahead up to kReadAheadBytes into the stream's buffer and are served from it. Cost: one
  // buffer per stream and one copy of small messages; gain: one ring trip per message instead of
  // one per piece of it.
  static constexpr size_t kDirectReadBytes = 16 * 1024;
  static constexpr size_t kReadAheadBytes = 64 * 1024;
  // Writes of at most this many bytes (and no fds) are buffered and coalesced; larger ones are
  // sent from the caller's buffer (a copy would cost more than the system call it saves).
  static constexpr size_t kCoalesceBytes = 8 * 1024;
  // Once this much is buffered the buffer is flushed at once rather than at the end of the run.
  static constexpr size_t kFlushAtBytes = 64 * 1024;

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<ReadResult> tryReadWithFds(void* buffer, size_t minBytes, size_t maxBytes,
                                         kj::AutoCloseFd* fdBuffer, size_t maxFds) override;
  kj::Promise<ReadResult> tryReadWithStreams(void* buffer, size_t minBytes, size_t maxBytes,
                                             kj::Own<kj::AsyncCapabilityStream>* streamBuffer,
                                             size_t maxStreams) override;

  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> writeWithFds(kj::ArrayPtr<const kj::byte> data,
                                 kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> moreData,
                                 kj::ArrayPtr<const int> fds) override;
  kj::Promise<void> writeWithStreams(kj::ArrayPtr<const kj::byte> data,
                                     kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> moreData,
                                     kj::Array<kj::Own<kj::AsyncCapabilityStream>> streams) override;

  // Resolves when the peer has gone away (POLLHUP or POLLERR on the socket).
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;

  void getsockopt(int level, int option, void* value, kj::uint* length) override;
  void setsockopt(int level, int option, const void* value, kj::uint length) override;
  void getsockname(struct sockaddr* addr, kj::uint* length) override;
  void getpeername(struct sockaddr* addr, kj::uint* length) override;
  kj::Maybe<int> getFd() const override { return fd_.get(); }

  // Read-ahead (on by default) may take the next message's bytes, and the fds attached to them,
  // in one recvmsg: the kernel glues a message carrying fds onto the bytes before it, so those
  // fds would arrive with the wrong read. Turn it off while the peer may send fds that matter
  // (a client before its registration answer arrives); the daemon keeps it on, since clients
  // never send it fds.
  void setReadAhead(bool enabled) { readAhead_.enabled = enabled; }

  Reactor& reactor() { return reactor_; }

 private:
  class ReadOp;
  class WriteOp;
  class HangupOp;
  class ReadAdapter;
  class WriteAdapter;
  class HangupAdapter;
  friend class ReadAdapter;
  friend class WriteAdapter;
  friend class HangupAdapter;

  kj::Promise<void> writeInternal(kj::ArrayPtr<const kj::byte> first,
                                  kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> rest,
                                  kj::ArrayPtr<const int> fds);
  // Buffers `iovs`, or sends them after what is buffered (see the header comment).
  kj::Promise<void> writeIovs(std::vector<iovec>&& iovs, size_t total, kj::ArrayPtr<const int> fds);
  // Sends `iovs` now: one non-blocking sendmsg, the rest through the ring.
  kj::Promise<void> writeNow(std::vector<iovec>&& iovs, size_t total, kj::ArrayPtr<const int> fds);
  // Flushable: sends the output buffer; what the socket does not take goes through the ring.
  void flush() override;

  // The output buffer (see the header comment). `sending_` holds the bytes of a flush that went
  // through the ring and `flushing_` that write's completion; later writes wait for it.
  std::vector<kj::byte> output_;
  std::vector<kj::byte> sending_;
  kj::Maybe<kj::ForkedPromise<void>> flushing_;  // resolved (kept) once flushBusy_ is false
  bool flushBusy_ = false;
  bool shutdownPending_ = false;  // shutdownWrite() came while a flush waited in the ring
  kj::Maybe<kj::Exception> writeError_;  // a buffered write failed: the next write fails with it

  struct ReadAhead {
    bool enabled = true;
    std::unique_ptr<kj::byte[]> data;
    size_t start = 0;  // next byte to hand out
    size_t end = 0;    // end of valid bytes
  };

  Reactor& reactor_;
  kj::AutoCloseFd fd_;
  ReadAhead readAhead_;
  ReadOp* readOp_;
  WriteOp* writeOp_;
  HangupOp* hangupOp_;
  kj::Maybe<kj::ForkedPromise<void>> hangup_;
};

}  // namespace sidecar::reactor
