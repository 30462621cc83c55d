// The reactor without KJ: the poll/arm/disarm contract of event sources, cross-thread wake-ups,
// EventFdSource and the Mailbox. Nothing here runs KJ promises, so this binary is also in the
// 'tsan' suite (tools/test reruns it under ThreadSanitizer).

#include "reactor/reactor.h"

#include <gtest/gtest.h>

#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "reactor/eventfd_source.h"
#include "reactor/mailbox.h"
#include "test_support.h"

namespace sidecar::reactor {
namespace {

using sidecar::testing::eventually;
using sidecar::testing::Watchdog;

// Drives a bare reactor the way the KJ port does: poll, sleep when idle, acknowledge wakes.
void runUntil(Reactor& reactor, const std::function<bool()>& done) {
  while (!done()) {
    if (!reactor.poll()) reactor.sleep(std::nullopt);
    reactor.takeWake();
  }
}

class FakeSource final : public EventSource {
 public:
  explicit FakeSource(bool armResult = true) : armResult(armResult) {}

  bool poll() override {
    ++polls;
    if (onPoll) onPoll();
    return pollResult;
  }
  bool arm() override {
    ++arms;
    EXPECT_FALSE(armed) << "arm() called twice without disarm()";
    if (armResult) {
      armed = true;
      ++armedCount;
    }
    return armResult;
  }
  void disarm() override {
    ++disarms;
    EXPECT_TRUE(armed) << "disarm() called on a source that was not armed";
    armed = false;
  }

