// The slab allocator: arena offsets handed out per memory hint, in runs of contiguous units.
//
// Model
// - The allocator manages `capacityBytes` of an arena starting at `baseOffset`, cut into slabs
//   of `slabSizeBytes` (default 2 MiB; a power of two from 4 KiB to 1 GiB). It never
//   touches the memory itself: all metadata lives on the heap, so it also works over an arena
//   it cannot map.
// - A hint is a unit size in bytes. A request of n bytes under hint h needs a run of
//   u = ceil(n / h) contiguous units and gets {offset, sizeBytes = u * h, units = u, hint = h}.
// - Small runs (u <= unitsPerSlab = floor(slab / h)) live inside one slab carved for hint h;
//   each carved slab has a used-unit bitmap searched first-fit with 64-bit word scans.
// - Big runs (u > unitsPerSlab, including every run of a hint larger than a slab) take
//   ceil(u * h / slab) contiguous whole slabs, found first-fit from the low end of the arena.
//   Slabs for carving are taken from the high end, so small hints do not chop up the space big
//   tensors need. Any request up to the whole capacity can succeed once enough is freed.
// - A carved slab that becomes empty goes back to the arena, except that each hint keeps at
//   most one empty slab as a hot spare (so alloc/free of one unit does not re-carve every
//   time). Spares are reclaimed whenever the arena runs out of whole slabs, and by trim().
//
// Threads
// - One owner thread calls everything except freeRemote(); the owner path uses no atomics
//   beyond one relaxed load that checks the remote-free list.
// - freeRemote() may be called from any thread (another core, or the thread that serves a
//   client's RPC): it sets the run's bits in the slab's atomic remote-free bitmap and pushes the
//   slab on a lock-free MPSC list (CAS push) unless already queued. The owner drains that list
//   with one exchange on its next tryAllocate / allocateOrWait / poll().
//   Invariant per carved slab: usedUnits == popcount(used) and remote bits are a subset of
//   used bits (a violation is a double free and aborts).
//
// Backpressure, never loss
// - tryAllocate fails at once with ArenaFull when nothing fits.
// - allocateOrWait queues a caller-owned AllocationWaiter when nothing fits. Waiters are served
//   strictly FIFO across all hints: while the head waiter does not fit, no later waiter and no
//   new request (tryAllocate or allocateOrWait) is served, so a big head-of-line request
//   cannot be starved by a stream of small ones. The price is head-of-line blocking, bounded by
//   each waiter's deadline. Because every request is at most the capacity and an empty
//   allocator can place any such request, the head always fits once enough is freed.
// - expireWaiters(now) fails every waiter whose deadline has passed with ArenaFull naming the
//   sizes and how long it waited.
//
// Costs (measured in docs/PERFORMANCE.md, "Slab allocator"): single-unit alloc+free of the last
// hint used is a fast path inlined from this header (one word at the slab's cursor; a validated
// free); a run of u units scans ~u/64 words; a big run scans the slab bitmap (one bit per slab).
// stats() and checkInvariants() walk all metadata.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "shm/bitmap.h"
#include "shm/clock.h"
#include "shm/mpsc_list.h"
#include "shm/result.h"

