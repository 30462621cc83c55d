// Seeded multi-thread stress: three owner threads, one allocator each over its own third of a
// real arena, allocating and freeing their own runs and each other's (through freeRemote).
// After every step the owner checks its allocator's invariants (used + free + slack ==
// capacity, bitmaps agree with counters) and that its new allocation overlaps no live one.
// Each allocation carries a tag in its first and last 8 bytes, checked before it is freed, so
// an overlap also shows up as a corrupted tag (and as a data race under TSan).
// Reproduce a failure with SHM_STRESS_SEED=<seed printed in the failure>.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "shm/arena.h"
#include "shm/sizes.h"
#include "shm/slab_allocator.h"

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SHM_STRESS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define SHM_STRESS_SANITIZED 1
#endif
#endif

namespace sidecar::shm {
namespace {

constexpr int kThreads = 3;
#ifdef SHM_STRESS_SANITIZED
constexpr int kSteps = 10000;
#else
constexpr int kSteps = 30000;
#endif
constexpr uint64_t kSlabBytes = 256 * kKiB;
constexpr uint64_t kPerThreadBytes = 16 * kMiB;
constexpr uint64_t kHints[] = {64, 1000, 4096, 64 * kKiB, 384 * kKiB};

struct Tagged {
  Allocation a;
  uint64_t tag;
};

struct Owner {
  std::unique_ptr<SlabAllocator> allocator;
  std::map<uint64_t, uint64_t> live;  // offset -> end; owner thread only
  std::vector<Tagged> mine;           // owner thread only
  std::mutex mutex;                   // guards inbox and notices
  std::vector<Tagged> inbox;          // allocations of other owners handed to this thread
  std::vector<uint64_t> notices;      // offsets of this owner's runs freed remotely
};

class Stress {
 public:
  Stress(uint64_t seed, std::byte* base) : seed_(seed), base_(base) {
    for (int i = 0; i < kThreads; ++i) {
      owners_[i].allocator = std::move(SlabAllocator::create({
                                           .capacityBytes = kPerThreadBytes,
                                           .slabSizeBytes = kSlabBytes,
                                           .baseOffset = i * kPerThreadBytes,
                                       }))
                                 .value();
    }
  }

  void writeTag(const Tagged& t) {
    std::memcpy(base_ + t.a.offset, &t.tag, 8);
    std::memcpy(base_ + t.a.offset + t.a.sizeBytes - 8, &t.tag, 8);
  }
  bool tagIntact(const Tagged& t) {
    uint64_t head = 0, tail = 0;
    std::memcpy(&head, base_ + t.a.offset, 8);
    std::memcpy(&tail, base_ + t.a.offset + t.a.sizeBytes - 8, 8);
    return head == t.tag && tail == t.tag;
  }

