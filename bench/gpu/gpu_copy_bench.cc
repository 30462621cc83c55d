// Device-to-arena copy bandwidth through the daemon (issue 6), against cudaMemcpyAsync from the
// same GPU into pinned host memory of the same size, measured in the same run.
//
//   gpu_copy_bench <path to sidecard> [rounds]
//
// Daemon path: a producer rank sends `batch` device tensors of one size back to back
// (Sidecar::send(DeviceTensorRef), each an IPC handle + event; the daemon copies on its own
// streams into the arena and stores the chunk) and waits for all handles; a consumer rank then
// marks them done. Bandwidth = bytes sent / time from the first send to the last handle.
// Baseline: `batch` cudaMemcpyAsync device-to-host into distinct regions of one cudaMallocHost
// buffer on one stream, then cudaStreamSynchronize. The median of `rounds` is reported, and the
// latency of one unbatched send (send to handle) besides.

#include <cuda_runtime.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(rc));
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <sidecard> [rounds]\n", argv[0]);
    return 2;
  }
  int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
  const uint64_t kMiB = 1ull << 20;
  const uint64_t batchBytes = 1024 * kMiB;  // per measurement, per size
  std::string dir = "/tmp/sidecar-gpubench-" + std::to_string(getpid());
  mkdir(dir.c_str(), 0700);
  std::string socket = dir + "/sidecar.sock";
  const char* logLevel = std::getenv("GPU_BENCH_DAEMON_LOG");  // e.g. debug: per-send phases
  std::vector<std::string> args = {argv[1], "--socket", socket, "--tcp", "off", "--arena-size",
                                   "3GiB", "--cores", "2", "--log-level",
                                   logLevel != nullptr ? logLevel : "info"};
  std::vector<char*> argvPtrs;
  for (auto& a : args) argvPtrs.push_back(a.data());
  argvPtrs.push_back(nullptr);
  pid_t daemon = 0;
  if (posix_spawn(&daemon, argv[1], nullptr, nullptr, argvPtrs.data(), environ) != 0) {
    std::perror("posix_spawn sidecard");
    return 1;
  }
  // Wait until the daemon answers and its copy engine is up.
  bool ready = false;
  for (int i = 0; i < 600 && !ready; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    try {
      ready = sidecar::Client::connectUnix(socket).status().cudaAvailable;
    } catch (const std::exception&) {
    }
  }
  if (!ready) {
    std::fprintf(stderr, "sidecard did not report a usable GPU\n");
    kill(daemon, SIGKILL);
    return 1;
  }

  cudaDeviceProp props{};
  check(cudaGetDeviceProperties(&props, 0), "cudaGetDeviceProperties");
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("GPU: %s, CUDA driver API %d, runtime %d\n", props.name, driver, runtime);

  sidecar::RankConfig producerConfig;
  producerConfig.rank = 0;
  producerConfig.sendHint = {sidecar::Dtype::kUint8, {4096}};
  producerConfig.socketPath = socket;
  sidecar::RankConfig consumerConfig = producerConfig;
  consumerConfig.rank = 1;
  auto producer = sidecar::Sidecar::connect(producerConfig);
  auto consumer = sidecar::Sidecar::connect(consumerConfig);

  void* device = nullptr;
  void* pinned = nullptr;
  check(cudaMalloc(&device, batchBytes), "cudaMalloc");
  check(cudaMemset(device, 0x5a, batchBytes), "cudaMemset");
  check(cudaMallocHost(&pinned, batchBytes), "cudaMallocHost");
  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaDeviceSynchronize(), "sync");

  // What the producer pays per send for its event: record and query of an interprocess event
  // against a plain one.
  {
    cudaEvent_t ipc, plain;
    check(cudaEventCreateWithFlags(&ipc, cudaEventInterprocess | cudaEventDisableTiming), "event");
    check(cudaEventCreateWithFlags(&plain, cudaEventDisableTiming), "event");
    for (cudaEvent_t e : {ipc, plain}) {
      const int n = 2000;
      auto t0 = Clock::now();
      for (int i = 0; i < n; ++i) cudaEventRecord(e, stream);
      auto t1 = Clock::now();
      cudaStreamSynchronize(stream);
      auto t2 = Clock::now();
      for (int i = 0; i < n; ++i) cudaEventQuery(e);
      auto t3 = Clock::now();
      std::printf("%s event: record %.2f us, query %.2f us\n", e == ipc ? "interprocess" : "plain",
                  seconds(t0, t1) * 1e6 / n, seconds(t2, t3) * 1e6 / n);
    }
    cudaEventDestroy(ipc);
    cudaEventDestroy(plain);
  }

  std::printf("%-8s %6s %14s %14s %7s %16s %12s\n", "size", "batch", "daemon GB/s", "memcpy GB/s",
              "ratio", "1 send latency", "send() call");
  uint64_t id = 0;
  for (uint64_t sizeMiB : {1ull, 16ull, 256ull}) {
    uint64_t size = sizeMiB * kMiB;
    uint64_t batch = batchBytes / size;
    auto daemonRound = [&]() {
      std::vector<std::string> ids;
      std::vector<sidecar::SendHandle> handles;
      auto start = Clock::now();
      for (uint64_t i = 0; i < batch; ++i) {
        ids.push_back("b" + std::to_string(id++));
        sidecar::DeviceTensorRef ref{sidecar::Dtype::kUint8, {int64_t(size / 4096), 4096}, {},
                                     static_cast<char*>(device) + i * size, 0, stream};
        handles.push_back(producer.send(ids.back(), ref, {{1}}));
      }
      for (auto& h : handles) h.wait();
      double s = seconds(start, Clock::now());
      for (auto& i : ids) {
        consumer.recv(i);
        consumer.markDone(i);
      }
      return double(batch * size) / s / 1e9;
    };
    auto memcpyRound = [&]() {
      auto start = Clock::now();
      for (uint64_t i = 0; i < batch; ++i) {
        check(cudaMemcpyAsync(static_cast<char*>(pinned) + i * size,
                              static_cast<char*>(device) + i * size, size, cudaMemcpyDeviceToHost,
                              stream), "cudaMemcpyAsync");
      }
      check(cudaStreamSynchronize(stream), "sync");
      return double(batch * size) / seconds(start, Clock::now()) / 1e9;
    };
    std::vector<double> issue;
    auto latencyRound = [&]() {
      std::string i = "l" + std::to_string(id++);
      sidecar::DeviceTensorRef ref{sidecar::Dtype::kUint8, {int64_t(size / 4096), 4096}, {},
                                   device, 0, stream};
      auto start = Clock::now();
      auto handle = producer.send(i, ref, {{1}});
      issue.push_back(seconds(start, Clock::now()) * 1e6);
      handle.wait();
      double us = seconds(start, Clock::now()) * 1e6;
      consumer.recv(i);
      consumer.markDone(i);
      return us;
    };
    daemonRound();  // warm: IPC handles opened, arena pages touched
    memcpyRound();
    std::vector<double> d, m, l;
    for (int r = 0; r < rounds; ++r) {
      // Interleaved, so that drift on the machine hits both alike.
      d.push_back(daemonRound());
      m.push_back(memcpyRound());
      l.push_back(latencyRound());
    }
    std::printf("%5llu MiB %6llu %14.1f %14.1f %7.3f %13.0f us %9.0f us\n",
                (unsigned long long)sizeMiB, (unsigned long long)batch, median(d), median(m),
                median(d) / median(m), median(l), median(issue));
    std::fflush(stdout);
  }
  kill(daemon, SIGTERM);
  int status = 0;
  waitpid(daemon, &status, 0);
  return 0;
}
