// Concurrent copy of a sender group without a GPU: the slicing math (groupSlice) and the gathering
// of the members' sends (GroupCopies) against fake hooks that record what the daemon would do and
// let each test decide when allocations and slice copies complete. Time is a manual kj timer.

#include "daemon/group_copies.h"

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <kj/timer.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace sidecar::daemon {
namespace {

// ---- Slices ---------------------------------------------------------------------------------

TEST(GroupSlice, EvenSplitGivesEqualContiguousSlices) {
  for (uint32_t i = 0; i < 4; ++i) {
    GroupSlice s = groupSlice(4096, 4, 4, i);
    EXPECT_EQ(s.offsetBytes, i * 1024u);
    EXPECT_EQ(s.sizeBytes, 1024u);
  }
}

TEST(GroupSlice, UnevenSplitGivesTheFirstMembersOneElementMore) {
  // 10 bfloat16 over 3 members: 4, 3, 3 elements.
  EXPECT_EQ(groupSlice(20, 2, 3, 0).offsetBytes, 0u);
  EXPECT_EQ(groupSlice(20, 2, 3, 0).sizeBytes, 8u);
  EXPECT_EQ(groupSlice(20, 2, 3, 1).offsetBytes, 8u);
  EXPECT_EQ(groupSlice(20, 2, 3, 1).sizeBytes, 6u);
  EXPECT_EQ(groupSlice(20, 2, 3, 2).offsetBytes, 14u);
  EXPECT_EQ(groupSlice(20, 2, 3, 2).sizeBytes, 6u);
}

TEST(GroupSlice, FewerElementsThanMembersLeavesTheLastMembersEmpty) {
  // 2 float64 over 4 members: members 2 and 3 copy nothing.
  EXPECT_EQ(groupSlice(16, 8, 4, 0).sizeBytes, 8u);
  EXPECT_EQ(groupSlice(16, 8, 4, 1).offsetBytes, 8u);
  EXPECT_EQ(groupSlice(16, 8, 4, 1).sizeBytes, 8u);
  EXPECT_EQ(groupSlice(16, 8, 4, 2).sizeBytes, 0u);
  EXPECT_EQ(groupSlice(16, 8, 4, 3).sizeBytes, 0u);
  // An empty tensor: nobody copies anything.
  for (uint32_t i = 0; i < 3; ++i) EXPECT_EQ(groupSlice(0, 2, 3, i).sizeBytes, 0u);
  // A position outside the group: nothing.
  EXPECT_EQ(groupSlice(16, 8, 2, 2).sizeBytes, 0u);
}

TEST(GroupSlice, SlicesCoverEveryTensorExactlyAtElementBoundaries) {
  for (uint32_t element : {1u, 2u, 4u, 8u}) {
    for (uint32_t members = 1; members <= 9; ++members) {
      for (uint64_t elements = 0; elements <= 40; ++elements) {
        uint64_t total = elements * element;
        uint64_t next = 0, largest = 0, smallest = UINT64_MAX;
        for (uint32_t i = 0; i < members; ++i) {
          GroupSlice s = groupSlice(total, element, members, i);
          if (s.sizeBytes == 0) continue;
          ASSERT_EQ(s.offsetBytes, next) << total << " bytes, " << members << " members, #" << i;
          ASSERT_EQ(s.offsetBytes % element, 0u);
          ASSERT_EQ(s.sizeBytes % element, 0u);
          next += s.sizeBytes;
          largest = std::max(largest, s.sizeBytes);
          smallest = std::min(smallest, s.sizeBytes);
        }
        ASSERT_EQ(next, total) << total << " bytes, " << members << " members";
        if (elements >= members) {
          ASSERT_LE(largest - smallest, element);  // as even as possible
        }
      }
    }
  }
}

// ---- Gathering ------------------------------------------------------------------------------

struct Copy {
  transfer::Rank rank;
  GroupSlice slice;
  uint64_t arenaOffset;
  kj::Own<kj::PromiseFulfiller<void>> done;
};

class FakeHooks final : public GroupCopies::Hooks {
 public:
  kj::Promise<shm::Allocation> allocate(rpc::SessionId session, uint64_t sizeBytes) override {
    allocations.push_back({session, sizeBytes});
    if (holdAllocation) {
      auto paf = kj::newPromiseAndFulfiller<shm::Allocation>();
      pendingAllocation = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    }
    return shm::Allocation{kSpaceOffset, sizeBytes, 1, sizeBytes};
  }
  kj::Promise<void> copySlice(const GroupMemberSend& member, GroupSlice slice,
                              uint64_t arenaOffset) override {
    auto paf = kj::newPromiseAndFulfiller<void>();
    copies.push_back({member.rank, slice, arenaOffset, kj::mv(paf.fulfiller)});
    return kj::mv(paf.promise);
  }
  kj::Promise<void> store(const GroupMemberSend& member, uint64_t arenaOffset) override {
    stores.push_back({member.rank, arenaOffset});
    return kj::READY_NOW;
  }
  kj::Promise<void> storeReplica(const GroupMemberSend& member) override {
    replicas.push_back(member.rank);
    return kj::READY_NOW;
  }
  kj::Promise<void> release(rpc::SessionId session, uint64_t arenaOffset) override {
    releases.push_back({session, arenaOffset});
    return kj::READY_NOW;
  }
  Copy* copyOf(transfer::Rank rank) {
    for (auto& c : copies) {
      if (c.rank == rank) return &c;
    }
    return nullptr;
  }

  static constexpr uint64_t kSpaceOffset = 1 << 20;
  bool holdAllocation = false;
  kj::Own<kj::PromiseFulfiller<shm::Allocation>> pendingAllocation;
  std::vector<std::pair<rpc::SessionId, uint64_t>> allocations;
  std::vector<Copy> copies;
  std::vector<std::pair<transfer::Rank, uint64_t>> stores;
  std::vector<transfer::Rank> replicas;
  std::vector<std::pair<rpc::SessionId, uint64_t>> releases;
};

// The outcome of one member's send: unset while pending, "" once stored, else the error.
using Outcome = std::optional<std::string>;

class GroupCopiesTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kTimeoutMs = 1000;

  // Rank r's session is 100 + r.
  GroupMemberSend member(transfer::Rank rank, transfer::Group group, std::vector<int64_t> shape,
                         transfer::Dtype dtype = transfer::Dtype::kFloat32,
                         std::string id = "id") {
    GroupMemberSend m;
    m.session = 100 + static_cast<rpc::SessionId>(rank);
    m.rank = rank;
    m.group = std::move(group);
    m.request.dataId = std::move(id);
    m.request.destinations = {{9}};
    m.request.tensor.dtype = dtype;
    m.request.tensor.shape = std::move(shape);
    m.request.tensor.sizeBytes = *transfer::tensorBytes(dtype, m.request.tensor.shape);
    m.request.senderRank = rank;
    m.request.senderGroup = m.group;
    m.request.concurrentCopy = true;
    return m;
  }

  Outcome* send(GroupMemberSend m) {
    outcomes_.push_back(std::make_unique<Outcome>());
    Outcome* out = outcomes_.back().get();
    tasks_.add(copies_.add(std::move(m)).then([out]() { *out = ""; },
                                              [out](kj::Exception&& e) {
                                                *out = e.getDescription().cStr();
                                              }));
    ws_.poll();
    return out;
  }
  void land(transfer::Rank rank) {
    Copy* c = hooks_.copyOf(rank);
    ASSERT_NE(c, nullptr) << "rank " << rank << " copies nothing";
    c->done->fulfill();
    ws_.poll();
  }
  void advanceMs(uint64_t ms) {
    now_ = now_ + ms * kj::MILLISECONDS;
    timer_.advanceTo(now_);
    ws_.poll();
  }

  struct NoErrors : kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override { ADD_FAILURE() << e.getDescription().cStr(); }
  };
  // The kj objects are held by pointer: their destructors may throw, which a gtest fixture's may
  // not; destroyed in reverse order of creation.
  std::unique_ptr<kj::EventLoop> loopOwner_ = std::make_unique<kj::EventLoop>();
  std::unique_ptr<kj::WaitScope> wsOwner_ = std::make_unique<kj::WaitScope>(*loopOwner_);
  kj::WaitScope& ws_ = *wsOwner_;
  kj::TimePoint now_ = kj::origin<kj::TimePoint>();
  kj::TimerImpl timer_{now_};
  FakeHooks hooks_;
  std::unique_ptr<GroupCopies> copiesOwner_ =
      std::make_unique<GroupCopies>(hooks_, timer_, kTimeoutMs);
  GroupCopies& copies_ = *copiesOwner_;
  NoErrors noErrors_;
  std::unique_ptr<kj::TaskSet> tasksOwner_ = std::make_unique<kj::TaskSet>(noErrors_);
  kj::TaskSet& tasks_ = *tasksOwner_;
  std::vector<std::unique_ptr<Outcome>> outcomes_;

  void TearDown() override {
    tasksOwner_.reset();
    copiesOwner_.reset();
    hooks_ = FakeHooks{};
  }
  ~GroupCopiesTest() noexcept override {
    wsOwner_.reset();
    loopOwner_.reset();
  }
};

