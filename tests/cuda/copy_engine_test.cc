// The copy engine's contract where it cannot copy (no CUDA in the build, or no GPU/driver): it
// says so with a reason, every copy fails at once through onDone, and sessions end at once. With
// a GPU the engine is exercised end to end by tests/gpu (through a real sidecard: CUDA IPC needs
// two processes).

#include <gtest/gtest.h>

#include <vector>

#include "cuda/copy_engine.h"
#include "reactor/reactor.h"

namespace sidecar::cuda {
namespace {

TEST(CopyEngineWithoutGpu, ReportsUnavailableAndFailsCopiesClearly) {
  reactor::Reactor reactor;
  std::vector<std::byte> arena(1 << 20);
  auto engine = CopyEngine::create(reactor, arena.data(), arena.size());
  ASSERT_NE(engine, nullptr);
  if (engine->available()) GTEST_SKIP() << "a GPU is present: tests/gpu covers the engine here";
  EXPECT_FALSE(engine->unavailableReason().empty());
  EXPECT_EQ(engine->deviceCount(), 0);

  std::string error = "not called";
  int pieces = 0;
  CopyCallbacks callbacks;
  callbacks.onPiece = [&](uint64_t, uint64_t) { ++pieces; };
  callbacks.onDone = [&](const std::string& e) { error = e; };
  engine->copyToArena(1, DeviceSource{}, 4096, 0, std::move(callbacks));
  EXPECT_EQ(error, engine->unavailableReason());
  EXPECT_EQ(pieces, 0);

  bool idle = false;
  engine->dropSession(1, [&] { idle = true; });
  EXPECT_TRUE(idle);
  EXPECT_EQ(engine->stats().copies, 0u);
}

}  // namespace
}  // namespace sidecar::cuda
