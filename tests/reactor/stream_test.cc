// UringStream over socketpair(AF_UNIX) and TCP loopback: small and large (ring write path)
// transfers, minBytes and EOF semantics, many-piece writes, disconnects, cancellation, fd passing
// over SCM_RIGHTS (including fds beyond the reader's limit, which must be closed, not leaked).

#include "reactor/uring_stream.h"

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <kj/exception.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "reactor/kj_event_port.h"
#include "reactor/socket.h"
#include "test_support.h"

namespace sidecar::reactor {
namespace {

using sidecar::testing::fdIsOpen;
using sidecar::testing::openFdCount;
using sidecar::testing::unixSocketPair;
using sidecar::testing::Watchdog;

enum class Transport { kUnix, kTcp };

std::string transportName(const ::testing::TestParamInfo<Transport>& info) {
  return info.param == Transport::kUnix ? "Unix" : "Tcp";
}

std::pair<kj::AutoCloseFd, kj::AutoCloseFd> connectedPair(Transport transport) {
  if (transport == Transport::kUnix) {
    auto [a, b] = unixSocketPair();
    return {kj::AutoCloseFd(a), kj::AutoCloseFd(b)};
  }
  auto listener = listenTcp(HostPort{"127.0.0.1", 0});
  uint16_t port = localPort(listener.get());
  auto client = connectTcp(HostPort{"127.0.0.1", port});
  int server = -1;
  for (int i = 0; i < 1000 && server < 0; ++i) {
    server = accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (server < 0) usleep(1000);
  }
  KJ_ASSERT(server >= 0, "accept4 failed", strerror(errno));
  setNoDelay(server);
  return {kj::mv(client), kj::AutoCloseFd(server)};
}

std::vector<kj::byte> pattern(size_t size, unsigned seed = 1) {
  std::vector<kj::byte> data(size);
  for (size_t i = 0; i < size; ++i) data[i] = static_cast<kj::byte>((i * 31 + seed) % 251);
  return data;
}

class StreamTest : public ::testing::TestWithParam<Transport> {
 protected:
  StreamTest() : loop_(ReactorOptions{}, 0) {
    auto [a, b] = connectedPair(GetParam());
    a_ = kj::heap<UringStream>(loop_.reactor(), kj::mv(a));
    b_ = kj::heap<UringStream>(loop_.reactor(), kj::mv(b));
  }

  // kj::Own's destructor may throw; gtest's fixture destructor may not.
  ~StreamTest() noexcept override {}
  kj::WaitScope& ws() { return loop_.waitScope(); }

