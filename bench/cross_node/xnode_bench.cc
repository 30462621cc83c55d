// Cross-node transfers between two running daemons (node A and node B, e.g. in two network
// namespaces started by bench/cross_node/perftest), measured from a sender rank on A to a
// receiver rank on B. This binary is only the two clients: it forks the receiver (rank 2 on B's
// socket) and runs the sender (rank 0 on A's socket) itself. Both processes are on one machine,
// so one-way times use one CLOCK_MONOTONIC: from before send() on A to after recv() returned the
// view on B.
//
// Per size, `iterations` timed transfers (after `warmup` untimed ones), one at a time: the
// receiver posts its recv, says "ready" over a pipe, the sender allocates a tensor in A's arena
// (zero copy: only its first and last 8 bytes are written, the iteration number, which the
// receiver checks), stamps the time and sends; the receiver stamps on arrival, marks it done and
// reports the stamp. The two processes pass "ready" and the stamp over pipes (they sleep between
// transfers), or with --handshake spin through one shared page that both poll, so that neither
// sleeps, as ucx_perftest's two processes never do (then keep them off the daemons' CPUs).
// Prints one JSON line per size:
//   {"name":"xfer_64MiB","bytes":67108864,"median_us":..,"p99_us":..,"gbps":..}
// gbps = bytes / median one-way time (decimal GB/s, as ucx_perftest's MB/s are decimal).
// Then, per size of at least 1 MiB, a stream like ucx_perftest's tag_bw: `streamCount` transfers
// sent back to back with up to `window` sends in flight (each allocated in A's arena, waiting for
// space when it is full), received in order, each marked done at once, after `streamWarmup`
// untimed streams of the same shape (ucx_perftest warms up too, and reuses one buffer: a fresh
// arena's first pass through its slabs pays a page fault per 4 KiB page on both nodes where
// there are no huge pages, which on the dev VM cut the figure to a third); prints
//   {"name":"stream_64MiB","bytes":..,"count":..,"gbps":..}
// gbps = count * bytes / (last arrival on B - first send on A).
//
// Then, with --pingpong N, per size under 1 MiB, N round trips measured the way ucx_perftest's
// tag_lat measures (and after `warmup` untimed ones): A sends, B receives and sends the same size
// back, A receives; half the round trip is the one-way figure. Each side allocates its next
// tensor before it waits, and marks done / waits for its send's answer after, so only the two
// transfers are timed. Prints
//   {"name":"pingpong_4KiB","bytes":4096,"median_us":..,"p99_us":..}   (half round trips)
//
// Usage: xnode_bench --socket-a PATH --socket-b PATH [--sizes 4096,1048576,67108864]
//                    [--iterations 30] [--warmup 5] [--rank-a 0] [--rank-b 2] [--pingpong 0]
//                    [--stream-count 16] [--window 4] [--stream-warmup 1]
//                    [--netns-a /var/run/netns/X] [--netns-b /var/run/netns/Y]

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <sched.h>
#include <sidecar/sidecar.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <stdexcept>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

uint64_t nowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000u + uint64_t(ts.tv_nsec);
}

void writeAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) {
      std::perror("write");
      std::exit(2);
    }
    p += w;
    n -= size_t(w);
  }
}

void readAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) {
      std::fprintf(stderr, "xnode_bench: the other process is gone\n");
      std::exit(2);
    }
    p += r;
    n -= size_t(r);
  }
}