  // Returns an empty string or what went wrong.
  std::string run(int self) {
    std::mt19937_64 rng(seed_ * 7919 + static_cast<uint64_t>(self));
    Owner& me = owners_[self];
    uint64_t serial = 0;
    for (int step = 0; step < kSteps; ++step) {
      unsigned op = static_cast<unsigned>(rng() % 100);
      if (op < 20) {  // free something another owner handed us, through its remote list
        Tagged t{};
        {
          std::lock_guard lock(me.mutex);
          if (me.inbox.empty()) continue;
          size_t i = rng() % me.inbox.size();
          t = me.inbox[i];
          me.inbox[i] = me.inbox.back();
          me.inbox.pop_back();
        }
        if (!tagIntact(t)) return "tag of a handed-over run was overwritten (overlap)";
        int ownerIndex = static_cast<int>(t.a.offset / kPerThreadBytes);
        Owner& owner = owners_[ownerIndex];
        {
          std::lock_guard lock(owner.mutex);  // before freeRemote: see header comment
          owner.notices.push_back(t.a.offset);
        }
        owner.allocator->freeRemote(t.a);
      } else if (op < 40 && !me.mine.empty()) {  // free one of ours locally
        size_t i = rng() % me.mine.size();
        Tagged t = me.mine[i];
        me.mine[i] = me.mine.back();
        me.mine.pop_back();
        if (!tagIntact(t)) return "tag of a live run was overwritten (overlap)";
        me.live.erase(t.a.offset);
        Result<void> freed = me.allocator->free(t.a);
        if (!freed.ok()) return freed.error().message;
      } else if (op < 50 && !me.mine.empty()) {  // hand one of ours to another thread
        size_t i = rng() % me.mine.size();
        Tagged t = me.mine[i];
        me.mine[i] = me.mine.back();
        me.mine.pop_back();
        Owner& to = owners_[(self + 1 + static_cast<int>(rng() % (kThreads - 1))) % kThreads];
        std::lock_guard lock(to.mutex);
        to.inbox.push_back(t);
      } else {  // allocate
        uint64_t hint = kHints[rng() % std::size(kHints)];
        uint64_t units = rng() % 8 == 0 ? 1 + rng() % 300 : 1 + rng() % 16;
        uint64_t bytes = units * hint - rng() % hint;
        if (bytes < 16) bytes = 16;  // room for the two tags
        if (bytes > kPerThreadBytes / 2) bytes = kPerThreadBytes / 2;
        Result<Allocation> a = me.allocator->tryAllocate(bytes, hint);
        if (!a.ok()) {
          if (a.code() != ShmErrc::ArenaFull) return a.error().message;
        } else {
          applyNotices(me);
          if (a->sizeBytes < bytes || a->hint != hint) return "allocation smaller than asked";
          auto next = me.live.lower_bound(a->offset);
          if (next != me.live.end() && next->first < a->offset + a->sizeBytes) {
            return "overlap with the live run at " + std::to_string(next->first);
          }
          if (next != me.live.begin() && std::prev(next)->second > a->offset) {
            return "overlap with the live run at " + std::to_string(std::prev(next)->first);
          }
          me.live.emplace(a->offset, a->offset + a->sizeBytes);
          Tagged t{*a, (uint64_t{static_cast<unsigned>(self)} << 56) | ++serial};
          writeTag(t);
          me.mine.push_back(t);
        }
      }
      Result<void> ok = me.allocator->checkInvariants();
      if (!ok.ok()) return "step " + std::to_string(step) + ": " + ok.error().message;
      AllocatorStats st = me.allocator->stats();
      if (st.usedBytes + st.freeBytes + st.slackBytes != st.capacityBytes) {
        return "used + free + slack != capacity at step " + std::to_string(step);
      }
    }
    return {};
  }

  void applyNotices(Owner& me) {
    std::lock_guard lock(me.mutex);
    for (uint64_t offset : me.notices) me.live.erase(offset);
    me.notices.clear();
  }

  // After all threads joined: free everything and check the allocators are empty.
  std::string drainAll() {
    for (Owner& o : owners_) {
      for (const Tagged& t : o.inbox) {
        if (!tagIntact(t)) return "tag overwritten at the end";
        owners_[t.a.offset / kPerThreadBytes].allocator->freeRemote(t.a);
      }
    }
    for (Owner& o : owners_) {
      for (const Tagged& t : o.mine) {
        Result<void> freed = o.allocator->free(t.a);
        if (!freed.ok()) return freed.error().message;
      }
      o.allocator->poll();
      o.allocator->trim();
      AllocatorStats st = o.allocator->stats();
      if (st.usedBytes != 0 || st.slabsFree != st.slabsTotal) return "memory leaked";
      Result<void> ok = o.allocator->checkInvariants();
      if (!ok.ok()) return ok.error().message;
    }
    return {};
  }

 private:
  uint64_t seed_;
  std::byte* base_;
  Owner owners_[kThreads];
};

TEST(ShmStress, ThreeOwnersFreeingEachOthersRuns) {
  uint64_t seed = 20240611;
  if (const char* env = std::getenv("SHM_STRESS_SEED")) seed = std::strtoull(env, nullptr, 10);
  Result<Arena> arena =
      Arena::create({.sizeBytes = kThreads * kPerThreadBytes, .pageKind = PageKind::Plain});
  ASSERT_TRUE(arena.ok()) << arena.error().message;
  Stress stress(seed, arena->base());
  std::string errors[kThreads];
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] { errors[i] = stress.run(i); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    EXPECT_EQ(errors[i], "") << "thread " << i << ", SHM_STRESS_SEED=" << seed;
  }
  EXPECT_EQ(stress.drainAll(), "") << "SHM_STRESS_SEED=" << seed;
}

}  // namespace
}  // namespace sidecar::shm
