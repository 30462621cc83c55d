// End to end GPU-to-remote (issue 6, item 7): a device tensor on node A to a host tensor on node
// B, against the slower of its two stages measured alone in the same run:
//   copy  device -> A's arena:  rank 0 sends the device tensor to rank 1, also on A
//   net   A's arena -> B:       rank 0 sends an arena tensor (zero copy) to rank 2 on B
//   e2e   device on A -> B:     rank 0 sends the device tensor to rank 2 on B
// Two daemons must run (bench/gpu/gpu_xnode starts them in two network namespaces); ranks {0,1}
// on A, {2,3} on B. This binary is the three ranks, each a thread with its own connection.
//
// Streamed: per size, `count` transfers back to back with up to `window` sends in flight; time
// from the first send on A to the last arrival (recv returned) at the receiver; each chunk is
// marked done on arrival. The three cases are interleaved round by round; per round,
// ratio = e2e / min(copy, net) in GB/s (10^9 B/s). Prints one JSON line per size with medians:
//   {"name":"stream_64MiB","copy_gbps":..,"net_gbps":..,"e2e_gbps":..,"ratio":..}
// One at a time: `singles` transfers of each case, send to arrival; medians in us:
//   {"name":"single_64MiB","copy_us":..,"net_us":..,"e2e_us":..}
// e2e_us close to copy_us + net_us means the stages run one after the other for one tensor.
//
// Usage: gpu_xnode_bench --socket-a PATH --socket-b PATH [--sizes 67108864,268435456]
//                        [--count 16] [--window 4] [--rounds 5] [--singles 9]

#include <cuda_runtime.h>
#include <CLI/CLI.hpp>
#include <sidecar/sidecar.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

enum class Kind { kCopy, kNet, kE2e };

struct Phase {
  Kind kind;
  uint64_t bytes;
  int count;
  int window;
  int receiver() const { return kind == Kind::kCopy ? 1 : 2; }
};

struct Options {
  std::string socketA, socketB;
  std::vector<uint64_t> sizes{64ull << 20, 256ull << 20};
  int count = 16;
  int window = 4;
  int rounds = 5;
  int singles = 9;
};

Options parse(int argc, char** argv) {
  Options o;
  CLI::App app{"gpu_xnode_bench: a device tensor on node A to a host tensor on node B against each stage "
               "alone (bench/gpu/gpu_xnode starts the daemons)"};
  app.add_option("--socket-a", o.socketA, "node A's daemon socket (the sender's)")->required();
  app.add_option("--socket-b", o.socketB, "node B's daemon socket (the receiver's)")->required();
  app.add_option("--sizes", o.sizes, "tensor sizes in bytes, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  app.add_option("--count", o.count, "streamed transfers per phase and round")->check(CLI::Range(1, 1000000));
  app.add_option("--window", o.window, "streamed transfers in flight")->check(CLI::Range(1, 1024));
  app.add_option("--rounds", o.rounds, "rounds (the median is reported)")->check(CLI::Range(1, 1000));
  app.add_option("--singles", o.singles, "one-at-a-time transfers per phase (0: none)")
      ->check(CLI::Range(0, 1000000));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::exit(app.exit(e));
  }
  return o;
}

std::string idOf(size_t phase, int i) { return "gx-" + std::to_string(phase) + "-" + std::to_string(i); }

