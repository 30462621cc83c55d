#pragma once
// Helpers shared by the system tests (tests/system): paths of the binaries under test, a bounded
// child process with its output in files, and a watchdog that turns a hang into a failure.
// Everything here is header-only and lives in sidecar::systest.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../common/watchdog.h"

extern char** environ;

namespace sidecar::systest {

using namespace std::chrono_literals;
using sidecar::testing::Watchdog;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Small helpers

inline std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void writeFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

inline std::vector<std::string> nonEmptyLines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

inline const char* envOrEmpty(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

inline std::string sidecardPath() { return envOrEmpty("SIDECARD"); }

// A loopback TCP port nothing listens on now (bound to 0 and closed; the caller's daemon binds
// it right after, so another process could take it in between: fine for tests).
inline int freeLoopbackTcpPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t length = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  ::close(fd);
  return ntohs(addr.sin_port);
}
inline std::string sidecarctlPath() { return envOrEmpty("SIDECARCTL"); }

// Reactor threads to ask for: 2, or fewer when this process may run on fewer CPUs (sidecard pins
// its reactors to CPUs of its affinity mask and refuses to start with too few).
inline uint32_t coresToUse() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  return static_cast<uint32_t>(std::clamp(CPU_COUNT(&set), 1, 2));
}

inline std::string describeWaitStatus(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + strsignal(WTERMSIG(status));
  return "wait status " + std::to_string(status);
}


// ---------------------------------------------------------------------------------------------
// A child process with stdout and stderr in files.

class Process {
 public:
  // Starts argv[0] (a path) with this process's environment less every SIDECAR_* variable, plus
  // `env`. stdin is /dev/null. Returns nullptr (with errno-ish text in *error) when fork fails;
  // an exec failure shows as exit code 127. `netnsPath` (e.g. NetnsCluster::netnsPath(i)), when
  // not empty, is the network namespace the child joins before exec; failing that it exits 124.
  static std::unique_ptr<Process> start(const std::vector<std::string>& argv,
                                        const std::vector<std::string>& env,
                                        const std::string& stdoutPath,
                                        const std::string& stderrPath,
                                        const std::string& netnsPath = "") {
    // Everything the child needs is prepared before fork(): after it, only async-signal-safe calls.
    std::vector<std::string> envStrings;
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, "SIDECAR_", 8) != 0) envStrings.emplace_back(*e);
    }
    for (const auto& e : env) envStrings.push_back(e);
    std::vector<char*> argvPtrs, envPtrs;
    for (const auto& a : argv) argvPtrs.push_back(const_cast<char*>(a.c_str()));
    argvPtrs.push_back(nullptr);
    for (auto& e : envStrings) envPtrs.push_back(e.data());
    envPtrs.push_back(nullptr);

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) return nullptr;
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(126);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      ::signal(SIGPIPE, SIG_DFL);
      int in = open("/dev/null", O_RDONLY);
      int out = open(stdoutPath.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      int err = open(stderrPath.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (in < 0 || out < 0 || err < 0) _exit(125);
      dup2(in, 0);
      dup2(out, 1);
      dup2(err, 2);
      if (!netnsPath.empty()) {
        int ns = open(netnsPath.c_str(), O_RDONLY | O_CLOEXEC);
        if (ns < 0 || setns(ns, CLONE_NEWNET) != 0) _exit(124);
        close(ns);
      }
      execve(argvPtrs[0], argvPtrs.data(), envPtrs.data());
      _exit(127);
    }
    return std::unique_ptr<Process>(new Process(pid, stdoutPath, stderrPath));
  }

  ~Process() { kill9(); }

  pid_t pid() const { return pid_; }
  std::string out() const { return readFile(stdoutPath_); }
  std::string err() const { return readFile(stderrPath_); }

  bool running() {
    reap(false);
    return !status_.has_value();
  }

  // The wait status once the process has ended within `limit`; nullopt while it still runs.
  std::optional<int> waitFor(std::chrono::milliseconds limit) {
    auto deadline = Clock::now() + limit;
    while (!reap(false) && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
    return status_;
  }

  void signal(int sig) {
    if (running()) ::kill(pid_, sig);
  }

  // SIGKILL to the process and every descendant (a daemon under strace is strace's child and
  // would outlive it), then reaps it.
  void kill9() {
    if (status_) return;
    std::vector<pid_t> all = {pid_};
    for (size_t i = 0; i < all.size(); ++i) {
      std::istringstream children(readFile("/proc/" + std::to_string(all[i]) + "/task/" +
                                           std::to_string(all[i]) + "/children"));
      for (pid_t child; children >> child;) all.push_back(child);
    }
    for (auto it = all.rbegin(); it != all.rend(); ++it) ::kill(*it, SIGKILL);
    reap(true);
  }

 private:
  Process(pid_t pid, std::string out, std::string err)
      : pid_(pid), stdoutPath_(std::move(out)), stderrPath_(std::move(err)) {}

  bool reap(bool block) {
    if (status_) return true;
    int status = 0;
    pid_t r = waitpid(pid_, &status, block ? 0 : WNOHANG);
    if (r == pid_) status_ = status;
    return status_.has_value();
  }

  pid_t pid_;
  std::string stdoutPath_, stderrPath_;
  std::optional<int> status_;
};

struct RunResult {
  int status = -1;  // wait status; -1 when it had to be killed
  std::string out, err;
  bool exitedWith(int code) const { return status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == code; }
  std::string describe() const {
    return (status < 0 ? std::string("timed out") : describeWaitStatus(status)) + "\n--- stdout:\n" +
           out + "--- stderr:\n" + err;
  }
};

// Waits up to `limit` for `process` (a sidecard) to create its unix socket at `path`: "" once it
// is there, otherwise why not (it exited, or the time ran out), with its stderr.
inline std::string awaitSocket(Process& process, const std::string& path,
                               std::chrono::milliseconds limit = std::chrono::seconds(15)) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  struct stat st {};
  while (lstat(path.c_str(), &st) != 0) {
    if (!process.running()) return "sidecard exited before its socket appeared:\n" + process.err();
    if (std::chrono::steady_clock::now() >= deadline) {
      return "no socket at " + path + " after " + std::to_string(limit.count()) + " ms:\n" + process.err();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return "";
}

}  // namespace sidecar::systest
