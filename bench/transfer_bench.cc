// Same-node transfers through a real sidecard (in this process) between a producer rank (this
// process, rank 0) and a consumer rank (a forked child process, rank 1), each beside its baseline
// measured in the same run and the same CPU placement:
//
//   BM_Memcpy64MiB           one memcpy of 64 MiB into a pre-touched destination (anonymous
//                            private memory, and a memfd MAP_SHARED mapping: the arena's kind)
//   BM_CopySend64MiB         send(TensorRef) of 64 MiB (allocate RPC + memcpy into the arena + send
//                            RPC) until the consumer's recv returns the view; each iteration first
//                            times one plain memcpy of the same source into a touched memfd
//                            mapping (memcpy_p50_GBps): the ratio uses that interleaved baseline
//   BM_ZeroCopySend64MiB     send(ArenaTensor) of 64 MiB allocated and filled beforehand (untimed)
//                            until the consumer's recv returns the view. Args placement/MiB/x:
//                            x = 0 the producer memsets the whole tensor just before the send,
//                            x = 1 it writes only the 16 checked bytes (the send path alone);
//                            diagnostics of what the fill costs: x = 2 fill, then 2 ms idle
//                            before the send; x = 3 fill a private 64 MiB buffer (not the
//                            arena) and only stamp the tensor
//   BM_SocketpairRtt         one byte written and echoed by the child over a socketpair (blocking)
//   BM_ObjectLatency64B      send of a 64-byte object until the consumer's recv returns it
//   BM_TensorLatency4KiB     send(TensorRef) of 4 KiB until the consumer's recv returns the view
//   BM_ZeroCopyLatency4KiB   send(ArenaTensor) of 4 KiB (allocated untimed) until recv returns
//   BM_Allocate4KiB          allocateTensor of 4 KiB alone (released untimed): over the lane,
//                            against the socketpair round trip a call costs at least
//   BM_ObjectSends64B        2000 pipelined sends of 64-byte objects (all handles waited); the
//                            consumer recvs them and marks them done; sends/s and end-to-end/s
//
// One-way times run from the producer's CLOCK_MONOTONIC before send() to the consumer's
// CLOCK_MONOTONIC after recv() returned (same machine, same clock). Before each timed send the
// consumer has posted its recv and a markDone round trip on the same session has pushed it to the
// daemon, so the daemon holds a waiting recv when the send arrives. Every timed loop is preceded by
// untimed warm-up iterations (the arena's pages are faulted in the producer's mapping by the first
// copies; the cold first copy is reported as `cold_ms`). The consumer checks the first and last
// 8 bytes of every tensor it receives (the iteration number, written fresh by the producer).
//
// Placements (daemon reactor CPU / producer CPU / consumer CPU):
//   0 "all-cpu0":     0 / 0 / 0  (everything on one core)
//   1 "daemon-alone": 0 / 1 / 1  (the daemon has its own core; producer and consumer share one)
//   2 "spread":       0 / 0 / 1  (producer with the daemon, consumer alone)
// The socketpair baseline runs with the producer's and the consumer's CPUs of the same placement.
// The daemon runs with its shipped defaults (spinUs 50, 1 core); its arena is 512 MiB of whatever
// page kind `auto` gets on this machine (printed at the end).
//
// The main() prints medians, ratios and the targets at the end.

#include <benchmark/benchmark.h>
#include <pthread.h>
#include <sched.h>
#include <sidecar/sidecar.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cpu_pinning.h"
#include "median_reporter.h"
#include "daemon/daemon.h"
#include "shm/arena.h"

namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kBigBytes = 64 * kMiB;
constexpr uint64_t kArenaBytes = 512 * kMiB;
constexpr int kBatch = 2000;

struct Placement {
  const char* name;
  int daemonCpu, producerCpu, consumerCpu;
};
constexpr Placement kPlacements[] = {
    {"all-cpu0", 0, 0, 0},
    {"daemon-alone", 0, 1, 1},
    {"spread", 0, 0, 1},
};

