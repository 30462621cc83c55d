// RankConfig::waitSpinUs: every wait of a connection polls for its answer for a bounded time
// before it sleeps (src/client/spin_wait.h). Against the real sidecard ($SIDECARD): answers that
// come within the window and after it (the sleep that follows) both arrive, errors still reach the
// caller, and an out-of-range setting is refused at connect with a typed error. How much the spin
// saves is measured in bench/transfer_bench, not here.

#include <gtest/gtest.h>
#include <sidecar/error.h>
#include <sidecar/sidecar.h>
#include <stdlib.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>

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

class WaitSpinTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(daemon_.start("wait-spin")); }

  void TearDown() override { unsetenv("SIDECAR_WAIT_SPIN_US"); }

  RankConfig config(int32_t rank, std::optional<uint32_t> waitSpinUs) {
    RankConfig c = daemon_.rankConfig(rank);
    c.waitSpinUs = waitSpinUs;
    return c;
  }

  // Connecting with `rank`'s config must fail with kInvalidArgument naming `mentions`.
  void expectRefused(const RankConfig& c, const std::string& mentions) {
    try {
      Sidecar::connect(c);
      ADD_FAILURE() << "connected with a bad wait spin (" << mentions << ")";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
    }
  }

  Watchdog watchdog_{"wait spin test", std::chrono::seconds(60)};
  LocalDaemon daemon_;
};

TEST_F(WaitSpinTest, ASpinOverTheLimitIsRefusedAtConnect) {
  expectRefused(config(1, 10'001), "waitSpinUs 10001");
  Sidecar atLimit = Sidecar::connect(config(1, 10'000));
  EXPECT_EQ(atLimit.rank(), 1);
}

TEST_F(WaitSpinTest, ABadEnvironmentValueIsRefusedUnlessTheConfigSetsTheSpin) {
  for (const char* bad : {"abc", "-5", "20000", "12us"}) {
    setenv("SIDECAR_WAIT_SPIN_US", bad, 1);
    expectRefused(config(2, std::nullopt), std::string("SIDECAR_WAIT_SPIN_US='") + bad + "'");
  }
  {
    Sidecar configured = Sidecar::connect(config(2, 0));  // the config wins over the environment
  }
  setenv("SIDECAR_WAIT_SPIN_US", "0", 1);
  Sidecar fromEnv = Sidecar::connect(config(2, std::nullopt));
  EXPECT_EQ(fromEnv.rank(), 2);
}

// The receiver's recv is posted before the data exists; the sender sends 100 ms later, after
// any spin window (at most 10 ms) has passed, so the receiver must have gone to sleep and be
// woken by the answer. Then the data of a second id is sent first, so its recv is answered while
// the receiver polls (or sleeps: either way the bytes must be right).
TEST_F(WaitSpinTest, AnswersArriveAfterTheSpinWindowAndWithinIt) {
  for (uint32_t spinUs : {0u, 1u, 10'000u}) {
    SCOPED_TRACE("waitSpinUs " + std::to_string(spinUs));
    Sidecar receiver = Sidecar::connect(config(4, spinUs));
    std::string late = "late-" + std::to_string(spinUs), early = "early-" + std::to_string(spinUs);
    auto handle = receiver.recvAsync(late);
    std::thread sender([&] {
      Sidecar sc = Sidecar::connect(config(3, spinUs));
      std::this_thread::sleep_for(100ms);
      sc.send(late, Object{1, "after the window"}, {{4}}).wait();
      sc.send(early, Object{2, "before the recv"}, {{4}}).wait();
    });
    Received got = handle.wait();
    sender.join();
    ASSERT_EQ(got.kind, Received::Kind::kObject);
    EXPECT_EQ(got.object.bytes, "after the window");
    Received second = receiver.recv(early);
    ASSERT_EQ(second.kind, Received::Kind::kObject);
    EXPECT_EQ(second.object.bytes, "before the recv");
    receiver.markDone(late);
    receiver.markDone(early);
  }
}

TEST_F(WaitSpinTest, ErrorsReachTheCallerWhileItSpins) {
  Sidecar sc = Sidecar::connect(config(5, 10'000));
  try {
    sc.recv("never", 0, /*timeoutMs=*/5);  // answered with kTimeout, likely inside the window
    ADD_FAILURE() << "recv of data never sent returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
  }
  try {
    sc.markDone("never");
    ADD_FAILURE() << "markDone of data never received succeeded";
  } catch (const Error& e) {
    EXPECT_NE(e.code(), ErrorCode::kInternal) << e.what();
  }
}

}  // namespace