TEST_F(GroupCopiesTest, EachMemberCopiesItsSliceIntoOneAllocationStoredOnce) {
  auto* a = send(member(0, {0, 1}, {5, 4}));  // 80 bytes: 10 floats each
  ASSERT_EQ(hooks_.allocations.size(), 1u);
  EXPECT_EQ(hooks_.allocations[0], (std::pair<rpc::SessionId, uint64_t>{100, 80}));
  ASSERT_EQ(hooks_.copies.size(), 1u);  // the first copies at once
  auto* b = send(member(1, {0, 1}, {5, 4}));
  ASSERT_EQ(hooks_.copies.size(), 2u);
  EXPECT_EQ(hooks_.allocations.size(), 1u) << "one shared allocation";
  EXPECT_EQ(hooks_.copyOf(0)->slice.offsetBytes, 0u);
  EXPECT_EQ(hooks_.copyOf(0)->slice.sizeBytes, 40u);
  EXPECT_EQ(hooks_.copyOf(0)->arenaOffset, FakeHooks::kSpaceOffset);
  EXPECT_EQ(hooks_.copyOf(1)->slice.offsetBytes, 40u);
  EXPECT_EQ(hooks_.copyOf(1)->arenaOffset, FakeHooks::kSpaceOffset + 40);
  land(1);
  EXPECT_TRUE(hooks_.stores.empty()) << "stored before every slice landed";
  EXPECT_FALSE(a->has_value());
  land(0);
  ASSERT_EQ(hooks_.stores.size(), 1u);
  EXPECT_EQ(hooks_.stores[0], (std::pair<transfer::Rank, uint64_t>{0, FakeHooks::kSpaceOffset}));
  EXPECT_EQ(hooks_.replicas, std::vector<transfer::Rank>{1});
  EXPECT_EQ(*a, "");
  EXPECT_EQ(*b, "");
  EXPECT_TRUE(hooks_.releases.empty());
  EXPECT_EQ(copies_.gathering(), 0u);
  EXPECT_EQ(copies_.stored(), 1u);
}

