// sidecard: the Sidecar node daemon. See `sidecard --help` and docs/CONFIG.md.

#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <kj/exception.h>
#include <variant>

#include "daemon/config.h"
#include "daemon/daemon.h"
#include "daemon/logging.h"
#include "sidecar_build_config.h"

#if SIDECAR_MIMALLOC
#include <mimalloc.h>

#include <cstdlib>
#endif

namespace {

// Says which malloc serves the process: mimalloc when it is linked first (the normal build), so
// that a packaging change that loses the override shows in the log instead of only in latency.
void logAllocator() {
#if SIDECAR_MIMALLOC
  void* probe = std::malloc(64);
  bool overridden = mi_is_in_heap_region(probe);
  std::free(probe);
  if (overridden) {
    spdlog::debug("allocator: mimalloc {}", mi_version());
  } else {
    spdlog::warn("allocator: mimalloc is linked but malloc is not its own (the C library's serves "
                 "this process); small-message throughput will be lower");
  }
#else
  spdlog::debug("allocator: the C library's malloc (sanitizer build)");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  using namespace sidecar::daemon;
  LoadResult loaded = loadConfig(argc, argv, ::getenv, SIDECAR_VERSION);
  if (auto* exitNow = std::get_if<ExitNow>(&loaded)) {
    std::fputs(exitNow->text.c_str(), exitNow->code == 0 ? stdout : stderr);
    return exitNow->code;
  }
  Config config = std::get<Config>(std::move(loaded));
  setupLogging(config.logLevel);
  spdlog::debug("configuration: {}", describeConfig(config));
  logAllocator();

  // Signals are taken synchronously by this thread (sigwaitinfo below); the reactor threads
  // inherit the blocked mask, so a signal never interrupts them. Writes to a closed socket
  // return EPIPE instead of killing the daemon.
  sigset_t stopSignals;
  sigemptyset(&stopSignals);
  sigaddset(&stopSignals, SIGINT);
  sigaddset(&stopSignals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stopSignals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  Daemon daemon(config);
  try {
    daemon.start();
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "sidecard: cannot start: %s\n", e.getDescription().cStr());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sidecard: cannot start: %s\n", e.what());
    return 1;
  }
  spdlog::info("ready; stop with SIGINT or SIGTERM");

  siginfo_t info;
  while (sigwaitinfo(&stopSignals, &info) < 0) {
  }
  spdlog::info("received {}, shutting down", info.si_signo == SIGINT ? "SIGINT" : "SIGTERM");
  daemon.stop();
  return 0;
}
