#pragma once
// A lane: a session's shared-memory fast path between one client and its daemon (docs/LANES.md).
// Two single-producer single-consumer rings of variable-length records in one memfd: requests
// (client -> daemon) and completions (daemon -> client). Each side of a ring is one thread.
//
// Wake-up protocol (a Dekker pair, so no record is ever left unseen by a sleeping consumer):
//   consumer about to sleep: armed = 1; fence; if records are there, disarm and go on polling.
//   producer after a push:   fence; if armed, clear it and ring the consumer's doorbell (an
//                            eventfd its io_uring reads). A consumer that is awake costs nothing.
//
// The other side of a lane may be a buggy or hostile process: the consumer validates every
// position and length before it uses it and copies each record out before it parses it, so a
// peer that scribbles on the ring gets its lane closed (kCorrupt), never a read outside it.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "shm/result.h"

namespace sidecar::shm {

// One direction's shared state; the record bytes follow it in the mapping.
struct LaneRingState {
  alignas(64) std::atomic<uint64_t> head;   // bytes ever written (the producer's)
  alignas(64) std::atomic<uint64_t> tail;   // bytes ever consumed (the consumer's)
  alignas(64) std::atomic<uint32_t> armed;  // 1: the consumer sleeps or is about to
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "a lane needs lock-free 64-bit atomics");

class LaneRing {
 public:
  // Every record is framed by 8 bytes and padded to 8; one never wraps around the end.
  static constexpr uint64_t kFrameBytes = 8;

  LaneRing() = default;
  // `capacityBytes`: a power of two, at least 4 KiB; `data` has that many bytes.
  LaneRing(LaneRingState* state, std::byte* data, uint64_t capacityBytes);

  uint64_t capacityBytes() const { return capacity_; }
  // The shared positions and flag, for tests that play a producer breaking the format.
  LaneRingState& sharedState() const { return *state_; }
  // The largest record a push can take: half the ring, so that a record never waits for more
  // than the padding of one wrap.
  uint64_t maxRecordBytes() const { return capacity_ / 2 - kFrameBytes; }

  // ---- producer ----
  // Appends one record; false when the ring has no room for it now (or it is over the maximum).
  bool tryPush(const void* bytes, uint64_t size);
  // After pushes: true when the consumer armed itself and must be woken now (the flag is cleared,
  // so one wake-up is rung per sleep however many records follow).
  bool takeDoorbell();

  // ---- consumer ----
  enum class Pop { kEmpty, kRecord, kCorrupt };
  // Copies the next record into `out` (8-byte aligned words, size rounded up) and its exact size
  // into `size`. kCorrupt: the producer broke the format; `why` says how; the ring is unusable.
  Pop tryPop(std::vector<uint64_t>& out, uint64_t& size, std::string* why);
  bool empty() const;
  // Before sleeping: false when records arrived meanwhile (then stay awake, not armed).
  bool arm();
  // After waking (or to stop doorbells while polling): producers stop ringing.
  void disarm();

 private:
  LaneRingState* state_ = nullptr;
  std::byte* data_ = nullptr;
  uint64_t capacity_ = 0;
};

// The shared memory of one lane: a header page, then the request ring, then the completion ring.
class LaneMemory {
 public:
  static constexpr uint64_t kDefaultRingBytes = 1 << 20;

  // The daemon's side: a new memfd of two rings of `ringBytes` each (a power of two >= 4 KiB).
  static Result<LaneMemory> create(uint64_t ringBytes = kDefaultRingBytes);
  // The client's side: maps the memfd `fd` (not taken) and checks its header.
  static Result<LaneMemory> map(int fd);

  LaneMemory(LaneMemory&& other) noexcept;
  LaneMemory& operator=(LaneMemory&& other) noexcept;
  ~LaneMemory();

  int fd() const { return fd_; }  // -1 on the mapping side
  uint64_t ringBytes() const { return ringBytes_; }
  LaneRing requests() const;
  LaneRing completions() const;

 private:
  LaneMemory() = default;
  void* base_ = nullptr;
  uint64_t mappedBytes_ = 0;
  uint64_t ringBytes_ = 0;
  int fd_ = -1;
};

}  // namespace sidecar::shm
