#include "shm/slab_allocator.h"

#include <algorithm>
#include <bit>
#include <cstring>

#include "shm/bitmap.h"
#include "shm/sizes.h"

namespace sidecar::shm {
namespace {

using detail::kNoBound;
using detail::kNoSlab;
using detail::SlabState;
using detail::UnitDivider;

std::string unitsText(uint64_t units, uint64_t hint) {
  return std::to_string(units) + (units == 1 ? " unit (" : " units (") +
         formatBytes(units * hint) + ")";
}

}  // namespace

SlabAllocator::HintClass SlabAllocator::noHint_;

Result<std::unique_ptr<SlabAllocator>> SlabAllocator::create(const SlabAllocatorOptions& options) {
  if (!std::has_single_bit(options.slabSizeBytes) || options.slabSizeBytes < 4096 ||
      options.slabSizeBytes > kGiB) {
    return ShmError{ShmErrc::BadSize, "slab size " + std::to_string(options.slabSizeBytes) +
                                          " B is not a power of two between 4 KiB and 1 GiB"};
  }
  if (options.capacityBytes < options.slabSizeBytes) {
    return ShmError{ShmErrc::BadSize, "allocator capacity " + formatBytes(options.capacityBytes) +
                                          " is smaller than one slab (" +
                                          formatBytes(options.slabSizeBytes) + ")"};
  }
  if (options.capacityBytes / options.slabSizeBytes >= kNoSlab) {
    return ShmError{ShmErrc::BadSize, "allocator capacity " + formatBytes(options.capacityBytes) +
                                          " needs more than 2^32 slabs of " +
                                          formatBytes(options.slabSizeBytes) +
                                          "; use a larger slab size"};
  }
  return std::unique_ptr<SlabAllocator>(new SlabAllocator(options));
}

SlabAllocator::SlabAllocator(const SlabAllocatorOptions& options)
    : capacityBytes_(roundDownBytes(options.capacityBytes, options.slabSizeBytes)),
      slabSizeBytes_(options.slabSizeBytes),
      slabShift_(static_cast<unsigned>(std::countr_zero(options.slabSizeBytes))),
      baseOffset_(options.baseOffset),
      slabCount_(static_cast<uint32_t>(options.capacityBytes / options.slabSizeBytes)),
      clock_(options.clock ? options.clock : &SteadyShmClock::instance()),
      slabs_(new Slab[slabCount_]),
      slabBitmap_(bitmap::wordsFor(slabCount_)),
      freeSlabs_(slabCount_) {
  bitmap::resetFree(slabBitmap_.data(), slabCount_);
}

SlabAllocator::~SlabAllocator() {
  while (waitHead_) unlinkWaiter(*waitHead_);
}

Result<uint64_t> SlabAllocator::validateRequest(uint64_t bytes, uint64_t hint) const {
  if (bytes == 0) {
    return ShmError{ShmErrc::ZeroSize, "allocation of 0 bytes (hint " + formatBytes(hint) +
                                           "): a tensor or object must have at least one byte"};
  }
  if (hint == 0) {
    return ShmError{ShmErrc::ZeroHint, "memory hint of 0 bytes for a " + formatBytes(bytes) +
                                           " allocation: the hint is the unit size and must be "
                                           "at least 1 byte (e.g. hidden size x dtype size)"};
  }
  if (bytes > capacityBytes_ || hint > capacityBytes_) {
    return ShmError{ShmErrc::TooLarge, "allocation of " + formatBytes(bytes) + " with hint " +
                                           formatBytes(hint) + " can never fit: the arena holds " +
                                           formatBytes(capacityBytes_) +
                                           "; split the tensor into chunks or enlarge the arena"};
  }
  uint64_t units = bytes / hint + (bytes % hint != 0);
  if (units * hint > capacityBytes_) {
    return ShmError{ShmErrc::TooLarge, "allocation of " + formatBytes(bytes) + " needs " +
                                           unitsText(units, hint) + " for hint " +
                                           formatBytes(hint) + ", more than the arena's " +
                                           formatBytes(capacityBytes_)};
  }
  return units;
}

inline SlabAllocator::HintClass& SlabAllocator::hintClass(uint64_t hint) {
  if (lastHint_->hint == hint) [[likely]] return *lastHint_;
  return hintClassSlow(hint);
}

SlabAllocator::HintClass& SlabAllocator::hintClassSlow(uint64_t hint) {
  for (auto& hc : hintClasses_) {
    if (hc->hint == hint) return *(lastHint_ = hc.get());
  }
  auto hc = std::make_unique<HintClass>();
  hc->hint = hint;
  hc->divider = UnitDivider(hint);
  hc->unitsPerSlab = static_cast<uint32_t>(std::min<uint64_t>(slabSizeBytes_ / hint, kNoBound - 1));
  lastHint_ = hc.get();
  hintClasses_.push_back(std::move(hc));
  return *lastHint_;
}

void SlabAllocator::setCurrent(HintClass& hc, uint32_t slabIndex) {
  hc.current = slabIndex;
  hc.currentSlab = slabIndex == kNoSlab ? nullptr : &slabs_[slabIndex];
}

// The unit just taken filled word `fullWord`: move the cursor to the next word with a free unit
// (or past the end).
void SlabAllocator::advanceCursor(Slab& slab, uint32_t fullWord) {
  const uint64_t* used = slab.used.get();
  uint32_t w = fullWord;
  do {
    ++w;
  } while (w < slab.wordCount && used[w] == bitmap::kAllUsed);
  slab.cursorWord = w;
}

// A single-unit free left the slab with no live unit: keep it as the hint's hot spare, or give
// it back when the hint already has one.
void SlabAllocator::slabEmptied(HintClass& hc, Slab& slab) {
  ++hc.emptySlabs;
  if (hc.emptySlabs > 1) releaseSlab(hc, static_cast<uint32_t>(&slab - slabs_.get()));
}

Result<Allocation> SlabAllocator::tryAllocateSlow(uint64_t bytes, uint64_t hint) {
  if (!remoteFrees_.empty()) drainRemoteFrees();
  // One compare each rejects 0 and anything larger than the arena; validateRequest explains.
  if (bytes - 1 >= capacityBytes_ || hint - 1 >= capacityBytes_) [[unlikely]] {
    return validateRequest(bytes, hint).error();
  }
  HintClass& hc = hintClass(hint);
  const uint64_t q = hc.divider.divide(bytes);
  const uint64_t units = q + (q * hint != bytes);
  if (units * hint > capacityBytes_) [[unlikely]] return validateRequest(bytes, hint).error();
  if (!waitHead_) [[likely]] {
    if (std::optional<Allocation> a = allocateUnits(hc, units)) [[likely]] return *a;
  }
  ++hc.failures;
  return arenaFullError(hc, bytes, units, std::nullopt);
}

Result<std::optional<Allocation>> SlabAllocator::allocateOrWait(uint64_t bytes, uint64_t hint,
                                                                ShmTimePoint deadline,
                                                                AllocationWaiter& waiter) {
  if (!remoteFrees_.empty()) drainRemoteFrees();
  Result<uint64_t> units = validateRequest(bytes, hint);
  if (!units) return units.error();
  HintClass& hc = hintClass(hint);
  if (!waitHead_) {
    if (std::optional<Allocation> a = allocateUnits(hc, *units)) return std::optional(*a);
  }
  ShmTimePoint now = clock_->now();
  if (deadline <= now) {
    ++hc.failures;
    return arenaFullError(hc, bytes, *units, std::chrono::milliseconds(0));
  }
  SIDECAR_SHM_CHECK(!waiter.queued_, "allocateOrWait with a waiter that is already queued");
  waiter.bytes_ = bytes;
  waiter.units_ = *units;
  waiter.hint_ = hint;
  waiter.enqueuedAt_ = now;
  waiter.deadline_ = deadline;
  waiter.prev_ = waitTail_;
  waiter.next_ = nullptr;
  waiter.queued_ = true;
  (waitTail_ ? waitTail_->next_ : waitHead_) = &waiter;
  waitTail_ = &waiter;
  ++waiterCount_;
  ++hc.waits;
  return std::optional<Allocation>();
}

bool SlabAllocator::cancelWait(AllocationWaiter& waiter) noexcept {
  if (!waiter.queued_) return false;
  bool wasHead = waitHead_ == &waiter;
  unlinkWaiter(waiter);
  if (wasHead && waitHead_) serveWaiters();  // the new head may fit
  return true;
}

void SlabAllocator::unlinkWaiter(AllocationWaiter& waiter) noexcept {
  (waiter.prev_ ? waiter.prev_->next_ : waitHead_) = waiter.next_;
  (waiter.next_ ? waiter.next_->prev_ : waitTail_) = waiter.prev_;
  waiter.prev_ = waiter.next_ = nullptr;
  waiter.queued_ = false;
  --waiterCount_;
}

std::optional<Allocation> SlabAllocator::allocateUnits(HintClass& hc, uint64_t units) {
  if (units > hc.unitsPerSlab) return allocateBig(hc, units);
  auto u = static_cast<uint32_t>(units);
  if (hc.current != kNoSlab) {
    if (std::optional<Allocation> a = allocateInSlab(hc, hc.current, u)) return a;
  }
  for (uint32_t s : hc.slabs) {
    if (s == hc.current) continue;
    if (std::optional<Allocation> a = allocateInSlab(hc, s, u)) return a;
  }
  uint32_t s = carveSlab(hc);
  if (s == kNoSlab) return std::nullopt;
  return allocateInSlab(hc, s, u);
}

std::optional<Allocation> SlabAllocator::allocateInSlab(HintClass& hc, uint32_t slabIndex,
                                                        uint32_t units) {
  Slab& slab = slabs_[slabIndex];
  if (slab.unitsPerSlab - slab.usedUnits < units || units >= slab.noRunAtLeast) {
    return std::nullopt;
  }
  uint64_t* used = slab.used.get();
  size_t pos = bitmap::findFreeRun(used, slab.wordCount, units, slab.cursorWord);
  if (pos == bitmap::kNoBit) {
    slab.noRunAtLeast = units;
    return std::nullopt;
  }
  if (units == 1) {
    used[pos / 64] |= uint64_t{1} << (pos % 64);
  } else {
    bitmap::setRange(used, pos, units);
  }
  if (slab.usedUnits == 0) --hc.emptySlabs;
  slab.usedUnits += units;
  while (slab.cursorWord < slab.wordCount && used[slab.cursorWord] == bitmap::kAllUsed) {
    ++slab.cursorWord;
  }
  if (hc.current != slabIndex) setCurrent(hc, slabIndex);
  hc.unitsUsed += units;
  ++hc.allocations;
  const uint64_t sizeBytes = uint64_t{units} * hc.hint;
  usedBytes_ += sizeBytes;
  return Allocation{baseOffset_ + uint64_t{slabIndex} * slabSizeBytes_ + pos * hc.hint, sizeBytes,
                    units, hc.hint};
}

uint32_t SlabAllocator::carveSlab(HintClass& hc) {
  size_t s = bitmap::findLastFree(slabBitmap_.data(), slabBitmap_.size());
  if (s == bitmap::kNoBit) {
    if (reclaimSpares() == 0) return kNoSlab;
    s = bitmap::findLastFree(slabBitmap_.data(), slabBitmap_.size());
    if (s == bitmap::kNoBit) return kNoSlab;
  }
  bitmap::setRange(slabBitmap_.data(), s, 1);
  --freeSlabs_;
  Slab& slab = slabs_[s];
  const uint32_t words = static_cast<uint32_t>(bitmap::wordsFor(hc.unitsPerSlab));
  const uint32_t remoteWords = words + static_cast<uint32_t>(bitmap::wordsFor(words));
  if (slab.usedCapacityWords < words) {
    slab.used.reset(new uint64_t[words]);
    slab.usedCapacityWords = words;
  }
  if (slab.remoteCapacityWords < remoteWords) {
    slab.remoteStorage.reset(new std::atomic<uint64_t>[remoteWords]);
    slab.remoteCapacityWords = remoteWords;
  }
  for (uint32_t i = 0; i < remoteWords; ++i) {
    slab.remoteStorage[i].store(0, std::memory_order_relaxed);
  }
  bitmap::resetFree(slab.used.get(), hc.unitsPerSlab);
  slab.state = SlabState::Carved;
  slab.hint = hc.hint;
  slab.unitsPerSlab = hc.unitsPerSlab;
  slab.wordCount = words;
  slab.remoteWords = slab.remoteStorage.get();
  slab.remoteSummary = slab.remoteStorage.get() + words;
  slab.hintClass = &hc;
  slab.divShift = static_cast<int8_t>(hc.divider.shift);
  slab.divMagic = hc.divider.magic;
  slab.offset = baseOffset_ + (uint64_t{s} << slabShift_);
  slab.usedUnits = 0;
  slab.cursorWord = 0;
  slab.noRunAtLeast = kNoBound;
  slab.posInHint = static_cast<uint32_t>(hc.slabs.size());
  hc.slabs.push_back(static_cast<uint32_t>(s));
  ++hc.emptySlabs;
  return static_cast<uint32_t>(s);
}

void SlabAllocator::releaseSlab(HintClass& hc, uint32_t slabIndex) {
  Slab& slab = slabs_[slabIndex];
  SIDECAR_SHM_CHECK(slab.state == SlabState::Carved && slab.usedUnits == 0,
                    "releasing slab " + std::to_string(slabIndex) + " that is not empty");
  uint32_t last = hc.slabs.back();
  hc.slabs[slab.posInHint] = last;
  slabs_[last].posInHint = slab.posInHint;
  hc.slabs.pop_back();
  if (hc.current == slabIndex) setCurrent(hc, hc.slabs.empty() ? kNoSlab : hc.slabs.front());
  --hc.emptySlabs;
  slab.state = SlabState::Free;
  slab.hintClass = nullptr;
  bitmap::clearRange(slabBitmap_.data(), slabIndex, 1);
  ++freeSlabs_;
}

size_t SlabAllocator::reclaimSpares() {
  size_t released = 0;
  for (auto& hc : hintClasses_) {
    for (size_t i = hc->slabs.size(); hc->emptySlabs > 0 && i-- > 0;) {
      uint32_t s = hc->slabs[i];
      if (slabs_[s].usedUnits == 0) {
        releaseSlab(*hc, s);
        ++released;
      }
    }
  }
  return released;
}

size_t SlabAllocator::trim() {
  if (!remoteFrees_.empty()) drainRemoteFrees();
  return reclaimSpares();
}

std::optional<Allocation> SlabAllocator::allocateBig(HintClass& hc, uint64_t units) {
  const uint64_t bytes = units * hc.hint;
  const uint64_t slabsNeeded = (bytes + slabSizeBytes_ - 1) / slabSizeBytes_;
  if (slabsNeeded > freeSlabs_ + hintClasses_.size()) return std::nullopt;  // cheap reject
  size_t s = bitmap::findFreeRun(slabBitmap_.data(), slabBitmap_.size(), slabsNeeded, 0);
  if (s == bitmap::kNoBit) {
    if (reclaimSpares() == 0) return std::nullopt;
    s = bitmap::findFreeRun(slabBitmap_.data(), slabBitmap_.size(), slabsNeeded, 0);
    if (s == bitmap::kNoBit) return std::nullopt;
  }
  bitmap::setRange(slabBitmap_.data(), s, slabsNeeded);
  freeSlabs_ -= static_cast<uint32_t>(slabsNeeded);
  Slab& head = slabs_[s];
  head.state = SlabState::BigHead;
  head.hint = hc.hint;
  head.hintClass = &hc;
  head.bigSlabs = static_cast<uint32_t>(slabsNeeded);
  head.bigUnits = units;
  for (uint64_t i = 1; i < slabsNeeded; ++i) slabs_[s + i].state = SlabState::BigTail;
  hc.unitsUsed += units;
  ++hc.bigRuns;
  hc.bigSlabs += slabsNeeded;
  ++hc.allocations;
  usedBytes_ += bytes;
  return Allocation{baseOffset_ + s * slabSizeBytes_, bytes, units, hc.hint};
}

void SlabAllocator::freeUnitsInSlab(Slab& slab, uint32_t firstUnit, uint32_t units) {
  if (units == 1) {
    slab.used[firstUnit / 64] &= ~(uint64_t{1} << (firstUnit % 64));
  } else {
    bitmap::clearRange(slab.used.get(), firstUnit, units);
  }
  HintClass& hc = *slab.hintClass;
  slab.usedUnits -= units;
  slab.cursorWord = std::min(slab.cursorWord, firstUnit / 64);
  slab.noRunAtLeast = kNoBound;
  hc.unitsUsed -= units;
  usedBytes_ -= uint64_t{units} * slab.hint;
  if (slab.usedUnits == 0) {
    ++hc.emptySlabs;
    if (hc.emptySlabs > 1) releaseSlab(hc, static_cast<uint32_t>(&slab - slabs_.get()));
  }
}

void SlabAllocator::freeBigRun(uint32_t slabIndex) {
  Slab& head = slabs_[slabIndex];
  HintClass& hc = *head.hintClass;
  for (uint32_t i = 0; i < head.bigSlabs; ++i) slabs_[slabIndex + i].state = SlabState::Free;
  bitmap::clearRange(slabBitmap_.data(), slabIndex, head.bigSlabs);
  freeSlabs_ += head.bigSlabs;
  hc.unitsUsed -= head.bigUnits;
  --hc.bigRuns;
  hc.bigSlabs -= head.bigSlabs;
  ++hc.frees;
  usedBytes_ -= head.bigUnits * hc.hint;
  head.hintClass = nullptr;
}

Result<void> SlabAllocator::freeSlow(const Allocation& a) {
  auto invalid = [&](const std::string& why) {
    return ShmError{ShmErrc::InvalidFree,
                    "invalid free of " + formatBytes(a.sizeBytes) + " at offset " +
                        std::to_string(a.offset) + " (" + std::to_string(a.units) +
                        " units, hint " + formatBytes(a.hint) + "): " + why};
  };
  if (a.units == 0 || a.hint == 0 || a.sizeBytes != a.units * a.hint) {
    return invalid("not an allocation (units, hint and size disagree)");
  }
  if (a.offset < baseOffset_ || a.offset - baseOffset_ >= capacityBytes_) {
    return invalid("outside this allocator's range [" + std::to_string(baseOffset_) + ", " +
                   std::to_string(baseOffset_ + capacityBytes_) + ")");
  }
  const uint64_t rel = a.offset - baseOffset_;
  const auto s = static_cast<uint32_t>(rel >> slabShift_);
  const uint64_t within = rel & (slabSizeBytes_ - 1);
  Slab& slab = slabs_[s];
  switch (slab.state) {
    case SlabState::Carved: {
      if (slab.hint != a.hint) {
        return invalid("slab " + std::to_string(s) + " holds hint " + formatBytes(slab.hint));
      }
      const uint64_t unit = slab.hintClass->divider.divide(within);
      if (unit * a.hint != within || unit + a.units > slab.unitsPerSlab) {
        return invalid("not on a unit boundary of slab " + std::to_string(s));
      }
      auto first = static_cast<uint32_t>(unit);
      auto units = static_cast<uint32_t>(a.units);
      const bool live = units == 1 ? (slab.used[first / 64] >> (first % 64)) & 1
                                   : bitmap::allSet(slab.used.get(), first, units);
      if (!live) [[unlikely]] {
        return invalid("some of its units are already free (double free?)");
      }
      ++slab.hintClass->frees;
      freeUnitsInSlab(slab, first, units);
      break;
    }
    case SlabState::BigHead:
      if (within != 0 || slab.hint != a.hint || slab.bigUnits != a.units) {
        return invalid("slab " + std::to_string(s) + " starts a run of " +
                       unitsText(slab.bigUnits, slab.hint) + " of hint " +
                       formatBytes(slab.hint));
      }
      freeBigRun(s);
      break;
    case SlabState::BigTail:
      return invalid("it points inside a multi-slab run, not at its start");
    case SlabState::Free:
      return invalid("slab " + std::to_string(s) + " is free (double free?)");
  }
  if (waitHead_) serveWaiters();
  return {};
}

void SlabAllocator::freeRemote(const Allocation& a) noexcept {
  SIDECAR_SHM_CHECK(a.units > 0 && a.offset >= baseOffset_ &&
                        a.offset - baseOffset_ < capacityBytes_,
                    "freeRemote of offset " + std::to_string(a.offset) +
                        " outside this allocator's range");
  const uint64_t rel = a.offset - baseOffset_;
  const uint64_t s = rel >> slabShift_;
  Slab& slab = slabs_[s];
  // seq_cst throughout: the owner clears remoteQueued before exchanging the bits, and either it
  // sees these bits or this thread sees remoteQueued == false and pushes the slab again.
  if (slab.state == SlabState::BigHead) {
    slab.bigFreePending.store(true, std::memory_order_seq_cst);
  } else {
    SIDECAR_SHM_CHECK(slab.state == SlabState::Carved,
                      "freeRemote of offset " + std::to_string(a.offset) + " in a free slab");
    const uint64_t first = slab.hintClass->divider.divide(rel & (slabSizeBytes_ - 1));
    bitmap::forEachWord(first, a.units, [&](size_t w, uint64_t mask) {
      slab.remoteWords[w].fetch_or(mask, std::memory_order_seq_cst);
      slab.remoteSummary[w / 64].fetch_or(uint64_t{1} << (w % 64), std::memory_order_seq_cst);
    });
  }
  if (!slab.remoteQueued.exchange(true, std::memory_order_seq_cst)) remoteFrees_.push(&slab);
}

bool SlabAllocator::drainRemoteFrees() {
  Slab* slab = remoteFrees_.takeAll();
  if (!slab) return false;
  while (slab) {
    Slab* next = slab->mpscNext;  // read before clearing remoteQueued: a producer may re-push
    slab->remoteQueued.store(false, std::memory_order_seq_cst);
    if (slab->state == SlabState::BigHead) {
      if (slab->bigFreePending.exchange(false, std::memory_order_seq_cst)) {
        freeBigRun(static_cast<uint32_t>(slab - slabs_.get()));
      }
    } else if (slab->state == SlabState::Carved) {
      HintClass& hc = *slab->hintClass;
      uint64_t* used = slab->used.get();
      uint32_t freed = 0;
      uint32_t lowestWord = slab->cursorWord;
      const size_t summaryWords = bitmap::wordsFor(slab->wordCount);
      for (size_t sw = 0; sw < summaryWords; ++sw) {
        uint64_t pending = slab->remoteSummary[sw].exchange(0, std::memory_order_seq_cst);
        while (pending) {
          size_t w = sw * 64 + static_cast<size_t>(std::countr_zero(pending));
          pending &= pending - 1;
          uint64_t bits = slab->remoteWords[w].exchange(0, std::memory_order_seq_cst);
          if (!bits) continue;
          SIDECAR_SHM_CHECK((used[w] & bits) == bits,
                            "remote free of units that are not in use (double free) in slab " +
                                std::to_string(slab - slabs_.get()));
          used[w] &= ~bits;
          freed += static_cast<uint32_t>(std::popcount(bits));
          lowestWord = std::min(lowestWord, static_cast<uint32_t>(w));
        }
      }
      if (freed) {
        ++hc.frees;
        slab->cursorWord = lowestWord;
        slab->noRunAtLeast = kNoBound;
        slab->usedUnits -= freed;
        hc.unitsUsed -= freed;
        usedBytes_ -= uint64_t{freed} * slab->hint;
        if (slab->usedUnits == 0) {
          ++hc.emptySlabs;
          if (hc.emptySlabs > 1) releaseSlab(hc, static_cast<uint32_t>(slab - slabs_.get()));
        }
      }
    }
    slab = next;
  }
  if (waitHead_) serveWaiters();
  return true;
}

bool SlabAllocator::poll() {
  bool did = drainRemoteFrees();
  if (waitHead_) {
    size_t before = waiterCount_;
    serveWaiters();
    did = did || waiterCount_ != before;
  }
  return did;
}

void SlabAllocator::serveWaiters() {
  if (servingWaiters_) return;  // a completion called back into free(); the outer loop goes on
  servingWaiters_ = true;
  while (waitHead_) {
    AllocationWaiter& waiter = *waitHead_;
    std::optional<Allocation> a = allocateUnits(hintClass(waiter.hint_), waiter.units_);
    if (!a) break;  // strict FIFO: nobody behind the head is served
    unlinkWaiter(waiter);
    waiter.complete(*a);
  }
  servingWaiters_ = false;
}

size_t SlabAllocator::expireWaiters(ShmTimePoint now) {
  // Unlink first, complete after: a completion may cancel or queue other waiters.
  AllocationWaiter* expired = nullptr;
  AllocationWaiter* expiredTail = nullptr;
  size_t count = 0;
  for (AllocationWaiter* w = waitHead_; w;) {
    AllocationWaiter* next = w->next_;
    if (w->deadline_ <= now) {
      unlinkWaiter(*w);
      (expiredTail ? expiredTail->next_ : expired) = w;
      expiredTail = w;
      ++count;
    }
    w = next;
  }
  while (expired) {
    AllocationWaiter* w = expired;
    expired = w->next_;
    w->next_ = nullptr;
    HintClass& hc = hintClass(w->hint_);
    ++hc.failures;
    auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(now - w->enqueuedAt_);
    w->complete(arenaFullError(hc, w->bytes_, w->units_, waited));
  }
  if (count && waitHead_) serveWaiters();
  return count;
}

ShmError SlabAllocator::arenaFullError(const HintClass& hc, uint64_t bytes, uint64_t units,
                                       std::optional<std::chrono::milliseconds> waited) const {
  std::string msg = "arena full: need a run of " + unitsText(units, hc.hint) + " for hint " +
                    formatBytes(hc.hint) + " (request " + formatBytes(bytes) + "); ";
  if (units <= hc.unitsPerSlab) {
    uint64_t largest = 0;
    for (uint32_t s : hc.slabs) {
      const Slab& slab = slabs_[s];
      largest = std::max<uint64_t>(largest,
                                   bitmap::largestFreeRun(slab.used.get(), slab.wordCount));
    }
    msg += "largest free run for this hint is " + unitsText(largest, hc.hint) + " in " +
           std::to_string(hc.slabs.size()) + " slabs, ";
  } else {
    msg += "it spans " +
           std::to_string((units * hc.hint + slabSizeBytes_ - 1) / slabSizeBytes_) +
           " whole slabs, ";
  }
  uint64_t largestSlabRun = bitmap::largestFreeRun(slabBitmap_.data(), slabBitmap_.size());
  msg += "largest free slab run is " + formatBytes(largestSlabRun * slabSizeBytes_) + " (" +
         std::to_string(freeSlabs_) + " of " + std::to_string(slabCount_) + " slabs of " +
         formatBytes(slabSizeBytes_) + " free; " + formatBytes(usedBytes_) + " of " +
         formatBytes(capacityBytes_) + " in use)";
  if (waiterCount_) msg += "; " + std::to_string(waiterCount_) + " waiters queued ahead";
  if (waited) msg += "; waited " + std::to_string(waited->count()) + " ms";
  return ShmError{ShmErrc::ArenaFull, std::move(msg)};
}

AllocatorStats SlabAllocator::stats() const {
  AllocatorStats st;
  st.capacityBytes = capacityBytes_;
  st.slabSizeBytes = slabSizeBytes_;
  st.slabsTotal = slabCount_;
  st.slabsFree = freeSlabs_;
  st.largestFreeSlabRun = bitmap::largestFreeRun(slabBitmap_.data(), slabBitmap_.size());
  st.usedBytes = usedBytes_;
  st.freeBytes = uint64_t{freeSlabs_} * slabSizeBytes_;
  st.waitersQueued = waiterCount_;
  for (const auto& hc : hintClasses_) {
    HintStats h;
    h.hint = hc->hint;
    h.slabs = hc->slabs.size();
    h.bigRuns = hc->bigRuns;
    h.bigSlabs = hc->bigSlabs;
    h.unitsUsed = hc->unitsUsed;
    for (uint32_t s : hc->slabs) {
      const Slab& slab = slabs_[s];
      h.unitsFree += slab.unitsPerSlab - slab.usedUnits;
      h.largestFreeRunUnits = std::max<uint64_t>(
          h.largestFreeRunUnits, bitmap::largestFreeRun(slab.used.get(), slab.wordCount));
      st.slackBytes += slabSizeBytes_ - uint64_t{slab.unitsPerSlab} * slab.hint;
    }
    st.slackBytes += hc->bigSlabs * slabSizeBytes_;
    h.fragmentation = h.unitsFree ? 1.0 - static_cast<double>(h.largestFreeRunUnits) /
                                              static_cast<double>(h.unitsFree)
                                  : 0.0;
    h.allocations = hc->allocations;
    h.frees = hc->frees;
    h.waits = hc->waits;
    h.failures = hc->failures;
    st.slabsCarved += h.slabs;
    st.slabsInBigRuns += h.bigSlabs;
    st.freeBytes += h.unitsFree * hc->hint;
    st.hints.push_back(h);
  }
  // Big-run tails: slabs held minus the bytes their units use.
  for (uint32_t s = 0; s < slabCount_; ++s) {
    if (slabs_[s].state == SlabState::BigHead) st.slackBytes -= slabs_[s].bigUnits * slabs_[s].hint;
  }
  std::sort(st.hints.begin(), st.hints.end(),
            [](const HintStats& a, const HintStats& b) { return a.hint < b.hint; });
  return st;
}

Result<void> SlabAllocator::checkInvariants() const {
  auto broken = [](const std::string& why) {
    return ShmError{ShmErrc::BrokenInvariant, "slab allocator invariant broken: " + why};
  };
  uint64_t freeSlabs = 0, usedBytes = 0, freeBytes = 0, slackBytes = 0;
  for (uint32_t s = 0; s < slabCount_; ++s) {
    const Slab& slab = slabs_[s];
    bool bit = (slabBitmap_[s / 64] >> (s % 64)) & 1;
    if ((slab.state == SlabState::Free) == bit) {
      return broken("slab " + std::to_string(s) + " state disagrees with the slab bitmap");
    }
    switch (slab.state) {
      case SlabState::Free:
        ++freeSlabs;
        freeBytes += slabSizeBytes_;
        break;
      case SlabState::Carved: {
        size_t freeUnits = bitmap::countFree(slab.used.get(), slab.wordCount);
        if (slab.usedUnits + freeUnits != slab.unitsPerSlab) {
          return broken("slab " + std::to_string(s) + " counts " +
                        std::to_string(slab.usedUnits) + " used units but its bitmap has " +
                        std::to_string(slab.unitsPerSlab - freeUnits));
        }
        for (uint32_t w = 0; w < slab.cursorWord; ++w) {
          if (slab.used[w] != bitmap::kAllUsed) {
            return broken("slab " + std::to_string(s) + " cursor skips a free unit");
          }
        }
        const HintClass* hc = slab.hintClass;
        if (!hc || slab.posInHint >= hc->slabs.size() || hc->slabs[slab.posInHint] != s) {
          return broken("slab " + std::to_string(s) + " is not listed by its hint");
        }
        usedBytes += uint64_t{slab.usedUnits} * slab.hint;
        freeBytes += freeUnits * slab.hint;
        slackBytes += slabSizeBytes_ - uint64_t{slab.unitsPerSlab} * slab.hint;
        break;
      }
      case SlabState::BigHead: {
        if (s + slab.bigSlabs > slabCount_) return broken("big run past the end");
        for (uint32_t i = 1; i < slab.bigSlabs; ++i) {
          if (slabs_[s + i].state != SlabState::BigTail) {
            return broken("big run at slab " + std::to_string(s) + " is not contiguous");
          }
        }
        uint64_t bytes = slab.bigUnits * slab.hint;
        if (bytes > uint64_t{slab.bigSlabs} * slabSizeBytes_ ||
            bytes <= uint64_t{slab.bigSlabs - 1} * slabSizeBytes_) {
          return broken("big run at slab " + std::to_string(s) + " has the wrong slab count");
        }
        usedBytes += bytes;
        slackBytes += uint64_t{slab.bigSlabs} * slabSizeBytes_ - bytes;
        s += slab.bigSlabs - 1;
        break;
      }
      case SlabState::BigTail:
        return broken("slab " + std::to_string(s) + " is a big-run tail without a head");
    }
  }
  if (freeSlabs != freeSlabs_) return broken("free slab count");
  if (usedBytes != usedBytes_) {
    return broken("used bytes " + std::to_string(usedBytes_) + " but the bitmaps say " +
                  std::to_string(usedBytes));
  }
  if (usedBytes + freeBytes + slackBytes != capacityBytes_) {
    return broken("used " + std::to_string(usedBytes) + " + free " + std::to_string(freeBytes) +
                  " + slack " + std::to_string(slackBytes) + " != capacity " +
                  std::to_string(capacityBytes_));
  }
  for (const auto& hc : hintClasses_) {
    uint64_t units = 0, empty = 0;
    for (uint32_t s : hc->slabs) {
      units += slabs_[s].usedUnits;
      empty += slabs_[s].usedUnits == 0;
    }
    for (uint32_t s = 0; s < slabCount_; ++s) {
      if (slabs_[s].state == SlabState::BigHead && slabs_[s].hintClass == hc.get()) {
        units += slabs_[s].bigUnits;
      }
    }
    if (units != hc->unitsUsed) return broken("hint " + std::to_string(hc->hint) + " unit count");
    if (empty != hc->emptySlabs || empty > 1) {
      return broken("hint " + std::to_string(hc->hint) + " keeps " + std::to_string(empty) +
                    " empty slabs, counted " + std::to_string(hc->emptySlabs));
    }
  }
  size_t waiters = 0;
  for (const AllocationWaiter* w = waitHead_; w; w = w->next_) ++waiters;
  if (waiters != waiterCount_) return broken("waiter count");
  return {};
}

}  // namespace sidecar::shm