  bool armResult;
  bool pollResult = false;
  bool armed = false;
  int polls = 0, arms = 0, armedCount = 0, disarms = 0;
  std::function<void()> onPoll;
};

TEST(Reactor, PollWithNothingToDoReportsNoWork) {
  Reactor reactor;
  FakeSource source;
  reactor.addSource(source);
  // The first poll submits the wake-up read; after that nothing happens.
  reactor.poll();
  EXPECT_FALSE(reactor.poll());
  EXPECT_GE(source.polls, 2);
  reactor.removeSource(source);
}

TEST(Reactor, PollReturnsTrueWhenASourceDidWork) {
  Reactor reactor;
  FakeSource source;
  source.pollResult = true;
  reactor.addSource(source);
  EXPECT_TRUE(reactor.poll());
  reactor.removeSource(source);
}

TEST(Reactor, SourceThatRefusesToArmKeepsReactorPolling) {
  Watchdog watchdog("sleep() with a refusing source must not block");
  Reactor reactor;
  FakeSource refusing(/*armResult=*/false);
  reactor.addSource(refusing);
  uint64_t sleepsBefore = reactor.stats().sleeps.load();
  // No timeout: if the reactor slept despite the refusal, this would block forever.
  for (int i = 0; i < 5; ++i) reactor.sleep(std::nullopt);
  EXPECT_EQ(reactor.stats().sleeps.load(), sleepsBefore);
  EXPECT_EQ(refusing.arms, 5);
  EXPECT_EQ(refusing.disarms, 0);  // never armed, so never disarmed
  reactor.removeSource(refusing);
}

TEST(Reactor, DisarmIsCalledExactlyForArmedSources) {
  Watchdog watchdog("sleep() with a refusing source must not block");
  Reactor reactor;
  FakeSource first(true), refusing(false), last(true);
  reactor.addSource(first);
  reactor.addSource(refusing);
  reactor.addSource(last);
  reactor.sleep(std::nullopt);
  EXPECT_EQ(first.disarms, first.armedCount);
  EXPECT_EQ(refusing.disarms, 0);
  EXPECT_EQ(last.disarms, last.armedCount);
  EXPECT_FALSE(first.armed);
  EXPECT_FALSE(last.armed);
  EXPECT_EQ(first.armedCount, 1);
  reactor.removeSource(first);
  reactor.removeSource(refusing);
  reactor.removeSource(last);
}

TEST(Reactor, SleepsWhenAllSourcesArmAndDisarmsThemAfterwards) {
  Reactor reactor;
  FakeSource a, b;
  reactor.addSource(a);
  reactor.addSource(b);
  reactor.poll();  // submit the wake read, so the ring has nothing to report
  uint64_t before = reactor.stats().sleeps.load();
  reactor.sleep(1'000'000);  // 1 ms timeout
  EXPECT_EQ(reactor.stats().sleeps.load(), before + 1);
  EXPECT_EQ(a.armedCount, 1);
  EXPECT_EQ(a.disarms, 1);
  EXPECT_EQ(b.armedCount, 1);
  EXPECT_EQ(b.disarms, 1);
  reactor.removeSource(a);
  reactor.removeSource(b);
}

TEST(Reactor, RemovedSourceIsNoLongerPolledOrArmed) {
  Reactor reactor;
  FakeSource source;
  reactor.addSource(source);
  reactor.poll();
  reactor.removeSource(source);
  int polls = source.polls;
  reactor.poll();
  reactor.sleep(0);
  EXPECT_EQ(source.polls, polls);
  EXPECT_EQ(source.arms, 0);
}

// Sources added from inside another source's poll() (e.g. a mailbox task that creates an
// EventFdSource) must not invalidate the reactor's iteration over its sources.
TEST(Reactor, SourceAddedDuringPollIsSafe) {
  Reactor reactor;
  FakeSource adder;
  std::vector<std::unique_ptr<FakeSource>> added;
  adder.onPoll = [&]() {
    if (!added.empty()) return;
    for (int i = 0; i < 64; ++i) {  // enough to force the vector to reallocate
      added.push_back(std::make_unique<FakeSource>());
      reactor.addSource(*added.back());
    }
  };
  reactor.addSource(adder);
  reactor.poll();
  reactor.poll();
  for (auto& source : added) EXPECT_GE(source->polls, 1);
  for (auto& source : added) reactor.removeSource(*source);
  reactor.removeSource(adder);
}

// A source destroyed from inside another source's poll() (a mailbox task tearing down an
// EventFdSource) must not be polled after its destruction.
TEST(Reactor, SourceDestroyedDuringPollIsNotPolledAgain) {
  Reactor reactor;
  Mailbox mailbox(reactor);
  int handled = 0;
  auto victim = std::make_unique<EventFdSource>(reactor, [&]() { ++handled; });
  victim->signal();
  mailbox.post([&]() { victim.reset(); });
  Watchdog watchdog("poll after destroying a source");
  for (int i = 0; i < 3; ++i) reactor.poll();
  EXPECT_EQ(victim, nullptr);
}

TEST(Reactor, WakeFromAnotherThreadEndsSleep) {
  Watchdog watchdog("wake() must end sleep(nullopt)");
  Reactor reactor;
  reactor.poll();
  std::thread waker([&]() {
    eventually([&]() { return reactor.stats().sleeps.load() > 0; });
    reactor.wake();
  });
  while (!reactor.takeWake()) {
    if (!reactor.poll()) reactor.sleep(std::nullopt);
  }
  waker.join();
  EXPECT_GE(reactor.stats().sleeps.load(), 1u);
}

TEST(Reactor, WakesCoalesceAndTakeWakeIsTrueOnce) {
  Reactor reactor;
  EXPECT_FALSE(reactor.takeWake());
  for (int i = 0; i < 100; ++i) reactor.wake();
  EXPECT_TRUE(reactor.takeWake());
  EXPECT_FALSE(reactor.takeWake());
  // The eventfd read's completion arrives and is re-armed without counting as a wake.
  reactor.poll();
  reactor.poll();
  EXPECT_FALSE(reactor.takeWake());
}

TEST(Reactor, PrepareBeyondQueueSizeSubmitsAndAllComplete) {
  struct Counter final : Completion {
    void complete(int32_t result, uint32_t) override {
      EXPECT_EQ(result, 0);
      ++count;
    }
    int count = 0;
  } counter;
  Reactor reactor(ReactorOptions{8});
  for (int i = 0; i < 100; ++i) reactor.prepare(&counter);  // nops
  Watchdog watchdog("100 nops must complete");
  while (counter.count < 100) {
    if (!reactor.poll()) reactor.sleep(1'000'000);
  }
  EXPECT_EQ(counter.count, 100);
}

// ---- Deferred task work (IORING_SETUP_DEFER_TASKRUN)

// A recv on one end of a socketpair, reporting its result.
struct RecvCompletion final : Completion {
  void complete(int32_t r, uint32_t) override {
    result = r;
    done = true;
  }
  char buffer[16] = {};
  int32_t result = 0;
  bool done = false;
};

bool kernelHasDeferTaskrun() {  // 6.1 or later
  utsname u{};
  if (uname(&u) != 0) return false;
  int major = 0, minor = 0;
  if (sscanf(u.release, "%d.%d", &major, &minor) != 2) return false;
  return major > 6 || (major == 6 && minor >= 1);
}

TEST(Reactor, DeferredTaskWorkDeliversCompletionsToPollAndSleep) {
  Watchdog watchdog("completions on a DEFER_TASKRUN ring must arrive");
  Reactor reactor(ReactorOptions{.ringEntries = 16, .deferTaskrun = true});
  if (kernelHasDeferTaskrun()) EXPECT_TRUE(reactor.deferTaskrun());
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);