using sidecar::bench::cpuOf;
using sidecar::bench::pinTo;
using sidecar::bench::unpin;

uint64_t nowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(ts.tv_nsec);
}

long minorFaults() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Touched memory of `bytes`: anonymous private, or a memfd mapped shared (the arena's kind).
std::byte* touchedBuffer(uint64_t bytes, bool shared) {
  void* p;
  if (shared) {
    int fd = memfd_create("transfer-bench", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0) return nullptr;
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
  } else {
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  if (p == MAP_FAILED) return nullptr;
  memset(p, 0x5a, bytes);
  return static_cast<std::byte*>(p);
}

// ---- the consumer process ---------------------------------------------------------------------

enum Op : int32_t { kConnect, kDisconnect, kArm, kBatchArm, kFinish, kEcho, kExit };

struct Command {
  int32_t op = 0;
  int32_t arg = 0;      // cpu (kConnect), count (kBatchArm, kEcho)
  uint64_t seq = 0;     // expected first/last 8 bytes of a tensor (kArm)
  uint64_t bytes = 0;   // expected tensor size, 0: an object (kArm)
  char text[160] = {};  // socket path (kConnect), data id or prefix (kArm, kBatchArm)
};

struct Reply {
  int32_t ok = 1;
  uint64_t timeNs = 0;
  char error[200] = {};
};

int gControl = -1;  // SOCK_SEQPACKET to the child (parent) or to the parent (child)
int gEcho = -1;     // SOCK_STREAM for the socketpair baseline

void sendMsg(const void* msg, size_t size) {
  if (write(gControl, msg, size) != static_cast<ssize_t>(size)) {
    perror("transfer_bench: control write");
    _exit(3);
  }
}

template <typename T>
T recvMsg() {
  T msg;
  if (read(gControl, &msg, sizeof msg) != static_cast<ssize_t>(sizeof msg)) {
    perror("transfer_bench: control read");
    _exit(3);
  }
  return msg;
}

void replyError(const std::string& message) {
  Reply reply;
  reply.ok = 0;
  snprintf(reply.error, sizeof reply.error, "consumer: %s", message.c_str());
  sendMsg(&reply, sizeof reply);
}

void replyTime(uint64_t timeNs) {
  Reply reply;
  reply.timeNs = timeNs;
  sendMsg(&reply, sizeof reply);
}

void checkReceived(const sidecar::Received& r, const Command& cmd) {
  if (cmd.bytes == 0) {
    if (r.kind != sidecar::Received::Kind::kObject || r.object.bytes.size() != 64 ||
        memcmp(r.object.bytes.data(), &cmd.seq, sizeof cmd.seq) != 0) {
      throw std::runtime_error(std::string("wrong object for ") + cmd.text);
    }
    return;
  }
  if (r.kind != sidecar::Received::Kind::kTensor || r.tensor.sizeBytes != cmd.bytes) {
    throw std::runtime_error(std::string("wrong tensor kind or size for ") + cmd.text);
  }
  uint64_t first, last;
  auto* data = static_cast<const std::byte*>(r.tensor.data);
  memcpy(&first, data, 8);
  memcpy(&last, data + cmd.bytes - 8, 8);
  if (first != cmd.seq || last != cmd.seq) {
    throw std::runtime_error(std::string("stale or wrong bytes in ") + cmd.text);
  }
}

[[noreturn]] void consumerMain() {
  std::optional<sidecar::Sidecar> sidecar;
  std::vector<std::string> pendingDone;  // received, to be marked done at the next flush
  auto markPending = [&]() {
    for (const auto& id : pendingDone) sidecar->markDone(id);
    pendingDone.clear();
  };
  for (;;) {
    auto cmd = recvMsg<Command>();
    try {
      switch (cmd.op) {
        case kConnect: {
          pinTo(cmd.arg);
          sidecar::RankConfig config;
          config.rank = 1;
          config.group = {1};
          config.sendHint = {sidecar::Dtype::kUint8, {4096}};
          config.socketPath = cmd.text;
          sidecar.emplace(sidecar::Sidecar::connect(config));
          pendingDone.clear();
          replyTime(0);
          break;
        }
        case kDisconnect:
          if (sidecar) markPending();
          sidecar.reset();
          replyTime(0);
          break;
        case kArm: {
          // Post the recv, push it to the daemon with the previous markDone (same session, so the
          // daemon has the recv before it answers), say ready, then wait for the data.
          auto handle = sidecar->recvAsync(cmd.text);
          markPending();
          replyTime(0);
          auto received = handle.wait();
          uint64_t t1 = nowNs();
          checkReceived(received, cmd);
          pendingDone.emplace_back(cmd.text);
          replyTime(t1);
          break;
        }
        case kBatchArm: {
          std::vector<sidecar::RecvHandle> handles;
          handles.reserve(static_cast<size_t>(cmd.arg));
          std::string prefix = cmd.text;
          for (int i = 0; i < cmd.arg; ++i) handles.push_back(sidecar->recvAsync(prefix + std::to_string(i)));
          markPending();
          replyTime(0);
          for (int i = 0; i < cmd.arg; ++i) {
            auto r = handles[static_cast<size_t>(i)].wait();
            if (r.kind != sidecar::Received::Kind::kObject || r.object.bytes.size() != 64) {
              throw std::runtime_error("wrong object in batch " + prefix);
            }
          }
          for (int i = 0; i < cmd.arg; ++i) sidecar->markDone(prefix + std::to_string(i));
          replyTime(nowNs());
          break;
        }
        case kFinish:
          markPending();
          replyTime(0);
          break;
        case kEcho: {
          pinTo(static_cast<int>(cmd.seq));
          replyTime(0);
          char byte;
          for (int i = 0; i < cmd.arg; ++i) {
            if (read(gEcho, &byte, 1) != 1 || write(gEcho, &byte, 1) != 1) _exit(4);
          }
          break;
        }
        case kExit:
          sidecar.reset();
          _exit(0);
      }
    } catch (const std::exception& e) {
      replyError(e.what());
    }
  }
}

// ---- the producer side ---------------------------------------------------------------------

// Throws with the consumer's message when it failed.
uint64_t awaitConsumer() {
  auto reply = recvMsg<Reply>();
  if (!reply.ok) throw std::runtime_error(reply.error);
  return reply.timeNs;
}

void command(Op op, int32_t arg = 0, const std::string& text = {}, uint64_t seq = 0,
             uint64_t bytes = 0) {
  Command cmd;
  cmd.op = op;
  cmd.arg = arg;
  cmd.seq = seq;
  cmd.bytes = bytes;
  snprintf(cmd.text, sizeof cmd.text, "%s", text.c_str());
  sendMsg(&cmd, sizeof cmd);
}

std::string gPageKind;  // what the arena got, for the summary

// A daemon, the consumer connected as rank 1 and this thread connected as rank 0, placed.
class Setup {
 public:
  explicit Setup(const Placement& p) {
    socketPath_ = "/tmp/sidecar-transfer-bench-" + std::to_string(getpid()) + ".sock";
    sidecar::daemon::Config config;
    config.socketPath = socketPath_;
    config.tcpListen = "127.0.0.1:0";
    config.nodeId = "transfer-bench";
    config.cores = 1;
    config.cpuList = {cpuOf(p.daemonCpu)};
    config.arenaBytes = kArenaBytes;
    unpin();
    daemon_.emplace(config);
    daemon_->start();
    gPageKind = std::string(sidecar::shm::pageKindName(daemon_->arena().pageKind())) + " (" +
                daemon_->arena().pageKindReason() + ")";
    command(kConnect, cpuOf(p.consumerCpu), socketPath_);
    awaitConsumer();
    pinTo(p.producerCpu);
    sidecar::RankConfig rc;
    rc.rank = 0;
    rc.group = {0};
    rc.sendHint = {sidecar::Dtype::kUint8, {4096}};
    rc.socketPath = socketPath_;
    sidecar_.emplace(sidecar::Sidecar::connect(rc));
  }
  ~Setup() {
    try {
      command(kDisconnect);
      awaitConsumer();
    } catch (const std::exception& e) {
      fprintf(stderr, "transfer_bench: %s\n", e.what());
    }
    sidecar_.reset();
    daemon_->stop();
    daemon_.reset();
    unpin();
  }
  sidecar::Sidecar& sidecar() { return *sidecar_; }

 private:
  std::string socketPath_;
  std::optional<sidecar::daemon::Daemon> daemon_;
  std::optional<sidecar::Sidecar> sidecar_;
};

const sidecar::Groups kToConsumer = {{1}};

// Per-iteration samples: manual time, plus p50/p99 counters.
struct Samples {
  std::vector<double> ns;
  void add(benchmark::State& state, uint64_t elapsedNs) {
    ns.push_back(static_cast<double>(elapsedNs));
    state.SetIterationTime(static_cast<double>(elapsedNs) * 1e-9);
  }
  double quantile(double q) {
    if (ns.empty()) return 0;
    std::vector<double> s = ns;
    std::sort(s.begin(), s.end());
    size_t i = std::min(s.size() - 1, static_cast<size_t>(q * static_cast<double>(s.size())));
    return s[i];
  }
  void report(benchmark::State& state, uint64_t bytes = 0) {
    double p50 = quantile(0.5), p99 = quantile(0.99);
    state.counters["p50_us"] = p50 / 1000;
    state.counters["p99_us"] = p99 / 1000;
    if (bytes != 0) state.counters["p50_GBps"] = static_cast<double>(bytes) / p50;
  }
};

// One armed, timed transfer: the consumer posts recv(id) and says ready; `send` runs from t0.
template <typename Send>
uint64_t oneWay(const std::string& id, uint64_t seq, uint64_t bytes, Send&& send) {
  command(kArm, 0, id, seq, bytes);
  awaitConsumer();  // ready
  uint64_t t0 = nowNs();
  send();
  uint64_t t1 = awaitConsumer();
  return t1 - t0;
}

void finish() {
  command(kFinish);
  awaitConsumer();
}

template <typename Body>
void guarded(benchmark::State& state, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ---- 64 MiB -------------------------------------------------------------------------------------

std::byte* gSource = nullptr;  // 64 MiB, touched

void stamp(std::byte* data, uint64_t bytes, uint64_t seq) {
  memcpy(data, &seq, 8);
  memcpy(data + bytes - 8, &seq, 8);
}

void BM_Memcpy64MiB(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  bool shared = state.range(1) != 0;
  pinTo(p.producerCpu);
  std::byte* dst = touchedBuffer(kBigBytes, shared);
  if (dst == nullptr) {
    state.SkipWithError("mmap failed");
    return;
  }
  for (int i = 0; i < 2; ++i) memcpy(dst, gSource, kBigBytes);  // warm-up
  Samples samples;
  long faults = minorFaults();
  for (auto _ : state) {
    uint64_t t0 = nowNs();
    memcpy(dst, gSource, kBigBytes);
    benchmark::ClobberMemory();
    samples.add(state, nowNs() - t0);
  }
  state.counters["minflt_per_iter"] =
      static_cast<double>(minorFaults() - faults) / static_cast<double>(state.iterations());
  samples.report(state, kBigBytes);
  munmap(dst, kBigBytes);
  unpin();
  state.SetLabel(std::string(p.name) + (shared ? " memfd-shared" : " anonymous"));
}

void BM_CopySend64MiB(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    sidecar::TensorRef ref{sidecar::Dtype::kUint8, {static_cast<int64_t>(kBigBytes)}, {}, gSource};
    uint64_t seq = 0;
    auto transfer = [&]() {
      ++seq;
      stamp(gSource, kBigBytes, seq);
      return oneWay("big-" + std::to_string(seq), seq, kBigBytes,
                    [&]() { sc.send("big-" + std::to_string(seq), ref, kToConsumer).wait(); });
    };
    // The baseline beside it: one memcpy of the same source into a touched memfd mapping (the
    // arena's kind of memory), timed in the same loop just before each transfer.
    std::byte* dst = touchedBuffer(kBigBytes, true);
    if (dst == nullptr) throw std::runtime_error("mmap failed");
    Samples memcpySamples;
    auto baseline = [&]() {
      uint64_t t0 = nowNs();
      memcpy(dst, gSource, kBigBytes);
      benchmark::ClobberMemory();
      memcpySamples.ns.push_back(static_cast<double>(nowNs() - t0));
    };
    long faults0 = minorFaults();
    uint64_t cold = transfer();
    long coldFaults = minorFaults() - faults0;
    // Warm-up: enough copies to have touched every arena page the allocator hands out.
    for (uint64_t i = 0; i < kArenaBytes / kBigBytes + 2; ++i) transfer();
    Samples samples;
    long faults = minorFaults();
    for (auto _ : state) {
      baseline();
      samples.add(state, transfer());
    }
    state.counters["minflt_per_iter"] =
        static_cast<double>(minorFaults() - faults - 0) / static_cast<double>(state.iterations());
    state.counters["memcpy_p50_GBps"] = static_cast<double>(kBigBytes) / memcpySamples.quantile(0.5);
    munmap(dst, kBigBytes);
    state.counters["cold_ms"] = static_cast<double>(cold) / 1e6;
    state.counters["cold_minflt"] = static_cast<double>(coldFaults);
    samples.report(state, kBigBytes);
    finish();
  });
  state.SetLabel(p.name);
}

void BM_ZeroCopySend64MiB(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  uint64_t bytes = state.range(1) > 0 ? static_cast<uint64_t>(state.range(1)) * kMiB : kBigBytes;
  int64_t variant = state.range(2);
  bool fill = variant == 0 || variant == 2;
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    uint64_t seq = 0;
    std::byte* elsewhere = variant == 3 ? touchedBuffer(bytes, false) : nullptr;
    auto transfer = [&]() {
      ++seq;
      auto tensor = sc.allocateTensor(sidecar::Dtype::kUint8, {static_cast<int64_t>(bytes)});
      if (fill) memset(tensor.data(), static_cast<int>(seq), bytes);  // the producer's "fill", untimed
      if (variant == 2) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      if (elsewhere != nullptr) memset(elsewhere, static_cast<int>(seq), bytes);
      stamp(static_cast<std::byte*>(tensor.data()), bytes, seq);
      return oneWay("zc-" + std::to_string(seq), seq, bytes, [&]() {
        sc.send("zc-" + std::to_string(seq), std::move(tensor), kToConsumer).wait();
      });
    };
    for (int i = 0; i < 3; ++i) transfer();
    Samples samples;
    for (auto _ : state) samples.add(state, transfer());
    samples.report(state);
    finish();
    if (elsewhere != nullptr) munmap(elsewhere, bytes);
  });
  static const char* const kVariants[] = {" filled just before", " stamp only",
                                          " filled, then 2 ms idle", " private buffer filled"};
  state.SetLabel(std::string(p.name) + " " + std::to_string(bytes / kMiB) + " MiB" +
                 kVariants[variant]);
}

