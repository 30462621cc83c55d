#pragma once
// Hop trace: the steps of a transfer through a daemon, timed at the cost of a clock read and a
// store each (no system call, no lock), so that the figures are the path's own. Trace-level log
// lines time the same steps but cost a write(2) each, microseconds on a VM: they moved the very
// times they measured.
//
// Off unless the process starts with SIDECAR_HOP_TRACE=PREFIX. Then it keeps the first
// kHopCapacity steps (from any thread) and, when it exits normally, writes them to PREFIX.<pid>,
// one "ns point-name" line each. bench/cross_node/hops.py lines them up with xnode_bench's
// per-transfer times (CLOCK_MONOTONIC is one clock for every process and namespace of a host).
// Off, a step costs one predictable branch on a global flag.

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "base/clock.h"

namespace sidecar::hop {

enum class Point : uint8_t {
  kLaneTaken,        // a lane request read off a client's ring
  kMessageSending,   // a small delivery encoded, its UCX send about to be called
  kMessageSent,      // that UCX send call returned
  kMessageReceived,  // a delivery message seen by the receiving daemon's code
  kChunkStored,      // the delivered chunk stored in the transfer table (waiting recvs answered)
  kLaneCompletion,   // a completion about to be pushed to a client's lane ring
  kAckSent,          // the delivery's ack sent back
  kSleeping,         // the reactor goes to sleep in io_uring
  kWoke,             // ... and is back
  kDirectSending,    // a client's direct send encoded, its UCX send about to be called
  kDirectSent,       // that UCX send call returned
  kUcxDone,          // a UCX tag operation completed (its callback, before the KJ turn that uses it)
  kDeliverParsed,    // a delivery message read (header and chunk), before it is stored
  kRecvAnswering,    // a waiting recv is given its chunk (before its answer is encoded)
  kLanePushed,       // a completion pushed to a client's lane ring (and its doorbell rung if asleep)
  kLaneAnswerSeen,   // the client took a completion off its lane ring
  kCount,
};

inline const char* pointName(Point p) {
  static const char* const kNames[] = {"lane-taken", "message-sending", "message-sent",
                                       "message-received", "chunk-stored", "lane-completion",
                                       "ack-sent", "sleeping", "woke", "direct-sending",
                                       "direct-sent", "ucx-done", "deliver-parsed",
                                       "recv-answering", "lane-pushed", "lane-answer-seen"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Point::kCount));
  return kNames[static_cast<int>(p)];
}

inline constexpr uint32_t kHopCapacity = 1u << 20;

struct Step {
  uint64_t ns;
  Point point;
};

// One per process in use (gRecorder); tests make their own.
class Recorder {
 public:
  Recorder() {
    const char* prefix = std::getenv("SIDECAR_HOP_TRACE");
    if (prefix == nullptr || prefix[0] == '\0') return;
    prefix_ = prefix;
    steps_ = std::make_unique<Step[]>(kHopCapacity);
    enabled = true;
  }
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  void record(Point p) {
    uint32_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i < kHopCapacity) steps_[i] = Step{monotonicNs(), p};
  }

  // Writes the steps kept so far to PREFIX.<pid>; nothing when off.
  void writeOut() {
    if (!enabled) return;
    std::string path = prefix_ + "." + std::to_string(getpid());
    FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "SIDECAR_HOP_TRACE: cannot write %s (%s); set it to a writable path prefix\n",
                   path.c_str(), std::strerror(errno));
      return;
    }
    uint32_t n = std::min(next_.load(), kHopCapacity);
    for (uint32_t i = 0; i < n; ++i) {
      std::fprintf(f, "%llu %s\n", static_cast<unsigned long long>(steps_[i].ns),
                   pointName(steps_[i].point));
    }
    std::fclose(f);
  }

  bool enabled = false;

 private:
  std::string prefix_;
  std::unique_ptr<Step[]> steps_;
  std::atomic<uint32_t> next_{0};
};

inline Recorder gRecorder;
// Registered once gRecorder is built (inline variables of one header initialise in the order
// they are defined), so it runs at exit before gRecorder's destructor.
inline const bool gRecorderWrittenAtExit = std::atexit([]() { gRecorder.writeOut(); }) == 0;

inline void mark(Point p) {
  if (__builtin_expect(gRecorder.enabled, false)) gRecorder.record(p);
}

}  // namespace sidecar::hop