  // Polling only: the data arrives while the recv is pending; the completion's task work runs
  // when poll() enters the ring (it sees IORING_SQ_TASKRUN), never on its own.
  RecvCompletion first;
  io_uring_prep_recv(&reactor.prepare(&first), fds[0], first.buffer, sizeof first.buffer, 0);
  reactor.poll();
  EXPECT_FALSE(first.done);
  ASSERT_EQ(write(fds[1], "hello", 5), 5);
  while (!first.done) reactor.poll();
  EXPECT_EQ(first.result, 5);
  EXPECT_EQ(std::string(first.buffer, 5), "hello");

  // Sleeping: another thread writes once the reactor sleeps; the sleep ends with the completion.
  RecvCompletion second;
  io_uring_prep_recv(&reactor.prepare(&second), fds[0], second.buffer, sizeof second.buffer, 0);
  reactor.poll();
  uint64_t sleeps = reactor.stats().sleeps.load();
  std::thread writer([&]() {
    eventually([&]() { return reactor.stats().sleeps.load() > sleeps; });
    EXPECT_EQ(write(fds[1], "world!", 6), 6);
  });
  while (!second.done) reactor.sleep(std::nullopt);
  writer.join();
  EXPECT_EQ(second.result, 6);
  EXPECT_EQ(std::string(second.buffer, 6), "world!");
  close(fds[0]);
  close(fds[1]);
}

TEST(Reactor, DeferTaskrunEnvironmentSwitchTurnsItOff) {
  setenv("SIDECAR_IO_URING_DEFER_TASKRUN", "0", 1);
  {
    Reactor reactor(ReactorOptions{.ringEntries = 16, .deferTaskrun = true});
    EXPECT_FALSE(reactor.deferTaskrun());
  }
  unsetenv("SIDECAR_IO_URING_DEFER_TASKRUN");
  Reactor plain;  // the default: threads other than the creator may drive it
  EXPECT_FALSE(plain.deferTaskrun());
}

// ---- EventFdSource

// ---- Flushable: output buffered during a loop run leaves before the reactor polls or sleeps

class FakeFlushable final : public Flushable {
 public:
  void flush() override {
    ++flushes;
    if (onFlush) onFlush();
  }
  int flushes = 0;
  std::function<void()> onFlush;
};

TEST(Reactor, QueuedFlushRunsOnceAtTheNextPollOrSleep) {
  Watchdog watchdog("flush");
  Reactor reactor;
  FakeFlushable a, b;
  reactor.queueFlush(a);
  reactor.queueFlush(a);  // queued twice: flushed once
  reactor.queueFlush(b);
  reactor.poll();
  EXPECT_EQ(a.flushes, 1);
  EXPECT_EQ(b.flushes, 1);
  reactor.poll();  // nothing queued: nothing flushed
  EXPECT_EQ(a.flushes, 1);
  reactor.queueFlush(a);
  reactor.sleep(uint64_t{1'000'000});  // 1 ms: flushes before it waits
  EXPECT_EQ(a.flushes, 2);
  EXPECT_EQ(b.flushes, 1);
}

TEST(Reactor, CancelledFlushDoesNotRun) {
  Watchdog watchdog("flush cancel");
  Reactor reactor;
  FakeFlushable a, b;
  reactor.queueFlush(a);
  reactor.queueFlush(b);
  reactor.cancelFlush(a);
  reactor.cancelFlush(a);  // cancelling what is not queued is harmless
  reactor.flush();
  EXPECT_EQ(a.flushes, 0);
  EXPECT_EQ(b.flushes, 1);
}

TEST(Reactor, AFlushMayQueueItselfOrCancelAnother) {
  Watchdog watchdog("flush re-entry");
  Reactor reactor;
  FakeFlushable a, b;
  // a runs first: it cancels b (b must not run in this flush) and queues itself again (it runs
  // at the next flush, not in this one, so a flush cannot loop forever).
  a.onFlush = [&] {
    reactor.cancelFlush(b);
    if (a.flushes == 1) reactor.queueFlush(a);
  };
  reactor.queueFlush(a);
  reactor.queueFlush(b);
  reactor.flush();
  EXPECT_EQ(a.flushes, 1);
  EXPECT_EQ(b.flushes, 0);
  reactor.flush();
  EXPECT_EQ(a.flushes, 2);
  EXPECT_EQ(b.flushes, 0);
}

TEST(EventFdSource, SignalFromAnotherThreadRunsHandlerOnReactorThread) {
  Watchdog watchdog("eventfd signal");
  Reactor reactor;
  std::thread::id handlerThread;
  int calls = 0;
  EventFdSource source(reactor, [&]() {
    handlerThread = std::this_thread::get_id();
    ++calls;
  });
  reactor.poll();
  std::thread signaller([&]() { source.signal(); });
  runUntil(reactor, [&]() { return calls > 0; });
  signaller.join();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(handlerThread, std::this_thread::get_id());
  EXPECT_EQ(source.handled(), 1u);
}

TEST(EventFdSource, SignalWakesASleepingReactor) {
  Watchdog watchdog("eventfd signal must wake the sleeping reactor");
  Reactor reactor;
  std::atomic<int> calls{0};
  EventFdSource source(reactor, [&]() { calls.fetch_add(1); });
  reactor.poll();
  std::thread signaller([&]() {
    // Wait until the reactor has gone to sleep at least once, then signal.
    eventually([&]() { return reactor.stats().sleeps.load() > 0; });
    source.signal();
  });
  runUntil(reactor, [&]() { return calls.load() > 0; });
  signaller.join();
  EXPECT_EQ(calls.load(), 1);
  EXPECT_GE(reactor.stats().sleeps.load(), 1u);
}

TEST(EventFdSource, SignalsBeforeTheHandlerRunsCoalesce) {
  Watchdog watchdog("eventfd coalescing");
  Reactor reactor;
  int calls = 0;
  EventFdSource source(reactor, [&]() { ++calls; });
  reactor.poll();
  for (int i = 0; i < 10; ++i) source.signal();
  runUntil(reactor, [&]() { return calls > 0; });
  // Drain: whatever arrives late must not produce more than one more call.
  for (int i = 0; i < 10; ++i) reactor.poll();
  EXPECT_EQ(calls, 1);
  // A later signal is a new event.
  source.signal();
  runUntil(reactor, [&]() { return calls > 1; });
  EXPECT_EQ(calls, 2);
}

TEST(EventFdSource, NoSignalIsLostAcrossThreads) {
  Watchdog watchdog("eventfd from many threads");
  Reactor reactor;
  std::atomic<int> sent{0};
  int calls = 0;
  int lastSeen = 0;
  EventFdSource source(reactor, [&]() {
    ++calls;
    lastSeen = sent.load();
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&]() {
      for (int i = 0; i < 1000; ++i) {
        sent.fetch_add(1);  // before signal(): a handler run caused by it sees the count
        source.signal();
      }
    });
  }
  // The last signal is followed by a handler run that sees every increment.
  runUntil(reactor, [&]() { return lastSeen == 4000; });
  for (auto& t : threads) t.join();
  EXPECT_GE(calls, 1);
  EXPECT_LE(calls, 4000);
}

