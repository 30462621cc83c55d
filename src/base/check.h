#pragma once
// Always-on invariant checks for module boundaries. A failed check is a bug in Sidecar, not bad
// input: it prints where and why, then aborts so the core dump shows the broken state. Bad input
// from clients and peers is reported through typed errors instead, never through these.

#include <cstdio>
#include <cstdlib>

#define SIDECAR_CHECK(cond, ...)                                                              \
  do {                                                                                        \
    if (__builtin_expect(!(cond), 0)) {                                                       \
      std::fprintf(stderr, "sidecar: check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, "  " __VA_ARGS__);                                                 \
      std::fputc('\n', stderr);                                                               \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

// For syscalls and liburing calls that return -errno on failure and can fail only through a bug
// (bad fd, bad arguments) or resource exhaustion we cannot recover from.
#define SIDECAR_CHECK_SYSCALL(expr)                                                     \
  ({                                                                                    \
    auto sidecarRc_ = (expr);                                                           \
    if (__builtin_expect(sidecarRc_ < 0, 0)) {                                          \
      std::fprintf(stderr, "sidecar: %s failed at %s:%d: rc=%ld\n", #expr, __FILE__, \
                   __LINE__, static_cast<long>(sidecarRc_));                            \
      std::abort();                                                                     \
    }                                                                                   \
    sidecarRc_;                                                                         \
  })