namespace sidecar::shm {

struct Allocation {
  uint64_t offset = 0;     // from the start of the arena (not of the allocator's range)
  uint64_t sizeBytes = 0;  // units * hint: the usable size, >= the bytes asked for
  uint64_t units = 0;
  uint64_t hint = 0;
  friend bool operator==(const Allocation&, const Allocation&) = default;
};

struct SlabAllocatorOptions {
  uint64_t capacityBytes = 0;           // rounded down to whole slabs; at least one slab
  uint64_t slabSizeBytes = 2ull << 20;  // power of two, 4 KiB .. 1 GiB
  uint64_t baseOffset = 0;              // arena offset of the first managed byte
  const ShmClock* clock = nullptr;      // SteadyShmClock when null; must outlive the allocator
};

struct HintStats {
  uint64_t hint = 0;
  uint64_t slabs = 0;               // slabs carved for this hint
  uint64_t bigRuns = 0;             // live runs spanning whole slabs
  uint64_t bigSlabs = 0;            // slabs held by those runs
  uint64_t unitsUsed = 0;           // in carved slabs and big runs
  uint64_t unitsFree = 0;           // free units in carved slabs
  uint64_t largestFreeRunUnits = 0; // in carved slabs
  double fragmentation = 0;         // 1 - largestFreeRun / unitsFree (0 when nothing is free)
  uint64_t allocations = 0;         // granted, including to waiters
  uint64_t frees = 0;               // local frees plus remote runs drained
  uint64_t waits = 0;               // requests that had to queue
  uint64_t failures = 0;            // tryAllocate ArenaFull plus expired waiters
};

struct AllocatorStats {
  uint64_t capacityBytes = 0;
  uint64_t slabSizeBytes = 0;
  uint64_t slabsTotal = 0;
  uint64_t slabsFree = 0;
  uint64_t slabsCarved = 0;
  uint64_t slabsInBigRuns = 0;
  uint64_t largestFreeSlabRun = 0;  // contiguous free slabs
  uint64_t usedBytes = 0;           // sum of live allocations' sizeBytes
  uint64_t freeBytes = 0;           // free slabs + free units of carved slabs
  uint64_t slackBytes = 0;          // tails of carved slabs and big runs no unit can use
  uint64_t waitersQueued = 0;
  std::vector<HintStats> hints;     // sorted by hint
};

// A request waiting for space. Owned by the caller; must stay alive (and not move) while
// queued, i.e. until complete() runs or cancelWait() returns true.
class AllocationWaiter {
 public:
  virtual ~AllocationWaiter() = default;
  // Called exactly once, on the owner thread, from inside free / poll / expireWaiters (or
  // tryAllocate / allocateOrWait, which drain remote frees): with the allocation when granted,
  // or ArenaFull when the deadline passed. It may call back into the allocator and may destroy
  // the waiter.
  virtual void complete(Result<Allocation> result) = 0;

  bool queued() const noexcept { return queued_; }

 private:
  friend class SlabAllocator;
  uint64_t bytes_ = 0;
  uint64_t units_ = 0;
  uint64_t hint_ = 0;
  ShmTimePoint enqueuedAt_{};
  ShmTimePoint deadline_{};
  AllocationWaiter* prev_ = nullptr;
  AllocationWaiter* next_ = nullptr;
  bool queued_ = false;
};

// A waiter that calls a std::function (convenient; allocates if the function does).
class CallbackWaiter final : public AllocationWaiter {
 public:
  explicit CallbackWaiter(std::function<void(Result<Allocation>)> fn) : fn_(std::move(fn)) {}
  void complete(Result<Allocation> result) override { fn_(std::move(result)); }

 private:
  std::function<void(Result<Allocation>)> fn_;
};

class SlabAllocator {
 public:
  // Fails with BadSize when the options cannot describe at least one slab.
  static Result<std::unique_ptr<SlabAllocator>> create(const SlabAllocatorOptions& options);
  ~SlabAllocator();
  SlabAllocator(const SlabAllocator&) = delete;
  SlabAllocator& operator=(const SlabAllocator&) = delete;

  // Owner thread. A run of ceil(bytes / hint) units now, or ArenaFull (also when waiters are
  // queued: see FIFO above), TooLarge, ZeroSize or ZeroHint.
  Result<Allocation> tryAllocate(uint64_t bytes, uint64_t hint);

  // Owner thread. An allocation now (value), or std::nullopt when `waiter` was queued: it will
  // be completed later by a free/poll (granted) or expireWaiters (ArenaFull). A deadline that
  // has already passed (<= clock now) fails with ArenaFull instead of queueing. TooLarge,
  // ZeroSize and ZeroHint fail at once. `waiter` must not be queued already.
  Result<std::optional<Allocation>> allocateOrWait(uint64_t bytes, uint64_t hint,
                                                   ShmTimePoint deadline,
                                                   AllocationWaiter& waiter);

  // Owner thread. Removes a queued waiter without completing it; false if it was not queued.
  bool cancelWait(AllocationWaiter& waiter) noexcept;