// ---- latency ------------------------------------------------------------------------------------

void BM_SocketpairRtt(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  int64_t total = state.max_iterations + 100;
  Command cmd;
  cmd.op = kEcho;
  cmd.arg = static_cast<int32_t>(total);
  cmd.seq = static_cast<uint64_t>(cpuOf(p.consumerCpu));
  sendMsg(&cmd, sizeof cmd);
  awaitConsumer();
  pinTo(p.producerCpu);
  char byte = 'x';
  auto rtt = [&]() {
    uint64_t t0 = nowNs();
    if (write(gEcho, &byte, 1) != 1 || read(gEcho, &byte, 1) != 1) _exit(5);
    return nowNs() - t0;
  };
  for (int i = 0; i < 100; ++i) rtt();
  Samples samples;
  for (auto _ : state) samples.add(state, rtt());
  samples.report(state);
  unpin();
  state.SetLabel(p.name);
}

void BM_ObjectLatency64B(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    sidecar::Object object{7, std::string(64, 'o')};
    uint64_t seq = 0;
    auto transfer = [&]() {
      ++seq;
      memcpy(object.bytes.data(), &seq, 8);
      std::string id = "obj-" + std::to_string(seq);
      return oneWay(id, seq, 0, [&]() { sc.send(id, object, kToConsumer).wait(); });
    };
    for (int i = 0; i < 200; ++i) transfer();
    Samples samples;
    for (auto _ : state) samples.add(state, transfer());
    samples.report(state);
    finish();
  });
  state.SetLabel(p.name);
}

