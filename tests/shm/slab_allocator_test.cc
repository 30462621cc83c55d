// The slab allocator, single-threaded paths plus remote frees from a second thread.
// No memory is mapped: the allocator only hands out offsets.
#include "shm/slab_allocator.h"

#include <gtest/gtest.h>

#include <random>
#include <thread>
#include <vector>

#include "shm/bitmap.h"
#include "shm/sizes.h"

namespace sidecar::shm {
namespace {

using std::chrono::milliseconds;

std::unique_ptr<SlabAllocator> makeAllocator(uint64_t capacityBytes, uint64_t slabSizeBytes,
                                             const ShmClock* clock = nullptr,
                                             uint64_t baseOffset = 0) {
  auto r = SlabAllocator::create({.capacityBytes = capacityBytes,
                                  .slabSizeBytes = slabSizeBytes,
                                  .baseOffset = baseOffset,
                                  .clock = clock});
  EXPECT_TRUE(r.ok()) << r.error().message;
  return std::move(r).value();
}

void expectConsistent(const SlabAllocator& a) {
  Result<void> ok = a.checkInvariants();
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  AllocatorStats st = a.stats();
  EXPECT_EQ(st.usedBytes + st.freeBytes + st.slackBytes, st.capacityBytes);
}

std::optional<HintStats> findHint(const AllocatorStats& st, uint64_t hint) {
  for (const HintStats& h : st.hints) {
    if (h.hint == hint) return h;
  }
  return std::nullopt;
}

// --- bitmap -------------------------------------------------------------------------------

size_t naiveFindRun(const std::vector<bool>& usedBits, size_t n) {
  size_t run = 0;
  for (size_t i = 0; i < usedBits.size(); ++i) {
    run = usedBits[i] ? 0 : run + 1;
    if (run == n) return i + 1 - n;
  }
  return bitmap::kNoBit;
}

TEST(ShmBitmap, FindFreeRunMatchesANaiveScan) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 300; ++round) {
    size_t bits = 1 + rng() % 700;
    std::vector<uint64_t> words(bitmap::wordsFor(bits));
    bitmap::resetFree(words.data(), bits);
    std::vector<bool> ref(bits, false);
    double density = (rng() % 100) / 100.0;
    for (size_t i = 0; i < bits; ++i) {
      if ((rng() % 1000) / 1000.0 < density) {
        bitmap::setRange(words.data(), i, 1);
        ref[i] = true;
      }
    }
    for (size_t n : {size_t{1}, size_t{2}, size_t{3}, size_t{7}, size_t{31}, size_t{63},
                     size_t{64}, size_t{65}, size_t{130}, size_t{256}}) {
      ASSERT_EQ(bitmap::findFreeRun(words.data(), words.size(), n, 0), naiveFindRun(ref, n))
          << "bits " << bits << " n " << n << " round " << round;
    }
    size_t best = 0, run = 0, freeCount = 0;
    for (bool b : ref) {
      run = b ? 0 : run + 1;
      best = std::max(best, run);
      freeCount += !b;
    }
    ASSERT_EQ(bitmap::largestFreeRun(words.data(), words.size()), best);
    ASSERT_EQ(bitmap::countFree(words.data(), words.size()), freeCount);
  }
}

// --- requests that fail at once -----------------------------------------------------------

TEST(ShmSlabAllocator, RejectsZeroSizeZeroHintAndTooLarge) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  EXPECT_EQ(a->tryAllocate(0, 64).code(), ShmErrc::ZeroSize);
  EXPECT_EQ(a->tryAllocate(64, 0).code(), ShmErrc::ZeroHint);
  Result<Allocation> big = a->tryAllocate(8 * kMiB + 1, 4096);
  ASSERT_EQ(big.code(), ShmErrc::TooLarge);
  EXPECT_NE(big.error().message.find("8 MiB"), std::string::npos) << big.error().message;
  // Rounding up to whole units can push a request past the capacity.
  EXPECT_EQ(a->tryAllocate(8 * kMiB - 1, 3 * kMiB).code(), ShmErrc::TooLarge);
  CallbackWaiter w([](Result<Allocation>) { FAIL() << "never queued"; });
  EXPECT_EQ(a->allocateOrWait(0, 64, ShmTimePoint::max(), w).code(), ShmErrc::ZeroSize);
  EXPECT_FALSE(w.queued());
  EXPECT_EQ(SlabAllocator::create({.capacityBytes = kMiB, .slabSizeBytes = 2 * kMiB}).code(),
            ShmErrc::BadSize);
  EXPECT_EQ(SlabAllocator::create({.capacityBytes = 8 * kMiB, .slabSizeBytes = 1000}).code(),
            ShmErrc::BadSize);
}