std::string sizeName(uint64_t bytes) {
  if (bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + "MiB";
  return std::to_string(bytes) + "B";
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

sidecar::RankConfig rankAt(int rank, const std::string& socket) {
  sidecar::RankConfig c;
  c.rank = rank;
  c.sendHint = {sidecar::Dtype::kUint8, {1 << 20}};
  c.recvHint = {sidecar::Dtype::kUint8, {1 << 20}};
  c.socketPath = socket;
  return c;
}

// Arrival times per phase, written by the receiver threads.
struct Arrivals {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<Clock::time_point> last;
  std::vector<bool> done;
  std::string error;

  void finish(size_t phase, Clock::time_point at) {
    std::lock_guard<std::mutex> lock(mutex);
    last[phase] = at;
    done[phase] = true;
    changed.notify_all();
  }
  void fail(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex);
    if (error.empty()) error = what;
    changed.notify_all();
  }
  Clock::time_point wait(size_t phase) {
    std::unique_lock<std::mutex> lock(mutex);
    changed.wait(lock, [&] { return done[phase] || !error.empty(); });
    if (!error.empty()) {
      std::fprintf(stderr, "gpu_xnode_bench: %s\n", error.c_str());
      std::exit(1);
    }
    return last[phase];
  }
};

void receive(int rank, const std::string& socket, const std::vector<Phase>& plan, Arrivals& arrivals) {
  try {
    auto sidecar = sidecar::Sidecar::connect(rankAt(rank, socket));
    for (size_t p = 0; p < plan.size(); ++p) {
      if (plan[p].receiver() != rank) continue;
      Clock::time_point at;
      for (int i = 0; i < plan[p].count; ++i) {
        auto got = sidecar.recv(idOf(p, i), 0, 120'000);
        at = Clock::now();
        if (got.kind != sidecar::Received::Kind::kTensor || got.tensor.sizeBytes != plan[p].bytes) {
          return arrivals.fail("rank " + std::to_string(rank) + " got something else for " + idOf(p, i));
        }
        sidecar.markDone(idOf(p, i));
      }
      arrivals.finish(p, at);
    }
  } catch (const std::exception& e) {
    arrivals.fail("rank " + std::to_string(rank) + ": " + e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  std::vector<Phase> plan;
  for (int r = 0; r < o.rounds; ++r) {
    for (uint64_t bytes : o.sizes) {
      for (Kind k : {Kind::kCopy, Kind::kNet, Kind::kE2e}) plan.push_back({k, bytes, o.count, o.window});
    }
  }
  for (int s = 0; s < o.singles; ++s) {
    for (uint64_t bytes : o.sizes) {
      for (Kind k : {Kind::kCopy, Kind::kNet, Kind::kE2e}) plan.push_back({k, bytes, 1, 1});
    }
  }
  uint64_t largest = *std::max_element(o.sizes.begin(), o.sizes.end());
  void* device = nullptr;
  if (cudaMalloc(&device, largest) != cudaSuccess || cudaMemset(device, 7, largest) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    std::fprintf(stderr, "gpu_xnode_bench: no GPU memory for %llu bytes\n", (unsigned long long)largest);
    return 1;
  }
  cudaDeviceProp props{};
  cudaGetDeviceProperties(&props, 0);
  int driver = 0;
  cudaDriverGetVersion(&driver);
  std::printf("{\"name\":\"device\",\"gpu\":\"%s\",\"cuda_driver\":%d}\n", props.name, driver);
  std::fflush(stdout);

  Arrivals arrivals;
  arrivals.last.resize(plan.size());
  arrivals.done.resize(plan.size(), false);
  std::thread local([&] { receive(1, o.socketA, plan, arrivals); });
  std::thread remote([&] { receive(2, o.socketB, plan, arrivals); });

  std::vector<double> seconds(plan.size());
  try {
    auto sender = sidecar::Sidecar::connect(rankAt(0, o.socketA));
    for (size_t p = 0; p < plan.size(); ++p) {
      const Phase& phase = plan[p];
      std::deque<sidecar::SendHandle> inFlight;
      auto start = Clock::now();
      for (int i = 0; i < phase.count; ++i) {
        if (static_cast<int>(inFlight.size()) >= phase.window) {
          inFlight.front().wait();
          inFlight.pop_front();
        }
        std::string id = idOf(p, i);
        if (phase.kind == Kind::kNet) {
          auto tensor = sender.allocateTensor(sidecar::Dtype::kUint8, {int64_t(phase.bytes)});
          static_cast<uint8_t*>(tensor.data())[0] = 1;  // zero copy: the bytes are the arena's
          inFlight.push_back(sender.send(id, std::move(tensor), {{2}}));
        } else {
          sidecar::DeviceTensorRef ref{sidecar::Dtype::kUint8, {int64_t(phase.bytes)}, {}, device, 0, nullptr};
          inFlight.push_back(sender.send(id, ref, {{phase.receiver()}}));
        }
      }
      for (auto& h : inFlight) h.wait();
      seconds[p] = std::chrono::duration<double>(arrivals.wait(p) - start).count();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_xnode_bench: sender: %s\n", e.what());
    std::_Exit(1);
  }
  local.join();
  remote.join();

  auto gbps = [&](size_t p) { return plan[p].bytes * double(plan[p].count) / seconds[p] / 1e9; };
  for (uint64_t bytes : o.sizes) {
    std::vector<double> copy, net, e2e, ratio, copyUs, netUs, e2eUs;
    for (size_t p = 0; p + 2 < plan.size(); ++p) {
      if (plan[p].bytes != bytes || plan[p].kind != Kind::kCopy) continue;
      if (plan[p].count > 1) {
        copy.push_back(gbps(p));
        net.push_back(gbps(p + 1));
        e2e.push_back(gbps(p + 2));
        ratio.push_back(gbps(p + 2) / std::min(gbps(p), gbps(p + 1)));
      } else {
        copyUs.push_back(seconds[p] * 1e6);
        netUs.push_back(seconds[p + 1] * 1e6);
        e2eUs.push_back(seconds[p + 2] * 1e6);
      }
    }
    std::printf("{\"name\":\"stream_%s\",\"bytes\":%llu,\"count\":%d,\"window\":%d,\"copy_gbps\":%.2f,"
                "\"net_gbps\":%.2f,\"e2e_gbps\":%.2f,\"ratio\":%.3f,\"ratio_min\":%.3f,\"ratio_max\":%.3f}\n",
                sizeName(bytes).c_str(), (unsigned long long)bytes, o.count, o.window, median(copy),
                median(net), median(e2e), median(ratio),
                ratio.empty() ? 0 : *std::min_element(ratio.begin(), ratio.end()),
                ratio.empty() ? 0 : *std::max_element(ratio.begin(), ratio.end()));
    if (!copyUs.empty()) {
      std::printf("{\"name\":\"single_%s\",\"copy_us\":%.0f,\"net_us\":%.0f,\"e2e_us\":%.0f}\n",
                  sizeName(bytes).c_str(), median(copyUs), median(netUs), median(e2eUs));
    }
  }
  cudaFree(device);
  return 0;
}