  // Owner thread. Frees a live allocation (exactly as returned). InvalidFree for anything that
  // is not one (outside the range, wrong hint or size, already free), leaving state unchanged.
  // Serves queued waiters afterwards.
  Result<void> free(const Allocation& allocation);

  // Any thread. Frees a live allocation through the remote-free list; the owner applies it on
  // its next drain. Lock-free; the caller must own `allocation` (no validation beyond bounds).
  void freeRemote(const Allocation& allocation) noexcept;

  // Owner thread. Drains remote frees and serves waiters. Returns true if it did any work.
  bool poll();

  // Owner thread. Fails waiters whose deadline is <= now with ArenaFull; returns how many.
  size_t expireWaiters(ShmTimePoint now);

  // Owner thread. Returns every empty carved slab (hot spares too) to the arena; returns how
  // many.
  size_t trim();

  AllocatorStats stats() const;

  // Recomputes every counter from the bitmaps and checks used + free + slack == capacity,
  // per-slab unit counts and slab states. Owner thread; O(metadata). For tests and debugging.
  Result<void> checkInvariants() const;

  uint64_t capacityBytes() const noexcept { return capacityBytes_; }
  uint64_t slabSizeBytes() const noexcept { return slabSizeBytes_; }
  uint64_t baseOffset() const noexcept { return baseOffset_; }
  size_t waitersQueued() const noexcept { return waiterCount_; }

  struct Slab;
  struct HintClass;

 private:
  explicit SlabAllocator(const SlabAllocatorOptions& options);

  Result<uint64_t> validateRequest(uint64_t bytes, uint64_t hint) const;
  HintClass& hintClass(uint64_t hint);
  HintClass& hintClassSlow(uint64_t hint);
  void setCurrent(HintClass& hc, uint32_t slabIndex);
  [[gnu::noinline]] Result<Allocation> tryAllocateSlow(uint64_t bytes, uint64_t hint);
  [[gnu::noinline]] Result<void> freeSlow(const Allocation& allocation);
  [[gnu::noinline]] void advanceCursor(Slab& slab, uint32_t fullWord);
  [[gnu::noinline]] void slabEmptied(HintClass& hc, Slab& slab);
  std::optional<Allocation> allocateUnits(HintClass& hc, uint64_t units);
  std::optional<Allocation> allocateInSlab(HintClass& hc, uint32_t slabIndex, uint32_t units);
  std::optional<Allocation> allocateBig(HintClass& hc, uint64_t units);
  uint32_t carveSlab(HintClass& hc);
  void releaseSlab(HintClass& hc, uint32_t slabIndex);
  size_t reclaimSpares();
  void freeUnitsInSlab(Slab& slab, uint32_t firstUnit, uint32_t units);
  void freeBigRun(uint32_t slabIndex);
  bool drainRemoteFrees();
  void serveWaiters();
  void unlinkWaiter(AllocationWaiter& waiter) noexcept;
  [[gnu::cold]] ShmError arenaFullError(const HintClass& hc, uint64_t bytes, uint64_t units,
                          std::optional<std::chrono::milliseconds> waited) const;

  const uint64_t capacityBytes_;
  const uint64_t slabSizeBytes_;
  const unsigned slabShift_;
  const uint64_t baseOffset_;
  const uint32_t slabCount_;
  const ShmClock* clock_;

  std::unique_ptr<Slab[]> slabs_;
  std::vector<uint64_t> slabBitmap_;  // 1 = slab carved or in a big run
  uint32_t freeSlabs_;
  uint64_t usedBytes_ = 0;

  std::vector<std::unique_ptr<HintClass>> hintClasses_;
  // One-entry cache for the fast path; never null: until the first request it is noHint_, whose
  // hint 0 matches no request (a request with hint 0 never reaches the comparison).
  static HintClass noHint_;
  HintClass* lastHint_ = &noHint_;

  MpscList<Slab> remoteFrees_;