// --- small runs ---------------------------------------------------------------------------

TEST(ShmSlabAllocator, RunsOfContiguousUnitsInsideASlab) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB, nullptr, /*baseOffset=*/kGiB);
  Result<Allocation> one = a->tryAllocate(1, 4096);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->units, 1u);
  EXPECT_EQ(one->sizeBytes, 4096u);
  EXPECT_EQ(one->hint, 4096u);
  EXPECT_GE(one->offset, kGiB);
  EXPECT_EQ((one->offset - kGiB) % 4096, 0u);
  Result<Allocation> run = a->tryAllocate(10 * 4096 + 1, 4096);  // 11 units
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->units, 11u);
  EXPECT_EQ(run->offset, one->offset + 4096) << "first fit, right after the first unit";
  // 63 units from unit 12 crosses a 64-bit word boundary.
  Result<Allocation> cross = a->tryAllocate(63 * 4096, 4096);
  ASSERT_TRUE(cross.ok());
  EXPECT_EQ(cross->offset, one->offset + 12 * 4096);
  std::optional<HintStats> h = findHint(a->stats(), 4096);
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->unitsUsed, 75u);
  EXPECT_EQ(h->unitsFree, 512u - 75u);
  EXPECT_EQ(h->slabs, 1u);
  expectConsistent(*a);
  ASSERT_TRUE(a->free(*run).ok());
  // The hole of 11 units is reused first-fit by a run that fits it.
  Result<Allocation> refill = a->tryAllocate(11 * 4096, 4096);
  ASSERT_TRUE(refill.ok());
  EXPECT_EQ(refill->offset, run->offset);
  expectConsistent(*a);
}

TEST(ShmSlabAllocator, UnitsNeedNotDivideTheSlab) {
  auto a = makeAllocator(4 * kMiB, 2 * kMiB);
  // 3000 B units: 699 per 2 MiB slab, 352 B of slack at the end of each slab.
  std::vector<Allocation> live;
  for (int i = 0; i < 699 * 2; ++i) {
    Result<Allocation> r = a->tryAllocate(3000, 3000);
    ASSERT_TRUE(r.ok()) << i << ": " << r.error().message;
    live.push_back(*r);
  }
  EXPECT_EQ(a->tryAllocate(3000, 3000).code(), ShmErrc::ArenaFull);
  AllocatorStats st = a->stats();
  EXPECT_EQ(st.slackBytes, 2 * (2 * kMiB - 699 * 3000));
  expectConsistent(*a);
  for (const Allocation& x : live) ASSERT_TRUE(a->free(x).ok());
  expectConsistent(*a);
}

// --- big runs -----------------------------------------------------------------------------

TEST(ShmSlabAllocator, BigRunsTakeContiguousWholeSlabs) {
  auto a = makeAllocator(16 * kMiB, 2 * kMiB);
  // 600 units of 8 KiB = 4.7 MiB > one slab: 3 whole slabs.
  Result<Allocation> big = a->tryAllocate(600 * 8192, 8192);
  ASSERT_TRUE(big.ok()) << big.error().message;
  EXPECT_EQ(big->units, 600u);
  EXPECT_EQ(big->offset % (2 * kMiB), 0u);
  AllocatorStats st = a->stats();
  EXPECT_EQ(st.slabsInBigRuns, 3u);
  EXPECT_EQ(st.slabsFree, 5u);
  // A hint larger than a slab: every run is big.
  Result<Allocation> huge = a->tryAllocate(5 * kMiB, 5 * kMiB);
  ASSERT_TRUE(huge.ok()) << huge.error().message;
  EXPECT_EQ(a->stats().slabsFree, 2u);
  expectConsistent(*a);
  ASSERT_TRUE(a->free(*big).ok());
  ASSERT_TRUE(a->free(*huge).ok());
  EXPECT_EQ(a->stats().slabsFree, 8u);
  // And then the whole arena in one run.
  Result<Allocation> all = a->tryAllocate(16 * kMiB, 4096);
  ASSERT_TRUE(all.ok()) << all.error().message;
  EXPECT_EQ(all->units, 4096u);
  EXPECT_EQ(a->tryAllocate(1, 4096).code(), ShmErrc::ArenaFull);
  expectConsistent(*a);
  ASSERT_TRUE(a->free(*all).ok());
  expectConsistent(*a);
}