  Watchdog watchdog_{"stream test", std::chrono::seconds(30)};
  ReactorLoop loop_;
  kj::Own<UringStream> a_;
  kj::Own<UringStream> b_;
};

TEST_P(StreamTest, SmallWriteIsReadBack) {
  const char message[] = "hello, ring";
  a_->write(message, sizeof message).wait(ws());
  char buffer[64] = {};
  size_t n = b_->tryRead(buffer, sizeof message, sizeof buffer).wait(ws());
  EXPECT_EQ(n, sizeof message);
  EXPECT_STREQ(buffer, message);
}

TEST_P(StreamTest, BothDirections) {
  a_->write("ab", 2).wait(ws());
  b_->write("cd", 2).wait(ws());
  char x[2], y[2];
  b_->read(x, 2).wait(ws());
  a_->read(y, 2).wait(ws());
  EXPECT_EQ(std::string(x, 2), "ab");
  EXPECT_EQ(std::string(y, 2), "cd");
}

TEST_P(StreamTest, LargeWriteGoesThroughTheRing) {
  constexpr size_t kSize = 8 << 20;  // far beyond any default socket buffer
  auto data = pattern(kSize);
  std::vector<kj::byte> received(kSize);
  uint64_t completionsBefore = loop_.reactor().stats().completions.load();
  auto write = a_->write(data.data(), data.size());
  auto read = b_->read(received.data(), kSize);
  read.wait(ws());
  write.wait(ws());
  EXPECT_TRUE(received == data);
  // The write could not have gone out in the one direct sendmsg: ring operations completed.
  EXPECT_GT(loop_.reactor().stats().completions.load(), completionsBefore);
}

TEST_P(StreamTest, FullDuplexLargeTransfers) {
  constexpr size_t kSize = 4 << 20;
  auto ab = pattern(kSize, 1), ba = pattern(kSize, 2);
  std::vector<kj::byte> gotAb(kSize), gotBa(kSize);
  auto w1 = a_->write(ab.data(), kSize);
  auto w2 = b_->write(ba.data(), kSize);
  auto r1 = b_->read(gotAb.data(), kSize);
  auto r2 = a_->read(gotBa.data(), kSize);
  kj::joinPromises(kj::arr(kj::mv(w1), kj::mv(w2), kj::mv(r1), kj::mv(r2))).wait(ws());
  EXPECT_TRUE(gotAb == ab);
  EXPECT_TRUE(gotBa == ba);
}

TEST_P(StreamTest, SequenceOfLargeWritesKeepsOrder) {
  constexpr size_t kChunk = 1 << 20;
  constexpr int kChunks = 6;
  std::vector<std::vector<kj::byte>> chunks;
  for (int i = 0; i < kChunks; ++i) chunks.push_back(pattern(kChunk, i + 3));
  std::vector<kj::byte> received(kChunk * kChunks);
  auto read = b_->read(received.data(), received.size());
  kj::Promise<void> writes = kj::READY_NOW;
  for (int i = 0; i < kChunks; ++i) {
    writes = writes.then([this, &chunks, i]() {
      return a_->write(chunks[i].data(), chunks[i].size());
    });
  }
  writes.wait(ws());
  read.wait(ws());
  for (int i = 0; i < kChunks; ++i) {
    EXPECT_EQ(0, memcmp(received.data() + i * kChunk, chunks[i].data(), kChunk)) << "chunk " << i;
  }
}

TEST_P(StreamTest, MinBytesReturnsAsSoonAsMinIsReached) {
  a_->write("12345", 5).wait(ws());
  char buffer[100];
  // min 1: returns what is there, not waiting for max.
  size_t n = b_->tryRead(buffer, 1, sizeof buffer).wait(ws());
  EXPECT_GE(n, 1u);
  EXPECT_LE(n, 5u);
  if (n < 5) n += b_->tryRead(buffer + n, 5 - n, 5 - n).wait(ws());
  EXPECT_EQ(std::string(buffer, n), "12345");
}

TEST_P(StreamTest, MinBytesWaitsForMoreData) {
  char buffer[100];
  auto read = b_->tryRead(buffer, 10, sizeof buffer);
  a_->write("abcd", 4).wait(ws());
  // Not yet 10 bytes: the read must still be pending after the loop has run for a while.
  loop_.timer().afterDelay(10 * kj::MILLISECONDS).wait(ws());
  EXPECT_FALSE(read.poll(ws()));
  a_->write("efghij", 6).wait(ws());
  size_t n = read.wait(ws());
  EXPECT_EQ(n, 10u);
  EXPECT_EQ(std::string(buffer, n), "abcdefghij");
}

TEST_P(StreamTest, EofGivesShortReadThenZero) {
  a_->write("xyz", 3).wait(ws());
  a_->shutdownWrite();
  char buffer[16];
  size_t n = b_->tryRead(buffer, 10, sizeof buffer).wait(ws());
  EXPECT_EQ(n, 3u);
  EXPECT_EQ(std::string(buffer, 3), "xyz");
  EXPECT_EQ(b_->tryRead(buffer, 1, sizeof buffer).wait(ws()), 0u);
  // The other direction still works after a half close.
  b_->write("ok", 2).wait(ws());
  EXPECT_EQ(a_->tryRead(buffer, 2, 2).wait(ws()), 2u);
}

TEST_P(StreamTest, ManyPiecesInOneWrite) {
  std::vector<std::vector<kj::byte>> storage;
  std::vector<kj::ArrayPtr<const kj::byte>> pieces;
  std::vector<kj::byte> expected;
  for (int i = 0; i < 300; ++i) {
    size_t size = (i % 7 == 0) ? 0 : static_cast<size_t>((i * 977) % 20000);  // some empty
    storage.push_back(pattern(size, i));
  }
  for (auto& s : storage) {
    pieces.push_back(kj::arrayPtr(s.data(), s.size()));
    expected.insert(expected.end(), s.begin(), s.end());
  }
  std::vector<kj::byte> received(expected.size());
  auto write = a_->write(kj::arrayPtr(pieces.data(), pieces.size()));
  auto read = b_->read(received.data(), received.size());
  read.wait(ws());
  write.wait(ws());
  EXPECT_TRUE(received == expected);
}

TEST_P(StreamTest, EmptyWritesAndReadsCompleteAtOnce) {
  a_->write(nullptr, 0).wait(ws());
  a_->write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>>()).wait(ws());
  char c;
  EXPECT_EQ(b_->tryRead(&c, 0, 0).wait(ws()), 0u);
}

TEST_P(StreamTest, PeerDisconnectMidMessageGivesShortReadNotACrash) {
  auto data = pattern(100);
  a_->write(data.data(), data.size()).wait(ws());
  a_ = nullptr;  // the peer goes away after half of a 200-byte message
  std::vector<kj::byte> buffer(200);
  size_t n = b_->tryRead(buffer.data(), 200, 200).wait(ws());
  EXPECT_EQ(n, 100u);
  EXPECT_EQ(0, memcmp(buffer.data(), data.data(), 100));
}

TEST_P(StreamTest, PeerDisconnectMidMessageFailsAFullRead) {
  a_->write("half", 4).wait(ws());
  a_ = nullptr;
  char buffer[8];
  // read() (unlike tryRead) insists on minBytes: premature EOF is an exception, not a crash.
  auto result = kj::runCatchingExceptions([&]() { b_->read(buffer, 8).wait(ws()); });
  EXPECT_TRUE(result != nullptr);
}

TEST_P(StreamTest, PeerResetIsEndOfStreamForTheReader) {
  // SO_LINGER 0: close() sends RST on TCP; on unix sockets it is a plain close.
  linger lg{1, 0};
  a_->setsockopt(SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  b_->write("unread", 6).wait(ws());  // unread data on a's side makes the close abortive
  a_ = nullptr;
  char buffer[8];
  auto result = b_->tryRead(buffer, 1, sizeof buffer).wait(ws());
  EXPECT_EQ(result, 0u);
}

TEST_P(StreamTest, WriteToClosedPeerFailsWithDisconnected) {
  a_ = nullptr;
  auto data = pattern(1 << 20);
  kj::Maybe<kj::Exception> failure;
  // The first writes may still land in the socket buffer (TCP only learns of the close with an
  // RST); keep writing until the error shows.
  for (int i = 0; i < 50 && failure == nullptr; ++i) {
    failure = kj::runCatchingExceptions([&]() { b_->write(data.data(), data.size()).wait(ws()); });
  }
  KJ_IF_MAYBE(e, failure) {
    EXPECT_EQ(e->getType(), kj::Exception::Type::DISCONNECTED) << e->getDescription().cStr();
  } else {
    ADD_FAILURE() << "writes to a closed peer never failed";
  }
}

TEST_P(StreamTest, CancelledReadThenDestroyedStream) {
  std::vector<kj::byte> buffer(4096);
  {
    auto read = b_->tryRead(buffer.data(), 1, buffer.size());
    loop_.timer().afterDelay(2 * kj::MILLISECONDS).wait(ws());  // the recvmsg is in the kernel
  }  // dropped: cancelled synchronously
  b_ = nullptr;  // stream gone while the cancelled op's CQE may still be in the ring
  // The peer may already see the close (EPIPE on unix); either way nothing crashes.
  kj::runCatchingExceptions([&]() { a_->write("late", 4).wait(ws()); });
  loop_.timer().afterDelay(2 * kj::MILLISECONDS).wait(ws());
}

TEST_P(StreamTest, ReadPromiseOutlivingTheStreamIsSafe) {
  std::vector<kj::byte> buffer(4096);
  auto read = b_->tryRead(buffer.data(), 1, buffer.size());
  loop_.timer().afterDelay(1 * kj::MILLISECONDS).wait(ws());
  b_ = nullptr;  // the stream first ...
  loop_.timer().afterDelay(1 * kj::MILLISECONDS).wait(ws());
  // ... then the promise (the op record must not be freed twice or touched after free).
}

TEST_P(StreamTest, CancelledReadDoesNotSwallowLaterData) {
  char buffer[16];
  for (int i = 0; i < 20; ++i) {
    auto read = b_->tryRead(buffer, 1, sizeof buffer);
    EXPECT_FALSE(read.poll(ws()));
  }
  a_->write("data", 4).wait(ws());
  size_t n = b_->tryRead(buffer, 4, sizeof buffer).wait(ws());
  EXPECT_EQ(std::string(buffer, n), "data");
}

TEST_P(StreamTest, CancelledLargeWriteThenDestroyedStream) {
  auto data = std::make_unique<std::vector<kj::byte>>(pattern(8 << 20));
  {
    auto write = a_->write(data->data(), data->size());
    EXPECT_FALSE(write.poll(ws()));  // nobody reads: it waits in the ring
  }
  data = nullptr;  // the buffer may go at once once the promise is dropped
  a_ = nullptr;
  // The reader sees a prefix of the data and then EOF; nothing crashes.
  std::vector<kj::byte> sink(1 << 16);
  size_t total = 0;
  for (;;) {
    size_t n = b_->tryRead(sink.data(), 1, sink.size()).wait(ws());
    if (n == 0) break;
    total += n;
  }
  EXPECT_LT(total, size_t{8} << 20);
}

TEST_P(StreamTest, PeerAddressesAreAvailable) {
  sockaddr_storage addr{};
  kj::uint len = sizeof addr;
  a_->getsockname(reinterpret_cast<sockaddr*>(&addr), &len);
  EXPECT_EQ(addr.ss_family, GetParam() == Transport::kUnix ? AF_UNIX : AF_INET);
  len = sizeof addr;
  a_->getpeername(reinterpret_cast<sockaddr*>(&addr), &len);
  EXPECT_GT(len, 0u);
  EXPECT_TRUE(a_->getFd() != nullptr);
}

TEST_P(StreamTest, WhenWriteDisconnectedResolvesOnceWritesFail) {
  auto disconnected = b_->whenWriteDisconnected();
  a_ = nullptr;
  // Unix: the close itself is the hang-up. TCP: the peer's RST to our next write is.
  auto data = pattern(64 << 10);
  for (int i = 0; i < 50 && !disconnected.poll(ws()); ++i) {
    kj::runCatchingExceptions([&]() { b_->write(data.data(), data.size()).wait(ws()); });
    loop_.timer().afterDelay(1 * kj::MILLISECONDS).wait(ws());
  }
  disconnected.wait(ws());
}

INSTANTIATE_TEST_SUITE_P(Transports, StreamTest,
                         ::testing::Values(Transport::kUnix, Transport::kTcp), transportName);

// ---- unix only: hang-up detection and fd passing

class UnixStreamTest : public ::testing::Test {
 protected:
  UnixStreamTest() : loop_(ReactorOptions{}, 0) {
    auto [a, b] = unixSocketPair();
    a_ = kj::heap<UringStream>(loop_.reactor(), kj::AutoCloseFd(a));
    b_ = kj::heap<UringStream>(loop_.reactor(), kj::AutoCloseFd(b));
  }
  ~UnixStreamTest() noexcept override {}
  kj::WaitScope& ws() { return loop_.waitScope(); }

  Watchdog watchdog_{"unix stream test", std::chrono::seconds(30)};
  ReactorLoop loop_;
  kj::Own<UringStream> a_;
  kj::Own<UringStream> b_;
};

TEST_F(UnixStreamTest, WhenWriteDisconnectedResolvesWhenPeerCloses) {
  auto disconnected = b_->whenWriteDisconnected();
  auto second = b_->whenWriteDisconnected();  // several observers share one poll
  loop_.timer().afterDelay(5 * kj::MILLISECONDS).wait(ws());
  EXPECT_FALSE(disconnected.poll(ws()));
  a_ = nullptr;
  disconnected.wait(ws());
  second.wait(ws());
}

TEST_F(UnixStreamTest, WhenWriteDisconnectedIgnoresPeerHalfClose) {
  auto disconnected = b_->whenWriteDisconnected();
  a_->shutdownWrite();
  loop_.timer().afterDelay(10 * kj::MILLISECONDS).wait(ws());
  EXPECT_FALSE(disconnected.poll(ws()));
}

TEST_F(UnixStreamTest, StreamDestroyedWithPendingHangupPromise) {
  auto disconnected = b_->whenWriteDisconnected();
  loop_.timer().afterDelay(1 * kj::MILLISECONDS).wait(ws());
  b_ = nullptr;
  // The branch outlives the stream; dropping it later must be safe.
}

TEST_F(UnixStreamTest, PassesAPipeFd) {
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  kj::AutoCloseFd readEnd(p[0]), writeEnd(p[1]);
  const kj::byte message[] = {'f', 'd'};
  int fds[] = {writeEnd.get()};
  a_->writeWithFds(kj::arrayPtr(message, 2), nullptr, kj::arrayPtr(fds, 1)).wait(ws());
  writeEnd = nullptr;  // the receiver's copy is the only write end now

  kj::byte buffer[2];
  kj::AutoCloseFd received[4];
  auto result = b_->tryReadWithFds(buffer, 2, 2, received, 4).wait(ws());
  EXPECT_EQ(result.byteCount, 2u);
  ASSERT_EQ(result.capCount, 1u);
  ASSERT_GE(received[0].get(), 0);
  EXPECT_TRUE(fcntl(received[0].get(), F_GETFD) & FD_CLOEXEC);  // MSG_CMSG_CLOEXEC

  ASSERT_EQ(::write(received[0].get(), "via fd", 6), 6);
  received[0] = nullptr;
  char out[16];
  ssize_t n = ::read(readEnd.get(), out, sizeof out);
  EXPECT_EQ(std::string(out, n > 0 ? n : 0), "via fd");
  EXPECT_EQ(::read(readEnd.get(), out, sizeof out), 0);  // no write end left anywhere
}

TEST_F(UnixStreamTest, PassesAMemfdWithItsContents) {
  int memfd = memfd_create("sidecar-test", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  kj::AutoCloseFd owned(memfd);
  ASSERT_EQ(pwrite(memfd, "shared bytes", 12, 0), 12);
  int fds[] = {memfd};
  auto payload = pattern(300000);  // large enough that part of it goes through the ring
  std::vector<kj::byte> received(payload.size());
  kj::AutoCloseFd got[2];
  auto write = a_->writeWithFds(kj::arrayPtr(payload.data(), payload.size()), nullptr,
                                kj::arrayPtr(fds, 1));
  auto result = b_->tryReadWithFds(received.data(), received.size(), received.size(), got, 2)
                    .wait(ws());
  write.wait(ws());
  EXPECT_EQ(result.byteCount, payload.size());
  EXPECT_TRUE(received == payload);
  ASSERT_EQ(result.capCount, 1u);
  char out[12];
  ASSERT_EQ(pread(got[0].get(), out, 12, 0), 12);
  EXPECT_EQ(std::string(out, 12), "shared bytes");
}

TEST_F(UnixStreamTest, FdsBeyondReadersLimitAreClosedNotLeaked) {
  int baseline = openFdCount();
  {
    std::vector<kj::AutoCloseFd> sent;
    std::vector<int> raw;
    for (int i = 0; i < 8; ++i) {
      int fd = memfd_create("extra", MFD_CLOEXEC);
      ASSERT_GE(fd, 0);
      sent.emplace_back(fd);
      raw.push_back(fd);
    }
    const kj::byte message[] = {1, 2, 3};
    a_->writeWithFds(kj::arrayPtr(message, 3), nullptr, kj::arrayPtr(raw.data(), raw.size()))
        .wait(ws());
    sent.clear();  // only the in-flight copies remain

    kj::byte buffer[3];
    kj::AutoCloseFd received[2];
    auto result = b_->tryReadWithFds(buffer, 3, 3, received, 2).wait(ws());
    EXPECT_EQ(result.byteCount, 3u);
    EXPECT_EQ(result.capCount, 2u);
    EXPECT_TRUE(fdIsOpen(received[0].get()));
    EXPECT_TRUE(fdIsOpen(received[1].get()));
    EXPECT_EQ(openFdCount(), baseline + 2);  // the other 6 were closed on arrival
  }
  EXPECT_EQ(openFdCount(), baseline);
}

TEST_F(UnixStreamTest, FdsBeyondPerReadMaximumAreNotLeaked) {
  int baseline = openFdCount();
  {
    constexpr int kSent = 40;  // more than kMaxFdsPerRead: the kernel truncates the rest
    std::vector<kj::AutoCloseFd> sent;
    std::vector<int> raw;
    for (int i = 0; i < kSent; ++i) {
      int fd = eventfd(0, EFD_CLOEXEC);
      ASSERT_GE(fd, 0);
      sent.emplace_back(fd);
      raw.push_back(fd);
    }
    const kj::byte message[] = {9};
    a_->writeWithFds(kj::arrayPtr(message, 1), nullptr, kj::arrayPtr(raw.data(), raw.size()))
        .wait(ws());
    sent.clear();
    kj::byte buffer[1];
    kj::AutoCloseFd received[kSent];
    auto result = b_->tryReadWithFds(buffer, 1, 1, received, kSent).wait(ws());
    EXPECT_EQ(result.byteCount, 1u);
    EXPECT_LE(result.capCount, UringStream::kMaxFdsPerRead);
    EXPECT_EQ(openFdCount(), baseline + static_cast<int>(result.capCount));
  }
  EXPECT_EQ(openFdCount(), baseline);
}

TEST_F(UnixStreamTest, FdsSentToAPlainReadAreClosed) {
  int baseline = openFdCount();
  {
    int fd = memfd_create("unwanted", MFD_CLOEXEC);
    ASSERT_GE(fd, 0);
    kj::AutoCloseFd owned(fd);
    int fds[] = {fd};
    const kj::byte message[] = {'x'};
    a_->writeWithFds(kj::arrayPtr(message, 1), nullptr, kj::arrayPtr(fds, 1)).wait(ws());
  }
  char c;
  EXPECT_EQ(b_->tryRead(&c, 1, 1).wait(ws()), 1u);
  EXPECT_EQ(openFdCount(), baseline);
}

TEST_F(UnixStreamTest, ManyFdMessagesInARow) {
  int baseline = openFdCount();
  for (int i = 0; i < 50; ++i) {
    int fd = memfd_create("loop", MFD_CLOEXEC);
    ASSERT_GE(fd, 0);
    kj::AutoCloseFd owned(fd);
    ASSERT_EQ(pwrite(fd, &i, sizeof i, 0), static_cast<ssize_t>(sizeof i));
    int fds[] = {fd};
    kj::byte message[] = {static_cast<kj::byte>(i)};
    a_->writeWithFds(kj::arrayPtr(message, 1), nullptr, kj::arrayPtr(fds, 1)).wait(ws());
  }
  for (int i = 0; i < 50; ++i) {
    kj::byte b;
    kj::AutoCloseFd got[1];
    auto result = b_->tryReadWithFds(&b, 1, 1, got, 1).wait(ws());
    ASSERT_EQ(result.byteCount, 1u);
    ASSERT_EQ(result.capCount, 1u);
    EXPECT_EQ(b, static_cast<kj::byte>(i));
    int value = -1;
    ASSERT_EQ(pread(got[0].get(), &value, sizeof value, 0), static_cast<ssize_t>(sizeof value));
    EXPECT_EQ(value, i);
  }
  EXPECT_EQ(openFdCount(), baseline);
}

TEST_F(UnixStreamTest, PassesAStream) {
  auto [x, y] = unixSocketPair();
  kj::Own<kj::AsyncCapabilityStream> inner =
      kj::heap<UringStream>(loop_.reactor(), kj::AutoCloseFd(x));
  kj::AutoCloseFd otherEnd(y);
  const kj::byte message[] = {'s'};
  a_->writeWithStreams(kj::arrayPtr(message, 1), nullptr, kj::arr(kj::mv(inner))).wait(ws());
  kj::byte b;
  kj::Own<kj::AsyncCapabilityStream> streams[1];
  auto result = b_->tryReadWithStreams(&b, 1, 1, streams, 1).wait(ws());
  ASSERT_EQ(result.capCount, 1u);
  ASSERT_EQ(::write(otherEnd.get(), "in", 2), 2);
  char buffer[2];
  streams[0]->read(buffer, 2).wait(ws());
  EXPECT_EQ(std::string(buffer, 2), "in");
}

}  // namespace
}  // namespace sidecar::reactor
