// GPU tensors end to end (issue 6) against the real sidecard on one node: device tensors as
// sources for the tensor scenarios of ../shared/scenarios/cornserve-test-matrix.md, received as
// host views and on a device; ordering after a producer kernel still running at send(); a
// producer process that exits mid-transfer; and, where there is no GPU, the clear errors.
//
// Ranks are threads of this process (a Sidecar belongs to its thread); the producer that exits is
// a child process (this binary, re-executed with --gpu-test-role).

#include <barrier>

#include "gpu_fixture.h"
#ifdef SIDECAR_TEST_KERNELS
#include "kernels.h"
#endif

namespace sidecar::systest {
namespace {

// ---- Without a GPU --------------------------------------------------------------------------

TEST_F(GpuTest, WithoutGpuInfoSaysUnavailableAndDeviceSendFailsClearly) {
  if (gpuCount() > 0) GTEST_SKIP() << "a GPU is present: the GPU tests cover this machine";
  ASSERT_NO_FATAL_FAILURE(startDaemon("64MiB"));
  EXPECT_FALSE(nodeStatus().cudaAvailable);
  auto sidecar = Sidecar::connect(config(0, {0}, Dtype::kFloat32, {4}));
  static float fake[4];
  DeviceTensorRef ref{Dtype::kFloat32, {1, 4}, {}, fake, 0, nullptr};
  try {
    sidecar.send("gpu-none", ref, {{1}}).wait();
    FAIL() << "a GPU send without a GPU must fail";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kGpuUnavailable) << e.what();
    EXPECT_NE(std::string(e.what()).find("host tensors"), std::string::npos) << e.what();
  }
  // The daemon is unharmed and the host path still works.
  std::vector<float> host = {1, 2, 3, 4};
  sidecar.send("host-ok", TensorRef{Dtype::kFloat32, {1, 4}, {}, host.data()}, {{0}}).wait();
  auto got = sidecar.recv("host-ok");
  ASSERT_EQ(got.kind, Received::Kind::kTensor);
  EXPECT_EQ(memcmp(got.tensor.data, host.data(), 16), 0);
}

#if SIDECAR_HAVE_CUDA

// ---- The tensor scenarios with device sources -----------------------------------------------

struct Scenario {
  const char* name;
  std::vector<int32_t> senders, receivers;
  uint32_t chunks;
  std::vector<int64_t> chunkShape;
  Dtype dtype;
  int64_t tokensMin, tokensMax;
  bool concurrent;
  uint32_t count;
  // false: each chunk sits at an offset inside one large cudaMalloc'ed pool, as with PyTorch's
  // caching allocator (shared through CUDA IPC). true: each chunk is its own small cudaMalloc
  // (the client stages those itself, see cuda::ExportedTensor::stage).
  bool freshAllocations = false;
};

int64_t tokensFor(const Scenario& s, uint32_t id, uint32_t chunk) {
  return s.tokensMin + static_cast<int64_t>((id * 7 + chunk * 13) % (s.tokensMax - s.tokensMin + 1));
}

class GpuMatrix : public GpuTest, public ::testing::WithParamInterface<Scenario> {};

TEST_P(GpuMatrix, DeviceSourcesArriveEqualAsHostViewsAndOnDevice) {
  SKIP_WITHOUT_GPU();
  const Scenario& s = GetParam();
  ASSERT_NO_FATAL_FAILURE(startDaemon("1GiB"));
  size_t rowBytes = dtypeBytes(s.dtype);
  for (int64_t d : s.chunkShape) rowBytes *= static_cast<size_t>(d);
  auto idOf = [&](uint32_t i) { return std::string(s.name) + "-" + std::to_string(i); };
  std::barrier receiversDone(static_cast<std::ptrdiff_t>(s.receivers.size()));
  std::mutex failuresMutex;
  std::vector<std::string> failures;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(failuresMutex);
    failures.push_back(what);
  };