TEST(ShmSlabAllocator, CarvingFromTheTopLeavesRoomForBigRuns) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  Result<Allocation> small = a->tryAllocate(64, 64);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->offset / (2 * kMiB), 3u) << "small hints carve the highest free slab";
  Result<Allocation> big = a->tryAllocate(6 * kMiB, 2 * kMiB);
  ASSERT_TRUE(big.ok()) << big.error().message;
  EXPECT_EQ(big->offset, 0u);
}

// --- slabs go back to the arena -----------------------------------------------------------

TEST(ShmSlabAllocator, EmptySlabsReturnSoHintsCanChange) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  std::vector<Allocation> live;
  for (;;) {
    Result<Allocation> r = a->tryAllocate(1000, 1000);
    if (!r.ok()) break;
    live.push_back(*r);
  }
  EXPECT_EQ(a->stats().slabsFree, 0u);
  for (const Allocation& x : live) ASSERT_TRUE(a->free(x).ok());
  AllocatorStats st = a->stats();
  EXPECT_EQ(st.slabsFree, 3u) << "all but one hot spare went back to the arena";
  EXPECT_EQ(findHint(st, 1000)->slabs, 1u);
  // A different hint needs every slab: the spare of hint 1000 is reclaimed on demand.
  Result<Allocation> whole = a->tryAllocate(8 * kMiB, kMiB);
  ASSERT_TRUE(whole.ok()) << whole.error().message;
  EXPECT_EQ(findHint(a->stats(), 1000)->slabs, 0u);
  expectConsistent(*a);
  ASSERT_TRUE(a->free(*whole).ok());
  ASSERT_TRUE(a->tryAllocate(1000, 1000).ok());
  EXPECT_EQ(a->trim(), 0u) << "the slab in use stays";
}

TEST(ShmSlabAllocator, TrimReleasesSpares) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  Result<Allocation> x = a->tryAllocate(64, 64);
  ASSERT_TRUE(x.ok());
  ASSERT_TRUE(a->free(*x).ok());
  EXPECT_EQ(a->stats().slabsFree, 3u);
  EXPECT_EQ(a->trim(), 1u);
  EXPECT_EQ(a->stats().slabsFree, 4u);
  expectConsistent(*a);
}

// --- invalid frees ------------------------------------------------------------------------

TEST(ShmSlabAllocator, InvalidFreesAreRejectedAndChangeNothing) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  Result<Allocation> x = a->tryAllocate(4 * 512, 512);
  Result<Allocation> big = a->tryAllocate(4 * kMiB, 4096);
  ASSERT_TRUE(x.ok() && big.ok());
  Allocation wrongHint = *x;
  wrongHint.hint = 256;
  wrongHint.sizeBytes = 256 * wrongHint.units;
  EXPECT_EQ(a->free(wrongHint).code(), ShmErrc::InvalidFree);
  Allocation outside = *x;
  outside.offset = 8 * kMiB;
  EXPECT_EQ(a->free(outside).code(), ShmErrc::InvalidFree);
  Allocation misaligned = *x;
  misaligned.offset += 1;
  EXPECT_EQ(a->free(misaligned).code(), ShmErrc::InvalidFree);
  Allocation tail = *big;
  tail.offset += 2 * kMiB;
  EXPECT_EQ(a->free(tail).code(), ShmErrc::InvalidFree);
  Allocation inconsistent = *x;
  inconsistent.sizeBytes += 1;
  EXPECT_EQ(a->free(inconsistent).code(), ShmErrc::InvalidFree);
  expectConsistent(*a);
  ASSERT_TRUE(a->free(*x).ok());
  Result<void> twice = a->free(*x);
  ASSERT_EQ(twice.code(), ShmErrc::InvalidFree);
  EXPECT_NE(twice.error().message.find("double free"), std::string::npos)
      << twice.error().message;
  ASSERT_TRUE(a->free(*big).ok());
  EXPECT_EQ(a->free(*big).code(), ShmErrc::InvalidFree);
  expectConsistent(*a);
}

