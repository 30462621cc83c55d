#include "shm/lane_ring.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

namespace sidecar::shm {

namespace {

constexpr uint32_t kRecordMagic = 0x4c414e45;  // "LANE"
constexpr uint32_t kWrapMagic = 0x57524150;    // "WRAP": the rest of the ring up to its end is padding
constexpr uint64_t kHeaderPageBytes = 4096;
constexpr uint64_t kMemoryMagic = 0x31454e414c524353;  // "SCRLANE1"
constexpr uint32_t kLayoutVersion = 1;
constexpr uint64_t kMinRingBytes = 4096;
constexpr uint64_t kMaxRingBytes = uint64_t{1} << 30;

struct Frame {
  uint32_t size;
  uint32_t magic;
};
static_assert(sizeof(Frame) == LaneRing::kFrameBytes);

// The header page: identifies the memory, then both rings' shared state.
struct LaneHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t reserved;
  uint64_t ringBytes;
  alignas(64) LaneRingState requests;
  alignas(64) LaneRingState completions;
};
static_assert(sizeof(LaneHeader) <= kHeaderPageBytes);

uint64_t round8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

bool validRingBytes(uint64_t n) {
  return n >= kMinRingBytes && n <= kMaxRingBytes && (n & (n - 1)) == 0;
}

ShmError mapError(const std::string& what) {
  return ShmError{ShmErrc::MapFailed, what + ": " + std::strerror(errno)};
}

}  // namespace

LaneRing::LaneRing(LaneRingState* state, std::byte* data, uint64_t capacityBytes)
    : state_(state), data_(data), capacity_(capacityBytes) {}

bool LaneRing::tryPush(const void* bytes, uint64_t size) {
  if (size > maxRecordBytes()) return false;
  uint64_t framed = kFrameBytes + round8(size);
  uint64_t head = state_->head.load(std::memory_order_relaxed);
  uint64_t tail = state_->tail.load(std::memory_order_acquire);
  uint64_t offset = head & (capacity_ - 1);
  uint64_t toEnd = capacity_ - offset;
  uint64_t needed = framed <= toEnd ? framed : toEnd + framed;
  // head is in the shared memory too: one the consumer moved off 8 bytes would put a frame (the
  // wrap marker's) across the ring's end.
  if (head % 8 != 0 || head - tail > capacity_ || capacity_ - (head - tail) < needed) return false;
  if (framed > toEnd) {
    Frame wrap{0, kWrapMagic};
    std::memcpy(data_ + offset, &wrap, sizeof wrap);
    head += toEnd;
    offset = 0;
  }
  Frame frame{static_cast<uint32_t>(size), kRecordMagic};
  std::memcpy(data_ + offset, &frame, sizeof frame);
  if (size > 0) std::memcpy(data_ + offset + kFrameBytes, bytes, size);
  state_->head.store(head + framed, std::memory_order_release);
  return true;
}

bool LaneRing::takeDoorbell() {
  // Pairs with the fence in arm(): either the consumer sees our head, or we see its flag.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (state_->armed.load(std::memory_order_relaxed) == 0) return false;
  return state_->armed.exchange(0, std::memory_order_acq_rel) != 0;
}

LaneRing::Pop LaneRing::tryPop(std::vector<uint64_t>& out, uint64_t& size, std::string* why) {
  auto corrupt = [&](const std::string& reason) {
    if (why != nullptr) *why = reason;
    return Pop::kCorrupt;
  };
  uint64_t tail = state_->tail.load(std::memory_order_relaxed);
  // tail is in the shared memory too: one the producer moved off 8 bytes would put the frame read
  // across the ring's end.
  if (tail % 8 != 0) {
    return corrupt("the consumer's position " + std::to_string(tail) + " is not a multiple of 8");
  }
  for (;;) {
    uint64_t head = state_->head.load(std::memory_order_acquire);
    if (head == tail) return Pop::kEmpty;
    uint64_t available = head - tail;
    if (available > capacity_ || available % 8 != 0) {
      return corrupt("the producer's position is " + std::to_string(available) +
                     " bytes ahead of the consumer's in a ring of " + std::to_string(capacity_));
    }
    uint64_t offset = tail & (capacity_ - 1);
    uint64_t toEnd = capacity_ - offset;
    Frame frame;
    std::memcpy(&frame, data_ + offset, sizeof frame);
    if (frame.magic == kWrapMagic) {
      if (toEnd > available) return corrupt("a wrap marker past the producer's position");
      tail += toEnd;
      state_->tail.store(tail, std::memory_order_release);
      continue;
    }
    uint64_t framed = kFrameBytes + round8(frame.size);
    if (frame.magic != kRecordMagic || frame.size > maxRecordBytes() || framed > available ||
        framed > toEnd) {
      return corrupt("a record frame that is not one (magic " + std::to_string(frame.magic) +
                     ", " + std::to_string(frame.size) + " bytes)");
    }
    size = frame.size;
    out.resize(round8(frame.size) / 8);
    if (frame.size > 0) std::memcpy(out.data(), data_ + offset + kFrameBytes, frame.size);
    state_->tail.store(tail + framed, std::memory_order_release);
    return Pop::kRecord;
  }
}