std::string sizeName(uint64_t bytes) {
  if (bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + "MiB";
  if (bytes % 1024 == 0) return std::to_string(bytes >> 10) + "KiB";
  return std::to_string(bytes) + "B";
}

struct Options {
  std::string socketA, socketB;
  std::vector<uint64_t> sizes{4096, 1 << 20, 64 << 20};
  int iterations = 30;
  int warmup = 5;
  int streamCount = 16;
  int window = 4;
  int streamWarmup = 1;  // untimed streams per size before the timed one
  int rankA = 0;  // the sender, served by node A
  int rankB = 2;  // the receiver, served by node B
  int pingpong = 0;  // round trips per size under 1 MiB (0: none)
  std::string timesPath;  // per timed transfer: "size send_ns arrive_ns", for bench/cross_node/hops.py
  // Network namespaces (/var/run/netns/...) the sender and the receiver live in, as executors on
  // those hosts would: a rank can then reach the other node's daemon itself (direct sends).
  std::string netnsA, netnsB;
  bool spinHandshake = false;  // --handshake spin: the one-at-a-time loop's handshake polls shared memory
};

// The one-at-a-time loop's handshake (receiver -> sender): "ready for transfer n" and "transfer n
// arrived at t", through pipes or, polled, through one shared page. Counts are n + 1, so 0 means
// nothing yet.
class Handshake {
 public:
  Handshake(bool spin) : spin_(spin) {
    if (pipe(ready_) != 0 || pipe(stamps_) != 0) throw std::runtime_error("pipe failed");
    void* page = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) throw std::runtime_error("mmap of the handshake page failed");
    shared_ = new (page) Shared{};
  }
  // After fork: each process keeps its ends of the pipes.
  void beReceiver() { close(ready_[0]); close(stamps_[0]); }
  void beSender() { close(ready_[1]); close(stamps_[1]); }

  // Receiver.
  void ready(uint64_t n) {
    if (spin_) { shared_->ready.store(n + 1, std::memory_order_release); return; }
    char one = 1;
    writeAll(ready_[1], &one, 1);
  }
  void arrived(uint64_t n, uint64_t ns) {
    if (spin_) {
      shared_->arrivedNs.store(ns, std::memory_order_relaxed);
      shared_->arrived.store(n + 1, std::memory_order_release);
      return;
    }
    writeAll(stamps_[1], &ns, sizeof ns);
  }
  // Sender.
  void awaitReady(uint64_t n) {
    if (!spin_) { char one = 0; readAll(ready_[0], &one, 1); return; }
    poll(shared_->ready, n + 1);
  }
  uint64_t awaitArrival(uint64_t n) {
    if (!spin_) { uint64_t ns = 0; readAll(stamps_[0], &ns, sizeof ns); return ns; }
    poll(shared_->arrived, n + 1);
    return shared_->arrivedNs.load(std::memory_order_relaxed);
  }
  // The streams' handshake always uses the pipes (not latency).
  int readyReadFd() const { return ready_[0]; }
  int readyWriteFd() const { return ready_[1]; }
  int stampsReadFd() const { return stamps_[0]; }
  int stampsWriteFd() const { return stamps_[1]; }

 private:
  struct Shared {
    alignas(64) std::atomic<uint64_t> ready{0};
    alignas(64) std::atomic<uint64_t> arrived{0};
    std::atomic<uint64_t> arrivedNs{0};
  };
  // Polls until `counter` reaches `want`; gives up after 60 s (the other process died).
  static void poll(const std::atomic<uint64_t>& counter, uint64_t want) {
    uint64_t deadline = nowNs() + 60'000'000'000ull;
    for (uint32_t i = 0; counter.load(std::memory_order_acquire) < want; ++i) {
      __builtin_ia32_pause();
      if ((i & 0xffff) == 0 && nowNs() > deadline) {
        std::fprintf(stderr, "xnode_bench: the other process is gone (no handshake in 60 s)\n");
        std::exit(2);
      }
    }
  }
  bool spin_;
  int ready_[2]{-1, -1};
  int stamps_[2]{-1, -1};
  Shared* shared_ = nullptr;
};

// Joins the network namespace at `path` (nothing for ""); exits when it cannot.
void joinNetns(const std::string& path) {
  if (path.empty()) return;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
    std::fprintf(stderr, "xnode_bench: cannot join the network namespace %s: %s\n", path.c_str(),
                 strerror(errno));
    std::exit(2);
  }
  close(fd);
}

