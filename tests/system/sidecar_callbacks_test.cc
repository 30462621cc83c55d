// libsidecar's completion callbacks (SendHandle/RecvHandle::onDone) and the owner thread's sleep
// (Sidecar::waitForWake/wake), which the Python package's owner thread is built on, against the
// real sidecard ($SIDECARD). Two Sidecars in this process, each on its own thread (a Sidecar
// belongs to the thread that created it).

#include <gtest/gtest.h>
#include <sidecar/error.h>
#include <sidecar/sidecar.h>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "local_daemon.h"

namespace {

using namespace sidecar::systest;
using namespace std::chrono_literals;
using sidecar::Dtype;
using sidecar::Error;
using sidecar::ErrorCode;
using sidecar::Object;
using sidecar::RankConfig;
using sidecar::Received;
using sidecar::Sidecar;

class SidecarCallbacksTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(daemon_.start("callbacks")); }

  RankConfig config(int32_t rank) { return daemon_.rankConfig(rank); }

  LocalDaemon daemon_;
};

TEST_F(SidecarCallbacksTest, WakeBeforeWaitReturnsAtOnceAndWakeFromAnotherThreadEndsTheWait) {
  Sidecar sc = Sidecar::connect(config(1));
  sc.wake();
  sc.waitForWake();  // returns at once: woken since the last return (a hang fails by timeout)
  std::atomic<bool> woken{false};
  std::thread waker([&] {
    std::this_thread::sleep_for(50ms);
    woken = true;
    sc.wake();
  });
  sc.waitForWake();
  EXPECT_TRUE(woken.load()) << "waitForWake returned before wake()";
  waker.join();
}

TEST_F(SidecarCallbacksTest, RecvCallbacksCompleteInArrivalOrderWhileTheOwnerSleeps) {
  // Rank 2 (this thread) issues three recvs and sleeps; rank 1 (another thread) sends the ids in
  // reverse order. Each callback wakes the sleeper.
  Sidecar receiver = Sidecar::connect(config(2));
  std::vector<std::string> order;
  std::vector<std::string> values;
  for (const char* id : {"a", "b", "c"}) {
    receiver.recvAsync(id).onDone([&receiver, &order, &values, id](Received* r, const Error* e) {
      receiver.wake();  // from inside a callback too: ends the current waitForWake
      ASSERT_EQ(e, nullptr) << e->what();
      ASSERT_EQ(r->kind, Received::Kind::kObject);
      order.push_back(id);
      values.push_back(r->object.bytes);
    });
  }
  std::thread sender([&] {
    Sidecar sc = Sidecar::connect(config(1));
    for (const char* id : {"c", "b", "a"}) {
      // Waited: each chunk is stored (and its recv answered) before the next is sent.
      sc.send(id, Object{1, std::string("value-") + id}, {{2}}).wait();
    }
  });
  auto deadline = Clock::now() + 30s;
  while (order.size() < 3 && Clock::now() < deadline) receiver.waitForWake();
  sender.join();
  ASSERT_EQ(order, (std::vector<std::string>{"c", "b", "a"}));
  EXPECT_EQ(values, (std::vector<std::string>{"value-c", "value-b", "value-a"}));
  for (const char* id : {"a", "b", "c"}) receiver.markDone(id);
}

TEST_F(SidecarCallbacksTest, ErrorsReachTheCallbacks) {
  Sidecar sc = Sidecar::connect(config(3));
  std::optional<ErrorCode> recvError, sendError;
  bool recvCalled = false, sendCalled = false;
  sc.recvAsync("never", 0, 50).onDone([&](Received* r, const Error* e) {
    recvCalled = true;
    EXPECT_EQ(r, nullptr);
    if (e != nullptr) recvError = e->code();
  });
  sc.send("mismatch", Object{1, "x"}, {{4}}, 0, 2).wait();
  sc.send("mismatch", Object{1, "y"}, {{4}}, 1, 3).onDone([&](const Error* e) {
    sendCalled = true;
    if (e != nullptr) sendError = e->code();
  });
  auto deadline = Clock::now() + 30s;
  while (!(recvCalled && sendCalled) && Clock::now() < deadline) {
    std::thread tick([&] {
      std::this_thread::sleep_for(10ms);
      sc.wake();
    });
    sc.waitForWake();
    tick.join();
  }
  ASSERT_TRUE(recvCalled && sendCalled);
  EXPECT_EQ(recvError, ErrorCode::kTimeout);
  EXPECT_EQ(sendError, ErrorCode::kNumChunksMismatch);
}

TEST_F(SidecarCallbacksTest, PendingCallbacksAreDroppedWithTheSidecar) {
  bool called = false;
  {
    Sidecar sc = Sidecar::connect(config(5));
    sc.recvAsync("never").onDone([&](Received*, const Error*) { called = true; });
  }
  EXPECT_FALSE(called) << "a callback ran after its Sidecar was destroyed";
  // The rank was unregistered: it can register again.
  Sidecar again = Sidecar::connect(config(5));
}

}  // namespace
