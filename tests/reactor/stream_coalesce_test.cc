// UringStream's write coalescing: small writes are buffered and leave in one sendmsg when the
// reactor next polls or sleeps. The writer is a UringStream; the peer is a raw socket, so the test
// sees exactly what the kernel got. SOCK_SEQPACKET keeps one record per sendmsg, which makes
// "one system call for several writes" observable: one recv returns all of them.

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <kj/exception.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "reactor/kj_event_port.h"
#include "reactor/uring_stream.h"
#include "test_support.h"

namespace sidecar::reactor {
namespace {

using sidecar::testing::Watchdog;

// The writer's end (non-blocking, as UringStream requires) and the raw peer (blocking).
std::pair<kj::AutoCloseFd, kj::AutoCloseFd> pairOf(int type) {
  int fds[2];
  KJ_ASSERT(socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds) == 0, strerror(errno));
  KJ_ASSERT(fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK) == 0);
  return {kj::AutoCloseFd(fds[0]), kj::AutoCloseFd(fds[1])};
}

std::string recvNow(int fd, size_t max = 1 << 16) {
  std::string out(max, '\0');
  ssize_t n = ::recv(fd, out.data(), out.size(), MSG_DONTWAIT);
  if (n < 0) return errno == EAGAIN ? "<nothing>" : "<error>";
  out.resize(static_cast<size_t>(n));
  return out;
}

class CoalesceTest : public ::testing::Test {
 protected:
  CoalesceTest() : loop_(ReactorOptions{}, 0) {}
  ~CoalesceTest() noexcept override {}

  void open(int type) {
    auto [mine, theirs] = pairOf(type);
    stream_ = kj::heap<UringStream>(loop_.reactor(), kj::mv(mine));
    peer_ = kj::mv(theirs);
  }
  // A write's promise, waited: buffered writes are ready at once (no reactor poll happens).
  void write(const std::string& s) { stream_->write(s.data(), s.size()).wait(loop_.waitScope()); }

  Watchdog watchdog_{"coalesce test", std::chrono::seconds(30)};
  ReactorLoop loop_;
  kj::Own<UringStream> stream_;
  kj::AutoCloseFd peer_;
};

TEST_F(CoalesceTest, SmallWritesWaitForTheReactorThenLeaveInOneSendmsg) {
  open(SOCK_SEQPACKET);
  write("call;");
  write("finish;");
  write("call2;");
  EXPECT_EQ(recvNow(peer_.get()), "<nothing>") << "a small write left before the reactor polled";
  loop_.reactor().poll();
  EXPECT_EQ(recvNow(peer_.get()), "call;finish;call2;");  // one record: one sendmsg
  EXPECT_EQ(recvNow(peer_.get()), "<nothing>");
}

TEST_F(CoalesceTest, SleepFlushesToo) {
  open(SOCK_SEQPACKET);
  write("before sleeping");
  loop_.reactor().sleep(uint64_t{1'000'000});  // 1 ms: times out, nothing else to do
  EXPECT_EQ(recvNow(peer_.get()), "before sleeping");
}

TEST_F(CoalesceTest, AWriteWithFdsGoesAfterWhatIsBufferedAndKeepsItsFds) {
  open(SOCK_SEQPACKET);
  write("first;");
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  kj::AutoCloseFd readEnd(p[0]), writeEnd(p[1]);
  const kj::byte message[] = {'F'};
  int fds[] = {writeEnd.get()};
  stream_->writeWithFds(kj::arrayPtr(message, 1), nullptr, kj::arrayPtr(fds, 1))
      .wait(loop_.waitScope());
  write("after;");
  loop_.reactor().poll();

  EXPECT_EQ(recvNow(peer_.get()), "first;");
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ASSERT_EQ(::recvmsg(peer_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC), 1);
  EXPECT_EQ(byte, 'F');
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  ASSERT_NE(c, nullptr) << "the fd did not travel with its byte";
  int got;
  memcpy(&got, CMSG_DATA(c), sizeof got);
  kj::AutoCloseFd received(got);
  EXPECT_EQ(recvNow(peer_.get()), "after;");
}

TEST_F(CoalesceTest, ALargeWriteGoesAfterWhatIsBuffered) {
  open(SOCK_STREAM);
  write("head;");
  std::string big(UringStream::kCoalesceBytes + 1, 'x');
  write(big);
  std::string got;
  while (got.size() < 5 + big.size()) {
    std::string part = recvNow(peer_.get());
    ASSERT_NE(part, "<error>");
    if (part == "<nothing>") {
      loop_.reactor().poll();
      continue;
    }
    got += part;
  }
  EXPECT_EQ(got, "head;" + big);
}

// The peer reads slowly: flushes stop fitting the socket, go through the ring, and later writes
// wait for them. Every byte arrives, in order.
TEST_F(CoalesceTest, BackpressureKeepsEveryByteInOrder) {
  open(SOCK_STREAM);
  constexpr int kMessages = 4000;
  constexpr size_t kBytes = 1000;  // 4 MB in all: far more than the socket buffer
  std::string received;              // the reader's until it is joined
  std::atomic<bool> readerDone{false};
  std::thread reader([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let the socket fill
    std::vector<char> buffer(1 << 16);
    for (;;) {
      ssize_t n = ::read(peer_.get(), buffer.data(), buffer.size());
      if (n <= 0) break;
      received.append(buffer.data(), static_cast<size_t>(n));
    }
    readerDone = true;
  });
  std::string expected;
  for (int i = 0; i < kMessages; ++i) {
    std::string m(kBytes, static_cast<char>('a' + i % 26));
    m.replace(0, std::to_string(i).size(), std::to_string(i));
    expected += m;
    write(m);
  }
  // Flushes first; a flush still in the ring ends the stream in the KJ continuation of its
  // completion, so the loop (KJ turns, not only the reactor) runs until the reader saw EOF. A lost
  // shutdown never ends the reader: the watchdog reports that.
  stream_->shutdownWrite();
  for (int i = 0; i < 200000 && !readerDone.load(); ++i) {
    loop_.waitScope().poll();  // KJ turns too: the flush's completion runs the shutdown
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  reader.join();
  ASSERT_EQ(received.size(), expected.size());
  EXPECT_TRUE(received == expected) << "bytes arrived out of order";
}

TEST_F(CoalesceTest, AFailedFlushFailsTheNextWrite) {
  open(SOCK_STREAM);
  peer_ = nullptr;
  write("lost");  // buffered: the failure shows at the flush
  loop_.reactor().poll();
  auto failure = kj::runCatchingExceptions([&]() { write("next"); });
  KJ_IF_MAYBE(e, failure) {
    EXPECT_EQ(e->getType(), kj::Exception::Type::DISCONNECTED) << e->getDescription().cStr();
  } else {
    ADD_FAILURE() << "a write after a failed flush succeeded";
  }
}

TEST_F(CoalesceTest, DestroyingTheStreamSendsWhatIsBuffered) {
  open(SOCK_STREAM);
  write("last words");
  stream_ = nullptr;
  EXPECT_EQ(recvNow(peer_.get()), "last words");
  EXPECT_EQ(recvNow(peer_.get()), "");  // then end of stream
}

}  // namespace
}  // namespace sidecar::reactor
