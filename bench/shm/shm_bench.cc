// Slab allocator fast paths against mimalloc, measured in the same run.
//   BM_SlabOneUnit/<hint>     tryAllocate(1 unit) + free, with a `vs_mimalloc` ratio counter
//   BM_MimallocOneUnit/<size> mi_malloc + mi_free of the same size (the baseline row)
//   BM_SlabRun/<units>        a run of 1..256 units of 64 B, `vs_mimalloc` against mi_malloc
//   BM_MimallocRun/<units>    mi_malloc + mi_free of units * 64 B
//   BM_SlabCrossThreadFree    two owner threads; each allocates and the other frees remotely
// The ratio counters time mimalloc inline with the same loop shape, so they hold for this
// machine and build only. See docs/PERFORMANCE.md, "Slab allocator".
#include <benchmark/benchmark.h>
#include <mimalloc.h>

#include <array>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "shm/sizes.h"
#include "shm/slab_allocator.h"

namespace sidecar::shm {
namespace {

std::unique_ptr<SlabAllocator> makeAllocator(uint64_t capacityBytes) {
  return std::move(SlabAllocator::create({.capacityBytes = capacityBytes})).value();
}

// ns per mi_malloc + mi_free of `bytes`, timed over a fixed count.
double mimallocNsPerOp(size_t bytes) {
  constexpr int kOps = 2'000'000;
  for (int i = 0; i < 1000; ++i) mi_free(mi_malloc(bytes));
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kOps; ++i) {
    void* p = mi_malloc(bytes);
    benchmark::DoNotOptimize(p);
    mi_free(p);
  }
  auto ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start);
  return ns.count() / kOps;
}

template <class F>
void timedLoop(benchmark::State& state, size_t bytes, F&& body) {
  double mimallocNs = mimallocNsPerOp(bytes);
  auto start = std::chrono::steady_clock::now();
  for (auto _ : state) body();
  auto ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start);
  double slabNs = ns.count() / static_cast<double>(state.iterations());
  state.counters["mimalloc_ns"] = mimallocNs;
  state.counters["vs_mimalloc"] = slabNs / mimallocNs;
}

void BM_SlabOneUnit(benchmark::State& state) {
  const auto hint = static_cast<uint64_t>(state.range(0));
  auto alloc = makeAllocator(256 * kMiB);
  // A realistic neighbourhood: some live units so the scan starts from a cursor, not bit 0.
  std::vector<Allocation> keep;
  for (int i = 0; i < 100; ++i) keep.push_back(*alloc->tryAllocate(hint, hint));
  timedLoop(state, hint, [&] {
    Result<Allocation> a = alloc->tryAllocate(hint, hint);
    benchmark::DoNotOptimize(a);
    (void)alloc->free(*a);
  });
}
BENCHMARK(BM_SlabOneUnit)->Arg(64)->Arg(4096)->Arg(16384);

void BM_MimallocOneUnit(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0));
  for (auto _ : state) {
    void* p = mi_malloc(bytes);
    benchmark::DoNotOptimize(p);
    mi_free(p);
  }
}
BENCHMARK(BM_MimallocOneUnit)->Arg(64)->Arg(4096)->Arg(16384);

void BM_SlabRun(benchmark::State& state) {
  const auto units = static_cast<uint64_t>(state.range(0));
  constexpr uint64_t kHint = 64;
  auto alloc = makeAllocator(256 * kMiB);
  std::vector<Allocation> keep;
  for (int i = 0; i < 37; ++i) keep.push_back(*alloc->tryAllocate(3 * kHint, kHint));
  timedLoop(state, units * kHint, [&] {
    Result<Allocation> a = alloc->tryAllocate(units * kHint, kHint);
    benchmark::DoNotOptimize(a);
    (void)alloc->free(*a);
  });
  state.SetLabel(std::to_string(units * kHint) + " B");
}
BENCHMARK(BM_SlabRun)->RangeMultiplier(2)->Range(1, 256);

void BM_MimallocRun(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(state.range(0)) * 64;
  for (auto _ : state) {
    void* p = mi_malloc(bytes);
    benchmark::DoNotOptimize(p);
    mi_free(p);
  }
}
BENCHMARK(BM_MimallocRun)->RangeMultiplier(2)->Range(1, 256);

// Single-producer single-consumer ring of allocations handed to the other thread.
class Ring {
 public:
  bool push(const Allocation& a) {
    size_t tail = tail_.load(std::memory_order_relaxed);
    if (tail - head_.load(std::memory_order_acquire) == kSize) return false;
    slots_[tail % kSize] = a;
    tail_.store(tail + 1, std::memory_order_release);
    return true;
  }
  bool pop(Allocation& out) {
    size_t head = head_.load(std::memory_order_relaxed);
    if (head == tail_.load(std::memory_order_acquire)) return false;
    out = slots_[head % kSize];
    head_.store(head + 1, std::memory_order_release);
    return true;
  }

 private:
  static constexpr size_t kSize = 1024;
  std::array<Allocation, kSize> slots_{};
  alignas(64) std::atomic<size_t> head_{0};
  alignas(64) std::atomic<size_t> tail_{0};
};

// Each side: allocate one unit from its own allocator, hand it to the other side, and free
// (remotely, into the other side's allocator) whatever the other side handed over.
struct Side {
  std::unique_ptr<SlabAllocator> alloc;
  Ring inbox;  // allocations of the *other* side, to be freed remotely
};

void exchangeStep(Side& me, Side& other, uint64_t hint) {
  Result<Allocation> a = me.alloc->tryAllocate(hint, hint);
  while (!a.ok()) {  // arena full: wait for the other side's frees
    me.alloc->poll();
    Allocation x;
    while (me.inbox.pop(x)) other.alloc->freeRemote(x);
    a = me.alloc->tryAllocate(hint, hint);
  }
  while (!other.inbox.push(*a)) {
    Allocation x;
    while (me.inbox.pop(x)) other.alloc->freeRemote(x);
  }
  Allocation x;
  while (me.inbox.pop(x)) other.alloc->freeRemote(x);
}

void BM_SlabCrossThreadFree(benchmark::State& state) {
  constexpr uint64_t kHint = 4096;
  Side a{makeAllocator(64 * kMiB), {}};
  Side b{makeAllocator(64 * kMiB), {}};
  std::atomic<bool> stop{false};
  std::thread peer([&] {
    while (!stop.load(std::memory_order_relaxed)) exchangeStep(b, a, kHint);
  });
  for (auto _ : state) exchangeStep(a, b, kHint);
  stop.store(true);
  peer.join();
  state.SetItemsProcessed(state.iterations());
  state.SetLabel("items = allocations by the timed thread, each freed by the peer");
}
BENCHMARK(BM_SlabCrossThreadFree)->UseRealTime();

}  // namespace
}  // namespace sidecar::shm

BENCHMARK_MAIN();
