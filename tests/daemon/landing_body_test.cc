// LandingBody: which prefix of a body that a GPU copy writes piece by piece is final, pieces
// landing out of order (several copy streams), and a failed copy.

#include "daemon/landing_body.h"

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>

#include <memory>

namespace sidecar::daemon {
namespace {

class LandingBodyTest : public ::testing::Test {
 protected:
  // Outcome of landed(n): unset while pending, "" once resolved, else the error.
  std::shared_ptr<std::optional<std::string>> watch(LandingBody& body, uint64_t n) {
    auto out = std::make_shared<std::optional<std::string>>();
    tasks_->add(body.landed(n).then([out]() { *out = ""; },
                                    [out](kj::Exception&& e) { *out = e.getDescription().cStr(); }));
    ws_->poll();
    return out;
  }
  struct NoErrors : kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override { ADD_FAILURE() << e.getDescription().cStr(); }
  };
  // Held by pointer: kj destructors may throw, a gtest fixture's may not.
  std::unique_ptr<kj::EventLoop> loop_ = std::make_unique<kj::EventLoop>();
  std::unique_ptr<kj::WaitScope> ws_ = std::make_unique<kj::WaitScope>(*loop_);
  NoErrors noErrors_;
  std::unique_ptr<kj::TaskSet> tasks_ = std::make_unique<kj::TaskSet>(noErrors_);

 public:
  ~LandingBodyTest() noexcept override {
    tasks_.reset();
    ws_.reset();
    loop_.reset();
  }
};

TEST_F(LandingBodyTest, APieceOutOfOrderCountsOnlyOnceThePrefixReachesIt) {
  LandingBody body(100);
  auto first = watch(body, 40);
  auto all = watch(body, 100);
  body.piece(40, 40);  // [40, 80) before [0, 40): not a prefix yet
  ws_->poll();
  EXPECT_EQ(body.prefixBytes(), 0u);
  EXPECT_FALSE(first->has_value());
  body.piece(0, 40);
  ws_->poll();
  EXPECT_EQ(body.prefixBytes(), 80u);
  EXPECT_EQ(*first, "");
  EXPECT_EQ(body.releasedEarly(), 1u) << "released before the body was whole";
  EXPECT_FALSE(all->has_value());
  body.piece(80, 20);
  ws_->poll();
  EXPECT_EQ(*all, "");
  EXPECT_EQ(body.releasedEarly(), 1u) << "the last one waited for the whole body";
  EXPECT_EQ(body.waiting(), 0u);
}

TEST_F(LandingBodyTest, WhatHasLandedResolvesAtOnceAndFinishResolvesEverything) {
  LandingBody body(64);
  body.piece(0, 16);
  EXPECT_EQ(*watch(body, 16), "");
  EXPECT_EQ(*watch(body, 0), "");
  auto rest = watch(body, 64);
  auto beyond = watch(body, 1000);  // asks past the end: the whole body
  body.finish();
  ws_->poll();
  EXPECT_EQ(*rest, "");
  EXPECT_EQ(*beyond, "");
}

TEST_F(LandingBodyTest, AFailedCopyRejectsWaitersAndLaterAsks) {
  LandingBody body(64);
  body.piece(0, 32);
  auto waiting = watch(body, 64);
  body.fail(KJ_EXCEPTION(FAILED, "[gpu-copy-failed] the producer went away"));
  ws_->poll();
  ASSERT_TRUE(waiting->has_value());
  EXPECT_NE(waiting->value().find("gpu-copy-failed"), std::string::npos);
  auto later = watch(body, 16);  // even a landed prefix: the body will never be whole
  ASSERT_TRUE(later->has_value());
  EXPECT_NE(later->value().find("gpu-copy-failed"), std::string::npos);
  body.piece(32, 32);  // ignored after the failure
  EXPECT_EQ(body.prefixBytes(), 32u);
}

TEST_F(LandingBodyTest, AnEmptyBodyHasLandedFromTheStart) {
  LandingBody body(0);
  EXPECT_EQ(*watch(body, 0), "");
}

}  // namespace
}  // namespace sidecar::daemon