  std::vector<std::thread> threads;
  for (int32_t rank : s.senders) {
    threads.emplace_back([&, rank] {
      try {
        cudaSetDevice(0);
        auto sidecar = Sidecar::connect(config(rank, s.senders, s.dtype, s.chunkShape, s.concurrent));
        const size_t poolBytes = 128 << 20;
        DeviceBuffer pool(s.freshAllocations ? 0 : poolBytes);
        size_t poolOffset = 0;
        for (uint32_t i = 0; i < s.count; ++i) {
          for (uint32_t c = 0; c < s.chunks; ++c) {
            int64_t n = tokensFor(s, i, c);
            auto bytes = chunkBytes(idOf(i), c, static_cast<size_t>(n) * rowBytes);
            DeviceBuffer fresh(s.freshAllocations ? bytes.size() : 0);
            void* data = fresh.ptr;
            if (!s.freshAllocations) {
              // Varying offsets (256-byte aligned) inside the pool; the previous send was waited.
              if (poolOffset + bytes.size() > poolBytes) poolOffset = 0;
              data = static_cast<char*>(pool.ptr) + poolOffset;
              poolOffset = (poolOffset + bytes.size() + 255 + 4096 * c) & ~size_t{255};
            }
            if (data == nullptr) return fail("cudaMalloc failed");
            std::vector<int64_t> shape = {n};
            shape.insert(shape.end(), s.chunkShape.begin(), s.chunkShape.end());
            cudaMemcpy(data, bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
            DeviceTensorRef ref{s.dtype, shape, {}, data, 0, nullptr};
            sidecar.send(idOf(i), ref, {s.receivers}, c, s.chunks).wait();
          }
        }
      } catch (const std::exception& e) {
        fail(std::string("sender ") + std::to_string(rank) + ": " + e.what());
      }
    });
  }
  for (int32_t rank : s.receivers) {
    threads.emplace_back([&, rank] {
      try {
        cudaSetDevice(0);
        auto sidecar = Sidecar::connect(config(rank, s.receivers, s.dtype, s.chunkShape));
        cudaStream_t stream;
        cudaStreamCreate(&stream);
        for (uint32_t i = 0; i < s.count; ++i) {
          for (uint32_t c = 0; c < s.chunks; ++c) {
            int64_t n = tokensFor(s, i, c);
            auto expected = chunkBytes(idOf(i), c, static_cast<size_t>(n) * rowBytes);
            auto got = sidecar.recv(idOf(i), c, 30'000);
            if (got.kind != Received::Kind::kTensor || got.tensor.sizeBytes != expected.size() ||
                got.tensor.dtype != s.dtype || got.tensor.shape[0] != n ||
                memcmp(got.tensor.data, expected.data(), expected.size()) != 0) {
              fail(idOf(i) + " chunk " + std::to_string(c) + ": host view differs at rank " +
                   std::to_string(rank));
            }
            DeviceBuffer out(expected.size());
            std::vector<int64_t> shape = {n};
            shape.insert(shape.end(), s.chunkShape.begin(), s.chunkShape.end());
            sidecar.recvToDevice(idOf(i), DeviceTensorRef{s.dtype, shape, {}, out.ptr, 0, stream}, c);
            cudaStreamSynchronize(stream);
            std::vector<uint8_t> back(expected.size());
            cudaMemcpy(back.data(), out.ptr, back.size(), cudaMemcpyDeviceToHost);
            if (back != expected) {
              fail(idOf(i) + " chunk " + std::to_string(c) + ": device copy differs at rank " +
                   std::to_string(rank));
            }
            receiversDone.arrive_and_wait();
            if (rank == s.receivers.front()) sidecar.markDone(idOf(i), c);
          }
          auto end = sidecar.recv(idOf(i), s.chunks, 30'000);
          if (end.kind != Received::Kind::kEndOfStream) fail(idOf(i) + ": no end of stream");
        }
        cudaStreamDestroy(stream);
      } catch (const std::exception& e) {
        fail(std::string("receiver ") + std::to_string(rank) + ": " + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
}

INSTANTIATE_TEST_SUITE_P(
    Tensors, GpuMatrix,
    ::testing::Values(
        Scenario{"single_corner", {0}, {2}, 1, {100}, Dtype::kBFloat16, 1, 1, false, 4},
        Scenario{"single_small", {0}, {2}, 1, {100}, Dtype::kFloat64, 5, 10, false, 5},
        Scenario{"single_medium", {0, 1}, {2}, 2, {1176}, Dtype::kBFloat16, 5, 10, false, 6},
        Scenario{"single_large", {0, 1}, {2, 3}, 4, {29, 4096}, Dtype::kBFloat16, 100, 200, false, 7},
        Scenario{"concurrent_small", {0}, {2}, 4, {13, 4096}, Dtype::kBFloat16, 100, 200, true, 8},
        Scenario{"concurrent_medium", {0, 1}, {2}, 2, {1176}, Dtype::kBFloat16, 50, 100, true, 9},
        Scenario{"concurrent_large", {0, 1}, {2, 3}, 1, {100}, Dtype::kFloat64, 5, 50, true, 10},
        Scenario{"concurrent_corner", {0, 1}, {2, 3}, 1, {100}, Dtype::kBFloat16, 1, 1, true, 3},
        // Beyond the table: one tensor of 100 MiB, cut into pieces by the copy engine.
        Scenario{"pieces_100mib", {0}, {2}, 1, {1 << 20}, Dtype::kUint8, 100, 100, false, 1},
        Scenario{"fresh_small_allocations", {0, 1}, {2, 3}, 2, {1176}, Dtype::kBFloat16, 5, 50,
                 false, 6, true}),
    [](const ::testing::TestParamInfo<Scenario>& info) { return std::string(info.param.name); });

TEST_F(GpuTest, InfoSaysCudaAvailable) {
  SKIP_WITHOUT_GPU();
  ASSERT_NO_FATAL_FAILURE(startDaemon("64MiB"));
  EXPECT_TRUE(nodeStatus().cudaAvailable);
}

TEST_F(GpuTest, BadDeviceTensorsGetClearErrors) {
  SKIP_WITHOUT_GPU();
  ASSERT_NO_FATAL_FAILURE(startDaemon("64MiB"));
  auto sidecar = Sidecar::connect(config(0, {0}, Dtype::kFloat32, {4}));
  std::vector<float> host(4);
  auto expectCode = [&](const DeviceTensorRef& ref, ErrorCode code, const char* what) {
    try {
      sidecar.send(std::string("bad-") + what, ref, {{1}}).wait();
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << what << ": " << e.what();
    }
  };
  expectCode({Dtype::kFloat32, {1, 4}, {}, host.data(), 0, nullptr}, ErrorCode::kInvalidArgument,
             "host pointer");
  DeviceBuffer buffer(16);
  expectCode({Dtype::kFloat32, {2, 4}, {}, buffer.ptr, 0, nullptr}, ErrorCode::kInvalidArgument,
             "past the allocation");
  expectCode({Dtype::kFloat32, {2, 2}, {1, 2}, buffer.ptr, 0, nullptr}, ErrorCode::kInvalidArgument,
             "strided");
  // The good one still goes through.
  sidecar.send("good", DeviceTensorRef{Dtype::kFloat32, {1, 4}, {}, buffer.ptr, 0, nullptr}, {{0}}).wait();
  EXPECT_EQ(sidecar.recv("good").kind, Received::Kind::kTensor);
}

// ---- Ordering after a producer kernel -------------------------------------------------------

TEST_F(GpuTest, CopyWaitsForTheProducerKernelStillRunningAtSend) {
  SKIP_WITHOUT_GPU();
#ifndef SIDECAR_TEST_KERNELS
  GTEST_SKIP() << "built without nvcc: no producer kernel";
#else
  ASSERT_NO_FATAL_FAILURE(startDaemon("256MiB"));
  auto producer = Sidecar::connect(config(0, {0}, Dtype::kFloat32, {1024}));
  auto consumer = Sidecar::connect(config(2, {2}, Dtype::kFloat32, {1024}));
  const size_t count = 16 << 20;  // 64 MiB of float
  DeviceBuffer buffer(count * sizeof(float));
  ASSERT_NE(buffer.ptr, nullptr);
  CUDA_OK(cudaMemset(buffer.ptr, 0, buffer.bytes));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_EQ(launchSpinThenFill(static_cast<float*>(buffer.ptr), count, 42.0f, 300, stream), 0);
  auto sentAt = Clock::now();
  auto handle = producer.send("ordered", DeviceTensorRef{Dtype::kFloat32, {int64_t(count / 1024), 1024}, {},
                                                         buffer.ptr, 0, stream},
                              {{2}});
  // The kernel is still spinning: send() neither waited for it nor synchronized the stream.
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady) << "the kernel ended before send returned";
  handle.wait();
  auto got = consumer.recv("ordered", 0, 10'000);
  ASSERT_EQ(got.kind, Received::Kind::kTensor);
  const float* values = static_cast<const float*>(got.tensor.data);
  size_t wrong = 0;
  for (size_t i = 0; i < count; ++i) wrong += values[i] != 42.0f;
  EXPECT_EQ(wrong, 0u) << "the copy did not wait for the producer's kernel";
  std::printf("send returned; the chunk was stored %lld ms after send\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         Clock::now() - sentAt).count()));
  consumer.markDone("ordered");
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
#endif
}

// ---- A producer that exits mid-transfer -----------------------------------------------------

// The child's side (main() runs it for --gpu-test-role=producer-exit <socket>): sends a device
// tensor whose producer kernel spins for a second, makes sure the send reached the daemon, and
// exits without any cleanup while the kernel and the daemon's copy are pending.
int producerThatExits(const std::string& socket) {
#ifdef SIDECAR_TEST_KERNELS
  RankConfig c;
  c.rank = 0;
  c.group = {0};
  c.sendHint = {Dtype::kFloat32, {1024}};
  c.socketPath = socket;
  auto sidecar = Sidecar::connect(c);
  const size_t count = 16 << 20;
  void* ptr = nullptr;
  if (cudaMalloc(&ptr, count * sizeof(float)) != cudaSuccess) return 3;
  cudaMemset(ptr, 0, count * sizeof(float));
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  launchSpinThenFill(static_cast<float*>(ptr), count, 7.0f, 1000, stream);
  auto handle = sidecar.send("orphan", DeviceTensorRef{Dtype::kFloat32, {int64_t(count / 1024), 1024},
                                                       {}, ptr, 0, stream},
                             {{2}});
  // Calls on one connection are delivered in order: once this answers, the device send is there.
  sidecar.send("orphan-marker", Object{1, "x"}, {{2}}).wait();
  std::printf("producer: sent, exiting\n");
  std::fflush(stdout);
  _exit(0);
#else
  (void)socket;
  return 4;
#endif
}

TEST_F(GpuTest, ProducerExitingMidTransferLeavesTheDaemonWorking) {
  SKIP_WITHOUT_GPU();
#ifndef SIDECAR_TEST_KERNELS
  GTEST_SKIP() << "built without nvcc: no producer kernel";
#else
  ASSERT_NO_FATAL_FAILURE(startDaemon("256MiB"));
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  ASSERT_GT(n, 0);
  self[n] = 0;
  auto child = Process::start({self, "--gpu-test-role=producer-exit", socket_}, {},
                              dir_ + "/producer.out", dir_ + "/producer.err");
  ASSERT_NE(child, nullptr);
  auto status = child->waitFor(30s);
  ASSERT_TRUE(status.has_value()) << "the producer did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
      << describeWaitStatus(*status) << "\n" << child->out() << child->err();

  auto consumer = Sidecar::connect(config(2, {2}, Dtype::kFloat32, {1024}));
  EXPECT_EQ(consumer.recv("orphan-marker", 0, 10'000).kind, Received::Kind::kObject);
  // Either the chunk arrives (and then it is the kernel's output, never zeros) or it never does;
  // what must not happen is a crash, a hang of the daemon, or torn data.
  try {
    auto got = consumer.recv("orphan", 0, 5'000);
    if (got.kind == Received::Kind::kTensor) {
      const float* values = static_cast<const float*>(got.tensor.data);
      size_t wrong = 0;
      for (size_t i = 0; i < got.tensor.sizeBytes / 4; ++i) wrong += values[i] != 7.0f;
      EXPECT_EQ(wrong, 0u) << "a chunk from the exited producer arrived with wrong data";
      std::printf("the orphan chunk arrived whole\n");
      consumer.markDone("orphan");
    }
  } catch (const Error& e) {
    std::printf("the orphan chunk did not arrive: %s\n", e.what());
  }
  // The daemon still serves: rank 0 registers again (its old session ends once its copies are
  // done) and a new device send goes through.
  std::optional<Sidecar> producer;
  auto deadline = Clock::now() + 20s;
  while (!producer) {
    try {
      producer.emplace(Sidecar::connect(config(0, {0}, Dtype::kFloat32, {1024})));
    } catch (const Error& e) {
      ASSERT_EQ(e.code(), ErrorCode::kAlreadyRegistered) << e.what();
      ASSERT_LT(Clock::now(), deadline) << "rank 0 stayed registered after its process exited";
      std::this_thread::sleep_for(50ms);
    }
  }
  std::vector<float> ones(4096, 1.0f);
  DeviceBuffer buffer(ones.size() * 4);
  CUDA_OK(cudaMemcpy(buffer.ptr, ones.data(), buffer.bytes, cudaMemcpyHostToDevice));
  producer->send("after", DeviceTensorRef{Dtype::kFloat32, {4, 1024}, {}, buffer.ptr, 0, nullptr}, {{2}}).wait();
  auto got = consumer.recv("after", 0, 10'000);
  ASSERT_EQ(got.kind, Received::Kind::kTensor);
  EXPECT_EQ(memcmp(got.tensor.data, ones.data(), buffer.bytes), 0);
  EXPECT_TRUE(daemon_->running());
#endif
}

#else  // !SIDECAR_HAVE_CUDA: the GPU tests are reported as skipped, with the reason.

TEST_F(GpuTest, InfoSaysCudaAvailable) { GTEST_SKIP() << noGpuReason(); }
TEST_F(GpuTest, BadDeviceTensorsGetClearErrors) { GTEST_SKIP() << noGpuReason(); }
TEST_F(GpuTest, CopyWaitsForTheProducerKernelStillRunningAtSend) { GTEST_SKIP() << noGpuReason(); }
TEST_F(GpuTest, ProducerExitingMidTransferLeavesTheDaemonWorking) { GTEST_SKIP() << noGpuReason(); }
TEST_F(GpuTest, TensorScenariosWithDeviceSources) { GTEST_SKIP() << noGpuReason(); }

#endif  // SIDECAR_HAVE_CUDA

}  // namespace
}  // namespace sidecar::systest

int main(int argc, char** argv) {
#if SIDECAR_HAVE_CUDA
  if (argc == 3 && std::string(argv[1]) == "--gpu-test-role=producer-exit") {
    return sidecar::systest::producerThatExits(argv[2]);
  }
#endif
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