  AllocationWaiter* waitHead_ = nullptr;
  AllocationWaiter* waitTail_ = nullptr;
  size_t waiterCount_ = 0;
  bool servingWaiters_ = false;
};

// ---- Internals shared by slab_allocator.cc and the inline fast paths below. ----

namespace detail {

inline constexpr uint32_t kNoSlab = UINT32_MAX;
inline constexpr uint32_t kNoBound = UINT32_MAX;

enum class SlabState : unsigned char { Free, Carved, BigHead, BigTail };

// Division by a hint without a divide instruction (20-40 cycles each on x86-64): a shift for
// powers of two, else Lemire's multiply-high method, exact for dividends < 2^32 (offsets inside
// a slab are, since slabs are at most 1 GiB); larger dividends take the hardware divide.
struct UnitDivider {
  uint64_t magic = 0;  // floor((2^64 - 1) / divisor) + 1
  int shift = -1;      // log2(divisor) for powers of two
  uint64_t divisor = 1;

  explicit UnitDivider(uint64_t d = 1) : divisor(d) {
    if (std::has_single_bit(d)) {
      shift = std::countr_zero(d);
    } else {
      magic = UINT64_MAX / d + 1;
    }
  }
  uint64_t divide(uint64_t x) const noexcept {
    if (shift >= 0) return x >> shift;
    if (x < (uint64_t{1} << 32)) {
      return static_cast<uint64_t>((static_cast<unsigned __int128>(magic) * x) >> 64);
    }
    return x / divisor;
  }
};

}  // namespace detail

// Field order: everything the single-unit alloc/free fast paths touch sits in the first cache
// line (the struct is line-aligned and two lines long, so indexing is a shift).
struct SlabAllocator::Slab {
  // [R]: written by the owner only while the slab holds no live unit; read by freeRemote().
  alignas(64) detail::SlabState state = detail::SlabState::Free;  // [R]
  int8_t divShift = -1;               // hintClass->divider, for offsets inside the slab:
  uint32_t unitsPerSlab = 0;          // [R]
  uint64_t hint = 0;                  // [R]

  // Owner only (hot).
  std::unique_ptr<uint64_t[]> used;
  HintClass* hintClass = nullptr;    // [R] for its divider
  uint32_t usedUnits = 0;
  uint32_t cursorWord = 0;           // every word before it is fully used
  uint32_t noRunAtLeast = detail::kNoBound;  // no free run of this many units exists (cache)
  uint32_t wordCount = 0;            // [R]
  uint64_t offset = 0;               // arena offset of the slab's first byte
  uint64_t divMagic = 0;             // ... shift or multiply-high (see UnitDivider)

  // Owner only (cold).
  uint32_t posInHint = 0;         // index in hintClass->slabs
  uint32_t bigSlabs = 0;          // BigHead: slabs in the run
  uint64_t bigUnits = 0;          // BigHead: units in the run
  uint32_t usedCapacityWords = 0;
  uint32_t remoteCapacityWords = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> remoteStorage;

  // [R]
  std::atomic<uint64_t>* remoteWords = nullptr;    // wordCount words, then the summary words
  std::atomic<uint64_t>* remoteSummary = nullptr;  // bit w set: remoteWords[w] may be non-zero

  // Shared with freeRemote().
  std::atomic<bool> remoteQueued{false};
  std::atomic<bool> bigFreePending{false};
  Slab* mpscNext = nullptr;

  // within < 2^32 (an offset inside the slab).
  uint64_t unitOf(uint64_t within) const noexcept {
    if (divShift >= 0) return within >> divShift;
    return static_cast<uint64_t>((static_cast<unsigned __int128>(divMagic) * within) >> 64);
  }
};
static_assert(sizeof(SlabAllocator::Slab) == 128, "fast paths index slabs with a shift");

struct SlabAllocator::HintClass {
  // Hot: the single-unit fast paths.
  uint64_t hint = 0;
  Slab* currentSlab = nullptr;  // &slabs_[current], null when current == kNoSlab
  uint64_t unitsUsed = 0;
  uint64_t allocations = 0;
  uint64_t frees = 0;
  uint32_t emptySlabs = 0;
  uint32_t current = detail::kNoSlab;

