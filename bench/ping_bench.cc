// The control-path round trip: `ping` served by sidecard's io_uring reactor, beside two baselines
// measured in the same run and the same CPU placement:
//   - raw: one byte written and echoed over a socketpair by a plain blocking thread;
//   - stock: the same Sidecar service served by Cap'n Proto on KJ's own epoll event port
//     (kj::setupAsyncIo), the way a stock capnp server runs.
// The client is the same (libsidecar's Client) for ours and stock, so the difference is the server.
//
// Placements: "same" puts client and server on CPU 0; "cross" puts the server on CPU 1. Waking a
// sleeping CPU costs tens of microseconds on these VMs, so cross-CPU numbers are dominated by
// wake-ups and the two placements must not be compared with each other.
//
// The main() prints the medians and the ratios ours/stock and ours/raw at the end.

#include <benchmark/benchmark.h>
#include <spdlog/spdlog.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <pthread.h>
#include <sched.h>
#include <sidecar/client.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <future>
#include <map>
#include <string>
#include <thread>

#include "cpu_pinning.h"
#include "median_reporter.h"
#include "daemon/daemon.h"
#include "rpc/sidecar_service.h"

namespace {

using sidecar::bench::pinTo;
using sidecar::bench::unpin;

int serverCpu(int placement) { return placement == 0 ? 0 : 1; }
const char* placementName(int placement) { return placement == 0 ? "same" : "cross"; }

std::string tempSocket(const char* tag) {
  return "/tmp/sidecar-bench-" + std::to_string(getpid()) + "-" + tag + ".sock";
}

// ---- raw socketpair --------------------------------------------------------------------------

void BM_RawSocketpair(benchmark::State& state) {
  int placement = static_cast<int>(state.range(0));
  int fds[2];
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
  unpin();
  std::thread echo([fd = fds[1], placement]() {
    pinTo(serverCpu(placement));
    char byte;
    while (read(fd, &byte, 1) == 1) {
      if (write(fd, &byte, 1) != 1) break;
    }
  });
  pinTo(0);
  char byte = 'x';
  for (auto _ : state) {
    if (write(fds[0], &byte, 1) != 1 || read(fds[0], &byte, 1) != 1) {
      state.SkipWithError("socketpair echo failed");
      break;
    }
  }
  close(fds[0]);
  echo.join();
  close(fds[1]);
  state.SetLabel(placementName(placement));
}

// ---- sidecard --------------------------------------------------------------------------------

void BM_PingSidecard(benchmark::State& state, bool tcp) {
  int placement = static_cast<int>(state.range(0));
  sidecar::daemon::Config config;
  config.socketPath = tempSocket("ours");
  config.tcpListen = "127.0.0.1:0";
  config.nodeId = "bench";
  config.cores = 1;
  config.cpuList = {serverCpu(placement)};
  config.spinUs = static_cast<uint32_t>(state.range(1));
  unpin();
  sidecar::daemon::Daemon daemon(config);
  daemon.start();
  pinTo(0);
  {
    auto client = tcp ? sidecar::Client::connectTcp("127.0.0.1:" + std::to_string(daemon.tcpPort()))
                      : sidecar::Client::connectUnix(config.socketPath);
    for (auto _ : state) client.ping();
  }
  daemon.stop();
  state.SetLabel(std::string(placementName(placement)) + " spin=" +
                 std::to_string(config.spinUs) + "us");
}

// ---- stock Cap'n Proto on KJ's epoll port ----------------------------------------------------

struct FakeNode final : sidecar::rpc::NodeState {
  kj::Promise<void> fillInfo(sidecar::proto::NodeInfo::Builder info) override {
    info.setProtocolVersion(sidecar::proto::PROTOCOL_VERSION);
    info.setVersion("stock");
    return kj::READY_NOW;
  }
};

void BM_PingStockKj(benchmark::State& state, bool tcp) {
  int placement = static_cast<int>(state.range(0));
  std::string socketPath = tempSocket("stock");
  unlink(socketPath.c_str());
  std::promise<uint16_t> ready;
  // Closing our end of this socketpair tells the server thread to stop.
  int stopFds[2];
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, stopFds);
  unpin();
  std::thread server([&]() {
    pinTo(serverCpu(placement));
    auto io = kj::setupAsyncIo();
    FakeNode node;
    capnp::TwoPartyServer twoParty(kj::heap<sidecar::rpc::SidecarService>(node));
    auto address = io.provider->getNetwork()
                       .parseAddress(tcp ? kj::str("127.0.0.1:0") : kj::str("unix:", socketPath.c_str()))
                       .wait(io.waitScope);
    auto listener = address->listen();
    auto stop = io.lowLevelProvider->wrapSocketFd(stopFds[1]);
    char byte;
    auto stopped = stop->tryRead(&byte, 1, 1).ignoreResult();
    ready.set_value(static_cast<uint16_t>(listener->getPort()));
    stopped.exclusiveJoin(twoParty.listen(*listener)).wait(io.waitScope);
  });
  uint16_t port = ready.get_future().get();
  pinTo(0);
  {
    auto client = tcp ? sidecar::Client::connectTcp("127.0.0.1:" + std::to_string(port))
                      : sidecar::Client::connectUnix(socketPath);
    for (auto _ : state) client.ping();
  }
  close(stopFds[0]);
  server.join();
  close(stopFds[1]);
  unlink(socketPath.c_str());
  state.SetLabel(placementName(placement));
}