Options parse(int argc, char** argv) {
  Options o;
  CLI::App app{"xnode_bench: a sender rank on node A and a receiver rank on node B (bench/cross_node/perftest "
               "starts the daemons)"};
  app.add_option("--socket-a", o.socketA, "node A's daemon socket (the sender's)")->required();
  app.add_option("--socket-b", o.socketB, "node B's daemon socket (the receiver's)")->required();
  app.add_option("--sizes", o.sizes, "tensor sizes in bytes, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  app.add_option("--iterations", o.iterations, "timed transfers per size")->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", o.warmup, "untimed transfers per size first")->check(CLI::Range(0, 1000000));
  app.add_option("--rank-a", o.rankA, "the sender's rank")->check(CLI::NonNegativeNumber);
  app.add_option("--rank-b", o.rankB, "the receiver's rank")->check(CLI::NonNegativeNumber);
  app.add_option("--stream-count", o.streamCount, "streamed transfers per size (0: none)")
      ->check(CLI::Range(0, 1000000));
  app.add_option("--window", o.window, "streamed transfers in flight")->check(CLI::Range(1, 1024));
  app.add_option("--stream-warmup", o.streamWarmup,
                 "untimed streams per size before the timed one (a fresh arena's first pass pays "
                 "its page faults)")
      ->check(CLI::Range(0, 100));
  app.add_option("--pingpong", o.pingpong, "timed round trips per size under 1 MiB (0: none)")
      ->check(CLI::Range(0, 1000000));
  app.add_option("--times", o.timesPath,
                 "write each timed one-at-a-time transfer's send and arrival (CLOCK_MONOTONIC ns) "
                 "to this file, for bench/cross_node/hops.py");
  app.add_option("--netns-a", o.netnsA, "the sender's network namespace (a /var/run/netns path)");
  app.add_option("--netns-b", o.netnsB, "the receiver's network namespace");
  std::string handshake = "pipe";
  app.add_option("--handshake", handshake,
                 "how the one-at-a-time loop's receiver says ready / arrived: pipe (both sleep "
                 "between transfers) or spin (both poll one shared page, as ucx_perftest's "
                 "processes poll; keep them off the daemons' CPUs)")
      ->check(CLI::IsMember({"pipe", "spin"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::exit(app.exit(e));
  }
  o.spinHandshake = handshake == "spin";
  return o;
}

std::string idOf(uint64_t size, int i) { return "xnode-" + std::to_string(size) + "-" + std::to_string(i); }
std::string pingIdOf(uint64_t size, int i) { return "xping-" + std::to_string(size) + "-" + std::to_string(i); }
std::string pongIdOf(uint64_t size, int i) { return "xpong-" + std::to_string(size) + "-" + std::to_string(i); }
bool pingponged(const Options& o, uint64_t size) { return o.pingpong > 0 && size < (1u << 20); }
// Pass 0 is the timed stream; passes 1.. are the warm-up streams before it.
std::string streamIdOf(uint64_t size, int i, int pass = 0) {
  return "xstream-" + std::to_string(pass) + "-" + std::to_string(size) + "-" + std::to_string(i);
}
bool streamed(const Options& o, uint64_t size) { return o.streamCount > 0 && size >= (1u << 20); }

sidecar::Sidecar connectRank(int rank, const std::string& socket) {
  sidecar::RankConfig config;
  config.rank = rank;
  config.sendHint = {sidecar::Dtype::kUint8, {4096}};
  config.socketPath = socket;
  return sidecar::Sidecar::connect(config);
}

// The first and last 8 bytes carry the transfer's number: written by the sender, checked here.
void stamp(sidecar::ArenaTensor& tensor, uint64_t size, uint64_t number) {
  std::memcpy(tensor.data(), &number, 8);
  std::memcpy(static_cast<char*>(tensor.data()) + size - 8, &number, 8);
}

void checkStamp(const sidecar::Received& r, uint64_t size, uint64_t number, const std::string& id) {
  uint64_t first = 0, last = 0;
  std::memcpy(&first, r.tensor.data, 8);
  std::memcpy(&last, static_cast<const char*>(r.tensor.data) + size - 8, 8);
  if (r.tensor.sizeBytes != size || first != number || last != number) {
    std::fprintf(stderr, "xnode_bench: transfer %s arrived wrong\n", id.c_str());
    _exit(1);
  }
}

// Rank 2 on node B: recv each transfer, check its stamps, report the arrival time.
[[noreturn]] void receiver(const Options& o, Handshake& handshake) {
  int readyFd = handshake.readyWriteFd();
  int stampFd = handshake.stampsWriteFd();
  try {
    auto sc = connectRank(o.rankB, o.socketB);
    for (uint64_t size : o.sizes) {
      for (int i = 0; i < o.warmup + o.iterations; ++i) {
        auto pending = sc.recvAsync(idOf(size, i), 0, 60'000);
        handshake.ready(uint64_t(i));
        sidecar::Received r = pending.wait();
        uint64_t arrived = nowNs();
        checkStamp(r, size, uint64_t(i), idOf(size, i));
        sc.markDone(idOf(size, i), 0);
        handshake.arrived(uint64_t(i), arrived);
      }
    }
    for (uint64_t size : o.sizes) {
      if (!streamed(o, size)) continue;
      for (int pass = o.streamWarmup; pass >= 0; --pass) {
        char ready = 1;
        writeAll(readyFd, &ready, 1);
        uint64_t arrived = 0;
        for (int k = 0; k < o.streamCount; ++k) {
          sidecar::Received r = sc.recv(streamIdOf(size, k, pass), 0, 60'000);
          arrived = nowNs();
          checkStamp(r, size, uint64_t(k), streamIdOf(size, k, pass));
          sc.markDone(streamIdOf(size, k, pass), 0);
        }
        writeAll(stampFd, &arrived, sizeof arrived);
      }
    }
    for (uint64_t size : o.sizes) {
      if (!pingponged(o, size)) continue;
      for (int i = 0; i < o.warmup + o.pingpong; ++i) {
        auto pong = sc.allocateTensor(sidecar::Dtype::kUint8, {int64_t(size)});
        stamp(pong, size, uint64_t(i));
        sidecar::Received r = sc.recv(pingIdOf(size, i), 0, 60'000);
        auto sent = sc.send(pongIdOf(size, i), std::move(pong), {{o.rankA}});
        checkStamp(r, size, uint64_t(i), pingIdOf(size, i));
        sc.markDone(pingIdOf(size, i), 0);
        sent.wait();
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "xnode_bench receiver: %s\n", e.what());
    _exit(1);
  }
  // exit, not _exit: the atexit handlers write this process's hop trace (SIDECAR_HOP_TRACE).
  // Nothing of the parent's is buffered here (it flushes stdout after every line).
  std::exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  Handshake handshake(o.spinHandshake);
  pid_t child = fork();
  if (child == 0) {
    handshake.beReceiver();
    joinNetns(o.netnsB);
    receiver(o, handshake);
  }
  joinNetns(o.netnsA);
  handshake.beSender();
  int rc = 0;
  try {
    auto sc = connectRank(o.rankA, o.socketA);
    FILE* times = o.timesPath.empty() ? nullptr : std::fopen(o.timesPath.c_str(), "w");
    if (!o.timesPath.empty() && times == nullptr) throw std::runtime_error("cannot write " + o.timesPath);
    for (uint64_t size : o.sizes) {
      std::vector<double> us;
      for (int i = 0; i < o.warmup + o.iterations; ++i) {
        auto tensor = sc.allocateTensor(sidecar::Dtype::kUint8, {int64_t(size)});
        stamp(tensor, size, uint64_t(i));
        handshake.awaitReady(uint64_t(i));
        uint64_t sent = nowNs();
        sc.send(idOf(size, i), std::move(tensor), {{o.rankB}}).wait();
        uint64_t arrived = handshake.awaitArrival(uint64_t(i));
        if (i >= o.warmup) us.push_back(double(arrived - sent) / 1000.0);
        if (i >= o.warmup && times != nullptr) {
          std::fprintf(times, "%llu %llu %llu\n", (unsigned long long)size, (unsigned long long)sent,
                       (unsigned long long)arrived);
        }
      }
      std::sort(us.begin(), us.end());
      double median = us[us.size() / 2];
      double p99 = us[std::min(us.size() - 1, size_t(double(us.size()) * 0.99))];
      std::printf("{\"name\":\"xfer_%s\",\"bytes\":%llu,\"median_us\":%.2f,\"p99_us\":%.2f,\"gbps\":%.3f}\n",
                  sizeName(size).c_str(), (unsigned long long)size, median, p99,
                  double(size) / (median * 1000.0));
      std::fflush(stdout);
    }
    if (times != nullptr) std::fclose(times);
    for (uint64_t size : o.sizes) {
      if (!streamed(o, size)) continue;
      uint64_t started = 0, arrived = 0;
      for (int pass = o.streamWarmup; pass >= 0; --pass) {
        char r = 0;
        readAll(handshake.readyReadFd(), &r, 1);
        std::deque<sidecar::SendHandle> inFlight;
        started = nowNs();
        for (int k = 0; k < o.streamCount; ++k) {
          if (int(inFlight.size()) >= o.window) {
            inFlight.front().wait();
            inFlight.pop_front();
          }
          auto tensor = sc.allocateTensor(sidecar::Dtype::kUint8, {int64_t(size)});
          stamp(tensor, size, uint64_t(k));
          inFlight.push_back(sc.send(streamIdOf(size, k, pass), std::move(tensor), {{o.rankB}}));
        }
        while (!inFlight.empty()) {
          inFlight.front().wait();
          inFlight.pop_front();
        }
        readAll(handshake.stampsReadFd(), &arrived, sizeof arrived);
      }
      double seconds = double(arrived - started) / 1e9;
      std::printf("{\"name\":\"stream_%s\",\"bytes\":%llu,\"count\":%d,\"window\":%d,\"gbps\":%.3f}\n",
                  sizeName(size).c_str(), (unsigned long long)size, o.streamCount, o.window,
                  double(size) * o.streamCount / seconds / 1e9);
      std::fflush(stdout);
    }
    for (uint64_t size : o.sizes) {
      if (!pingponged(o, size)) continue;
      std::vector<double> us;
      for (int i = 0; i < o.warmup + o.pingpong; ++i) {
        auto ping = sc.allocateTensor(sidecar::Dtype::kUint8, {int64_t(size)});
        stamp(ping, size, uint64_t(i));
        uint64_t started = nowNs();
        auto sent = sc.send(pingIdOf(size, i), std::move(ping), {{o.rankB}});
        sidecar::Received r = sc.recv(pongIdOf(size, i), 0, 60'000);
        uint64_t ended = nowNs();
        checkStamp(r, size, uint64_t(i), pongIdOf(size, i));
        sc.markDone(pongIdOf(size, i), 0);
        sent.wait();
        if (i >= o.warmup) us.push_back(double(ended - started) / 2000.0);
      }
      std::sort(us.begin(), us.end());
      std::printf("{\"name\":\"pingpong_%s\",\"bytes\":%llu,\"median_us\":%.2f,\"p99_us\":%.2f}\n",
                  sizeName(size).c_str(), (unsigned long long)size, us[us.size() / 2],
                  us[std::min(us.size() - 1, size_t(double(us.size()) * 0.99))]);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "xnode_bench sender: %s\n", e.what());
    rc = 1;
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  return rc;
}
