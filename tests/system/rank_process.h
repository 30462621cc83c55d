#pragma once
// Rank processes for the transfer system tests: each rank of a scenario is its own process,
// forked from the test binary, that connects to the real sidecard through the public client
// library (include/sidecar/sidecar.h), runs its role and exits.
//
// Rules (see transfer_matrix_test.cc):
// - Fork only while the forking process has no sidecar::Client / Sidecar alive on any thread:
//   each thread that uses the library owns a KJ event loop and an io_uring, which a child must not
//   inherit mid-use. The test process therefore talks to the daemon only from short-lived helper
//   threads (TransferMatrixTest::transfers()), joined before the next fork.
// - A rank's body throws RankFailure (or lets a sidecar::Error escape) to fail; the child then
//   writes one line to its failure pipe and _exit(1)s. Success is _exit(0). Children never run
//   gtest assertions and never return into gtest (no destructors, no atexit handlers).
// - Children get SIGKILL when the test process dies (PR_SET_PDEATHSIG); the parent bounds every
//   wait and kills stragglers.
// - Coordination between processes uses Signal (a pipe created before the fork): post() writes
//   one byte, wait() reads one with a bounded timeout. Never timing.
// - Data is verifiable without IPC: fillBytes(seed) and firstMismatch(seed) regenerate the same
//   bytes from a seed derived from (scenario, item, chunk), the same in every process.

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sidecar/error.h>
#include <sidecar/sidecar.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace sidecar::systest {

// A failed check inside a rank process.
class RankFailure : public std::runtime_error {
 public:
  explicit RankFailure(const std::string& what) : std::runtime_error(what) {}
};

inline void require(bool condition, const std::string& what) {
  if (!condition) throw RankFailure(what);
}

// Runs `call`, which must fail with sidecar::Error `code` whose message contains every string of
// `mustContain`. Returns the message.
template <typename Call>
std::string expectError(ErrorCode code, const std::string& what, Call&& call,
                        const std::vector<std::string>& mustContain = {}) {
  try {
    call();
  } catch (const Error& e) {
    if (e.code() != code) {
      throw RankFailure(what + ": expected error " + toString(code) + ", got " + toString(e.code()) +
                        ": " + e.what());
    }
    std::string message = e.what();
    for (const auto& needle : mustContain) {
      if (message.find(needle) == std::string::npos) {
        throw RankFailure(what + ": the " + toString(code) + " message does not mention '" + needle +
                          "': " + message);
      }
    }
    return message;
  }
  throw RankFailure(what + ": expected error " + std::string(toString(code)) + ", but it succeeded");
}

// ---------------------------------------------------------------------------------------------
// A one-way signal between processes: a pipe created before fork.

class Signal {
 public:
  Signal() {
    if (pipe2(fds_, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe2: ") + strerror(errno));
  }
  ~Signal() {
    close(fds_[0]);
    close(fds_[1]);
  }
  Signal(const Signal&) = delete;
  Signal& operator=(const Signal&) = delete;

  void post(size_t count = 1) {
    std::string bytes(count, 'x');
    size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = write(fds_[1], bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw RankFailure(std::string("signal post failed: ") + strerror(errno));
      done += static_cast<size_t>(n);
    }
  }

  // Takes one post; false when none came within `timeoutMs` (0: do not wait).
  bool tryWait(int timeoutMs = 0) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
    while (true) {
      int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                      deadline - std::chrono::steady_clock::now())
                                      .count());
      pollfd p{fds_[0], POLLIN, 0};
      int r = poll(&p, 1, std::max(left, 0));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      char c;
      ssize_t n = read(fds_[0], &c, 1);
      if (n == 1) return true;
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      return false;
    }
  }

  // Takes `count` posts, each within `timeoutMs`; throws RankFailure naming `what` otherwise.
  void wait(const std::string& what, size_t count = 1, int timeoutMs = 60'000) {
    for (size_t i = 0; i < count; ++i) {
      if (!tryWait(timeoutMs)) {
        throw RankFailure("no signal '" + what + "' within " + std::to_string(timeoutMs) + " ms");
      }
    }
  }

 private:
  int fds_[2] = {-1, -1};
};

// ---------------------------------------------------------------------------------------------
// A forked rank process.

class RankProcess {
 public:
  // Forks and runs `body` in the child. The caller must hold no live sidecar::Client or Sidecar.
  // `netnsPath` (e.g. NetnsCluster::netnsPath(i)), when not empty, is the network namespace the
  // child joins first (cross-node tests); failing that it exits 124.
  static std::unique_ptr<RankProcess> fork(std::string name, std::function<void()> body,
                                           const std::string& netnsPath = "") {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe2: ") + strerror(errno));
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t parent = getpid();
    pid_t pid = ::fork();
    if (pid < 0) {
      close(fds[0]);
      close(fds[1]);
      throw std::runtime_error(std::string("fork: ") + strerror(errno));
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(126);
      close(fds[0]);
      if (!netnsPath.empty()) {
        int ns = open(netnsPath.c_str(), O_RDONLY | O_CLOEXEC);
        if (ns < 0 || setns(ns, CLONE_NEWNET) != 0) _exit(124);
        close(ns);
      }
      std::string failure;
      try {
        body();
      } catch (const Error& e) {
        failure = std::string("sidecar::Error ") + toString(e.code()) + ": " + e.what();
      } catch (const std::exception& e) {
        failure = e.what();
      } catch (...) {
        failure = "unknown exception";
      }
      if (failure.empty()) _exit(0);
      failure = name + ": " + failure;
      if (failure.size() > 4000) failure.resize(4000);
      ssize_t ignored = write(fds[1], failure.data(), failure.size());
      (void)ignored;
      _exit(1);
    }
    close(fds[1]);
    return std::unique_ptr<RankProcess>(new RankProcess(std::move(name), pid, fds[0]));
  }

