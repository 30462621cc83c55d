// base::LogLimiter: a bounded number of lines per window, the rest counted and reported by the
// next line that passes.
#include "base/log_limiter.h"

#include <gtest/gtest.h>

namespace {

using sidecar::base::LogLimiter;
constexpr uint64_t kSecond = 1'000'000'000;

TEST(LogLimiter, PassesUpToTheBudgetThenCountsTheRest) {
  LogLimiter limiter(3, kSecond);
  uint64_t suppressed = 99;
  uint64_t t = 5 * kSecond;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(limiter.allow(t + i, suppressed)) << i;
    EXPECT_EQ(suppressed, 0u);
  }
  for (int i = 0; i < 10; ++i) EXPECT_FALSE(limiter.allow(t + 100 + i, suppressed)) << i;
  // Still the same window: nothing passes.
  EXPECT_FALSE(limiter.allow(t + kSecond - 1, suppressed));
  // The next window's first line carries the count of those left out (11).
  suppressed = 0;
  EXPECT_TRUE(limiter.allow(t + kSecond, suppressed));
  EXPECT_EQ(suppressed, 11u);
  // ... once: the next one reports none.
  EXPECT_TRUE(limiter.allow(t + kSecond + 1, suppressed));
  EXPECT_EQ(suppressed, 0u);
}

TEST(LogLimiter, AQuietSpellStartsAFreshWindow) {
  LogLimiter limiter(1, kSecond);
  uint64_t suppressed = 0;
  EXPECT_TRUE(limiter.allow(0, suppressed));  // a clock that starts at 0 counts too
  EXPECT_FALSE(limiter.allow(1, suppressed));
  EXPECT_TRUE(limiter.allow(10 * kSecond, suppressed));
  EXPECT_EQ(suppressed, 1u);
  EXPECT_FALSE(limiter.allow(10 * kSecond + 5, suppressed));
}

TEST(LogLimiter, ZeroBudgetPassesNothing) {
  LogLimiter limiter(0, kSecond);
  uint64_t suppressed = 0;
  for (uint64_t t = 0; t < 5 * kSecond; t += kSecond / 2) EXPECT_FALSE(limiter.allow(t, suppressed));
}

}  // namespace