  detail::UnitDivider divider;
  uint32_t unitsPerSlab = 0;  // 0 when the hint is larger than a slab: every run is big
  std::vector<uint32_t> slabs;
  uint64_t bigRuns = 0;
  uint64_t bigSlabs = 0;
  uint64_t waits = 0;
  uint64_t failures = 0;
};

// Fast path: one unit (0 < bytes <= hint) of the last hint used, nothing to drain, nobody
// waiting, taken at the current slab's cursor word (every word before the cursor is full, so
// this is one load and one ctz). A hint class exists only for a hint that passed validation
// (0 < hint <= capacity), so the match also validates the hint. Everything else, including
// every error, takes tryAllocateSlow().
[[gnu::always_inline]] inline Result<Allocation> SlabAllocator::tryAllocate(uint64_t bytes, uint64_t hint) {
  HintClass& hc = *lastHint_;
  // Bitwise, not short-circuit: one branch for "nothing queued, nothing to drain".
  const bool idle = (reinterpret_cast<uintptr_t>(waitHead_) | remoteFrees_.headBits()) == 0;
  if (bytes - 1 < hint && hc.hint == hint && idle) [[likely]] {
    Slab* slab = hc.currentSlab;
    // usedUnits < unitsPerSlab also keeps the cursor inside the bitmap: when every word is
    // full (padding bits are set), every unit is used.
    if (slab && slab->usedUnits < slab->unitsPerSlab) [[likely]] {
      uint64_t* used = slab->used.get();
      const uint32_t w0 = slab->cursorWord;
      uint64_t word = used[w0];
      if (word != bitmap::kAllUsed) [[likely]] {
        const auto bit = static_cast<unsigned>(std::countr_one(word));
        word |= uint64_t{1} << bit;
        used[w0] = word;
        hc.emptySlabs -= slab->usedUnits == 0;  // the hint's spare is in use again
        ++slab->usedUnits;
        ++hc.unitsUsed;
        ++hc.allocations;
        usedBytes_ += hint;
        Result<Allocation> out =
            Allocation{slab->offset + (uint64_t{w0} * 64 + bit) * hint, hint, 1, hint};
        // Last, so that nothing but the result is live across the (rare) call.
        if (word == bitmap::kAllUsed) [[unlikely]] advanceCursor(*slab, w0);
        return out;
      }
    }
  }
  return tryAllocateSlow(bytes, hint);
}

// Fast path: a live single unit of a carved slab. Every check of freeSlow() that applies to one
// unit is made here too (consistent sizes, in range, carved slab of this hint, on a unit
// boundary, unit in use); anything else, including every invalid free, takes freeSlow(), which
// reports it without touching state.
[[gnu::always_inline]] inline Result<void> SlabAllocator::free(const Allocation& a) {
  const uint64_t rel = a.offset - baseOffset_;  // wraps past capacityBytes_ when below the base
  if (a.units == 1 && a.sizeBytes == a.hint && rel < capacityBytes_) [[likely]] {
    Slab& slab = slabs_[rel >> slabShift_];
    // A carved slab's hint is never 0, so this also rejects a.hint == 0.
    if ((slab.state == detail::SlabState::Carved) & (slab.hint == a.hint)) [[likely]] {
      const uint64_t within = rel & (slabSizeBytes_ - 1);
      const uint64_t unit = slab.unitOf(within);
      // unit < unitsPerSlab: the slab's tail past its last unit maps onto set padding bits.
      if (unit * a.hint == within && unit < slab.unitsPerSlab) [[likely]] {
        uint64_t& word = slab.used[unit / 64];
        const uint64_t bit = uint64_t{1} << (unit % 64);
        if (word & bit) [[likely]] {
          word &= ~bit;
          HintClass& hc = *slab.hintClass;
          ++hc.frees;
          --hc.unitsUsed;
          usedBytes_ -= a.hint;
          slab.cursorWord = std::min(slab.cursorWord, static_cast<uint32_t>(unit / 64));
          slab.noRunAtLeast = detail::kNoBound;
          if (--slab.usedUnits == 0) [[unlikely]] slabEmptied(hc, slab);
          if (waitHead_) [[unlikely]] serveWaiters();
          return {};
        }
      }
    }
  }
  return freeSlow(a);
}

}  // namespace sidecar::shm
