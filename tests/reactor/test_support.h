#pragma once
// Helpers shared by the reactor and RPC tests: a watchdog that turns a hang into a clear failure,
// fd counting for leak checks, and socket pairs.

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "../common/watchdog.h"

namespace sidecar::testing {


// Number of open fds of this process (the directory stream's own fd included, consistently).
inline int openFdCount() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(dir);
  return count;
}

inline bool fdIsOpen(int fd) { return fcntl(fd, F_GETFD) >= 0; }

// A connected AF_UNIX stream pair, non-blocking and close-on-exec (what UringStream expects).
inline std::pair<int, int> unixSocketPair() {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  return {fds[0], fds[1]};
}

// Spins (yielding) until `pred` holds or `seconds` pass; returns whether it holds.
template <typename Pred>
bool eventually(Pred pred, int seconds = 10) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

}  // namespace sidecar::testing