// The single-unit fast paths (tryAllocate of one unit of the last hint, free of one unit) must
// reject exactly what the general paths reject and keep every counter exact.
TEST(ShmSlabAllocator, SingleUnitFastPathsValidateLikeTheGeneralPaths) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB, nullptr, /*baseOffset=*/kGiB);
  for (uint64_t hint : {uint64_t{64}, uint64_t{3000}, uint64_t{4096}}) {
    std::vector<Allocation> live;
    for (int i = 0; i < 130; ++i) {  // crosses two 64-unit words of the current slab
      Result<Allocation> r = a->tryAllocate(hint, hint);
      ASSERT_TRUE(r.ok()) << r.error().message;
      EXPECT_EQ(r->units, 1u);
      EXPECT_EQ(r->sizeBytes, hint);
      if (!live.empty()) {
        EXPECT_EQ(r->offset, live.back().offset + hint) << "first fit";
      }
      live.push_back(*r);
    }
    const Allocation x = live[70];
    Allocation bad = x;
    bad.hint = 0;
    bad.sizeBytes = 0;
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    bad = x;
    bad.sizeBytes = hint + 1;
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    bad = x;
    bad.offset += 1;  // not on a unit boundary
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    bad = x;
    bad.offset = kGiB - hint;  // below the base: the relative offset wraps
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    bad = x;
    bad.hint = bad.sizeBytes = hint / 2;
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    bad = x;
    bad.offset = live.back().offset + hint;  // a free unit of this slab
    EXPECT_EQ(a->free(bad).code(), ShmErrc::InvalidFree);
    expectConsistent(*a);
    ASSERT_TRUE(a->free(x).ok());
    Result<void> twice = a->free(x);
    ASSERT_EQ(twice.code(), ShmErrc::InvalidFree);
    EXPECT_NE(twice.error().message.find("double free"), std::string::npos)
        << twice.error().message;
    // The freed unit is the lowest free one: the next single unit reuses it.
    Result<Allocation> again = a->tryAllocate(1, hint);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->offset, x.offset);
    std::optional<HintStats> h = findHint(a->stats(), hint);
    ASSERT_TRUE(h.has_value());
    EXPECT_EQ(h->unitsUsed, 130u);
    EXPECT_EQ(h->allocations, 131u);
    EXPECT_EQ(h->frees, 1u);
    expectConsistent(*a);
    for (const Allocation& y : live) ASSERT_TRUE(a->free(y).ok());
    EXPECT_EQ(a->stats().usedBytes, 0u);
    expectConsistent(*a);
  }
  // A one-unit request of a hint larger than a slab is a big run, not a fast-path unit.
  Result<Allocation> huge = a->tryAllocate(1, 3 * kMiB);
  ASSERT_TRUE(huge.ok()) << huge.error().message;
  EXPECT_EQ(a->stats().slabsInBigRuns, 2u);
  ASSERT_TRUE(a->free(*huge).ok());
  EXPECT_EQ(a->free(*huge).code(), ShmErrc::InvalidFree);
  expectConsistent(*a);
}