bool LaneRing::empty() const {
  return state_->head.load(std::memory_order_acquire) == state_->tail.load(std::memory_order_relaxed);
}

bool LaneRing::arm() {
  state_->armed.store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!empty()) {
    state_->armed.store(0, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void LaneRing::disarm() {
  if (state_->armed.load(std::memory_order_relaxed) != 0) {
    state_->armed.store(0, std::memory_order_relaxed);
  }
}

// ---- LaneMemory ----------------------------------------------------------------------------------

Result<LaneMemory> LaneMemory::create(uint64_t ringBytes) {
  if (!validRingBytes(ringBytes)) {
    return ShmError{ShmErrc::BadSize, "a lane ring must be a power of two from 4 KiB to 1 GiB, not " +
                                          std::to_string(ringBytes) + " bytes"};
  }
  LaneMemory memory;
  memory.ringBytes_ = ringBytes;
  memory.mappedBytes_ = kHeaderPageBytes + 2 * ringBytes;
  memory.fd_ = memfd_create("sidecar-lane", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (memory.fd_ < 0) return mapError("memfd_create for a lane");
  if (ftruncate(memory.fd_, static_cast<off_t>(memory.mappedBytes_)) != 0) {
    return mapError("ftruncate of a lane to " + std::to_string(memory.mappedBytes_) + " bytes");
  }
  // The client gets this fd: it must not be able to shrink the file under the daemon's mapping
  // (the daemon would die of SIGBUS) nor grow it.
  if (fcntl(memory.fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return mapError("sealing a lane's memfd");
  }
  // Populated: otherwise the first pass of the records through each page of the rings costs a
  // page fault in each process (a few hundred in a lane's first thousands of requests, each
  // microseconds on a VM, on the latency path).
  memory.base_ = mmap(nullptr, memory.mappedBytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      memory.fd_, 0);
  if (memory.base_ == MAP_FAILED) {
    memory.base_ = nullptr;
    return mapError("mmap of a lane");
  }
  auto* header = new (memory.base_) LaneHeader{};
  header->ringBytes = ringBytes;
  header->version = kLayoutVersion;
  header->magic = kMemoryMagic;
  return memory;
}

Result<LaneMemory> LaneMemory::map(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return mapError("fstat of a lane's fd");
  auto fileBytes = static_cast<uint64_t>(st.st_size);
  if (fileBytes < kHeaderPageBytes) {
    return ShmError{ShmErrc::MapFailed, "the lane's memory is only " + std::to_string(fileBytes) + " bytes"};
  }
  LaneMemory memory;
  memory.mappedBytes_ = fileBytes;
  memory.base_ = mmap(nullptr, fileBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (memory.base_ == MAP_FAILED) {
    memory.base_ = nullptr;
    return mapError("mmap of a lane");
  }
  auto* header = static_cast<LaneHeader*>(memory.base_);
  if (header->magic != kMemoryMagic || header->version != kLayoutVersion ||
      !validRingBytes(header->ringBytes) || kHeaderPageBytes + 2 * header->ringBytes != fileBytes) {
    return ShmError{ShmErrc::MapFailed,
                    "the lane's memory has an unknown layout (version " +
                        std::to_string(header->version) + "): client and daemon differ in version"};
  }
  memory.ringBytes_ = header->ringBytes;
  return memory;
}

LaneMemory::LaneMemory(LaneMemory&& other) noexcept
    : base_(other.base_), mappedBytes_(other.mappedBytes_), ringBytes_(other.ringBytes_), fd_(other.fd_) {
  other.base_ = nullptr;
  other.fd_ = -1;
}

LaneMemory& LaneMemory::operator=(LaneMemory&& other) noexcept {
  if (this != &other) {
    this->~LaneMemory();
    new (this) LaneMemory(std::move(other));
  }
  return *this;
}

LaneMemory::~LaneMemory() {
  if (base_ != nullptr) munmap(base_, mappedBytes_);
  if (fd_ >= 0) close(fd_);
}

LaneRing LaneMemory::requests() const {
  auto* header = static_cast<LaneHeader*>(base_);
  return LaneRing(&header->requests, static_cast<std::byte*>(base_) + kHeaderPageBytes, ringBytes_);
}

LaneRing LaneMemory::completions() const {
  auto* header = static_cast<LaneHeader*>(base_);
  return LaneRing(&header->completions, static_cast<std::byte*>(base_) + kHeaderPageBytes + ringBytes_,
                  ringBytes_);
}

}  // namespace sidecar::shm
