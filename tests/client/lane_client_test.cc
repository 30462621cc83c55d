// LaneClient::awaitAnswer (the blocking recv's path past KJ) against a fake daemon: this test
// owns the other side of the lane's memory, pops the client's requests and pushes completions.
// The awaited answer is returned (a failed one too) with its credits back and its promise left
// unfulfilled; answers of other requests that come first still fulfil their promises; an answer
// already taken by the reactor, a "use a call" answer, or one that does not come within the spin,
// leaves the promise to carry it; a lane that turns out corrupt ends the wait and rejects the
// promise.

#include <gtest/gtest.h>
#include <kj/async.h>
#include <sys/eventfd.h>

#include <string>
#include <vector>

#include "client/lane_client.h"
#include "reactor/kj_event_port.h"
#include "shm/lane_ring.h"
#include "sidecar.capnp.h"

namespace sidecar::client {
namespace {

constexpr uint64_t kRingBytes = 1 << 16;
constexpr uint32_t kObjectMaxBytes = 1024;

kj::AutoCloseFd eventFd() { return kj::AutoCloseFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

class LaneClientTest : public ::testing::Test {
 protected:
  LaneClientTest() : daemonSide_(shm::LaneMemory::create(kRingBytes).value()) {
    auto mapped = shm::LaneMemory::map(daemonSide_.fd());
    EXPECT_TRUE(mapped.ok());
    client_ = kj::heap<LaneClient>(loop_.reactor(), std::move(mapped).value(), eventFd(), eventFd(),
                                   kObjectMaxBytes);
  }
  // (KJ's event loop may throw from its destructor; gtest's fixture may not.)
  ~LaneClientTest() noexcept override {}

  // A recv request on the lane; its seq goes to `seq`.
  kj::Promise<kj::Own<LaneAnswer>> recv(uint64_t& seq) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::LaneRequest>();
    request.setDataId("x");
    request.initRecv().setTimeoutMs(1000);
    KJ_IF_MAYBE(p, client_->request(message, true, &seq)) { return kj::mv(*p); }
    ADD_FAILURE() << "the lane refused a recv";
    return KJ_EXCEPTION(FAILED, "refused");
  }

  // The daemon answers request `seq`: done, failed with `failure`, or "use a call".
  void answer(uint64_t seq, const std::string& failure = "", bool useCall = false) {
    capnp::MallocMessageBuilder message;
    auto c = message.initRoot<proto::LaneCompletion>();
    c.setSeq(seq);
    if (useCall) {
      c.setUseCall();
    } else if (failure.empty()) {
      c.setDone();
    } else {
      c.setFailed(failure);
    }
    auto flat = capnp::messageToFlatArray(message);
    ASSERT_TRUE(daemonSide_.completions().tryPush(flat.begin(), flat.size() * sizeof(capnp::word)));
  }

  // Requests the daemon side has not taken yet.
  size_t requestsWaiting() {
    size_t n = 0;
    std::vector<uint64_t> words;
    uint64_t size = 0;
    while (daemonSide_.requests().tryPop(words, size, nullptr) == shm::LaneRing::Pop::kRecord) ++n;
    return n;
  }

  reactor::ReactorLoop loop_;
  shm::LaneMemory daemonSide_;
  kj::Own<LaneClient> client_;
};

TEST_F(LaneClientTest, AwaitedAnswerIsTakenPastKjAndOthersStillFulfil) {
  uint64_t first = 0, second = 0;
  auto firstPromise = recv(first);
  auto secondPromise = recv(second);
  EXPECT_EQ(requestsWaiting(), 2u);
  answer(first);   // another request's answer comes first
  answer(second, "[timeout] nothing came");
  KJ_IF_MAYBE(a, client_->awaitAnswer(second, 1'000'000)) {
    EXPECT_EQ((*a)->get().getSeq(), second);
    ASSERT_TRUE((*a)->get().isFailed()) << "a failed answer is returned as it is";
    EXPECT_EQ(std::string((*a)->get().getFailed().cStr()), "[timeout] nothing came");
  } else {
    FAIL() << "the awaited answer was not returned";
  }
  ASSERT_TRUE(firstPromise.poll(loop_.waitScope())) << "the other answer fulfilled its promise";
  EXPECT_EQ(firstPromise.wait(loop_.waitScope())->get().getSeq(), first);
  // The awaited request is no longer pending: its promise is never fulfilled with an answer
  // (the caller drops it), and a second wait for it returns at once.
  EXPECT_EQ(client_->awaitAnswer(second, 1'000'000), nullptr);
  { auto dropped = kj::mv(secondPromise); }
  // Its credits came back: the lane takes as many recvs as a fresh one.
  size_t taken = 0;
  std::vector<kj::Promise<kj::Own<LaneAnswer>>> more;
  uint64_t seq = 0;
  for (;;) {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::LaneRequest>().initRecv();
    KJ_IF_MAYBE(p, client_->request(message, true, &seq)) {
      more.push_back(kj::mv(*p));
      ++taken;
    } else {
      break;
    }
  }
  LaneClient fresh(loop_.reactor(), shm::LaneMemory::map(shm::LaneMemory::create(kRingBytes).value().fd()).value(),
                   eventFd(), eventFd(), kObjectMaxBytes);
  size_t freshTaken = 0;
  std::vector<kj::Promise<kj::Own<LaneAnswer>>> freshMore;
  for (;;) {
    capnp::MallocMessageBuilder message;
    message.initRoot<proto::LaneRequest>().initRecv();
    KJ_IF_MAYBE(p, fresh.request(message, true)) {
      freshMore.push_back(kj::mv(*p));
      ++freshTaken;
    } else {
      break;
    }
  }
  EXPECT_EQ(taken, freshTaken);
}

TEST_F(LaneClientTest, AnswerTakenByTheReactorOrLateIsLeftToThePromise) {
  uint64_t seq = 0;
  auto promise = recv(seq);
  // Nothing comes within the spin: null, and the request stays pending.
  EXPECT_EQ(client_->awaitAnswer(seq, 200), nullptr);
  EXPECT_FALSE(promise.poll(loop_.waitScope()));
  // The answer comes and the reactor takes it: the promise has it, and awaitAnswer returns at once.
  answer(seq);
  ASSERT_TRUE(promise.poll(loop_.waitScope()));
  EXPECT_EQ(client_->awaitAnswer(seq, 10'000'000), nullptr);
  EXPECT_EQ(promise.wait(loop_.waitScope())->get().getSeq(), seq);
}

TEST_F(LaneClientTest, UseCallAnswerIsLeftToThePromise) {
  uint64_t seq = 0;
  auto promise = recv(seq);
  answer(seq, "", /*useCall=*/true);
  EXPECT_EQ(client_->awaitAnswer(seq, 10'000'000), nullptr) << "the promise makes the call";
  ASSERT_TRUE(promise.poll(loop_.waitScope()));
  EXPECT_TRUE(promise.wait(loop_.waitScope())->get().isUseCall());
}

TEST_F(LaneClientTest, CorruptRingEndsTheWaitAndRejects) {
  uint64_t seq = 0;
  auto promise = recv(seq);
  // The daemon side pushes a record that is no LaneCompletion.
  uint64_t garbage[4] = {0xffffffffffffffffull, 1, 2, 3};
  ASSERT_TRUE(daemonSide_.completions().tryPush(garbage, sizeof garbage));
  EXPECT_EQ(client_->awaitAnswer(seq, 10'000'000), nullptr);
  EXPECT_THROW(promise.wait(loop_.waitScope()), kj::Exception);
}

}  // namespace
}  // namespace sidecar::client