// The inline fast paths past their easy cases: the tail of a slab that its units do not fill
// (padding bits are set there, so only the unit bound rejects it), a hint whose current slab
// was given back, and hints taking turns (the one-entry hint cache).
TEST(ShmSlabAllocator, SingleUnitFastPathsAtSlabTailsAndAfterRelease) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB, nullptr, /*baseOffset=*/4096);
  constexpr uint64_t kHint = 3000;  // 699 units per 2 MiB slab, 2152 bytes of tail
  Result<Allocation> first = a->tryAllocate(kHint, kHint);
  ASSERT_TRUE(first.ok()) << first.error().message;
  const uint64_t slabStart = first->offset;
  Allocation tail{slabStart + 699 * kHint, kHint, 1, kHint};
  Result<void> r = a->free(tail);
  ASSERT_EQ(r.code(), ShmErrc::InvalidFree);
  EXPECT_NE(r.error().message.find("not on a unit boundary"), std::string::npos)
      << r.error().message;
  expectConsistent(*a);
  // Fill the slab through the fast path; the next unit needs a second slab.
  std::vector<Allocation> live{*first};
  for (int i = 1; i < 699; ++i) {
    Result<Allocation> u = a->tryAllocate(1, kHint);
    ASSERT_TRUE(u.ok());
    EXPECT_EQ(u->offset, slabStart + uint64_t(i) * kHint);
    live.push_back(*u);
  }
  EXPECT_EQ(a->free(tail).code(), ShmErrc::InvalidFree);
  Result<Allocation> next = a->tryAllocate(kHint, kHint);
  ASSERT_TRUE(next.ok());
  EXPECT_NE(next->offset / (2 * kMiB), slabStart / (2 * kMiB));
  expectConsistent(*a);
  // Free the second slab's unit (it stays as the spare), then all of the first (released).
  ASSERT_TRUE(a->free(*next).ok());
  for (const Allocation& u : live) ASSERT_TRUE(a->free(u).ok());
  EXPECT_EQ(a->stats().slabsCarved, 1u);
  EXPECT_EQ(a->free(live[5]).code(), ShmErrc::InvalidFree);
  expectConsistent(*a);
  // Hints take turns: each request of another hint goes through the general path once.
  std::vector<Allocation> mixed;
  for (int i = 0; i < 50; ++i) {
    for (uint64_t hint : {uint64_t{64}, kHint, uint64_t{4096}}) {
      Result<Allocation> u = a->tryAllocate(hint, hint);
      ASSERT_TRUE(u.ok()) << u.error().message;
      mixed.push_back(*u);
    }
  }
  expectConsistent(*a);
  for (const Allocation& u : mixed) ASSERT_TRUE(a->free(u).ok());
  for (const Allocation& u : mixed) EXPECT_EQ(a->free(u).code(), ShmErrc::InvalidFree);
  EXPECT_EQ(a->stats().usedBytes, 0u);
  const uint64_t carved = a->stats().slabsCarved;
  EXPECT_EQ(a->trim(), carved);
  EXPECT_EQ(a->stats().slabsFree, 4u);
  // After trim no hint has a current slab: the fast path must fall through and carve.
  Result<Allocation> again = a->tryAllocate(4096, 4096);
  ASSERT_TRUE(again.ok()) << again.error().message;
  ASSERT_TRUE(a->free(*again).ok());
  expectConsistent(*a);
}

TEST(ShmSlabAllocator, SingleUnitFastPathsDrainRemoteFreesAndRespectWaiters) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  std::vector<Allocation> all;
  for (int i = 0; i < 32; ++i) all.push_back(*a->tryAllocate(64 * kKiB, 64 * kKiB));
  EXPECT_EQ(a->tryAllocate(1, 64 * kKiB).code(), ShmErrc::ArenaFull);
  std::thread([&] { a->freeRemote(all[5]); }).join();
  Result<Allocation> one = a->tryAllocate(1, 64 * kKiB);  // drains, then takes the unit
  ASSERT_TRUE(one.ok()) << one.error().message;
  EXPECT_EQ(one->offset, all[5].offset);
  // With a waiter queued, a one-unit tryAllocate must not jump the line, and a one-unit free
  // serves the waiter.
  std::vector<Result<Allocation>> log;
  struct Rec final : AllocationWaiter {
    std::vector<Result<Allocation>>* log;
    void complete(Result<Allocation> r) override { log->push_back(std::move(r)); }
  } w;
  w.log = &log;
  ASSERT_TRUE(a->allocateOrWait(64 * kKiB, 64 * kKiB, clock.now() + milliseconds(100), w).ok());
  ASSERT_TRUE(a->free(all[9]).ok());
  ASSERT_EQ(log.size(), 1u);
  ASSERT_TRUE(log[0].ok());
  EXPECT_EQ(log[0]->offset, all[9].offset);
  ASSERT_TRUE(a->free(*log[0]).ok());
  expectConsistent(*a);
}

