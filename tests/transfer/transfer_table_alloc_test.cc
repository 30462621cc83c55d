// Heap allocations on the hot path, counted with a replaced global operator new: a send of one
// more chunk of a live id, a recv that hits, and a markDone.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "table_fixture.h"

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
// Pairs with the malloc above (GCC cannot see that).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace sidecar::transfer::testing {
namespace {

long countAllocations(const std::function<void()>& f) {
  allocations = 0;
  counting = true;
  f();
  counting = false;
  return allocations.load();
}

TEST_F(TableTest, HotPathAllocations) {
  const std::vector<Group> dests = {{2, 3}};
  const std::string id = "0123456789abcdef0123456789abcdef";  // a uuid4().hex, past the SSO
  ASSERT_TRUE(isOk(send(0, {0}, id, 0, 8, dests, tensor(Dtype::kBFloat16, {4, 4096}))));
  TensorChunk next = tensor(Dtype::kBFloat16, {4, 4096});
  const Group senders = {0};
  long sendCost = countAllocations([&] { (void)table->send(0, senders, id, 1, 8, dests, std::move(next)); });
  EXPECT_LE(sendCost, 2) << "send of one more chunk";
  TestWaiter w;
  long recvCost = countAllocations([&] { table->recv(3, id, 1, w); });
  ASSERT_NE(w.tensor(), nullptr);
  EXPECT_EQ(recvCost, 0) << "recv hit";
  long doneCost = countAllocations([&] { (void)table->markDone(2, id, 1); });
  EXPECT_EQ(doneCost, 0) << "markDone";
  // A fresh id: the map node, its key, the groups, the chunk vector, the payload box.
  TensorChunk fresh = tensor(Dtype::kBFloat16, {4, 4096});
  const std::string freshId = "fedcba9876543210fedcba9876543210";
  long freshCost = countAllocations(
      [&] { (void)table->send(0, senders, freshId, 0, 1, dests, std::move(fresh)); });
  EXPECT_LE(freshCost, 5) << "send creating an id";
  // A recv that waits, then is served by a send, allocates only for the send.
  TestWaiter later;
  table->recv(2, id, 6, later);  // rank 2's first queued recv makes its (kept) per-rank list
  table->cancel(later);
  long waitCost = countAllocations([&] { table->recv(2, id, 5, later); });
  EXPECT_EQ(waitCost, 0) << "queuing a recv on a live id of a rank seen before";
  table->cancel(later);
  std::printf("allocations: send %ld, recv hit %ld, markDone %ld, new id %ld, queued recv %ld\n", sendCost,
              recvCost, doneCost, freshCost, waitCost);
}

}  // namespace
}  // namespace sidecar::transfer::testing
