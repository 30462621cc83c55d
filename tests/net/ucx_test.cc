// tests/net: UcxContext, UcxWorker and UcxEndpoint on the reactor. Two workers share one
// ReactorLoop (one thread, as on a daemon core); their endpoints talk over UCX's TCP transport
// (meson sets UCX_TLS=tcp, which also works inside network namespaces and on hosts without RDMA).
// Skips with the reason when UCX cannot initialize.

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "../common/watchdog.h"
#include "net/ucx_context.h"
#include "net/ucx_endpoint.h"
#include "net/ucx_error.h"
#include "net/ucx_worker.h"
#include "reactor/kj_event_port.h"

namespace sidecar::net {
namespace {

using namespace std::chrono_literals;
using sidecar::testing::Watchdog;

constexpr size_t kKiB = 1024, kMiB = 1024 * kKiB;
constexpr size_t kRegionBytes = 128 * kMiB;

// Deterministic contents that differ per size and per seed, so a stale or misplaced buffer fails.
void fill(uint8_t* data, size_t sizeBytes, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + sizeBytes;
  for (size_t i = 0; i < sizeBytes; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(data + i, &x, std::min<size_t>(8, sizeBytes - i));
  }
}

bool same(const uint8_t* data, size_t sizeBytes, uint64_t seed) {
  std::vector<uint8_t> expected(sizeBytes);
  fill(expected.data(), sizeBytes, seed);
  return std::memcmp(expected.data(), data, sizeBytes) == 0;
}

class UcxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("UCX_TLS", "tcp", 0);  // meson sets it too; an explicit value from outside wins
    region_ = mmap(nullptr, kRegionBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(region_, MAP_FAILED);
    try {
      context_ = std::make_unique<UcxContext>(region_, kRegionBytes);
      sender_ = std::make_unique<UcxWorker>(*context_, loop_.reactor());
      receiver_ = std::make_unique<UcxWorker>(*context_, loop_.reactor());
      endpoint_ = sender_->connect(kj::arrayPtr(receiver_->address().data(),
                                                receiver_->address().size()));
    } catch (const UcxError& e) {
      GTEST_SKIP() << "UCX cannot start here: " << e.what();
    }
  }

  void TearDown() override {
    endpoint_.reset();
    receiver_.reset();
    sender_.reset();
    context_.reset();
    if (region_ != MAP_FAILED) munmap(region_, kRegionBytes);
  }

  uint8_t* regionAt(size_t offsetBytes) { return static_cast<uint8_t*>(region_) + offsetBytes; }

  // Runs the loop for about `ms` (a KJ timer), so UCX can progress with nothing awaited.
  void runFor(int ms) { loop_.timer().afterDelay(ms * kj::MILLISECONDS).wait(loop_.waitScope()); }