// --- statistics ---------------------------------------------------------------------------

TEST(ShmSlabAllocator, StatsReportFragmentation) {
  auto a = makeAllocator(2 * kMiB, 2 * kMiB);
  // 8 units of 256 KiB: keep every other one, so 4 free units in runs of 1.
  std::vector<Allocation> units;
  for (int i = 0; i < 8; ++i) units.push_back(*a->tryAllocate(256 * kKiB, 256 * kKiB));
  for (int i = 0; i < 8; i += 2) ASSERT_TRUE(a->free(units[i]).ok());
  std::optional<HintStats> h = findHint(a->stats(), 256 * kKiB);
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->unitsFree, 4u);
  EXPECT_EQ(h->largestFreeRunUnits, 1u);
  EXPECT_DOUBLE_EQ(h->fragmentation, 0.75);
  Result<Allocation> two = a->tryAllocate(512 * kKiB, 256 * kKiB);
  ASSERT_EQ(two.code(), ShmErrc::ArenaFull);
  EXPECT_NE(two.error().message.find("need a run of 2 units (512 KiB) for hint 256 KiB"),
            std::string::npos)
      << two.error().message;
  EXPECT_NE(two.error().message.find("largest free run for this hint is 1 unit (256 KiB)"),
            std::string::npos)
      << two.error().message;
  h = findHint(a->stats(), 256 * kKiB);
  EXPECT_EQ(h->failures, 1u);
  EXPECT_EQ(h->allocations, 8u);
  EXPECT_EQ(h->frees, 4u);
}

// --- remote frees -------------------------------------------------------------------------

TEST(ShmSlabAllocator, RemoteFreesAreAppliedWhenTheOwnerDrains) {
  auto a = makeAllocator(8 * kMiB, 2 * kMiB);
  std::vector<Allocation> live;
  for (int i = 0; i < 200; ++i) live.push_back(*a->tryAllocate(3 * 64, 64));
  live.push_back(*a->tryAllocate(3 * kMiB, 4096));  // a big run, freed remotely too
  std::thread other([&] {
    for (const Allocation& x : live) a->freeRemote(x);
  });
  other.join();
  EXPECT_EQ(a->stats().usedBytes, 200 * 3 * 64 + 3 * kMiB) << "not applied until drained";
  EXPECT_TRUE(a->poll());
  EXPECT_FALSE(a->poll());
  EXPECT_EQ(a->stats().usedBytes, 0u);
  expectConsistent(*a);
}

TEST(ShmSlabAllocator, TryAllocateDrainsRemoteFrees) {
  auto a = makeAllocator(2 * kMiB, 2 * kMiB);
  Result<Allocation> all = a->tryAllocate(2 * kMiB, 64);
  ASSERT_TRUE(all.ok());
  std::thread([&] { a->freeRemote(*all); }).join();
  EXPECT_TRUE(a->tryAllocate(2 * kMiB, 64).ok());
  expectConsistent(*a);
}

// --- waiters ------------------------------------------------------------------------------

struct RecordingWaiter final : AllocationWaiter {
  std::vector<Result<Allocation>>* log;
  explicit RecordingWaiter(std::vector<Result<Allocation>>* l) : log(l) {}
  void complete(Result<Allocation> r) override { log->push_back(std::move(r)); }
};

