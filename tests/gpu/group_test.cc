// Sender groups of device tensors (issue 6, item 3) against the real sidecard: every member of a
// group sends its replica from its own device buffer (all on device 0: one GPU is enough).
//
// With concurrent copy on, each member's buffer holds the true bytes ONLY in its own slice and
// filler elsewhere, so the received tensor is right only if every member copied exactly its slice
// (the split rule is restated here, independently of the daemon's groupSlice). With it off, the
// replicas are whole and one of them arrives. Then: a member that never sends, and a member that
// goes away while its slice still waits for its kernel, fail the group without leaking the
// shared allocation.

#include <barrier>
#include <mutex>

#include "gpu_fixture.h"

#ifdef SIDECAR_TEST_KERNELS
#include "kernels.h"
#endif

namespace sidecar::systest {
namespace {

#if SIDECAR_HAVE_CUDA

// Member `position`'s slice of `elements` elements over `members`: [first, first + count).
std::pair<size_t, size_t> sliceElements(size_t elements, size_t members, size_t position) {
  size_t base = elements / members, extra = elements % members;
  size_t first = position * base + std::min(position, extra);
  return {first, base + (position < extra ? 1 : 0)};
}

struct GroupCase {
  const char* name;
  uint32_t members;
  Dtype dtype;
  std::vector<int64_t> shape;
  bool concurrent;
};

class GpuGroup : public GpuTest, public ::testing::WithParamInterface<GroupCase> {};

TEST_P(GpuGroup, EveryMemberSendsItsReplicaAndTheReceiverGetsTheTensorOnce) {
  SKIP_WITHOUT_GPU();
  const GroupCase& c = GetParam();
  ASSERT_NO_FATAL_FAILURE(startDaemon("1GiB"));
  std::vector<int32_t> group;
  for (uint32_t i = 0; i < c.members; ++i) group.push_back(static_cast<int32_t>(i));
  const int32_t receiver = 10;
  size_t elementBytes = dtypeBytes(c.dtype);
  size_t elements = 1;
  for (int64_t d : c.shape) elements *= static_cast<size_t>(d);
  const size_t bytes = elements * elementBytes;
  const uint32_t rounds = 3;
  auto idOf = [&](uint32_t r) { return std::string(c.name) + "-" + std::to_string(r); };
  uint64_t usedBefore = arenaUsedBytes();

  std::mutex failuresMutex;
  std::vector<std::string> failures;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(failuresMutex);
    failures.push_back(what);
  };
  std::barrier ready(static_cast<std::ptrdiff_t>(c.members));
  std::vector<std::thread> threads;
  for (uint32_t position = 0; position < c.members; ++position) {
    threads.emplace_back([&, position] {
      try {
        cudaSetDevice(0);
        auto sidecar = Sidecar::connect(config(group[position], group, c.dtype, {1}, c.concurrent));
        // At least 2 MiB: a smaller cudaMalloc is staged by the client as a host send of the whole
        // replica (cuda::ExportedTensor::stage), where concurrent copy does not apply.
        DeviceBuffer buffer(std::max<size_t>(bytes, 4 << 20));
        if (buffer.ptr == nullptr) return fail("cudaMalloc failed");
        for (uint32_t r = 0; r < rounds; ++r) {
          std::vector<uint8_t> replica = chunkBytes(idOf(r), 0, bytes);
          if (c.concurrent) {
            // Only this member's slice is true: the rest must come from the other members.
            auto [first, count] = sliceElements(elements, c.members, position);
            for (size_t i = 0; i < bytes; ++i) {
              size_t element = i / elementBytes;
              if (element < first || element >= first + count) replica[i] = 0xEE;
            }
          }
          cudaMemcpy(buffer.ptr, replica.data(), bytes, cudaMemcpyHostToDevice);
          ready.arrive_and_wait();  // the members send together
          sidecar.send(idOf(r), DeviceTensorRef{c.dtype, c.shape, {}, buffer.ptr, 0, nullptr},
                       {{receiver}})
              .wait();
        }
      } catch (const std::exception& e) {
        fail("member " + std::to_string(position) + ": " + e.what());
      }
    });
  }
  threads.emplace_back([&] {
    try {
      cudaSetDevice(0);
      auto sidecar = Sidecar::connect(config(receiver, {receiver}, c.dtype, {1}));
      for (uint32_t r = 0; r < rounds; ++r) {
        auto expected = chunkBytes(idOf(r), 0, bytes);
        auto got = sidecar.recv(idOf(r), 0, 30'000);
        if (got.kind != Received::Kind::kTensor || got.tensor.sizeBytes != bytes ||
            got.tensor.shape != c.shape) {
          fail(idOf(r) + ": not the tensor sent");
        } else if (bytes > 0 && memcmp(got.tensor.data, expected.data(), bytes) != 0) {
          size_t at = 0;
          auto* data = static_cast<const uint8_t*>(got.tensor.data);
          while (data[at] == expected[at]) ++at;
          fail(idOf(r) + ": bytes differ first at byte " + std::to_string(at) + " of " +
               std::to_string(bytes) + " (element " + std::to_string(at / elementBytes) + ")");
        }
        sidecar.markDone(idOf(r));
        if (sidecar.recv(idOf(r), 1, 5'000).kind != Received::Kind::kEndOfStream) {
          fail(idOf(r) + ": no end of stream");
        }
      }
    } catch (const std::exception& e) {
      fail(std::string("receiver: ") + e.what());
    }
  });
  for (auto& t : threads) t.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
  // Every round was consumed: nothing of the group's copies is left in the arena.
  EXPECT_EQ(arenaUsedBytes(), usedBefore);
}

INSTANTIATE_TEST_SUITE_P(
    Groups, GpuGroup,
    ::testing::Values(
        GroupCase{"two_even", 2, Dtype::kFloat32, {1024, 1024}, true},
        GroupCase{"two_uneven", 2, Dtype::kBFloat16, {7, 333}, true},
        GroupCase{"four_uneven_pieces", 4, Dtype::kFloat32, {(40 << 20) / 4 + 3}, true},
        GroupCase{"four_smaller_than_group", 4, Dtype::kFloat64, {2}, true},
        GroupCase{"four_one_element", 4, Dtype::kBFloat16, {1, 1}, true},
        GroupCase{"three_odd_bytes", 3, Dtype::kUint8, {1000003}, true},
        GroupCase{"four_uneven_off", 4, Dtype::kBFloat16, {7, 333}, false},
        GroupCase{"two_pieces_off", 2, Dtype::kFloat32, {(40 << 20) / 4 + 3}, false}),
    [](const ::testing::TestParamInfo<GroupCase>& info) { return std::string(info.param.name); });

// Waits until the arena is back to `bytes` in use (copies and releases finish asynchronously).
::testing::AssertionResult arenaReturnsTo(GpuTest& test, uint64_t bytes,
                                         const std::function<uint64_t()>& used) {
  auto deadline = Clock::now() + 10s;
  uint64_t now = used();
  while (now != bytes && Clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
    now = used();
  }
  if (now == bytes) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "the arena still has " << now << " bytes in use, not "
                                       << bytes << ": the shared allocation leaked";
}

TEST_F(GpuTest, GroupMemberThatNeverSendsTimesOutWithoutLeaking) {
  SKIP_WITHOUT_GPU();
  // The gather waits the send timeout for the missing member.
  ASSERT_NO_FATAL_FAILURE(startDaemon("256MiB", {"--send-timeout-ms", "1500"}));
  auto member0 = Sidecar::connect(config(0, {0, 1}, Dtype::kFloat32, {1024}, true));
  auto member1 = Sidecar::connect(config(1, {0, 1}, Dtype::kFloat32, {1024}, true));
  auto receiver = Sidecar::connect(config(2, {2}, Dtype::kFloat32, {1024}));
  uint64_t usedBefore = arenaUsedBytes();
  const size_t bytes = 8 << 20;
  auto replica = chunkBytes("lonely", 0, bytes);
  DeviceBuffer buffer0(bytes), buffer1(bytes);
  CUDA_OK(cudaMemcpy(buffer0.ptr, replica.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(buffer1.ptr, replica.data(), bytes, cudaMemcpyHostToDevice));
  DeviceTensorRef ref0{Dtype::kFloat32, {int64_t(bytes / 4096), 1024}, {}, buffer0.ptr, 0, nullptr};
  DeviceTensorRef ref1{Dtype::kFloat32, {int64_t(bytes / 4096), 1024}, {}, buffer1.ptr, 0, nullptr};
  try {
    member0.send("lonely", ref0, {{2}}).wait();
    FAIL() << "a group send that one member never joined was stored";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank(s) 1 did not send"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(arenaReturnsTo(*this, usedBefore, [&] { return arenaUsedBytes(); }));
  // Both members send the next one: it arrives whole.
  auto h0 = member0.send("together", ref0, {{2}});
  auto h1 = member1.send("together", ref1, {{2}});
  h0.wait();
  h1.wait();
  auto got = receiver.recv("together", 0, 10'000);
  ASSERT_EQ(got.kind, Received::Kind::kTensor);
  EXPECT_EQ(memcmp(got.tensor.data, replica.data(), bytes), 0);
  receiver.markDone("together");
  EXPECT_TRUE(arenaReturnsTo(*this, usedBefore, [&] { return arenaUsedBytes(); }));
}

TEST_F(GpuTest, GroupMemberGoingAwayMidCopyFailsTheGroupWithoutLeaking) {
  SKIP_WITHOUT_GPU();
#ifndef SIDECAR_TEST_KERNELS
  GTEST_SKIP() << "built without nvcc: no producer kernel";
#else
  ASSERT_NO_FATAL_FAILURE(startDaemon("256MiB"));
  auto member0 = Sidecar::connect(config(0, {0, 1}, Dtype::kFloat32, {1024}, true));
  auto receiver = Sidecar::connect(config(2, {2}, Dtype::kFloat32, {1024}));
  uint64_t usedBefore = arenaUsedBytes();
  const size_t count = 4 << 20;  // floats
  DeviceBuffer buffer0(count * 4), buffer1(count * 4);
  CUDA_OK(cudaMemset(buffer0.ptr, 0, count * 4));
  DeviceTensorRef ref0{Dtype::kFloat32, {int64_t(count / 1024), 1024}, {}, buffer0.ptr, 0, nullptr};
  auto h0 = member0.send("abandoned", ref0, {{2}});
  {
    // Member 1's slice waits for its kernel (2 s); the member goes away before that.
    auto member1 = Sidecar::connect(config(1, {0, 1}, Dtype::kFloat32, {1024}, true));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    ASSERT_EQ(launchSpinThenFill(static_cast<float*>(buffer1.ptr), count, 1.0f, 2000, stream), 0);
    auto h1 = member1.send("abandoned", DeviceTensorRef{Dtype::kFloat32, {int64_t(count / 1024), 1024},
                                                        {}, buffer1.ptr, 0, stream},
                           {{2}});
    member1.send("marker", Object{1, "x"}, {{2}}).wait();  // the device send reached the daemon
    cudaStreamDestroy(stream);  // the kernel still runs; the destroy does not wait for it
  }  // member 1 unregisters here
  try {
    h0.wait();
    FAIL() << "the group's chunk was stored although member 1 went away before copying";
  } catch (const Error& e) {
    EXPECT_TRUE(e.code() == ErrorCode::kCancelled || e.code() == ErrorCode::kGpuCopyFailed)
        << e.what();
  }
  EXPECT_EQ(receiver.recv("marker", 0, 5'000).kind, Received::Kind::kObject);
  receiver.markDone("marker");
  cudaDeviceSynchronize();
  EXPECT_TRUE(arenaReturnsTo(*this, usedBefore, [&] { return arenaUsedBytes(); }));
  EXPECT_TRUE(daemon_->running());
#endif
}

#else  // !SIDECAR_HAVE_CUDA

TEST_F(GpuTest, GroupsWithDeviceSources) { GTEST_SKIP() << noGpuReason(); }

#endif  // SIDECAR_HAVE_CUDA

}  // namespace
}  // namespace sidecar::systest