  // Held by pointer: kj::EventLoop's destructor may throw, which a gtest fixture's may not.
  std::unique_ptr<reactor::ReactorLoop> loopHolder_ = std::make_unique<reactor::ReactorLoop>();
  reactor::ReactorLoop& loop_ = *loopHolder_;
  void* region_ = MAP_FAILED;
  std::unique_ptr<UcxContext> context_;
  std::unique_ptr<UcxWorker> sender_, receiver_;
  std::unique_ptr<UcxEndpoint> endpoint_;
};

// ---------------------------------------------------------------------------------------------
// Contents arrive intact, from the registered arena and from plain memory.

struct SizeCase {
  size_t sizeBytes;
  bool inRegion;
};

class UcxSizeTest : public UcxTest, public ::testing::WithParamInterface<SizeCase> {};

TEST_P(UcxSizeTest, RecvPostedThenSendDeliversExactContents) {
  Watchdog watchdog("tag send/recv", 60s);
  const auto [sizeBytes, inRegion] = GetParam();
  std::vector<uint8_t> plainSource, plainTarget;
  uint8_t* source;
  uint8_t* target;
  if (inRegion) {
    source = regionAt(0);
    target = regionAt(kRegionBytes / 2);
    ASSERT_NE(context_->regionHandleFor(source, sizeBytes), nullptr);
  } else {
    plainSource.resize(sizeBytes);
    plainTarget.resize(sizeBytes);
    source = plainSource.data();
    target = plainTarget.data();
    ASSERT_EQ(context_->regionHandleFor(source, sizeBytes), nullptr);
  }
  fill(source, sizeBytes, 7);
  std::memset(target, 0, sizeBytes);

  auto received = receiver_->tagRecv(42, target, sizeBytes);
  auto sent = endpoint_->tagSend(42, source, sizeBytes);
  sent.wait(loop_.waitScope());
  EXPECT_EQ(received.wait(loop_.waitScope()), sizeBytes);
  EXPECT_TRUE(same(target, sizeBytes, 7));
  EXPECT_EQ(sender_->inFlight(), 0u);
  EXPECT_EQ(receiver_->inFlight(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Sizes, UcxSizeTest,
                         ::testing::Values(SizeCase{4 * kKiB, true}, SizeCase{4 * kKiB, false},
                                           SizeCase{1 * kMiB, true}, SizeCase{1 * kMiB, false},
                                           SizeCase{64 * kMiB, true}, SizeCase{64 * kMiB, false}),
                         [](const auto& info) {
                           return std::to_string(info.param.sizeBytes / kKiB) + "KiB_" +
                                  (info.param.inRegion ? "arena" : "plain");
                         });

// Tags select: two messages with different tags land in the receives that name them, whatever the
// order of posting.
TEST_F(UcxTest, TagsSelectTheirReceive) {
  Watchdog watchdog("tags", 30s);
  std::vector<uint8_t> a(8 * kKiB), b(8 * kKiB), ra(8 * kKiB), rb(8 * kKiB);
  fill(a.data(), a.size(), 1);
  fill(b.data(), b.size(), 2);
  auto recvB = receiver_->tagRecv(2, rb.data(), rb.size());
  auto recvA = receiver_->tagRecv(1, ra.data(), ra.size());
  auto sendA = endpoint_->tagSend(1, a.data(), a.size());
  auto sendB = endpoint_->tagSend(2, b.data(), b.size());
  sendA.wait(loop_.waitScope());
  sendB.wait(loop_.waitScope());
  recvA.wait(loop_.waitScope());
  recvB.wait(loop_.waitScope());
  EXPECT_TRUE(same(ra.data(), ra.size(), 1));
  EXPECT_TRUE(same(rb.data(), rb.size(), 2));
}

// ---------------------------------------------------------------------------------------------
// A receive posted after the message arrived (UCX's unexpected queue) still completes: eager
// (4 KiB, the send completes first) and rendezvous (1 MiB, the send waits for the receive).

class UcxUnexpectedTest : public UcxTest, public ::testing::WithParamInterface<size_t> {};

TEST_P(UcxUnexpectedTest, RecvPostedAfterTheSendCompletes) {
  Watchdog watchdog("unexpected message", 30s);
  const size_t sizeBytes = GetParam();
  std::vector<uint8_t> source(sizeBytes), target(sizeBytes, 0);
  fill(source.data(), sizeBytes, 3);
  auto sent = endpoint_->tagSend(9, source.data(), sizeBytes).fork();
  runFor(100);  // the message (or its rendezvous header) reaches the receiver, nobody expects it
  auto received = receiver_->tagRecv(9, target.data(), sizeBytes);
  EXPECT_EQ(received.wait(loop_.waitScope()), sizeBytes);
  sent.addBranch().wait(loop_.waitScope());
  EXPECT_TRUE(same(target.data(), sizeBytes, 3));
}

INSTANTIATE_TEST_SUITE_P(Sizes, UcxUnexpectedTest, ::testing::Values(4 * kKiB, 1 * kMiB));

// ---------------------------------------------------------------------------------------------
// Cancellation and errors.

// Dropping an unmatched receive cancels it: the message sent afterwards is not written into the
// dropped buffer but waits for the next receive with its tag.
TEST_F(UcxTest, DroppedRecvIsCancelledAndNeverWritesItsBuffer) {
  Watchdog watchdog("cancelled recv", 30s);
  const size_t sizeBytes = 64 * kKiB;
  std::vector<uint8_t> source(sizeBytes), dropped(sizeBytes, 0), target(sizeBytes, 0);
  fill(source.data(), sizeBytes, 5);
  {
    auto recv = receiver_->tagRecv(77, dropped.data(), sizeBytes);
    runFor(10);
    EXPECT_EQ(receiver_->inFlight(), 1u);
  }
  EXPECT_EQ(receiver_->inFlight(), 0u) << "the dropped receive's request is still in UCX";
  auto sent = endpoint_->tagSend(77, source.data(), sizeBytes).fork();
  runFor(100);
  EXPECT_EQ(std::count(dropped.begin(), dropped.end(), 0), static_cast<long>(sizeBytes))
      << "a cancelled receive wrote into its buffer";
  EXPECT_EQ(receiver_->tagRecv(77, target.data(), sizeBytes).wait(loop_.waitScope()), sizeBytes);
  sent.addBranch().wait(loop_.waitScope());
  EXPECT_TRUE(same(target.data(), sizeBytes, 5));
}

// Dropping a receive while its rendezvous data is arriving returns only once UCX is done with the
// buffer: afterwards the buffer no longer changes.
TEST_F(UcxTest, DroppedRecvMidTransferLeavesTheBufferAlone) {
  Watchdog watchdog("recv dropped mid-transfer", 60s);
  const size_t sizeBytes = 64 * kMiB;
  uint8_t* source = regionAt(0);
  uint8_t* target = regionAt(kRegionBytes / 2);
  fill(source, sizeBytes, 11);
  std::memset(target, 0, sizeBytes);
  auto sent = endpoint_->tagSend(5, source, sizeBytes).fork();
  {
    auto recv = receiver_->tagRecv(5, target, sizeBytes);
    // Run until some data arrived (the receive is matched) but, most likely, not all of it.
    for (int i = 0; i < 2000 && target[sizeBytes / 2 - 1] == 0 && target[0] == 0; ++i) runFor(1);
  }
  EXPECT_EQ(receiver_->inFlight(), 0u);
  std::vector<uint8_t> snapshot(target, target + sizeBytes);
  sent.addBranch().then([] {}, [](kj::Exception&&) {}).wait(loop_.waitScope());
  runFor(50);
  EXPECT_EQ(std::memcmp(snapshot.data(), target, sizeBytes), 0)
      << "the buffer of a dropped receive changed after the drop returned";
}

// A masked receive takes messages of one kind from any sender and reports each one's full tag,
// whether it was posted before the message came or the message waited for it (unexpected), and
// never takes a message of another kind.
TEST_F(UcxTest, MaskedRecvReportsTheSendersTag) {
  Watchdog watchdog("masked receive", 30s);
  constexpr uint64_t kMask = 0xffffffff00000000ull, kKindA = 1ull << 32, kKindB = 2ull << 32;
  std::vector<uint8_t> source(4 * kKiB), target(8 * kKiB), other(8 * kKiB);
  fill(source.data(), source.size(), 5);
  // Posted first.
  auto posted = receiver_->tagRecvMasked(kKindA, kMask, target.data(), target.size());
  endpoint_->tagSend(kKindA | 17, source.data(), source.size()).wait(loop_.waitScope());
  TagCompletion first = posted.wait(loop_.waitScope());
  EXPECT_EQ(first.senderTag, kKindA | 17);
  EXPECT_EQ(first.sizeBytes, source.size());
  EXPECT_TRUE(same(target.data(), source.size(), 5));
  // Unexpected: a kind-B message and a kind-A one arrive before anything is posted.
  endpoint_->tagSend(kKindB | 3, source.data(), 64).wait(loop_.waitScope());
  endpoint_->tagSend(kKindA | 0xfffffffeu, source.data(), 128).wait(loop_.waitScope());
  runFor(50);
  TagCompletion second = receiver_->tagRecvMasked(kKindA, kMask, target.data(), target.size())
                             .wait(loop_.waitScope());
  EXPECT_EQ(second.senderTag, kKindA | 0xfffffffeu);
  EXPECT_EQ(second.sizeBytes, 128u);
  TagCompletion third = receiver_->tagRecvMasked(kKindB, kMask, other.data(), other.size())
                            .wait(loop_.waitScope());
  EXPECT_EQ(third.senderTag, kKindB | 3);
  EXPECT_EQ(third.sizeBytes, 64u);
}

TEST_F(UcxTest, MessageLargerThanTheBufferRejectsWithWhatToDo) {
  Watchdog watchdog("truncated", 30s);
  std::vector<uint8_t> source(8 * kKiB), target(4 * kKiB);
  auto recv = receiver_->tagRecv(3, target.data(), target.size());
  auto sent = endpoint_->tagSend(3, source.data(), source.size()).then([] {}, [](kj::Exception&&) {});
  try {
    recv.wait(loop_.waitScope());
    ADD_FAILURE() << "a truncated receive resolved";
  } catch (const kj::Exception& e) {
    EXPECT_TRUE(strstr(e.getDescription().cStr(), "larger than the receive buffer") != nullptr)
        << e.getDescription().cStr();
  }
  sent.wait(loop_.waitScope());
}

// The peer's worker goes away (as when its daemon is killed): a send to it fails within a bounded
// time, and so does whenFailed(); the endpoint can still be destroyed.
TEST_F(UcxTest, SendToADestroyedWorkerFailsInsteadOfHanging) {
  Watchdog watchdog("send to a dead peer", 40s);
  std::vector<uint8_t> source(1 * kMiB), target(1 * kMiB);
  // One exchange first so the connection is fully wired up, as between two running daemons.
  auto recv = receiver_->tagRecv(1, target.data(), target.size());
  endpoint_->tagSend(1, source.data(), source.size()).wait(loop_.waitScope());
  recv.wait(loop_.waitScope());

  receiver_.reset();
  auto failed = endpoint_->whenFailed().then([] { return false; }, [](kj::Exception&&) { return true; });
  bool sendFailed = false;
  for (int attempt = 0; attempt < 100 && !sendFailed; ++attempt) {
    try {
      endpoint_->tagSend(2, source.data(), source.size()).wait(loop_.waitScope());
      runFor(20);  // an eager send may complete locally before the reset is seen
    } catch (const kj::Exception& e) {
      sendFailed = true;
      EXPECT_EQ(e.getType(), kj::Exception::Type::DISCONNECTED) << e.getDescription().cStr();
    }
  }
  EXPECT_TRUE(sendFailed) << "sends to a destroyed worker kept succeeding";
  EXPECT_TRUE(failed.wait(loop_.waitScope()));
  ASSERT_TRUE(endpoint_->failure().has_value());
  EXPECT_TRUE(isPeerFailure(endpoint_->failure()->status())) << endpoint_->failure()->what();
  EXPECT_EQ(sender_->inFlight(), 0u);
}

TEST_F(UcxTest, OrderlyCloseResolvesAndLaterSendsReject) {
  Watchdog watchdog("close", 30s);
  std::vector<uint8_t> source(4 * kKiB), target(4 * kKiB);
  auto recv = receiver_->tagRecv(1, target.data(), target.size());
  endpoint_->tagSend(1, source.data(), source.size()).wait(loop_.waitScope());
  recv.wait(loop_.waitScope());
  endpoint_->close().wait(loop_.waitScope());
  EXPECT_ANY_THROW(endpoint_->tagSend(1, source.data(), source.size()).wait(loop_.waitScope()));
}

TEST_F(UcxTest, ConnectToGarbageAddressIsATypedError) {
  std::vector<uint8_t> empty;
  EXPECT_THROW(sender_->connect(kj::arrayPtr(empty.data(), empty.size())), UcxError);
}

// ---------------------------------------------------------------------------------------------
// An idle worker lets the reactor sleep: arm() succeeds and the ring waits on the worker's fd.

TEST_F(UcxTest, IdleWorkersLetTheReactorSleep) {
  Watchdog watchdog("idle sleep", 30s);
  // Traffic first, so the workers have connections whose fds UCX watches.
  std::vector<uint8_t> source(4 * kKiB), target(4 * kKiB);
  auto recv = receiver_->tagRecv(1, target.data(), target.size());
  endpoint_->tagSend(1, source.data(), source.size()).wait(loop_.waitScope());
  recv.wait(loop_.waitScope());
  runFor(20);

  uint64_t sleepsBefore = loop_.reactor().stats().sleeps.load();
  uint64_t completionsBefore = loop_.reactor().stats().completions.load();
  runFor(200);
  uint64_t sleeps = loop_.reactor().stats().sleeps.load() - sleepsBefore;
  uint64_t completions = loop_.reactor().stats().completions.load() - completionsBefore;
  // A source that refused to arm would make the reactor poll instead: no sleep at all. One that
  // armed a notification that keeps firing would wake it over and over.
  EXPECT_GE(sleeps, 1u);
  EXPECT_LE(completions, 20u) << "the worker's event fd keeps waking an idle reactor";
}

// A message that arrives while the reactor sleeps wakes it (the worker's fd is in the ring).
TEST_F(UcxTest, ArrivingMessageWakesASleepingReactor) {
  Watchdog watchdog("wake on message", 30s);
  std::vector<uint8_t> source(4 * kKiB), target(4 * kKiB);
  fill(source.data(), source.size(), 9);
  auto recv = receiver_->tagRecv(1, target.data(), target.size());
  endpoint_->tagSend(1, source.data(), source.size()).wait(loop_.waitScope());
  recv.wait(loop_.waitScope());

  // A second worker on its own thread and loop sends while this loop sleeps in io_uring.
  auto recv2 = receiver_->tagRecv(2, target.data(), target.size());
  std::vector<uint8_t> address = receiver_->address();
  std::atomic<bool> remoteDone{false};
  std::thread remote([&] {
    reactor::ReactorLoop loop;
    UcxWorker worker(*context_, loop.reactor());
    auto endpoint = worker.connect(kj::arrayPtr(address.data(), address.size()));
    endpoint->tagSend(2, source.data(), source.size()).wait(loop.waitScope());
    endpoint->close().wait(loop.waitScope());  // the flush needs this loop's worker to answer
    remoteDone = true;
  });
  uint64_t sleepsBefore = loop_.reactor().stats().sleeps.load();
  EXPECT_EQ(recv2.wait(loop_.waitScope()), source.size());
  while (!remoteDone) runFor(5);
  remote.join();
  EXPECT_GT(loop_.reactor().stats().sleeps.load(), sleepsBefore);
  EXPECT_TRUE(same(target.data(), target.size(), 9));
}

}  // namespace
}  // namespace sidecar::net