  ~RankProcess() {
    kill9();
    close(failureFd_);
  }
  RankProcess(const RankProcess&) = delete;
  RankProcess& operator=(const RankProcess&) = delete;

  const std::string& name() const { return name_; }
  pid_t pid() const { return pid_; }

  bool running() {
    reap(false);
    return !status_.has_value();
  }

  // Waits until the process ends or `deadline` passes.
  bool waitUntil(std::chrono::steady_clock::time_point deadline) {
    while (!reap(false)) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return true;
  }

  // SIGKILL, then reap (so the pid is gone from the system when this returns). A straggler:
  // failure() reports it.
  void kill9() {
    if (status_) return;
    ::kill(pid_, SIGKILL);
    reap(true);
    killed_ = true;
  }

  // The test kills it on purpose (a crash to survive): failure() does not report it.
  void crash() {
    kill9();
    crashed_ = true;
  }

  // Empty when the process exited with 0; otherwise what went wrong.
  std::string failure() {
    if (!status_) return name_ + ": still running";
    if (crashed_) return "";
    if (killed_) return name_ + ": killed (did not finish in time)";
    int status = *status_;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
    std::string message;
    char buffer[4096];
    int flags = fcntl(failureFd_, F_GETFL);
    fcntl(failureFd_, F_SETFL, flags | O_NONBLOCK);
    while (true) {
      ssize_t n = read(failureFd_, buffer, sizeof buffer);
      if (n <= 0) break;
      message.append(buffer, static_cast<size_t>(n));
    }
    if (message.empty()) {
      message = name_ + ": " +
                (WIFEXITED(status) ? "exited with code " + std::to_string(WEXITSTATUS(status))
                                   : std::string("killed by signal ") + strsignal(WTERMSIG(status)));
    }
    return message;
  }

 private:
  RankProcess(std::string name, pid_t pid, int failureFd)
      : name_(std::move(name)), pid_(pid), failureFd_(failureFd) {}

  bool reap(bool block) {
    if (status_) return true;
    int status = 0;
    pid_t r;
    do {
      r = waitpid(pid_, &status, block ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == pid_) status_ = status;
    return status_.has_value();
  }

  std::string name_;
  pid_t pid_;
  int failureFd_;
  std::optional<int> status_;
  bool killed_ = false;
  bool crashed_ = false;
};

// ---------------------------------------------------------------------------------------------
// Deterministic data: the same bytes in every process from a seed.

inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint64_t seedOf(std::string_view scenario, uint64_t item, uint64_t chunk) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a of the scenario's name
  for (char c : scenario) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
  return mix64(h ^ mix64(item * 0x10001ull + mix64(chunk)));
}

// Word w of a seeded stream.
inline uint64_t streamWord(uint64_t seed, uint64_t w) { return mix64(seed + w * 0x9E3779B97F4A7C15ull); }

inline void fillBytes(void* out, uint64_t bytes, uint64_t seed) {
  auto* p = static_cast<unsigned char*>(out);
  uint64_t words = bytes / 8;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t v = streamWord(seed, w);
    std::memcpy(p + w * 8, &v, 8);
  }
  if (bytes % 8 != 0) {
    uint64_t v = streamWord(seed, words);
    std::memcpy(p + words * 8, &v, bytes % 8);
  }
}

// The offset of the first byte that differs from fillBytes(seed); nullopt when all match.
inline std::optional<uint64_t> firstMismatch(const void* data, uint64_t bytes, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t words = bytes / 8;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t v = streamWord(seed, w), got;
    std::memcpy(&got, p + w * 8, 8);
    if (got != v) {
      for (uint64_t b = 0; b < 8; ++b) {
        if (((got >> (8 * b)) & 0xFF) != ((v >> (8 * b)) & 0xFF)) return w * 8 + b;
      }
    }
  }
  if (bytes % 8 != 0) {
    uint64_t v = streamWord(seed, words), got = 0;
    std::memcpy(&got, p + words * 8, bytes % 8);
    uint64_t mask = (uint64_t{1} << (8 * (bytes % 8))) - 1;
    if ((got & mask) != (v & mask)) {
      for (uint64_t b = 0; b < bytes % 8; ++b) {
        if (((got >> (8 * b)) & 0xFF) != ((v >> (8 * b)) & 0xFF)) return words * 8 + b;
      }
    }
  }
  return std::nullopt;
}

}  // namespace sidecar::systest
