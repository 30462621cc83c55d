// GPU tensors across two nodes (issue 6, item 6): the producer is on node A (a device tensor), the
// consumer on node B (a host view, and a copy onto its device). Two sidecards joined by a [peers]
// rank map, ranks {0,1} on A and {2,3} on B, in two network namespaces when root (UCX over TCP
// through the namespaces' bridge), else both on 127.0.0.1 with UCX_TLS=tcp. Both nodes share the
// one GPU of the machine; what crosses between them is the network only.

#include <barrier>
#include <mutex>

#include "../common/netns.h"
#include "gpu_fixture.h"

#ifdef SIDECAR_TEST_KERNELS
#include "kernels.h"
#endif

namespace sidecar::systest {
namespace {

using sidecar::testing::NetnsCluster;

class GpuTwoNodes : public GpuTest {
 protected:
  void TearDown() override {
    if (nodeB_ != nullptr && nodeB_->running()) {
      nodeB_->signal(SIGTERM);
      auto status = nodeB_->waitFor(20s);
      EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
          << "node B's sidecard did not stop cleanly\n" << nodeB_->err();
    }
    if (HasFailure() && nodeB_ != nullptr) std::printf("--- node B stderr:\n%s\n", nodeB_->err().c_str());
    nodeB_.reset();
    GpuTest::TearDown();  // node A
    cluster_.reset();
  }

  // Starts node A (this fixture's daemon_, at socket_) and node B (at socketB_).
  void startNodes(const std::string& arenaSize) {
    std::string reason;
    if (NetnsCluster::available(&reason)) {
      cluster_ = std::make_unique<NetnsCluster>(2);
      ASSERT_TRUE(cluster_->ok()) << cluster_->error();
    } else {
      std::printf("note: both nodes on 127.0.0.1, not in namespaces: %s\n", reason.c_str());
    }
    socketB_ = dir_ + "/nodeB.sock";
    std::vector<std::string> addresses, sockets = {socket_, socketB_};
    for (int i = 0; i < 2; ++i) {
      addresses.push_back(cluster_ ? NetnsCluster::address(i) + ":7650"
                                   : "127.0.0.1:" + std::to_string(freeLoopbackTcpPort()));
    }
    std::string map = "0-1=" + addresses[0] + ",2-3=" + addresses[1];
    for (int i = 0; i < 2; ++i) {
      std::vector<std::string> argv = {
          sidecardPath(), "--socket", sockets[i], "--tcp", addresses[i], "--advertise",
          addresses[i], "--peers", map, "--arena-size", arenaSize, "--node-id",
          i == 0 ? "gpu-node-a" : "gpu-node-b", "--cores", std::to_string(coresToUse()),
          "--log-level", "info"};
      std::string base = dir_ + (i == 0 ? "/nodeA" : "/nodeB");
      // Between namespaces of one host UCX would pick shared memory and never touch the link.
      auto process = Process::start(argv, {"UCX_TLS=tcp"}, base + ".out", base + ".err",
                                    cluster_ ? cluster_->netnsPath(i) : "");
      ASSERT_NE(process, nullptr);
      (i == 0 ? daemon_ : nodeB_) = std::move(process);
    }
    for (int i = 0; i < 2; ++i) {
      Process& daemon = i == 0 ? *daemon_ : *nodeB_;
      auto deadline = Clock::now() + 30s;
      bool ready = false;
      while (!ready && Clock::now() < deadline) {
        ASSERT_TRUE(daemon.running()) << daemon.err();
        struct stat st {};
        if (lstat(sockets[i].c_str(), &st) == 0) {
          try {
            NodeStatus status;
            std::thread t([&] { status = Client::connectUnix(sockets[i]).status(); });
            t.join();
            ready = status.cudaAvailable;
          } catch (const std::exception&) {
          }
        }
        if (!ready) std::this_thread::sleep_for(20ms);
      }
      ASSERT_TRUE(ready) << "node " << i << " did not get ready (with CUDA) within 30 s\n"
                         << daemon.err();
    }
  }

  RankConfig configAt(const std::string& socket, int32_t rank, std::vector<int32_t> group,
                      Dtype dtype, bool concurrent = false) {
    RankConfig c = config(rank, std::move(group), dtype, {1}, concurrent);
    c.socketPath = socket;
    return c;
  }

