// KJ's event loop on the reactor (KjEventPort / ReactorLoop): timers, sleeping when idle, and
// cross-thread wake-ups through the Mailbox and KJ's own Executor while the loop sleeps.

#include "reactor/kj_event_port.h"

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/time.h>

#include <atomic>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "reactor/eventfd_source.h"
#include "reactor/mailbox.h"
#include "test_support.h"

namespace sidecar::reactor {
namespace {

using sidecar::testing::eventually;
using sidecar::testing::Watchdog;

TEST(KjEventPort, AfterDelayFiresNoEarlierThanAsked) {
  Watchdog watchdog("afterDelay");
  ReactorLoop loop;
  // KJ measures afterDelay() from the timer's time of the current loop turn, not from the call
  // (as KJ's own UnixEventPort does), so the contract is "no earlier than that time + delay".
  // Both clocks are monotonicNs(), so this holds however slowly the test runs (ASan, 2 cores).
  uint64_t turnNs = (loop.timer().now() - kj::origin<kj::TimePoint>()) / kj::NANOSECONDS;
  loop.timer().afterDelay(20 * kj::MILLISECONDS).wait(loop.waitScope());
  EXPECT_GE(monotonicNs() - turnNs, 20'000'000u);
}

TEST(KjEventPort, SeveralTimersFireInDeadlineOrder) {
  Watchdog watchdog("timer order");
  ReactorLoop loop;
  std::vector<int> order;
  // eagerlyEvaluate: KJ runs a .then() continuation only when someone pulls its result, and the
  // join below pulls in array order; eager continuations run when their timer fires.
  auto& timer = loop.timer();
  auto a = timer.afterDelay(30 * kj::MILLISECONDS).then([&]() { order.push_back(30); })
               .eagerlyEvaluate(nullptr);
  auto b = timer.afterDelay(10 * kj::MILLISECONDS).then([&]() { order.push_back(10); })
               .eagerlyEvaluate(nullptr);
  auto c = timer.afterDelay(20 * kj::MILLISECONDS).then([&]() { order.push_back(20); })
               .eagerlyEvaluate(nullptr);
  auto d = timer.afterDelay(0 * kj::MILLISECONDS).then([&]() { order.push_back(0); })
               .eagerlyEvaluate(nullptr);
  kj::joinPromises(kj::arr(kj::mv(a), kj::mv(b), kj::mv(c), kj::mv(d))).wait(loop.waitScope());
  EXPECT_EQ(order, (std::vector<int>{0, 10, 20, 30}));
}

TEST(KjEventPort, IdleTimerWaitSleepsInTheRing) {
  Watchdog watchdog("idle timer");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  uint64_t sleepsBefore = loop.reactor().stats().sleeps.load();
  loop.timer().afterDelay(30 * kj::MILLISECONDS).wait(loop.waitScope());
  EXPECT_GT(loop.reactor().stats().sleeps.load(), sleepsBefore);
}

TEST(KjEventPort, SpinningPortStillFiresTimersAndEventuallySleeps) {
  Watchdog watchdog("spinning timer");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/1000);
  uint64_t sleepsBefore = loop.reactor().stats().sleeps.load();
  loop.timer().afterDelay(50 * kj::MILLISECONDS).wait(loop.waitScope());
  // 50 ms idle is far past the 1 ms spin window.
  EXPECT_GT(loop.reactor().stats().sleeps.load(), sleepsBefore);
}

TEST(KjEventPort, CancelledTimerDoesNotFire) {
  Watchdog watchdog("cancelled timer");
  ReactorLoop loop;
  bool fired = false;
  {
    auto p = loop.timer().afterDelay(5 * kj::MILLISECONDS).then([&]() { fired = true; });
  }
  loop.timer().afterDelay(20 * kj::MILLISECONDS).wait(loop.waitScope());
  EXPECT_FALSE(fired);
}

TEST(KjEventPort, EvalLaterRunsWithoutSleeping) {
  ReactorLoop loop;
  int value = kj::evalLater([]() { return 42; }).wait(loop.waitScope());
  EXPECT_EQ(value, 42);
}

TEST(KjEventPort, MailboxPostWakesALoopSleepingInWait) {
  Watchdog watchdog("mailbox post to a sleeping KJ loop");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  Mailbox mailbox(loop.reactor());
  auto paf = kj::newPromiseAndFulfiller<int>();
  auto* fulfiller = paf.fulfiller.get();
  std::thread::id ranOn;
  std::thread poster([&]() {
    eventually([&]() { return loop.reactor().stats().sleeps.load() > 0; });
    mailbox.post([&, fulfiller]() {
      ranOn = std::this_thread::get_id();
      fulfiller->fulfill(7);
    });
  });
  EXPECT_EQ(paf.promise.wait(loop.waitScope()), 7);
  poster.join();
  EXPECT_EQ(ranOn, std::this_thread::get_id());
  EXPECT_GT(loop.reactor().stats().sleeps.load(), 0u);
}

TEST(KjEventPort, ManyProducersPostToASleepingLoopInPerProducerOrder) {
  Watchdog watchdog("mailbox producers to a KJ loop", std::chrono::seconds(60));
  constexpr int kProducers = 4;
  constexpr int kTasks = 2000;
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  Mailbox mailbox(loop.reactor());
  std::vector<int> next(kProducers, 0);
  int outOfOrder = 0;
  int done = 0;
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto* fulfiller = paf.fulfiller.get();
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p]() {
      eventually([&]() { return loop.reactor().stats().sleeps.load() > 0; });
      for (int i = 0; i < kTasks; ++i) {
        mailbox.post([&, p, i]() {
          if (next[p] != i) ++outOfOrder;
          next[p] = i + 1;
          if (++done == kProducers * kTasks) fulfiller->fulfill();
        });
        if (i % 256 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
      }
    });
  }
  paf.promise.wait(loop.waitScope());
  for (auto& t : producers) t.join();
  EXPECT_EQ(outOfOrder, 0);
  for (int p = 0; p < kProducers; ++p) EXPECT_EQ(next[p], kTasks);
}