void BM_TensorLatency4KiB(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  bool zeroCopy = state.range(1) != 0;
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    std::vector<std::byte> source(4096, std::byte{1});
    sidecar::TensorRef ref{sidecar::Dtype::kFloat32, {1024}, {}, source.data()};
    uint64_t seq = 0;
    auto transfer = [&]() {
      ++seq;
      std::string id = "t4k-" + std::to_string(seq);
      if (zeroCopy) {
        auto tensor = sc.allocateTensor(sidecar::Dtype::kFloat32, {1024});
        memset(tensor.data(), 1, 4096);
        stamp(static_cast<std::byte*>(tensor.data()), 4096, seq);
        return oneWay(id, seq, 4096,
                      [&]() { sc.send(id, std::move(tensor), kToConsumer).wait(); });
      }
      stamp(source.data(), 4096, seq);
      return oneWay(id, seq, 4096, [&]() { sc.send(id, ref, kToConsumer).wait(); });
    };
    for (int i = 0; i < 200; ++i) transfer();
    Samples samples;
    for (auto _ : state) samples.add(state, transfer());
    samples.report(state);
    finish();
  });
  state.SetLabel(std::string(p.name) + (zeroCopy ? " zero-copy" : " copying"));
}

// allocateTensor alone: the producer's round trip to the daemon for a place in the arena (over the
// session's lane where the daemon takes allocates there, else a call), released untimed.
void BM_Allocate4KiB(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    auto allocate = [&]() {
      uint64_t t0 = nowNs();
      auto tensor = sc.allocateTensor(sidecar::Dtype::kFloat32, {1024});
      uint64_t t1 = nowNs();
      sc.release(std::move(tensor));
      return t1 - t0;
    };
    for (int i = 0; i < 200; ++i) allocate();
    Samples samples;
    for (auto _ : state) samples.add(state, allocate());
    samples.report(state);
    finish();
  });
  state.SetLabel(p.name);
}

