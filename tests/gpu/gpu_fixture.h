#pragma once
// What the GPU system tests share: whether there is a GPU (and why not), deterministic chunk
// bytes, a fixture that starts a real sidecard on one node, and a device buffer.

#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <thread>

#include "../system/daemon_process.h"
#include "sidecar_build_config.h"

#if SIDECAR_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace sidecar::systest {

inline int gpuCount() {
#if SIDECAR_HAVE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
#else
  return 0;
#endif
}

inline std::string noGpuReason() {
#if SIDECAR_HAVE_CUDA
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) return std::string("no usable GPU: ") + cudaGetErrorString(rc);
  return "no GPU on this machine";
#else
  return "built without CUDA (-Dcuda=disabled or no toolkit)";
#endif
}

#define SKIP_WITHOUT_GPU()                                     \
  do {                                                         \
    if (gpuCount() == 0) GTEST_SKIP() << noGpuReason();        \
  } while (0)

// Deterministic bytes of (id, chunk): every member of a sender group makes the same replica.
inline std::vector<uint8_t> chunkBytes(const std::string& id, uint32_t chunk, size_t bytes) {
  uint64_t x = std::hash<std::string>{}(id) * 0x9E3779B97F4A7C15ull + chunk + 1;
  std::vector<uint8_t> out(bytes);
  for (size_t i = 0; i < bytes; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<uint8_t>(x);
  }
  return out;
}

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(sidecardPath().empty()) << "$SIDECARD must name the sidecard binary";
    char tmpl[] = "/tmp/sidecar-gpu-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/sidecar.sock";
  }

  void TearDown() override {
    if (daemon_ != nullptr && daemon_->running()) {
      daemon_->signal(SIGTERM);
      auto status = daemon_->waitFor(20s);
      EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
          << "sidecard did not stop cleanly\n" << daemon_->err();
    }
    if (HasFailure() && daemon_ != nullptr) std::printf("--- sidecard stderr:\n%s\n", daemon_->err().c_str());
    daemon_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void startDaemon(const std::string& arenaSize, std::vector<std::string> extraArgs = {}) {
    std::vector<std::string> argv = {sidecardPath(), "--socket", socket_, "--tcp", "off",
                                     "--arena-size", arenaSize, "--cores",
                                     std::to_string(coresToUse()), "--log-level", "info"};
    argv.insert(argv.end(), extraArgs.begin(), extraArgs.end());
    daemon_ = Process::start(argv, {}, dir_ + "/sidecard.out", dir_ + "/sidecard.err");
    ASSERT_NE(daemon_, nullptr);
    auto deadline = Clock::now() + 30s;
    while (Clock::now() < deadline) {
      ASSERT_TRUE(daemon_->running()) << daemon_->err();
      struct stat st {};
      if (lstat(socket_.c_str(), &st) == 0) {
        try {
          auto info = nodeStatus();
          // The copy engine starts on core 0 after the socket: wait for it where a GPU is.
          if (gpuCount() == 0 || info.cudaAvailable) return;
        } catch (const std::exception&) {
        }
      }
      std::this_thread::sleep_for(20ms);
    }
    FAIL() << "sidecard did not get ready within 30 s\n" << daemon_->err();
  }

  NodeStatus nodeStatus() {
    std::optional<NodeStatus> out;
    std::thread t([&] { out = Client::connectUnix(socket_).status(); });
    t.join();
    return *out;
  }

  // Bytes of the arena in use (allocated or held), as the daemon reports it.
  uint64_t arenaUsedBytes() {
    auto status = nodeStatus();
    return status.arena ? status.arena->usedBytes : 0;
  }

  RankConfig config(int32_t rank, std::vector<int32_t> group, Dtype dtype,
                    std::vector<int64_t> rowShape, bool concurrent = false) {
    RankConfig c;
    c.rank = rank;
    c.group = std::move(group);
    c.sendHint = {dtype, std::move(rowShape)};
    c.concurrentCopy = concurrent;
    c.socketPath = socket_;
    return c;
  }

  std::string dir_, socket_;
  std::unique_ptr<Process> daemon_;
};

#if SIDECAR_HAVE_CUDA

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

// A device buffer holding `bytes` for the test's life.
struct DeviceBuffer {
  explicit DeviceBuffer(size_t bytes) : bytes(bytes) {  // 0: none
    if (bytes > 0 && cudaMalloc(&ptr, bytes) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  void* ptr = nullptr;
  size_t bytes;
};

#endif  // SIDECAR_HAVE_CUDA

}  // namespace sidecar::systest
