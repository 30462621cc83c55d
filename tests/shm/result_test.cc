// Result<T>: a value or a ShmError kept out of line (null pointer on success).
#include "shm/result.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace sidecar::shm {
namespace {

Result<int> fails() { return ShmError{ShmErrc::TooLarge, "too large: 3 GiB"}; }

TEST(ShmResult, ValueAndErrorAccessors) {
  Result<int> ok = 7;
  EXPECT_TRUE(ok.ok());
  EXPECT_TRUE(static_cast<bool>(ok));
  EXPECT_EQ(ok.value(), 7);
  EXPECT_EQ(*ok, 7);
  // error() of a success is ArenaFull with no message, as Result<void> always gave.
  EXPECT_EQ(ok.code(), ShmErrc::ArenaFull);
  EXPECT_TRUE(ok.error().message.empty());

  Result<int> bad = fails();
  EXPECT_FALSE(bad.ok());
  EXPECT_FALSE(static_cast<bool>(bad));
  EXPECT_EQ(bad.code(), ShmErrc::TooLarge);
  EXPECT_EQ(bad.error().message, "too large: 3 GiB");

  struct Pair {
    int a, b;
  };
  Result<Pair> p = Pair{1, 2};
  EXPECT_EQ(p->b, 2);
  const Result<Pair>& cp = p;
  EXPECT_EQ(cp->a, 1);
  EXPECT_EQ((*cp).b, 2);
}

TEST(ShmResult, CopiesAndMovesKeepTheError) {
  Result<std::string> bad = ShmError{ShmErrc::InvalidFree, "double free?"};
  Result<std::string> copy = bad;
  EXPECT_EQ(copy.code(), ShmErrc::InvalidFree);
  EXPECT_EQ(copy.error().message, "double free?");
  EXPECT_EQ(bad.error().message, "double free?");
  Result<std::string> moved = std::move(bad);
  EXPECT_EQ(moved.code(), ShmErrc::InvalidFree);
  EXPECT_EQ(moved.error().message, "double free?");
  EXPECT_FALSE(bad.ok()) << "a moved-from failure stays a failure";  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(bad.code(), ShmErrc::InvalidFree);

  Result<std::string> good = std::string(100, 'x');  // not in the SSO buffer
  copy = good;
  ASSERT_TRUE(copy.ok());
  EXPECT_EQ(*copy, std::string(100, 'x'));
  good = moved;  // value -> error
  EXPECT_EQ(good.code(), ShmErrc::InvalidFree);
  good = std::move(copy);  // error -> value
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(good.value(), std::string(100, 'x'));
  good = good;  // NOLINT: self-assignment keeps the value
  EXPECT_EQ(good.value(), std::string(100, 'x'));
}

TEST(ShmResult, MoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 5);
  Result<std::unique_ptr<int>> e = ShmError{ShmErrc::BadSize, "bad"};
  Result<std::unique_ptr<int>> e2 = std::move(e);
  EXPECT_EQ(e2.code(), ShmErrc::BadSize);
  e2 = std::make_unique<int>(6);
  ASSERT_TRUE(e2.ok());
  EXPECT_EQ(**e2, 6);
  std::vector<Result<std::unique_ptr<int>>> v;
  for (int i = 0; i < 20; ++i) {
    if (i % 2) {
      v.emplace_back(std::make_unique<int>(i));
    } else {
      v.emplace_back(ShmError{ShmErrc::ArenaFull, "full " + std::to_string(i)});
    }
  }
  for (int i = 0; i < 20; ++i) {
    if (i % 2) {
      EXPECT_EQ(*v[i].value(), i);
    } else {
      EXPECT_EQ(v[i].error().message, "full " + std::to_string(i));
    }
  }
}

TEST(ShmResult, VoidResults) {
  Result<void> ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.code(), ShmErrc::ArenaFull);
  EXPECT_TRUE(ok.error().message.empty());
  Result<void> bad = ShmError{ShmErrc::InvalidFree, "not an allocation"};
  EXPECT_FALSE(bad.ok());
  Result<void> copy = bad;
  EXPECT_EQ(copy.error().message, "not an allocation");
  ok = copy;
  EXPECT_EQ(ok.code(), ShmErrc::InvalidFree);
  copy = Result<void>();
  EXPECT_TRUE(copy.ok());
  Result<void> moved = std::move(bad);
  EXPECT_EQ(moved.error().message, "not an allocation");
}

}  // namespace
}  // namespace sidecar::shm