// ---- throughput ---------------------------------------------------------------------------------

void BM_ObjectSends64B(benchmark::State& state) {
  const Placement& p = kPlacements[state.range(0)];
  guarded(state, [&]() {
    Setup setup(p);
    auto& sc = setup.sidecar();
    sidecar::Object object{7, std::string(64, 's')};
    uint64_t batch = 0;
    std::vector<double> sendRates, endToEndRates;
    auto run = [&]() {
      ++batch;
      std::string prefix = "b" + std::to_string(batch) + "-";
      command(kBatchArm, kBatch, prefix);
      awaitConsumer();
      std::vector<sidecar::SendHandle> handles;
      handles.reserve(kBatch);
      uint64_t t0 = nowNs();
      for (int i = 0; i < kBatch; ++i) handles.push_back(sc.send(prefix + std::to_string(i), object, kToConsumer));
      for (auto& h : handles) h.wait();
      uint64_t t1 = nowNs();
      uint64_t t2 = awaitConsumer();
      sendRates.push_back(kBatch / (static_cast<double>(t1 - t0) * 1e-9));
      endToEndRates.push_back(kBatch / (static_cast<double>(t2 - t0) * 1e-9));
      return t1 - t0;
    };
    for (int i = 0; i < 3; ++i) run();
    sendRates.clear();
    endToEndRates.clear();
    Samples samples;
    for (auto _ : state) samples.add(state, run());
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[v.size() / 2];
    };
    state.counters["sends_per_s"] = median(sendRates);
    state.counters["end_to_end_per_s"] = median(endToEndRates);
    samples.report(state);
  });
  state.SetLabel(p.name);
}