void BM_PingSidecardUnix(benchmark::State& state) { BM_PingSidecard(state, false); }
void BM_PingSidecardTcp(benchmark::State& state) { BM_PingSidecard(state, true); }
void BM_PingStockKjUnix(benchmark::State& state) { BM_PingStockKj(state, false); }
void BM_PingStockKjTcp(benchmark::State& state) { BM_PingStockKj(state, true); }

// Args: placement (0 same CPU, 1 cross CPU) [, daemon spinUs].
BENCHMARK(BM_RawSocketpair)->Arg(0)->Arg(1)->UseRealTime();
BENCHMARK(BM_PingStockKjUnix)->Arg(0)->Arg(1)->UseRealTime();
BENCHMARK(BM_PingStockKjTcp)->Arg(0)->Arg(1)->UseRealTime();
BENCHMARK(BM_PingSidecardUnix)->Args({0, 0})->Args({0, 50})->Args({1, 0})->Args({1, 50})->UseRealTime();
BENCHMARK(BM_PingSidecardTcp)->Args({0, 0})->Args({0, 50})->Args({1, 0})->Args({1, 50})->UseRealTime();


}  // namespace

int main(int argc, char** argv) {
  spdlog::set_level(spdlog::level::warn);
  benchmark::Initialize(&argc, argv);
  sidecar::bench::MedianReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  auto get = [&](const std::string& name) {
    auto it = reporter.figures.find(name);
    return it == reporter.figures.end() ? 0.0 : it->second.realTimeUs;
  };
  std::printf("\nping round trip, median us (ratio < 1 means sidecard is faster):\n");
  for (int placement = 0; placement < 2; ++placement) {
    std::string p = std::to_string(placement);
    double raw = get("BM_RawSocketpair/" + p);
    for (const char* transport : {"Unix", "Tcp"}) {
      double stock = get(std::string("BM_PingStockKj") + transport + "/" + p);
      for (const char* spin : {"0", "50"}) {
        double ours = get(std::string("BM_PingSidecard") + transport + "/" + p + "/" + spin);
        if (ours == 0 || stock == 0 || raw == 0) continue;
        std::printf("  %-5s %-4s spin=%-3sus: sidecard %7.1f  stock-kj %7.1f  raw %6.1f  "
                    "sidecard/stock %.2f  sidecard/raw %.2f\n",
                    placementName(placement), transport, spin, ours, stock, raw, ours / stock,
                    ours / raw);
      }
    }
  }
  benchmark::Shutdown();
  return 0;
}
