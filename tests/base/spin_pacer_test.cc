// SpinPacer: a spinner yields the CPU while another thread wants it, and otherwise only pauses.
// The pacer reads the clock right after each yield (and never otherwise), so a fake clock both
// tells it how long the yield took and counts the yields.

#include "base/spin_pacer.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>

namespace sidecar {
namespace {

struct FakeClock {
  uint64_t nextNs = 0;  // what the read after a yield returns
  int reads = 0;        // = yields
  uint64_t operator()() {
    ++reads;
    return nextNs;
  }
};

TEST(SpinPacer, AloneItPausesBetweenRareYields) {
  SpinPacer pacer;
  FakeClock clock;
  clock.nextNs = 1'000 + 500;  // the first yield comes back at once: nobody else wanted the CPU
  pacer.pause(1'000, std::ref(clock));
  EXPECT_EQ(clock.reads, 1);
  for (uint64_t t = 2'000; t < 1'500 + SpinPacer::kAloneYieldEveryNs; t += 1'000) {
    pacer.pause(t, std::ref(clock));
  }
  EXPECT_EQ(clock.reads, 1) << "no yield within the alone window";
  uint64_t due = 1'500 + SpinPacer::kAloneYieldEveryNs;
  clock.nextNs = due + 300;
  pacer.pause(due, std::ref(clock));
  EXPECT_EQ(clock.reads, 2) << "asks again once the window passed";
}

TEST(SpinPacer, SharingTheCpuItYieldsEveryTime) {
  SpinPacer pacer;
  FakeClock clock;
  uint64_t t = 5'000;
  for (int i = 1; i <= 5; ++i) {
    clock.nextNs = t + SpinPacer::kYieldRanOtherNs + 1'000;  // another thread ran meanwhile
    pacer.pause(t, std::ref(clock));
    EXPECT_EQ(clock.reads, i);
    t = clock.nextNs + 100;
  }
}

TEST(SpinPacer, ABusyCpuAfterAQuietOneIsNoticedAtTheNextYield) {
  SpinPacer pacer;
  FakeClock clock;
  clock.nextNs = 600;  // alone
  pacer.pause(0, std::ref(clock));
  uint64_t due = 600 + SpinPacer::kAloneYieldEveryNs;
  clock.nextNs = due + 50'000;  // a client got the CPU for 50 us
  pacer.pause(due, std::ref(clock));
  EXPECT_EQ(clock.reads, 2);
  clock.nextNs = due + 50'100 + 200;  // and yields back at once now
  pacer.pause(due + 50'100, std::ref(clock));
  EXPECT_EQ(clock.reads, 3) << "after a slow yield the very next poll yields again";
}

}  // namespace
}  // namespace sidecar
