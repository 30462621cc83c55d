// Seeded randomized runs of the transfer table: sends from every member of sending groups, recvs
// from receivers (and strangers), markDones in random order, closeStreams, cancels, rank churn and
// expiry, with re-entrant callbacks. Checked throughout: internal invariants and stats
// (checkInvariants), no double release and no leak (FakeHooks), every recv completes at most once
// and every view it gets is of live memory holding the requested id and chunk.
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>

#include "table_fixture.h"

namespace sidecar::transfer::testing {
namespace {

struct IdPlan {
  std::string id;
  Group senders;
  std::vector<Group> dests;
  uint32_t numChunks;  // the real count
  bool stream;         // sent with numChunks 0, then closed
};

// The tag of a chunk's payload: which id and chunk it belongs to.
uint32_t tagOf(size_t idIndex, uint32_t chunk) { return static_cast<uint32_t>(idIndex * 1000 + chunk); }

class RandomTableTest : public TableTest, public ::testing::WithParamInterface<uint32_t> {};

TEST_P(RandomTableTest, InvariantsHold) {
  std::mt19937 rng(GetParam());
  auto pick = [&](size_t n) { return static_cast<size_t>(std::uniform_int_distribution<size_t>(0, n - 1)(rng)); };
  auto chance = [&](int percent) { return static_cast<int>(pick(100)) < percent; };

  makeTable(TransferLimits{.objectBytesMax = 64, .ttlMs = 500, .tombstoneMs = 300, .worldSize = 0});
  const std::vector<Group> senderGroups = {{0}, {0, 1}, {1000, 1001, 1002}};
  const std::vector<std::vector<Group>> destSets = {{{2}}, {{2, 3}}, {{2, 3}, {4}}, {{5}}, {{0, 1}}};
  std::vector<IdPlan> plans;
  for (size_t i = 0; i < 12; ++i) {
    plans.push_back({"id" + std::to_string(i), senderGroups[pick(senderGroups.size())],
                     destSets[pick(destSets.size())], static_cast<uint32_t>(1 + pick(4)), chance(40)});
  }
  std::vector<Rank> receivers = {0, 1, 2, 3, 4, 5, 7};
  for (Rank r : {0, 1, 2, 3, 4}) table->rankRegistered(r);  // 5 and 7 are not: their holds expire

  struct Pending {
    std::unique_ptr<TestWaiter> waiter;
    size_t plan;
    uint32_t chunk;
  };
  std::vector<Pending> pending;
  uint64_t hits = 0, ends = 0, errors = 0, sendsOk = 0, markOk = 0;

  auto checkCompletion = [&](TestWaiter& w, size_t planIndex, uint32_t chunk) {
    EXPECT_LE(w.calls, 1) << "a recv completed twice";
    if (const TensorChunk* t = w.tensor()) {
      EXPECT_TRUE(hooks.isLive(t->allocation.offset)) << "view of released memory";
      EXPECT_EQ(t->allocation.hint, tagOf(planIndex, chunk) + 64) << "view of another chunk";
      ++hits;
    } else if (const ObjectChunk* o = w.object()) {
      EXPECT_EQ(o->typeTag, tagOf(planIndex, chunk)) << "object of another chunk";
      ++hits;
    } else if (w.isEnd()) {
      ++ends;
    } else {
      ++errors;
    }
  };

  // SIDECAR_TRANSFER_STEPS lengthens a run (the default keeps the unit suite quick).
  const char* stepsEnv = std::getenv("SIDECAR_TRANSFER_STEPS");
  const int steps = stepsEnv ? std::atoi(stepsEnv) : 4000;
  for (int step = 0; step < steps; ++step) {
    size_t p = pick(plans.size());
    const IdPlan& plan = plans[p];
    int action = static_cast<int>(pick(100));
    if (action < 35) {
      Rank s = plan.senders[pick(plan.senders.size())];
      uint32_t chunk = static_cast<uint32_t>(pick(plan.numChunks + (chance(5) ? 2 : 0)));
      Payload payload;
      if (chance(50)) {
        TensorChunk t;
        t.dtype = chance(50) ? Dtype::kBFloat16 : Dtype::kUint8;
        t.shape = {static_cast<int64_t>(1 + pick(4)), 3};
        t.sizeBytes = 3 * static_cast<uint64_t>(t.shape[0]) * dtypeBytes(t.dtype);
        // The hint carries the chunk's identity (hint > 0 keeps units meaningful).
        t.allocation = hooks.allocate(t.sizeBytes, tagOf(p, chunk) + 64);
        if (chance(3)) t.sizeBytes += 1;  // invalid now and then
        payload = t;
      } else {
        payload = ObjectChunk{tagOf(p, chunk), std::string(chance(3) ? 65 : 8, 'o')};
      }
      auto result = send(s, plan.senders, plan.id, chunk, plan.stream ? 0 : plan.numChunks, plan.dests,
                         std::move(payload));
      if (isOk(result)) ++sendsOk;
    } else if (action < 60) {
      auto w = std::make_unique<TestWaiter>();
      Rank r = receivers[pick(receivers.size())];
      uint32_t chunk = static_cast<uint32_t>(pick(plan.numChunks + 1));
      TestWaiter* raw = w.get();
      size_t planIndex = p;
      // Some callbacks re-enter: mark the chunk done, or recv another chunk of the id.
      int mode = static_cast<int>(pick(10));
      raw->onComplete = [&, raw, planIndex, chunk, r, mode](TestWaiter& self) {
        checkCompletion(self, planIndex, chunk);
        if (!table) return;  // completing from the table's destructor
        if (mode == 0 && (self.tensor() || self.object())) {
          (void)table->markDone(r, plans[planIndex].id, chunk);
        } else if (mode == 1) {
          (void)table->markDone(r, plans[(planIndex + 1) % plans.size()].id, 0);
        }
        (void)raw;
      };
      table->recv(r, plan.id, chunk, *w);
      table->checkInvariants();
      pending.push_back({std::move(w), p, chunk});
    } else if (action < 80) {
      Rank r = receivers[pick(receivers.size())];
      if (isOk(markDone(r, plan.id, static_cast<uint32_t>(pick(plan.numChunks + 1))))) ++markOk;
    } else if (action < 85) {
      Rank s = plan.senders[pick(plan.senders.size())];
      (void)table->closeStream(s, plan.id, plan.numChunks, plan.dests);
      table->checkInvariants();
    } else if (action < 90) {
      hooks.now += pick(200);
      table->expire();
      table->checkInvariants();
    } else if (action < 94 && !pending.empty()) {
      size_t i = pick(pending.size());
      bool wasQueued = pending[i].waiter->queued();
      EXPECT_EQ(table->cancel(*pending[i].waiter), wasQueued);
      table->checkInvariants();
    } else if (action < 96) {
      Rank r = receivers[pick(receivers.size())];
      table->rankGone(r);
      table->checkInvariants();
      if (chance(70)) table->rankRegistered(r);
    } else if (action < 98) {
      // Forget completed waiters.
      std::erase_if(pending, [](const Pending& x) { return !x.waiter->queued(); });
    } else {
      // Start an id over with a fresh plan once it is gone from the table.
      if (!table->describe(plan.id).has_value()) {
        plans[p] = {plan.id, senderGroups[pick(senderGroups.size())], destSets[pick(destSets.size())],
                    static_cast<uint32_t>(1 + pick(4)), chance(40)};
      }
    }
  }
  auto s = table->stats();
  EXPECT_GT(sendsOk, 100u);
  EXPECT_GT(hits, 50u);
  EXPECT_GT(markOk, 20u);
  RecordProperty("hits", static_cast<int>(hits));
  std::printf("seed %u: %llu sends ok, %llu hits, %llu ends, %llu errors, %llu markDones; stats: items %llu "
              "chunks %llu bytes %llu waiters %llu dups %llu expired %llu completed %llu\n",
              GetParam(), (unsigned long long)sendsOk, (unsigned long long)hits, (unsigned long long)ends,
              (unsigned long long)errors, (unsigned long long)markOk, (unsigned long long)s.items,
              (unsigned long long)s.chunks, (unsigned long long)s.bytesHeld, (unsigned long long)s.waiters,
              (unsigned long long)s.duplicatesDropped, (unsigned long long)s.expiredHolds,
              (unsigned long long)s.chunksCompleted);
  // Destroying the table completes every queued waiter exactly once and releases everything.
  table.reset();
  for (const Pending& x : pending) {
    EXPECT_FALSE(x.waiter->queued());
    EXPECT_LE(x.waiter->calls, 1);
  }
  EXPECT_TRUE(hooks.live.empty());
}

INSTANTIATE_TEST_SUITE_P(Seeds, RandomTableTest, ::testing::Range(1u, 41u));

}  // namespace
}  // namespace sidecar::transfer::testing