// Args: placement [, variant].
BENCHMARK(BM_Memcpy64MiB)->Args({1, 0})->Args({1, 1})->Args({0, 1})->Iterations(30)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_CopySend64MiB)->Arg(1)->Arg(0)->Iterations(30)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ZeroCopySend64MiB)->Args({1,64,0})->Args({1,64,1})->Args({1,1,0})->Args({1,16,0})->Args({0,64,0})->Args({2,64,0})->Args({1,64,2})->Args({1,64,3})->Iterations(30)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SocketpairRtt)->Arg(0)->Arg(1)->Arg(2)->Iterations(3000)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ObjectLatency64B)->Arg(0)->Arg(1)->Arg(2)->Iterations(2000)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TensorLatency4KiB)->Args({0, 0})->Args({1, 0})->Args({2, 0})->Args({1, 1})->Iterations(2000)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Allocate4KiB)->Arg(0)->Arg(1)->Arg(2)->Iterations(2000)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ObjectSends64B)->Arg(0)->Arg(1)->Arg(2)->Iterations(10)->UseManualTime()->Unit(benchmark::kMillisecond);


}  // namespace

int main(int argc, char** argv) {
  // The consumer is forked before anything creates a thread, an event loop or a Sidecar.
  int control[2], echo[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, control) != 0 ||
      socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, echo) != 0) {
    perror("socketpair");
    return 1;
  }
  pid_t child = fork();
  if (child < 0) {
    perror("fork");
    return 1;
  }
  if (child == 0) {
    close(control[0]);
    close(echo[0]);
    gControl = control[1];
    gEcho = echo[1];
    spdlog::set_level(spdlog::level::warn);
    consumerMain();
  }
  close(control[1]);
  close(echo[1]);
  gControl = control[0];
  gEcho = echo[0];

  spdlog::set_level(spdlog::level::warn);
  gSource = touchedBuffer(kBigBytes, false);
  benchmark::Initialize(&argc, argv);
  sidecar::bench::MedianReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  command(kExit);
  waitpid(child, nullptr, 0);

  auto get = [&](const std::string& name, const char* key) {
    auto it = reporter.figures.find(name);
    if (it == reporter.figures.end()) return 0.0;
    auto k = it->second.counters.find(key);
    return k == it->second.counters.end() ? 0.0 : k->second;
  };
  std::printf("\nsame-node transfers (medians of per-iteration samples; arena pages: %s)\n",
              gPageKind.c_str());
  double memcpyShared = get("BM_Memcpy64MiB/1/1", "p50_GBps");
  double memcpyAnon = get("BM_Memcpy64MiB/1/0", "p50_GBps");
  double memcpyShared0 = get("BM_Memcpy64MiB/0/1", "p50_GBps");
  for (int pl : {1, 0}) {
    std::string n = std::to_string(pl);
    double base = get("BM_CopySend64MiB/" + n, "memcpy_p50_GBps");  // interleaved with it
    double separate = pl == 1 ? memcpyShared : memcpyShared0;
    double copy = get("BM_CopySend64MiB/" + n, "p50_GBps");
    if (copy == 0 || base == 0) continue;
    std::printf("  64 MiB copying send->recv [%s]: %.2f GB/s (%.2f ms, p99 %.2f ms); memcpy to "
                "touched memfd in the same loop %.2f GB/s (separate runs: memfd %.2f, anonymous "
                "%.2f); ratio %.2f (target >= 0.90); cold first copy %.1f ms, %g faults\n",
                kPlacements[pl].name, copy, get("BM_CopySend64MiB/" + n, "p50_us") / 1000,
                get("BM_CopySend64MiB/" + n, "p99_us") / 1000, base, separate, memcpyAnon, copy / base,
                get("BM_CopySend64MiB/" + n, "cold_ms"), get("BM_CopySend64MiB/" + n, "cold_minflt"));
  }
  static const char* const kZeroCopyVariants[] = {
      "filled just before", "not filled, stamp only",
      "diagnostic: filled, then 2 ms idle before the send",
      "diagnostic: a private 64 MiB buffer filled instead, tensor stamped"};
  for (const char* args : {"1/64/0", "1/64/1", "1/16/0", "1/1/0", "0/64/0", "2/64/0", "1/64/2", "1/64/3"}) {
    std::string n = std::string("BM_ZeroCopySend64MiB/") + args;
    if (get(n, "p50_us") == 0) continue;
    int pl = args[0] - '0';
    std::printf("  zero-copy send->recv of %s MiB [%s, %s]: median %.1f us, p99 %.1f us "
                "(target for 64 MiB < 100 us)\n",
                std::string(args + 2, strchr(args + 2, '/')).c_str(), kPlacements[pl].name,
                kZeroCopyVariants[args[strlen(args) - 1] - '0'],
                get(n, "p50_us"), get(n, "p99_us"));
  }
  for (int pl : {0, 1, 2}) {
    std::string n = std::to_string(pl);
    double raw = get("BM_SocketpairRtt/" + n, "p50_us");
    double obj = get("BM_ObjectLatency64B/" + n, "p50_us");
    if (raw == 0) continue;
    std::printf("  [%s] socketpair round trip median %.1f us (p99 %.1f)\n", kPlacements[pl].name,
                raw, get("BM_SocketpairRtt/" + n, "p99_us"));
    if (obj != 0) {
      std::printf("  [%s]   64 B object send->recv median %.1f us, p99 %.1f us; "
                  "median/socketpair %.2fx (target <= 5x)\n",
                  kPlacements[pl].name, obj, get("BM_ObjectLatency64B/" + n, "p99_us"), obj / raw);
    }
    if (double a = get("BM_Allocate4KiB/" + n, "p50_us"); a != 0) {
      std::printf("  [%s]   allocateTensor 4 KiB median %.1f us, p99 %.1f us; median/socketpair %.2fx\n",
                  kPlacements[pl].name, a, get("BM_Allocate4KiB/" + n, "p99_us"), a / raw);
    }
    for (int zc : {0, 1}) {
      std::string t = "BM_TensorLatency4KiB/" + n + "/" + std::to_string(zc);
      double v = get(t, "p50_us");
      if (v == 0) continue;
      std::printf("  [%s]   4 KiB tensor (%s) send->recv median %.1f us, p99 %.1f us; "
                  "median/socketpair %.2fx\n",
                  kPlacements[pl].name, zc ? "zero-copy" : "copying", v, get(t, "p99_us"), v / raw);
    }
  }
  for (int pl : {0, 1, 2}) {
    std::string n = "BM_ObjectSends64B/" + std::to_string(pl);
    if (get(n, "sends_per_s") == 0) continue;
    std::printf("  64 B object sends [%s]: %.0f sends/s (batches of %d, all acknowledged), "
                "%.0f/s end to end (consumer recv + markDone)\n",
                kPlacements[pl].name, get(n, "sends_per_s"), kBatch, get(n, "end_to_end_per_s"));
  }
  benchmark::Shutdown();
  return 0;
}