// Destroying a source whose read has completed (its CQE sits in the ring, not yet dispatched)
// must not re-submit the read and spin forever waiting for it.
TEST(EventFdSource, DestroyWithCompletedReadInRingTerminates) {
  Reactor reactor;
  for (int round = 0; round < 20; ++round) {
    auto source = std::make_unique<EventFdSource>(reactor, []() {});
    reactor.poll();     // the eventfd read is now pending in the kernel
    source->signal();   // completes it; the CQE is posted on our way back from write()
    Watchdog watchdog("~EventFdSource with a completed read in the ring");
    source.reset();
  }
  // The ring is still usable afterwards.
  int calls = 0;
  EventFdSource source(reactor, [&]() { ++calls; });
  source.signal();
  Watchdog watchdog("signal after destroyed sources");
  runUntil(reactor, [&]() { return calls > 0; });
  EXPECT_EQ(calls, 1);
}

TEST(EventFdSource, DestroyWithPendingReadDoesNotLeakOrCrash) {
  Reactor reactor;
  for (int i = 0; i < 50; ++i) {
    EventFdSource source(reactor, []() {});
    reactor.poll();
  }
  EXPECT_FALSE(reactor.poll());
}

// ---- Mailbox

TEST(Mailbox, TasksRunOnOwnerThreadInPostingOrder) {
  Reactor reactor;
  Mailbox mailbox(reactor);
  std::vector<int> order;
  for (int i = 0; i < 100; ++i) mailbox.post([&order, i]() { order.push_back(i); });
  EXPECT_TRUE(reactor.poll());
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
  EXPECT_EQ(mailbox.delivered(), 100u);
}