TEST_F(GroupCopiesTest, UnevenSplitOverFourMembersArrivingOutOfOrder) {
  // 7 bfloat16 over 4 members: 2, 2, 2, 1 elements.
  std::vector<Outcome*> out;
  for (transfer::Rank r : {3, 1, 0, 2}) out.push_back(send(member(r, {0, 1, 2, 3}, {7}, transfer::Dtype::kBFloat16)));
  ASSERT_EQ(hooks_.copies.size(), 4u);
  EXPECT_EQ(hooks_.allocations[0].first, 103u) << "the first to send allocates";
  uint64_t expectOffset[] = {0, 4, 8, 12}, expectSize[] = {4, 4, 4, 2};
  for (transfer::Rank r = 0; r < 4; ++r) {
    EXPECT_EQ(hooks_.copyOf(r)->slice.offsetBytes, expectOffset[r]) << r;
    EXPECT_EQ(hooks_.copyOf(r)->slice.sizeBytes, expectSize[r]) << r;
    land(r);
  }
  ASSERT_EQ(hooks_.stores.size(), 1u);
  EXPECT_EQ(hooks_.stores[0].first, 3) << "stored as the allocating member's send";
  EXPECT_EQ(hooks_.replicas.size(), 3u);
  for (auto* o : out) EXPECT_EQ(*o, "");
}