TEST(ShmSlabAllocatorWaiters, FreesGrantWaitersInFifoOrder) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  Result<Allocation> all = a->tryAllocate(2 * kMiB, 64 * kKiB);
  ASSERT_TRUE(all.ok());
  std::vector<Result<Allocation>> log;
  RecordingWaiter w1(&log), w2(&log);
  auto deadline = clock.now() + milliseconds(2000);
  auto r1 = a->allocateOrWait(64 * kKiB, 64 * kKiB, deadline, w1);
  auto r2 = a->allocateOrWait(128 * kKiB, 64 * kKiB, deadline, w2);
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_FALSE(r1->has_value());
  EXPECT_TRUE(w1.queued() && w2.queued());
  EXPECT_EQ(a->waitersQueued(), 2u);
  // New requests queue behind the waiters instead of jumping the line.
  EXPECT_EQ(a->tryAllocate(64 * kKiB, 64 * kKiB).code(), ShmErrc::ArenaFull);
  ASSERT_TRUE(a->free(*all).ok());
  ASSERT_EQ(log.size(), 2u);
  ASSERT_TRUE(log[0].ok() && log[1].ok());
  EXPECT_EQ(log[0]->units, 1u);
  EXPECT_EQ(log[1]->units, 2u);
  EXPECT_FALSE(w1.queued());
  EXPECT_EQ(findHint(a->stats(), 64 * kKiB)->waits, 2u);
  expectConsistent(*a);
}

TEST(ShmSlabAllocatorWaiters, BigHeadOfLineIsNotStarvedBySmallOnes) {
  ManualShmClock clock;
  auto a = makeAllocator(4 * kMiB, 2 * kMiB, &clock);
  std::vector<Allocation> quarters;
  for (int i = 0; i < 4; ++i) quarters.push_back(*a->tryAllocate(kMiB, kMiB));
  std::vector<Result<Allocation>> log;
  RecordingWaiter bigWaiter(&log), smallWaiter(&log);
  auto deadline = clock.now() + milliseconds(5000);
  ASSERT_TRUE(a->allocateOrWait(4 * kMiB, kMiB, deadline, bigWaiter).ok());  // the whole arena
  ASSERT_TRUE(a->allocateOrWait(kMiB, kMiB, deadline, smallWaiter).ok());
  // Each free would fit the small waiter, but the big head waits and so does everyone behind.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(a->free(quarters[i]).ok());
    EXPECT_TRUE(log.empty()) << "served out of order after free " << i;
  }
  ASSERT_TRUE(a->free(quarters[3]).ok());
  ASSERT_EQ(log.size(), 1u);
  ASSERT_TRUE(log[0].ok());
  EXPECT_EQ(log[0]->sizeBytes, 4 * kMiB);
  EXPECT_TRUE(smallWaiter.queued());
  ASSERT_TRUE(a->free(*log[0]).ok());
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[1]->sizeBytes, kMiB);
  expectConsistent(*a);
}

TEST(ShmSlabAllocatorWaiters, ExpiredWaitersFailWithTheSizes) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  Result<Allocation> all = a->tryAllocate(2 * kMiB, 8192);
  ASSERT_TRUE(all.ok());
  std::vector<Result<Allocation>> log;
  RecordingWaiter early(&log), late(&log);
  ASSERT_TRUE(a->allocateOrWait(3 * 8192, 8192, clock.now() + milliseconds(2000), early).ok());
  ASSERT_TRUE(a->allocateOrWait(8192, 8192, clock.now() + milliseconds(9000), late).ok());
  clock.advance(milliseconds(1999));
  EXPECT_EQ(a->expireWaiters(clock.now()), 0u);
  clock.advance(milliseconds(1));
  EXPECT_EQ(a->expireWaiters(clock.now()), 1u);
  ASSERT_EQ(log.size(), 1u);
  ASSERT_FALSE(log[0].ok());
  EXPECT_EQ(log[0].code(), ShmErrc::ArenaFull);
  const std::string& msg = log[0].error().message;
  EXPECT_NE(msg.find("need a run of 3 units (24 KiB) for hint 8 KiB"), std::string::npos) << msg;
  EXPECT_NE(msg.find("waited 2000 ms"), std::string::npos) << msg;
  EXPECT_TRUE(late.queued());
  EXPECT_EQ(findHint(a->stats(), 8192)->failures, 1u);
  ASSERT_TRUE(a->free(*all).ok());
  ASSERT_EQ(log.size(), 2u);
  EXPECT_TRUE(log[1].ok());
}

