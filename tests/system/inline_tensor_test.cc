// Small tensors sent inline (schema InlineTensor): the client puts the bytes of a tensor up to the
// daemon's limit (register's inlineTensorMaxBytes, 32 KiB) in the send call, and the daemon
// allocates and copies. Against the real sidecard ($SIDECARD):
// - through the Sidecar API, tensors just under, at and just over the limit (the last takes the
//   allocate path) and a strided one arrive byte for byte with their dtype and shape;
// - with the arena full, an inline send returns at once and waits in the daemon: it completes
//   when space comes within the send timeout, and its handle fails with kArenaFull when not;
// - a raw client (Cap'n Proto, no libsidecar) that sends what libsidecar never would, an inline
//   tensor over the limit or one whose bytes do not match its shape, gets typed errors, and the
//   daemon keeps no allocation for them; a correct inline send on the same session still works.

#include <capnp/ez-rpc.h>
#include <gtest/gtest.h>
#include <sidecar/sidecar.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "local_daemon.h"
#include "kj_errors.h"
#include "sidecar.capnp.h"

namespace {

using namespace sidecar::systest;
using namespace std::chrono_literals;
namespace proto = sidecar::proto;
using sidecar::ArenaTensor;
using sidecar::Dtype;
using sidecar::Error;
using sidecar::ErrorCode;
using sidecar::RankConfig;
using sidecar::Received;
using sidecar::Sidecar;
using sidecar::TensorRef;

constexpr uint32_t kRecvTimeoutMs = 30'000;
constexpr uint64_t kInlineLimit = 32 * 1024;  // rpc::kInlineTensorMaxBytes

class InlineTensorTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(daemon_.start("inline-tensor")); }

  RankConfig config(int32_t rank) { return daemon_.rankConfig(rank, {Dtype::kFloat32, {256}}); }

  Watchdog watchdog_{"inline tensor test", std::chrono::seconds(60)};
  LocalDaemon daemon_;
};

// Bytes that differ for every position and every case, so a misplaced or stale byte shows.
std::vector<unsigned char> pattern(size_t n, unsigned seed) {
  std::vector<unsigned char> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<unsigned char>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
  return out;
}

TEST_F(InlineTensorTest, SizesAroundTheLimitArriveIntact) {
  Sidecar sender = Sidecar::connect(config(0));
  Sidecar receiver = Sidecar::connect(config(1));
  struct Case {
    std::string name;
    std::vector<int64_t> shape;  // float32
  };
  // 4 bytes per element: 4 KiB, one element under the limit, the limit, one element over it.
  std::vector<Case> cases = {
      {"4KiB", {4, 256}},
      {"under", {static_cast<int64_t>(kInlineLimit / 4 - 1)}},
      {"limit", {32, 256}},
      {"over", {static_cast<int64_t>(kInlineLimit / 4 + 1)}},
      {"empty", {0, 256}},
  };
  unsigned seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    size_t bytes = 4;
    for (int64_t d : c.shape) bytes *= static_cast<size_t>(d);
    std::vector<unsigned char> data = pattern(bytes, seed++);
    TensorRef t{Dtype::kFloat32, c.shape, {}, data.data()};
    sender.send("inline-" + c.name, t, {{1}}).wait();
    Received r = receiver.recv("inline-" + c.name, 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kTensor);
    EXPECT_EQ(r.tensor.dtype, Dtype::kFloat32);
    EXPECT_EQ(r.tensor.shape, c.shape);
    ASSERT_EQ(r.tensor.sizeBytes, bytes);
    if (bytes > 0) EXPECT_EQ(memcmp(r.tensor.data, data.data(), bytes), 0);
    receiver.markDone("inline-" + c.name, 0);
  }

  // Strided: the transpose of a 64 x 32 int16 matrix (4 KiB), sent as shape (32, 64) with strides
  // (1, 32); it must arrive as the contiguous transpose.
  std::vector<int16_t> matrix(64 * 32);
  for (size_t i = 0; i < matrix.size(); ++i) matrix[i] = static_cast<int16_t>(i * 3 + 1);
  TensorRef transposed{Dtype::kInt16, {32, 64}, {1, 32}, matrix.data()};
  sender.send("inline-strided", transposed, {{1}}).wait();
  Received r = receiver.recv("inline-strided", 0, kRecvTimeoutMs);
  ASSERT_EQ(r.kind, Received::Kind::kTensor);
  ASSERT_EQ(r.tensor.sizeBytes, matrix.size() * 2);
  const auto* got = static_cast<const int16_t*>(r.tensor.data);
  for (size_t row = 0; row < 32; ++row) {
    for (size_t col = 0; col < 64; ++col) {
      ASSERT_EQ(got[row * 64 + col], matrix[col * 32 + row]) << "at (" << row << ", " << col << ")";
    }
  }
  receiver.markDone("inline-strided", 0);
}

class InlineBackpressureTest : public InlineTensorTest {
 protected:
  // A short send timeout, so that a send that finds no space fails quickly (long enough that the
  // release below, queued right behind the waiting send on the same connection, comes in time).
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(daemon_.start("inline-full", "64MiB", {"--send-timeout-ms", "1000"}));
  }
};