  std::unique_ptr<NetnsCluster> cluster_;
  std::unique_ptr<Process> nodeB_;
  std::string socketB_;
};

#if SIDECAR_HAVE_CUDA

// Device tensors of several sizes (inline in the control message, one UCX piece, several pieces)
// from rank 0 on A to group {2,3} on B: both members get the host view, one also on its device.
TEST_F(GpuTwoNodes, DeviceTensorOnNodeAArrivesAsHostTensorOnNodeB) {
  SKIP_WITHOUT_GPU();
  ASSERT_NO_FATAL_FAILURE(startNodes("1GiB"));
  const std::vector<size_t> sizes = {4 << 10, (1 << 20) + 4, 40 << 20};
  const uint32_t chunks = 2;
  std::mutex failuresMutex;
  std::vector<std::string> failures;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(failuresMutex);
    failures.push_back(what);
  };
  auto idOf = [](size_t i) { return "xgpu-" + std::to_string(i); };
  std::barrier receiversDone(2);
  std::vector<std::thread> threads;
  threads.emplace_back([&] {
    try {
      cudaSetDevice(0);
      auto producer = Sidecar::connect(configAt(socket_, 0, {0}, Dtype::kFloat32));
      DeviceBuffer pool(128 << 20);  // an IPC-shared allocation, as PyTorch's caching allocator
      if (pool.ptr == nullptr) return fail("cudaMalloc failed");
      for (size_t i = 0; i < sizes.size(); ++i) {
        for (uint32_t c = 0; c < chunks; ++c) {
          auto bytes = chunkBytes(idOf(i), c, sizes[i]);
          void* data = static_cast<char*>(pool.ptr) + c * (64 << 20);
          cudaMemcpy(data, bytes.data(), bytes.size(), cudaMemcpyHostToDevice);
          producer.send(idOf(i), DeviceTensorRef{Dtype::kFloat32, {int64_t(sizes[i] / 4)}, {}, data, 0, nullptr},
                        {{2, 3}}, c, chunks)
              .wait();
        }
      }
    } catch (const std::exception& e) {
      fail(std::string("producer: ") + e.what());
    }
  });
  for (int32_t rank : {2, 3}) {
    threads.emplace_back([&, rank] {
      try {
        cudaSetDevice(0);
        auto consumer = Sidecar::connect(configAt(socketB_, rank, {2, 3}, Dtype::kFloat32));
        cudaStream_t stream;
        cudaStreamCreate(&stream);
        for (size_t i = 0; i < sizes.size(); ++i) {
          for (uint32_t c = 0; c < chunks; ++c) {
            auto expected = chunkBytes(idOf(i), c, sizes[i]);
            auto got = consumer.recv(idOf(i), c, 30'000);
            if (got.kind != Received::Kind::kTensor || got.tensor.sizeBytes != expected.size() ||
                memcmp(got.tensor.data, expected.data(), expected.size()) != 0) {
              fail(idOf(i) + " chunk " + std::to_string(c) + ": host view differs at rank " +
                   std::to_string(rank));
            }
            if (rank == 2) {
              DeviceBuffer out(expected.size());
              consumer.recvToDevice(idOf(i), DeviceTensorRef{Dtype::kFloat32, {int64_t(sizes[i] / 4)}, {}, out.ptr, 0, stream}, c);
              cudaStreamSynchronize(stream);
              std::vector<uint8_t> back(expected.size());
              cudaMemcpy(back.data(), out.ptr, back.size(), cudaMemcpyDeviceToHost);
              if (back != expected) fail(idOf(i) + " chunk " + std::to_string(c) + ": device copy differs");
            }
            receiversDone.arrive_and_wait();
            if (rank == 2) consumer.markDone(idOf(i), c);
          }
          if (consumer.recv(idOf(i), chunks, 30'000).kind != Received::Kind::kEndOfStream) {
            fail(idOf(i) + ": no end of stream at rank " + std::to_string(rank));
          }
        }
        cudaStreamDestroy(stream);
      } catch (const std::exception& e) {
        fail("consumer " + std::to_string(rank) + ": " + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
}

// A group {0,1} on A with concurrent copy (each member's buffer true only in its slice) to rank 2
// on B: the chunk crosses once and whole.
TEST_F(GpuTwoNodes, GroupWithConcurrentCopyOnNodeAArrivesWholeOnNodeB) {
  SKIP_WITHOUT_GPU();
  ASSERT_NO_FATAL_FAILURE(startNodes("512MiB"));
  const size_t elements = (24 << 20) / 2 + 3;  // bfloat16, an uneven split
  const size_t bytes = elements * 2;
  auto truth = chunkBytes("xgroup", 0, bytes);
  std::mutex failuresMutex;
  std::vector<std::string> failures;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(failuresMutex);
    failures.push_back(what);
  };
  std::vector<std::thread> threads;
  for (int32_t rank : {0, 1}) {
    threads.emplace_back([&, rank] {
      try {
        cudaSetDevice(0);
        auto member = Sidecar::connect(configAt(socket_, rank, {0, 1}, Dtype::kBFloat16, true));
        size_t half = (elements + 1) / 2;  // member 0 takes the extra element
        size_t first = rank == 0 ? 0 : half, count = rank == 0 ? half : elements - half;
        std::vector<uint8_t> replica(bytes, 0xEE);
        memcpy(replica.data() + first * 2, truth.data() + first * 2, count * 2);
        DeviceBuffer buffer(bytes);
        if (buffer.ptr == nullptr) return fail("cudaMalloc failed");
        cudaMemcpy(buffer.ptr, replica.data(), bytes, cudaMemcpyHostToDevice);
        member.send("xgroup", DeviceTensorRef{Dtype::kBFloat16, {int64_t(elements)}, {}, buffer.ptr, 0, nullptr},
                    {{2}})
            .wait();
      } catch (const std::exception& e) {
        fail("member " + std::to_string(rank) + ": " + e.what());
      }
    });
  }
  threads.emplace_back([&] {
    try {
      auto consumer = Sidecar::connect(configAt(socketB_, 2, {2}, Dtype::kBFloat16));
      auto got = consumer.recv("xgroup", 0, 30'000);
      if (got.kind != Received::Kind::kTensor || got.tensor.sizeBytes != bytes ||
          memcmp(got.tensor.data, truth.data(), bytes) != 0) {
        fail("the group's tensor differs on node B");
      }
      consumer.markDone("xgroup");
    } catch (const std::exception& e) {
      fail(std::string("consumer: ") + e.what());
    }
  });
  for (auto& t : threads) t.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
}

// Ordering across nodes: the chunk that reaches node B is the output of the producer's kernel,
// which was still running when send() returned on node A.
TEST_F(GpuTwoNodes, RemoteConsumerGetsTheOutputOfAKernelStillRunningAtSend) {
  SKIP_WITHOUT_GPU();
#ifndef SIDECAR_TEST_KERNELS
  GTEST_SKIP() << "built without nvcc: no producer kernel";
#else
  ASSERT_NO_FATAL_FAILURE(startNodes("512MiB"));
  auto producer = Sidecar::connect(configAt(socket_, 0, {0}, Dtype::kFloat32));
  std::optional<Received> got;
  std::string consumerError;
  std::thread consumerThread([&] {
    try {
      auto consumer = Sidecar::connect(configAt(socketB_, 2, {2}, Dtype::kFloat32));
      auto received = consumer.recv("xordered", 0, 30'000);
      if (received.kind != Received::Kind::kTensor) {
        consumerError = "not a tensor";
        return;
      }
      const float* values = static_cast<const float*>(received.tensor.data);
      size_t wrong = 0;
      for (size_t i = 0; i < received.tensor.sizeBytes / 4; ++i) wrong += values[i] != 42.0f;
      if (wrong != 0) {
        consumerError = std::to_string(wrong) + " values are not the kernel's output";
      }
      consumer.markDone("xordered");
    } catch (const std::exception& e) {
      consumerError = e.what();
    }
  });
  const size_t count = 8 << 20;  // 32 MiB of float
  DeviceBuffer buffer(count * sizeof(float));
  ASSERT_NE(buffer.ptr, nullptr);
  CUDA_OK(cudaMemset(buffer.ptr, 0, buffer.bytes));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_EQ(launchSpinThenFill(static_cast<float*>(buffer.ptr), count, 42.0f, 300, stream), 0);
  auto handle = producer.send("xordered", DeviceTensorRef{Dtype::kFloat32, {int64_t(count)}, {},
                                                          buffer.ptr, 0, stream},
                              {{2}});
  EXPECT_EQ(cudaStreamQuery(stream), cudaErrorNotReady) << "the kernel ended before send returned";
  handle.wait();
  consumerThread.join();
  EXPECT_EQ(consumerError, "");
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
#endif
}

// Pipelined delivery whose copy never completes: the producer goes away while its copy still
// waits for its kernel, after the chunk's control message already went to node B. Both nodes
// give their space back and keep working.
TEST_F(GpuTwoNodes, ProducerGoingAwayMidPipelineLeavesBothNodesClean) {
  SKIP_WITHOUT_GPU();
#ifndef SIDECAR_TEST_KERNELS
  GTEST_SKIP() << "built without nvcc: no producer kernel";
#else
  ASSERT_NO_FATAL_FAILURE(startNodes("512MiB"));
  auto usedAt = [&](const std::string& socket) {
    NodeStatus status;
    std::thread t([&] { status = Client::connectUnix(socket).status(); });
    t.join();
    return status.arena ? status.arena->usedBytes : 0;
  };
  uint64_t usedA = usedAt(socket_), usedB = usedAt(socketB_);
  const size_t count = 8 << 20;  // 32 MiB of float: several UCX pieces
  DeviceBuffer buffer(count * sizeof(float));
  ASSERT_NE(buffer.ptr, nullptr);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    auto producer = Sidecar::connect(configAt(socket_, 0, {0}, Dtype::kFloat32));
    ASSERT_EQ(launchSpinThenFill(static_cast<float*>(buffer.ptr), count, 5.0f, 2000, stream), 0);
    auto handle = producer.send("xabandoned", DeviceTensorRef{Dtype::kFloat32, {int64_t(count)}, {},
                                                              buffer.ptr, 0, stream},
                                {{2}});
    producer.send("xmarker", Object{1, "x"}, {{2}}).wait();  // the device send reached node A
    std::this_thread::sleep_for(200ms);  // and its control message node B
  }  // the producer unregisters: its waiting copy is dropped
  auto consumer = Sidecar::connect(configAt(socketB_, 2, {2}, Dtype::kFloat32));
  EXPECT_EQ(consumer.recv("xmarker", 0, 10'000).kind, Received::Kind::kObject);
  consumer.markDone("xmarker");
  try {
    auto got = consumer.recv("xabandoned", 0, 3'000);
    ADD_FAILURE() << "a chunk whose copy was dropped arrived on node B";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
  }
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  auto deadline = Clock::now() + 10s;
  while ((usedAt(socket_) != usedA || usedAt(socketB_) != usedB) && Clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(usedAt(socket_), usedA) << "node A kept the abandoned chunk's space";
  EXPECT_EQ(usedAt(socketB_), usedB) << "node B kept the space it received the body into";
  // Both still work: the next device tensor crosses whole.
  auto producer = Sidecar::connect(configAt(socket_, 0, {0}, Dtype::kFloat32));
  std::vector<float> ones(count, 1.0f);
  CUDA_OK(cudaMemcpy(buffer.ptr, ones.data(), buffer.bytes, cudaMemcpyHostToDevice));
  producer.send("xafter", DeviceTensorRef{Dtype::kFloat32, {int64_t(count)}, {}, buffer.ptr, 0, nullptr},
                {{2}}).wait();
  auto got = consumer.recv("xafter", 0, 10'000);
  ASSERT_EQ(got.kind, Received::Kind::kTensor);
  EXPECT_EQ(memcmp(got.tensor.data, ones.data(), buffer.bytes), 0);
  consumer.markDone("xafter");
#endif
}

#else  // !SIDECAR_HAVE_CUDA

TEST_F(GpuTwoNodes, DeviceTensorsAcrossNodes) { GTEST_SKIP() << noGpuReason(); }

#endif  // SIDECAR_HAVE_CUDA

}  // namespace
}  // namespace sidecar::systest