TEST(KjEventPort, KjExecutorFromAnotherThreadWakesTheLoop) {
  Watchdog watchdog("kj::Executor to a sleeping loop");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  const kj::Executor& executor = kj::getCurrentThreadExecutor();
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto* fulfiller = paf.fulfiller.get();
  std::thread other([&]() {
    eventually([&]() { return loop.reactor().stats().sleeps.load() > 0; });
    int result = executor.executeSync([&]() {
      fulfiller->fulfill();
      return 5;
    });
    EXPECT_EQ(result, 5);
  });
  paf.promise.wait(loop.waitScope());
  other.join();
}

TEST(KjEventPort, EventFdSignalFulfillsPromiseWhileLoopSleeps) {
  Watchdog watchdog("eventfd signal to a sleeping KJ loop");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto* fulfiller = paf.fulfiller.get();
  EventFdSource source(loop.reactor(), [&]() {
    if (fulfiller->isWaiting()) fulfiller->fulfill();
  });
  std::thread signaller([&]() {
    eventually([&]() { return loop.reactor().stats().sleeps.load() > 0; });
    source.signal();
  });
  paf.promise.wait(loop.waitScope());
  signaller.join();
  EXPECT_EQ(source.handled(), 1u);
}

TEST(KjEventPort, TimerAndMailboxTogether) {
  Watchdog watchdog("timer and mailbox");
  ReactorLoop loop(ReactorOptions{}, /*spinUs=*/0);
  Mailbox mailbox(loop.reactor());
  std::atomic<int> posted{0};
  int ran = 0;
  std::thread poster([&]() {
    for (int i = 0; i < 20; ++i) {
      mailbox.post([&]() { ++ran; });
      posted.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  // Ticks of the timer interleave with mailbox tasks; neither starves the other.
  int ticks = 0;
  while (ran < 20) {
    loop.timer().afterDelay(2 * kj::MILLISECONDS).wait(loop.waitScope());
    ++ticks;
  }
  poster.join();
  EXPECT_EQ(ran, 20);
  EXPECT_GT(ticks, 0);
}

}  // namespace
}  // namespace sidecar::reactor