TEST_F(GroupCopiesTest, TensorSmallerThanTheGroupCopiesOnlyNonEmptySlices) {
  // 2 float64 over 4 members: ranks 2 and 3 copy nothing, yet the chunk waits for their sends.
  auto* a = send(member(0, {0, 1, 2, 3}, {2}, transfer::Dtype::kFloat64));
  auto* c = send(member(2, {0, 1, 2, 3}, {2}, transfer::Dtype::kFloat64));
  auto* d = send(member(3, {0, 1, 2, 3}, {2}, transfer::Dtype::kFloat64));
  land(0);
  EXPECT_TRUE(hooks_.stores.empty()) << "stored before rank 1 sent";
  auto* b = send(member(1, {0, 1, 2, 3}, {2}, transfer::Dtype::kFloat64));
  EXPECT_EQ(hooks_.copies.size(), 2u);
  land(1);
  ASSERT_EQ(hooks_.stores.size(), 1u);
  for (auto* o : {a, b, c, d}) EXPECT_EQ(*o, "");
}

TEST_F(GroupCopiesTest, MembersArrivingBeforeTheSpaceCopyOnceItExists) {
  hooks_.holdAllocation = true;
  auto* a = send(member(0, {0, 1}, {8}));
  auto* b = send(member(1, {0, 1}, {8}));
  EXPECT_TRUE(hooks_.copies.empty()) << "copied before the space existed";
  hooks_.pendingAllocation->fulfill(shm::Allocation{4096, 32, 1, 32});
  ws_.poll();
  ASSERT_EQ(hooks_.copies.size(), 2u);
  EXPECT_EQ(hooks_.copyOf(1)->arenaOffset, 4096u + 16);
  land(0);
  land(1);
  EXPECT_EQ(*a, "");
  EXPECT_EQ(*b, "");
}

TEST_F(GroupCopiesTest, AMemberThatNeverSendsTimesOutAndTheSpaceIsReleased) {
  auto* a = send(member(0, {0, 1, 2}, {9}));
  auto* b = send(member(1, {0, 1, 2}, {9}));
  land(0);
  advanceMs(kTimeoutMs - 1);
  EXPECT_FALSE(a->has_value());
  advanceMs(1);
  ASSERT_TRUE(a->has_value());
  EXPECT_NE(a->value().find("[timeout]"), std::string::npos) << **a;
  EXPECT_NE(a->value().find("rank(s) 2 did not send"), std::string::npos) << **a;
  EXPECT_EQ(*b, *a);
  // Rank 1's slice is still being copied into the space: not released yet.
  EXPECT_TRUE(hooks_.releases.empty());
  EXPECT_EQ(copies_.draining(), 1u);
  land(1);
  ASSERT_EQ(hooks_.releases.size(), 1u);
  EXPECT_EQ(hooks_.releases[0], (std::pair<rpc::SessionId, uint64_t>{100, FakeHooks::kSpaceOffset}));
  EXPECT_TRUE(hooks_.stores.empty());
  EXPECT_EQ(copies_.draining(), 0u);
  // A late send of the missing member starts a new gather (and times out in its turn).
  auto* late = send(member(2, {0, 1, 2}, {9}));
  EXPECT_EQ(copies_.gathering(), 1u);
  land(2);
  advanceMs(kTimeoutMs);
  ASSERT_TRUE(late->has_value());
  EXPECT_NE(late->value().find("[timeout]"), std::string::npos);
  EXPECT_EQ(hooks_.releases.size(), 2u);
  EXPECT_EQ(copies_.gathering() + copies_.draining(), 0u);
}

TEST_F(GroupCopiesTest, AFailedSliceCopyFailsEveryMemberAfterTheOtherCopiesLanded) {
  auto* a = send(member(0, {0, 1}, {8}));
  auto* b = send(member(1, {0, 1}, {8}));
  hooks_.copyOf(1)->done->reject(KJ_EXCEPTION(FAILED, "[gpu-copy-failed] no such GPU"));
  ws_.poll();
  ASSERT_TRUE(a->has_value());
  EXPECT_NE(a->value().find("gpu-copy-failed"), std::string::npos);
  EXPECT_EQ(*b, *a);
  EXPECT_TRUE(hooks_.releases.empty()) << "released while rank 0's copy still writes into it";
  land(0);
  EXPECT_EQ(hooks_.releases.size(), 1u);
  EXPECT_TRUE(hooks_.stores.empty());
}