TEST(Mailbox, ArmRefusesWhileTasksAreQueued) {
  Reactor reactor;
  Mailbox mailbox(reactor);
  EXPECT_TRUE(mailbox.arm());
  mailbox.post([]() {});
  EXPECT_FALSE(mailbox.arm());
  reactor.poll();
  EXPECT_TRUE(mailbox.arm());
  mailbox.disarm();
}

TEST(Mailbox, PostWakesASleepingReactor) {
  Watchdog watchdog("a post must wake the sleeping reactor");
  Reactor reactor;
  Mailbox mailbox(reactor);
  std::atomic<bool> ran{false};
  std::thread::id ranOn;
  std::thread reactorThread([&]() {
    runUntil(reactor, [&]() { return ran.load(); });
  });
  ASSERT_TRUE(eventually([&]() { return reactor.stats().sleeps.load() > 0; }));
  mailbox.post([&]() {
    ranOn = std::this_thread::get_id();
    ran.store(true);
  });
  std::thread::id reactorId = reactorThread.get_id();
  reactorThread.join();
  EXPECT_EQ(ranOn, reactorId);
}

TEST(Mailbox, ManyProducersKeepPerProducerOrder) {
  Watchdog watchdog("mailbox with many producers", std::chrono::seconds(60));
  constexpr int kProducers = 4;
  constexpr int kTasks = 5000;
  Reactor reactor;
  Mailbox mailbox(reactor);
  std::vector<int> next(kProducers, 0);  // touched on the reactor thread only
  int outOfOrder = 0;
  int done = 0;
  std::atomic<bool> reactorReady{false};
  std::thread reactorThread([&]() {
    reactorReady.store(true);
    runUntil(reactor, [&]() { return done == kProducers * kTasks; });
  });
  while (!reactorReady.load()) std::this_thread::yield();
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, p]() {
      for (int i = 0; i < kTasks; ++i) {
        mailbox.post([&, p, i]() {
          if (next[p] != i) ++outOfOrder;
          next[p] = i + 1;
          ++done;
        });
        // Let the reactor fall asleep now and then, so posts also hit a sleeping loop.
        if (i % 512 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  for (auto& t : producers) t.join();
  reactorThread.join();
  EXPECT_EQ(outOfOrder, 0);
  for (int p = 0; p < kProducers; ++p) EXPECT_EQ(next[p], kTasks);
  EXPECT_EQ(mailbox.delivered(), uint64_t{kProducers} * kTasks);
  EXPECT_GT(reactor.stats().sleeps.load(), 0u);
}

TEST(Mailbox, TaskPostedFromATaskRuns) {
  Watchdog watchdog("nested post");
  Reactor reactor;
  Mailbox mailbox(reactor);
  int ran = 0;
  mailbox.post([&]() {
    ++ran;
    mailbox.post([&]() { ++ran; });
  });
  runUntil(reactor, [&]() { return ran == 2; });
  EXPECT_EQ(ran, 2);
}

TEST(Mailbox, DestructorDropsQueuedTasksWithoutRunningThem) {
  Reactor reactor;
  auto token = std::make_shared<int>(0);
  bool ran = false;
  {
    Mailbox mailbox(reactor);
    for (int i = 0; i < 10; ++i) mailbox.post([token, &ran]() { ran = true; });
    EXPECT_EQ(token.use_count(), 11);
  }
  EXPECT_FALSE(ran);
  EXPECT_EQ(token.use_count(), 1);  // the captured copies were destroyed
  reactor.poll();
}

}  // namespace
}  // namespace sidecar::reactor