TEST_F(InlineBackpressureTest, InlineSendWaitsForSpaceThenFailsWithArenaFull) {
  Sidecar sender = Sidecar::connect(config(0));
  Sidecar receiver = Sidecar::connect(config(1));
  // Fill the arena: allocations of shrinking size until not even one 1 KiB row fits.
  std::vector<ArenaTensor> held;
  for (int64_t rows : {16384, 1024, 64, 1}) {
    for (;;) {
      ASSERT_LT(held.size(), 200'000u) << "the arena never filled";
      try {
        held.push_back(sender.allocateTensor(Dtype::kFloat32, {rows, 256}));
      } catch (const Error& e) {
        ASSERT_EQ(e.code(), ErrorCode::kArenaFull) << e.what();
        break;
      }
    }
  }
  ASSERT_FALSE(held.empty());
  std::vector<unsigned char> data = pattern(4096, 3);
  TensorRef t{Dtype::kFloat32, {4, 256}, {}, data.data()};

  // No space and none coming: the handle fails after the daemon's send timeout.
  auto failed = sender.send("full", t, {{1}});
  try {
    failed.wait();
    ADD_FAILURE() << "an inline send into a full arena succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kArenaFull) << e.what();
  }

  // Space freed while the send waits (the daemon reads the send, finds no space and waits, before
  // it reads the release behind it on the same connection): it completes, bytes intact.
  auto waiting = sender.send("waits", t, {{1}});
  sender.release(std::move(held.back()));
  held.pop_back();
  waiting.wait();
  Received r = receiver.recv("waits", 0, kRecvTimeoutMs);
  ASSERT_EQ(r.kind, Received::Kind::kTensor);
  ASSERT_EQ(r.tensor.sizeBytes, data.size());
  EXPECT_EQ(memcmp(r.tensor.data, data.data(), data.size()), 0);
  receiver.markDone("waits", 0);
  // Nothing of the failed send was stored.
  EXPECT_THROW(receiver.recv("full", 0, 200), Error);
  for (ArenaTensor& tensor : held) sender.release(std::move(tensor));
}

TEST_F(InlineTensorTest, BadInlineTensorsGetTypedErrorsAndLeakNothing) {
  std::vector<unsigned char> good = pattern(4096, 9);
  {
    capnp::EzRpcClient client("unix:" + daemon_.socket());
    auto& ws = client.getWaitScope();
    auto sidecar = client.getMain<proto::Sidecar>();
    auto reg = sidecar.registerRequest();
    auto r = reg.initRegistration();
    r.setRank(0);
    r.initGroup(1).set(0, 0);
    r.initSendHint().setDtype(proto::Dtype::FLOAT32);
    r.getSendHint().initRowShape(1).set(0, 256);
    r.initRecvHint().setDtype(proto::Dtype::FLOAT32);
    r.getRecvHint().initRowShape(1).set(0, 256);
    auto registered = reg.send().wait(ws);
    EXPECT_EQ(registered.getInlineTensorMaxBytes(), kInlineLimit);
    auto session = registered.getSession();

    auto inlineSend = [&](const std::string& id, std::vector<int64_t> shape, size_t bytes,
                          const unsigned char* data) {
      auto send = session.sendRequest();
      send.setDataId(id);
      send.setChunkId(0);
      send.setNumChunks(1);
      send.initDestinations(1)[0].initRanks(1).set(0, 1);
      auto t = send.initPayload().initInlineTensor();
      t.setDtype(proto::Dtype::FLOAT32);
      auto s = t.initShape(static_cast<unsigned>(shape.size()));
      for (unsigned i = 0; i < shape.size(); ++i) s.set(i, shape[i]);
      auto b = t.initBytes(static_cast<unsigned>(bytes));
      if (data != nullptr) memcpy(b.begin(), data, bytes);
      send.send().wait(ws);
    };

    std::string tooLarge = errorOf([&] { inlineSend("over-limit", {8193}, kInlineLimit + 4, nullptr); });
    EXPECT_NE(tooLarge.find("[too-large]"), std::string::npos) << tooLarge;
    EXPECT_NE(tooLarge.find("allocate"), std::string::npos) << tooLarge;

    std::string mismatch = errorOf([&] { inlineSend("mismatch", {100}, 4096, good.data()); });
    EXPECT_NE(mismatch.find("[invalid-argument]"), std::string::npos) << mismatch;
    EXPECT_NE(mismatch.find("400 bytes"), std::string::npos) << mismatch;

    // The session still works, and the failed sends left no allocation behind.
    inlineSend("good", {1024}, good.size(), good.data());
    auto summary = sidecar.transfersRequest().send().wait(ws).getSummary();
    bool found = false;
    for (auto rank : summary.getRanks()) {
      if (rank.getRank() != 0) continue;
      found = true;
      EXPECT_EQ(rank.getBytesAllocated(), 0u);
    }
    EXPECT_TRUE(found) << "rank 0 is not in the daemon's summary";
    EXPECT_EQ(summary.getChunks(), 1u);
  }
  // The good chunk, through libsidecar (after the raw client's event loop is gone).
  Sidecar receiver = Sidecar::connect(config(1));
  Received r = receiver.recv("good", 0, kRecvTimeoutMs);
  ASSERT_EQ(r.kind, Received::Kind::kTensor);
  ASSERT_EQ(r.tensor.sizeBytes, good.size());
  EXPECT_EQ(memcmp(r.tensor.data, good.data(), good.size()), 0);
  receiver.markDone("good", 0);
}

}  // namespace