TEST(ShmSlabAllocatorWaiters, ExpiringTheHeadServesTheNextOne) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  Result<Allocation> half = a->tryAllocate(kMiB, kMiB);
  ASSERT_TRUE(half.ok());
  std::vector<Result<Allocation>> log;
  RecordingWaiter head(&log), next(&log);
  ASSERT_TRUE(a->allocateOrWait(2 * kMiB, kMiB, clock.now() + milliseconds(10), head).ok());
  ASSERT_TRUE(a->allocateOrWait(kMiB, kMiB, clock.now() + milliseconds(1000), next).ok());
  EXPECT_TRUE(log.empty());
  clock.advance(milliseconds(10));
  EXPECT_EQ(a->expireWaiters(clock.now()), 1u);
  ASSERT_EQ(log.size(), 2u);
  EXPECT_FALSE(log[0].ok());
  EXPECT_TRUE(log[1].ok()) << "the fitting waiter behind the expired head is served";
}

TEST(ShmSlabAllocatorWaiters, ImmediateGrantPastDeadlineAndCancel) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  CallbackWaiter never([](Result<Allocation>) { FAIL() << "not expected"; });
  auto now = a->allocateOrWait(kMiB, kMiB, clock.now(), never);
  ASSERT_TRUE(now.ok());
  ASSERT_TRUE(now->has_value()) << "space available: granted at once, not queued";
  auto past = a->allocateOrWait(2 * kMiB, kMiB, clock.now(), never);
  ASSERT_FALSE(past.ok());
  EXPECT_EQ(past.code(), ShmErrc::ArenaFull);
  ASSERT_TRUE(a->allocateOrWait(2 * kMiB, kMiB, clock.now() + milliseconds(5), never).ok());
  EXPECT_TRUE(a->cancelWait(never));
  EXPECT_FALSE(a->cancelWait(never));
  EXPECT_EQ(a->expireWaiters(clock.now() + milliseconds(10)), 0u);
  ASSERT_TRUE(a->free(**now).ok());
  expectConsistent(*a);
}

TEST(ShmSlabAllocatorWaiters, CompletionsMayCallBackIntoTheAllocator) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  Result<Allocation> all = a->tryAllocate(2 * kMiB, kMiB);
  ASSERT_TRUE(all.ok());
  int granted = 0;
  // Each waiter frees what it got at once; both must be served from the one free.
  CallbackWaiter w1([&](Result<Allocation> r) {
    ASSERT_TRUE(r.ok());
    ++granted;
    ASSERT_TRUE(a->free(*r).ok());
  });
  CallbackWaiter w2([&](Result<Allocation> r) {
    ASSERT_TRUE(r.ok());
    ++granted;
    ASSERT_TRUE(a->free(*r).ok());
  });
  auto deadline = clock.now() + milliseconds(100);
  ASSERT_TRUE(a->allocateOrWait(2 * kMiB, kMiB, deadline, w1).ok());
  ASSERT_TRUE(a->allocateOrWait(2 * kMiB, kMiB, deadline, w2).ok());
  ASSERT_TRUE(a->free(*all).ok());
  EXPECT_EQ(granted, 2);
  EXPECT_EQ(a->stats().usedBytes, 0u);
  expectConsistent(*a);
}

TEST(ShmSlabAllocatorWaiters, RemoteFreesServeWaitersOnPoll) {
  ManualShmClock clock;
  auto a = makeAllocator(2 * kMiB, 2 * kMiB, &clock);
  Result<Allocation> all = a->tryAllocate(2 * kMiB, 4096);
  ASSERT_TRUE(all.ok());
  std::vector<Result<Allocation>> log;
  RecordingWaiter w(&log);
  ASSERT_TRUE(a->allocateOrWait(4096, 4096, clock.now() + milliseconds(100), w).ok());
  std::thread([&] { a->freeRemote(*all); }).join();
  EXPECT_TRUE(log.empty());
  EXPECT_TRUE(a->poll());
  ASSERT_EQ(log.size(), 1u);
  EXPECT_TRUE(log[0].ok());
}

}  // namespace
}  // namespace sidecar::shm