TEST_F(GroupCopiesTest, TheAllocatingSessionEndingWaitsForTheOtherCopiesBeforeUnregistering) {
  auto* a = send(member(0, {0, 1}, {8}));
  auto* b = send(member(1, {0, 1}, {8}));
  land(0);
  bool unregistered = false;
  copies_.sessionEnded(100, [&] { unregistered = true; });
  ws_.poll();
  ASSERT_TRUE(a->has_value());
  EXPECT_NE(a->value().find("[cancelled] rank 0 went away"), std::string::npos) << **a;
  EXPECT_EQ(*b, *a);
  EXPECT_FALSE(unregistered) << "rank 1's copy still writes into rank 0's allocation";
  land(1);
  EXPECT_TRUE(unregistered);
  // The session's unregister frees its allocations: the gather must not release it too.
  EXPECT_TRUE(hooks_.releases.empty());
}

TEST_F(GroupCopiesTest, AnotherMembersSessionEndingReleasesTheSpaceOnceCopiesLanded) {
  auto* a = send(member(0, {0, 1}, {8}));
  send(member(1, {0, 1}, {8}));
  bool unregistered = false;
  copies_.sessionEnded(101, [&] { unregistered = true; });
  ws_.poll();
  EXPECT_TRUE(unregistered) << "rank 1 holds no shared space: nothing to wait for";
  ASSERT_TRUE(a->has_value());
  EXPECT_NE(a->value().find("[cancelled] rank 1"), std::string::npos) << **a;
  land(1);
  EXPECT_TRUE(hooks_.releases.empty());
  land(0);
  ASSERT_EQ(hooks_.releases.size(), 1u);
  EXPECT_EQ(hooks_.releases[0].first, 100u);
}

TEST_F(GroupCopiesTest, AMismatchedReplicaFailsTheGroupClearly) {
  auto* a = send(member(0, {0, 1}, {8}));
  auto* b = send(member(1, {0, 1}, {9}));
  ASSERT_TRUE(b->has_value());
  EXPECT_NE(b->value().find("[invalid-argument] rank 1 sent chunk 0 of 'id' from group [0,1] with "
                            "another shape than rank 0"),
            std::string::npos)
      << **b;
  ASSERT_TRUE(a->has_value());
  EXPECT_NE(a->value().find("another shape"), std::string::npos);
  land(0);
  EXPECT_EQ(hooks_.releases.size(), 1u);
}

TEST_F(GroupCopiesTest, TheSameMemberSendingTwiceWhileGatheringIsAlreadySent) {
  auto* a = send(member(0, {0, 1}, {8}));
  auto* again = send(member(0, {0, 1}, {8}));
  ASSERT_TRUE(again->has_value());
  EXPECT_NE(again->value().find("[already-sent]"), std::string::npos) << **again;
  EXPECT_FALSE(a->has_value()) << "the first send still gathers";
  send(member(1, {0, 1}, {8}));
  land(0);
  land(1);
  EXPECT_EQ(*a, "");
}

TEST_F(GroupCopiesTest, ChunksAndIdsGatherSeparately) {
  auto m = [&](transfer::Rank r, std::string id, uint32_t chunk) {
    auto s = member(r, {0, 1}, {4}, transfer::Dtype::kFloat32, std::move(id));
    s.request.chunkId = chunk;
    s.request.numChunks = 2;
    return s;
  };
  send(m(0, "x", 0));
  send(m(0, "x", 1));
  send(m(0, "y", 0));
  EXPECT_EQ(copies_.gathering(), 3u);
  EXPECT_EQ(hooks_.allocations.size(), 3u);
}

TEST_F(GroupCopiesTest, ARankOutsideItsGroupIsRefused) {
  auto* out = send(member(5, {0, 1}, {4}));
  ASSERT_TRUE(out->has_value());
  EXPECT_NE(out->value().find("[invalid-argument] rank 5 is not in its group [0,1]"), std::string::npos);
  EXPECT_EQ(copies_.gathering(), 0u);
}

}  // namespace
}  // namespace sidecar::daemon
