// The transfer table: ids, chunks, groups, holds, waiters, streams, time-to-live, validation.
// Every test ends with the table destroyed and FakeHooks checking that each allocation handed to
// the table was released exactly once (see table_fixture.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "table_fixture.h"

namespace sidecar::transfer::testing {
namespace {

using ::testing::HasSubstr;

const std::vector<Group> kTo2 = {{2}};
const std::vector<Group> kTo23 = {{2, 3}};

// ---- dtype helpers ------------------------------------------------------------------------------

TEST(Dtype, BytesNamesAndParsing) {
  EXPECT_EQ(dtypeBytes(Dtype::kBool), 1u);
  EXPECT_EQ(dtypeBytes(Dtype::kUint8), 1u);
  EXPECT_EQ(dtypeBytes(Dtype::kInt8), 1u);
  EXPECT_EQ(dtypeBytes(Dtype::kInt16), 2u);
  EXPECT_EQ(dtypeBytes(Dtype::kInt32), 4u);
  EXPECT_EQ(dtypeBytes(Dtype::kInt64), 8u);
  EXPECT_EQ(dtypeBytes(Dtype::kFloat16), 2u);
  EXPECT_EQ(dtypeBytes(Dtype::kBFloat16), 2u);
  EXPECT_EQ(dtypeBytes(Dtype::kFloat32), 4u);
  EXPECT_EQ(dtypeBytes(Dtype::kFloat64), 8u);
  EXPECT_EQ(dtypeBytes(static_cast<Dtype>(200)), 0u);
  EXPECT_STREQ(dtypeName(Dtype::kBFloat16), "bfloat16");
  EXPECT_STREQ(dtypeName(static_cast<Dtype>(200)), "unknown");
  for (int d = 0; d <= static_cast<int>(Dtype::kFloat64); ++d) {
    auto dtype = static_cast<Dtype>(d);
    EXPECT_EQ(parseDtype(dtypeName(dtype)), dtype);
    EXPECT_EQ(parseDtype(std::string("torch.") + dtypeName(dtype)), dtype);
  }
  EXPECT_EQ(parseDtype("bf16"), Dtype::kBFloat16);
  EXPECT_EQ(parseDtype("float"), Dtype::kFloat32);
  EXPECT_EQ(parseDtype("double"), Dtype::kFloat64);
  EXPECT_EQ(parseDtype("complex64"), std::nullopt);
  EXPECT_STREQ(errcName(Errc::kAlreadyDone), "already-done");
}

// ---- basic paths --------------------------------------------------------------------------------

TEST_F(TableTest, ObjectFromOneRankToOne) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "ab12", 0, 1, kTo2, "string")));
  EXPECT_EQ(table->stats().items, 1u);
  EXPECT_EQ(table->stats().chunks, 1u);
  EXPECT_EQ(table->stats().bytesHeld, 0u);  // objects hold no arena memory
  TestWaiter w;
  recv(2, "ab12", 0, w);
  ASSERT_TRUE(w.done());
  ASSERT_NE(w.object(), nullptr);
  EXPECT_EQ(w.object()->bytes, "string");
  EXPECT_EQ(w.object()->typeTag, 1u);
  // Idempotent until marked done.
  TestWaiter again;
  recv(2, "ab12", 0, again);
  EXPECT_EQ(again.object(), w.object());
  // Past the end.
  TestWaiter end;
  recv(2, "ab12", 1, end);
  EXPECT_TRUE(end.isEnd());
  ASSERT_TRUE(isOk(markDone(2, "ab12", 0)));
  auto s = table->stats();
  EXPECT_EQ(s.items, 0u);
  EXPECT_EQ(s.chunks, 0u);
  EXPECT_EQ(s.chunksCompleted, 1u);
  EXPECT_TRUE(table->dataIds().empty());
}

TEST_F(TableTest, TensorViewUntilMarkDone) {
  TensorChunk t = tensor(Dtype::kBFloat16, {5, 100});
  shm::Allocation a = t.allocation;
  ASSERT_TRUE(isOk(send(0, {0}, "t", 0, 1, kTo2, t)));
  EXPECT_EQ(table->stats().bytesHeld, a.sizeBytes);
  TestWaiter w;
  recv(2, "t", 0, w);
  ASSERT_NE(w.tensor(), nullptr);
  EXPECT_EQ(w.tensor()->dtype, Dtype::kBFloat16);
  EXPECT_EQ(w.tensor()->shape, (std::vector<int64_t>{5, 100}));
  EXPECT_EQ(w.tensor()->sizeBytes, 1000u);
  EXPECT_EQ(w.tensor()->allocation, a);
  EXPECT_TRUE(hooks.isLive(a.offset));
  ASSERT_TRUE(isOk(markDone(2, "t", 0)));
  EXPECT_FALSE(hooks.isLive(a.offset));
  EXPECT_EQ(hooks.releases, 1u);
  EXPECT_EQ(table->stats().bytesHeld, 0u);
}

TEST_F(TableTest, RecvAfterMarkDoneIsAClearError) {
  ASSERT_TRUE(isOk(send(0, {0}, "ab12", 0, 1, kTo2, tensor(Dtype::kFloat32, {4}))));
  ASSERT_TRUE(isOk(markDone(2, "ab12", 0)));
  TestWaiter w;
  recv(2, "ab12", 0, w);
  ASSERT_TRUE(w.done());
  EXPECT_EQ(w.code(), Errc::kAlreadyDone);
  EXPECT_THAT(w.message(), HasSubstr("chunk 0 of id 'ab12' was already marked done by group [2]"));
  auto second = markDone(2, "ab12", 0);
  EXPECT_EQ(codeOf(second), Errc::kAlreadyDone);
  EXPECT_THAT(messageOf(second), HasSubstr("chunk 0 of id 'ab12' was already marked done"));
  // Past the end of the finished id is still end-of-stream.
  TestWaiter end;
  recv(2, "ab12", 1, end);
  EXPECT_TRUE(end.isEnd());
  TestWaiter stranger;
  recv(7, "ab12", 0, stranger);
  EXPECT_EQ(stranger.code(), Errc::kNotReceiver);
}

TEST_F(TableTest, SenderAndReceiverInTheSameExecutor) {
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "self", 0, 1, {{0, 1}}, "x")));
  ASSERT_TRUE(isOk(sendObject(1, {0, 1}, "self", 0, 1, {{0, 1}}, "x")));
  TestWaiter w0, w1;
  recv(0, "self", 0, w0);
  recv(1, "self", 0, w1);
  ASSERT_NE(w0.object(), nullptr);
  EXPECT_EQ(w0.object(), w1.object());
  EXPECT_TRUE(isOk(markDone(1, "self", 0)));
  ASSERT_TRUE(isOk(sendObject(3, {3}, "self2", 0, 1, {{3}}, "y")));
  TestWaiter w3;
  recv(3, "self2", 0, w3);
  EXPECT_NE(w3.object(), nullptr);
}

// ---- groups ---------------------------------------------------------------------------------------

TEST_F(TableTest, SenderGroupReplicasAreKeptOnce) {
  TensorChunk first = tensor(Dtype::kFloat64, {10});
  TensorChunk second = tensor(Dtype::kFloat64, {10});
  ASSERT_TRUE(isOk(send(0, {0, 1}, "g", 0, 1, kTo23, first)));
  ASSERT_TRUE(isOk(send(1, {0, 1}, "g", 0, 1, kTo23, second)));
  EXPECT_FALSE(hooks.isLive(second.allocation.offset));  // dropped at once
  EXPECT_TRUE(hooks.isLive(first.allocation.offset));
  EXPECT_EQ(table->stats().duplicatesDropped, 1u);
  EXPECT_EQ(table->stats().chunks, 1u);
  // The same rank again: an error, and the caller keeps its allocation.
  TensorChunk third = tensor(Dtype::kFloat64, {10});
  auto again = table->send(1, {0, 1}, "g", 0, 1, kTo23, third);
  EXPECT_EQ(codeOf(again), Errc::kAlreadySent);
  EXPECT_THAT(messageOf(again), HasSubstr("rank 1 already sent chunk 0 of id 'g'"));
  EXPECT_TRUE(hooks.isLive(third.allocation.offset));
  hooks.callerFree(third.allocation);

  TestWaiter w2, w3, w3b;
  recv(2, "g", 0, w2);
  recv(3, "g", 0, w3);
  recv(3, "g", 0, w3b);
  ASSERT_NE(w2.tensor(), nullptr);
  EXPECT_EQ(w2.tensor(), w3.tensor());
  EXPECT_EQ(w3.tensor(), w3b.tensor());
  EXPECT_EQ(w2.tensor()->allocation, first.allocation);
  ASSERT_TRUE(isOk(markDone(3, "g", 0)));  // one member marks for the group
  TestWaiter late;
  recv(2, "g", 0, late);
  EXPECT_EQ(late.code(), Errc::kAlreadyDone);
  EXPECT_THAT(late.message(), HasSubstr("already marked done by group [2,3]"));
  EXPECT_EQ(codeOf(markDone(2, "g", 0)), Errc::kAlreadyDone);
  EXPECT_EQ(table->stats().chunksCompleted, 1u);
}

TEST_F(TableTest, EveryDestinationGroupHoldsUntilItIsDone) {
  const std::vector<Group> dests = {{2, 3}, {4}};
  TensorChunk t = tensor(Dtype::kInt32, {8});
  ASSERT_TRUE(isOk(send(0, {0}, "two", 0, 1, dests, t)));
  ASSERT_TRUE(isOk(markDone(4, "two", 0)));
  EXPECT_TRUE(hooks.isLive(t.allocation.offset));
  TestWaiter w4, w2;
  recv(4, "two", 0, w4);
  EXPECT_EQ(w4.code(), Errc::kAlreadyDone);
  recv(2, "two", 0, w2);
  ASSERT_NE(w2.tensor(), nullptr);
  EXPECT_EQ(table->stats().chunksCompleted, 0u);
  ASSERT_TRUE(isOk(markDone(2, "two", 0)));
  EXPECT_FALSE(hooks.isLive(t.allocation.offset));
  EXPECT_EQ(table->stats().chunksCompleted, 1u);
  EXPECT_EQ(table->stats().items, 0u);
}

TEST_F(TableTest, DestinationsInAnotherOrderAreTheSame) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "o", 0, 2, {{2}, {4, 5}}, "a")));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "o", 1, 2, {{4, 5}, {2}}, "b")));
  auto other = sendObject(0, {0}, "o", 1, 2, {{4}, {2}}, "b");
  EXPECT_EQ(codeOf(other), Errc::kInvalidArgument);
  auto group = sendObject(7, {7}, "o", 1, 2, {{2}, {4, 5}}, "b");
  EXPECT_EQ(codeOf(group), Errc::kInvalidArgument);
  EXPECT_THAT(messageOf(group), HasSubstr("is being sent by group [0]"));
}

// ---- waiting --------------------------------------------------------------------------------------

TEST_F(TableTest, RecvBeforeTheSenderExistsQueues) {
  TestWaiter w2, w3, stranger;
  recv(2, "early", 1, w2);
  recv(3, "early", 0, w3);
  recv(9, "early", 0, stranger);
  EXPECT_FALSE(w2.done());
  EXPECT_EQ(table->stats().waiters, 3u);
  EXPECT_EQ(table->stats().items, 1u);  // waited for
  EXPECT_EQ(table->dataIds(), (std::vector<std::string>{"early"}));
  EXPECT_TRUE(w2.queued());
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "early", 0, 2, kTo23, "zero")));
  // The destinations are known: the stranger learns it is not a receiver; rank 3 gets chunk 0.
  EXPECT_EQ(stranger.code(), Errc::kNotReceiver);
  EXPECT_THAT(stranger.message(), HasSubstr("rank 9 is not a receiver of id 'early'"));
  ASSERT_NE(w3.object(), nullptr);
  EXPECT_EQ(w3.object()->bytes, "zero");
  EXPECT_FALSE(w2.done());
  EXPECT_EQ(table->stats().waiters, 1u);
  ASSERT_TRUE(isOk(sendObject(1, {0, 1}, "early", 1, 2, kTo23, "one")));
  ASSERT_NE(w2.object(), nullptr);
  EXPECT_EQ(w2.object()->bytes, "one");
  EXPECT_EQ(w2.calls, 1);
  EXPECT_EQ(w3.calls, 1);
  EXPECT_EQ(table->stats().waiters, 0u);
}

TEST_F(TableTest, NotReceiverOnAnExistingItem) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "x", 0, 1, kTo2, "v")));
  TestWaiter w;
  recv(5, "x", 0, w);
  EXPECT_EQ(w.code(), Errc::kNotReceiver);
  EXPECT_EQ(codeOf(markDone(5, "x", 0)), Errc::kNotReceiver);
}

TEST_F(TableTest, CancelRemovesAQueuedWaiter) {
  TestWaiter w;
  EXPECT_FALSE(table->cancel(w));
  recv(2, "c", 0, w);
  EXPECT_EQ(table->stats().items, 1u);
  EXPECT_TRUE(table->cancel(w));
  EXPECT_FALSE(w.queued());
  EXPECT_FALSE(w.done());
  EXPECT_FALSE(table->cancel(w));
  EXPECT_EQ(table->stats().items, 0u);  // only the waiter kept it
  EXPECT_EQ(table->stats().waiters, 0u);
  table->checkInvariants();
  // Reusable.
  recv(2, "c", 0, w);
  ASSERT_TRUE(isOk(sendObject(0, {0}, "c", 0, 1, kTo2, "v")));
  EXPECT_EQ(w.calls, 1);
  EXPECT_NE(w.object(), nullptr);
}

TEST_F(TableTest, RankGoneCancelsOnlyThatRanksWaiters) {
  TestWaiter a, b, c;
  recv(2, "r", 0, a);
  recv(2, "r", 1, b);
  recv(3, "r", 0, c);
  table->rankRegistered(2);
  table->rankGone(2);
  table->checkInvariants();
  EXPECT_EQ(a.code(), Errc::kCancelled);
  EXPECT_THAT(a.message(), HasSubstr("rank 2 disconnected"));
  EXPECT_EQ(b.code(), Errc::kCancelled);
  EXPECT_FALSE(c.done());
  EXPECT_EQ(table->stats().waiters, 1u);
  table->rankGone(3);
  EXPECT_EQ(c.code(), Errc::kCancelled);
  EXPECT_EQ(table->stats().items, 0u);
  EXPECT_TRUE(table->dataIds().empty());
}

TEST_F(TableTest, FailWaitersFailsOnlyThatIdsQueuedRecvsAndKeepsItsChunks) {
  TestWaiter first, second, other;
  ASSERT_TRUE(isOk(send(0, {0}, "s", 0, 0, kTo2, tensor(Dtype::kUint8, {100}))));  // a stream
  recv(2, "s", 1, first);
  recv(2, "s", 2, second);
  recv(2, "t", 0, other);
  table->failWaiters("s", "node 'b' was lost");
  table->checkInvariants();
  EXPECT_EQ(first.code(), Errc::kPeerLost);
  EXPECT_THAT(first.message(), HasSubstr("chunk 1"));
  EXPECT_THAT(first.message(), HasSubstr("node 'b' was lost"));
  EXPECT_EQ(second.code(), Errc::kPeerLost);
  EXPECT_FALSE(other.done());
  // The chunk that arrived stays readable; a new recv of a missing chunk queues again.
  TestWaiter again, late;
  recv(2, "s", 0, again);
  EXPECT_NE(again.tensor(), nullptr);
  recv(2, "s", 1, late);
  EXPECT_FALSE(late.done());
  table->failWaiters("unknown", "nothing");  // no-op
  ASSERT_TRUE(isOk(markDone(2, "s", 0)));
  table->rankGone(2);
  table->rankGone(3);
}

TEST_F(TableTest, DestructionCancelsWaitersAndReleasesEverything) {
  TestWaiter w;
  recv(2, "d", 1, w);
  ASSERT_TRUE(isOk(send(0, {0}, "d", 0, 2, kTo2, tensor(Dtype::kUint8, {100}))));
  ASSERT_TRUE(isOk(send(0, {0}, "e", 0, 1, kTo2, tensor(Dtype::kUint8, {100}))));
  table.reset();
  EXPECT_EQ(w.code(), Errc::kCancelled);
  EXPECT_THAT(w.message(), HasSubstr("shutting down"));
  EXPECT_TRUE(hooks.live.empty());
}

// ---- markDone ---------------------------------------------------------------------------------------

TEST_F(TableTest, MarkDoneErrors) {
  EXPECT_EQ(codeOf(markDone(2, "nothing", 0)), Errc::kNotAvailable);
  ASSERT_TRUE(isOk(sendObject(0, {0}, "m", 1, 3, kTo2, "one")));
  auto missing = markDone(2, "m", 0);
  EXPECT_EQ(codeOf(missing), Errc::kNotAvailable);
  EXPECT_THAT(messageOf(missing), HasSubstr("chunk 0 of id 'm' has not arrived"));
  EXPECT_EQ(codeOf(markDone(2, "m", 3)), Errc::kChunkOutOfRange);
  EXPECT_EQ(codeOf(markDone(4, "m", 1)), Errc::kNotReceiver);
  EXPECT_EQ(codeOf(markDone(-1, "m", 1)), Errc::kInvalidArgument);
  EXPECT_EQ(codeOf(markDone(2, "", 1)), Errc::kInvalidArgument);
  EXPECT_TRUE(isOk(markDone(2, "m", 1)));
  EXPECT_EQ(codeOf(markDone(2, "m", 1)), Errc::kAlreadyDone);
}

TEST_F(TableTest, MarkDoneInAnyOrder) {
  std::vector<shm::Allocation> allocations;
  for (uint32_t i = 0; i < 4; ++i) {
    TensorChunk t = tensor(Dtype::kBFloat16, {3, 7});
    allocations.push_back(t.allocation);
    ASSERT_TRUE(isOk(send(0, {0}, "any", i, 4, kTo2, t)));
  }
  for (uint32_t i : {2u, 0u, 3u}) {
    ASSERT_TRUE(isOk(markDone(2, "any", i)));
    EXPECT_FALSE(hooks.isLive(allocations[i].offset));
    EXPECT_EQ(table->stats().items, 1u);
  }
  TestWaiter w;
  recv(2, "any", 1, w);
  ASSERT_NE(w.tensor(), nullptr);
  TestWaiter gone;
  recv(2, "any", 2, gone);
  EXPECT_EQ(gone.code(), Errc::kAlreadyDone);
  ASSERT_TRUE(isOk(markDone(2, "any", 1)));
  EXPECT_EQ(table->stats().items, 0u);
  EXPECT_EQ(table->stats().chunksCompleted, 4u);
  EXPECT_EQ(hooks.releases, 4u);
}

// ---- chunk counts and streams ---------------------------------------------------------------------

TEST_F(TableTest, NumChunksRules) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "n", 0, 3, kTo2, "a")));
  auto mismatch = sendObject(0, {0}, "n", 1, 4, kTo2, "b");
  EXPECT_EQ(codeOf(mismatch), Errc::kNumChunksMismatch);
  EXPECT_THAT(messageOf(mismatch), HasSubstr("has 3 chunks"));
  EXPECT_EQ(codeOf(sendObject(0, {0}, "n", 3, 3, kTo2, "c")), Errc::kChunkOutOfRange);
  EXPECT_EQ(codeOf(sendObject(0, {0}, "n", 3, 0, kTo2, "c")), Errc::kChunkOutOfRange);
  EXPECT_TRUE(isOk(sendObject(0, {0}, "n", 2, 0, kTo2, "c")));  // 0 = "don't know" is fine
  EXPECT_EQ(codeOf(table->closeStream(0, "n", 4, kTo2)), Errc::kNumChunksMismatch);
  EXPECT_TRUE(isOk(table->closeStream(0, "n", 3, kTo2)));
  // A send's own numChunks bounds its chunk id.
  EXPECT_EQ(codeOf(sendObject(0, {0}, "fresh", 5, 5, kTo2, "x")), Errc::kChunkOutOfRange);
  EXPECT_TRUE(table->describe("fresh") == std::nullopt);
}

TEST_F(TableTest, StreamClosedAfterItsChunks) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "s", 0, 0, kTo2, "a")));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "s", 1, 0, kTo2, "b")));
  TestWaiter w2, w5, w9;
  recv(2, "s", 2, w2);
  recv(2, "s", 5, w5);
  recv(2, "s", 9, w9);
  EXPECT_FALSE(w5.done());  // the count is unknown: they might still come
  ASSERT_TRUE(isOk(sendObject(0, {0}, "s", 5, 0, kTo2, "f")));
  ASSERT_NE(w5.object(), nullptr);
  EXPECT_EQ(w5.object()->bytes, "f");
  EXPECT_EQ(codeOf(table->closeStream(0, "s", 5, kTo2)), Errc::kNumChunksMismatch);  // chunk 5 exists
  ASSERT_TRUE(isOk(table->closeStream(0, "s", 6, kTo2)));
  table->checkInvariants();
  EXPECT_TRUE(w9.isEnd());
  EXPECT_FALSE(w2.done());
  TestWaiter end;
  recv(2, "s", 6, end);
  EXPECT_TRUE(end.isEnd());
  EXPECT_TRUE(isOk(table->closeStream(0, "s", 6, kTo2)));  // repeat: fine
  EXPECT_EQ(codeOf(table->closeStream(0, "s", 6, {{3}})), Errc::kInvalidArgument);
  EXPECT_EQ(codeOf(table->closeStream(8, "s", 6, kTo2)), Errc::kInvalidArgument);
  table->cancel(w2);
}

TEST_F(TableTest, StreamFixedByALaterSendWithACount) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "s", 1, 0, kTo2, "b")));
  TestWaiter past;
  recv(2, "s", 3, past);
  EXPECT_EQ(codeOf(sendObject(0, {0}, "s", 0, 1, kTo2, "a")), Errc::kNumChunksMismatch);  // 1 exists
  ASSERT_TRUE(isOk(sendObject(0, {0}, "s", 0, 2, kTo2, "a")));
  EXPECT_TRUE(past.isEnd());
  ASSERT_TRUE(isOk(markDone(2, "s", 0)));
  ASSERT_TRUE(isOk(markDone(2, "s", 1)));
  EXPECT_EQ(table->stats().items, 0u);
}

TEST_F(TableTest, CloseStreamBeforeAnyChunk) {
  TestWaiter before;
  recv(3, "cs", 0, before);
  ASSERT_TRUE(isOk(table->closeStream(0, "cs", 2, kTo23)));
  table->checkInvariants();
  EXPECT_FALSE(before.done());
  TestWaiter end;
  recv(2, "cs", 2, end);
  EXPECT_TRUE(end.isEnd());
  EXPECT_EQ(codeOf(sendObject(0, {0}, "cs", 2, 0, kTo23, "x")), Errc::kChunkOutOfRange);
  EXPECT_EQ(codeOf(sendObject(0, {0}, "cs", 0, 3, kTo23, "x")), Errc::kNumChunksMismatch);
  ASSERT_TRUE(isOk(sendObject(0, {0}, "cs", 0, 0, kTo23, "x")));
  ASSERT_NE(before.object(), nullptr);
  ASSERT_TRUE(isOk(sendObject(0, {0}, "cs", 1, 2, kTo23, "y")));
  ASSERT_TRUE(isOk(markDone(3, "cs", 1)));
  ASSERT_TRUE(isOk(markDone(2, "cs", 0)));
  EXPECT_EQ(table->stats().items, 0u);
  EXPECT_EQ(table->stats().chunksCompleted, 2u);
}

TEST_F(TableTest, EmptyStream) {
  TestWaiter w;
  recv(2, "empty", 0, w);
  ASSERT_TRUE(isOk(table->closeStream(0, "empty", 0, kTo2)));
  table->checkInvariants();
  EXPECT_TRUE(w.isEnd());
  EXPECT_EQ(table->stats().items, 0u);  // nothing to hold: done at once
  TestWaiter again;
  recv(2, "empty", 0, again);
  EXPECT_TRUE(again.isEnd());
}

// The "mixed streaming" scenario: tensors 1..9 as a stream, then object chunk 0, then closeStream.
void mixedStreaming(TableTest& t, FakeHooks& hooks, TransferTable& table, const Group& senders,
                    const std::vector<Group>& dests, bool everySenderCloses,
                    std::function<TensorChunk()> make) {
  const std::string id = "mixed";
  std::vector<Rank> receivers;
  for (const Group& g : dests) receivers.insert(receivers.end(), g.begin(), g.end());
  std::vector<TestWaiter> early(receivers.size());
  for (size_t r = 0; r < receivers.size(); ++r) table.recv(receivers[r], id, 4, early[r]);
  std::vector<shm::Allocation> kept(10);
  for (uint32_t c = 1; c < 10; ++c) {
    for (Rank s : senders) {
      TensorChunk tensor = make();
      if (s == senders.front()) kept[c] = tensor.allocation;
      ASSERT_TRUE(isOk(table.send(s, senders, id, c, 0, dests, tensor)));
    }
  }
  for (Rank s : senders) {
    ASSERT_TRUE(isOk(table.send(s, senders, id, 0, 0, dests,
                                object("{\"first_token\": 11908, \"num_prefill_tokens\": 100}", 7))));
  }
  for (Rank s : senders) {
    ASSERT_TRUE(isOk(table.closeStream(s, id, 10, dests)));
    if (!everySenderCloses) break;
  }
  table.checkInvariants();
  auto s = table.stats();
  EXPECT_EQ(s.chunks, 10u);
  EXPECT_EQ(s.duplicatesDropped, 10u * (senders.size() - 1));
  for (size_t r = 0; r < receivers.size(); ++r) {
    ASSERT_NE(early[r].tensor(), nullptr);
    EXPECT_EQ(early[r].tensor()->allocation, kept[4]);
    TestWaiter zero;
    table.recv(receivers[r], id, 0, zero);
    ASSERT_NE(zero.object(), nullptr);
    EXPECT_EQ(zero.object()->typeTag, 7u);
    for (uint32_t c = 1; c < 10; ++c) {
      TestWaiter w;
      table.recv(receivers[r], id, c, w);
      ASSERT_NE(w.tensor(), nullptr);
      EXPECT_EQ(w.tensor()->allocation, kept[c]);
    }
    TestWaiter end;
    table.recv(receivers[r], id, 10, end);
    EXPECT_TRUE(end.isEnd());
  }
  // One receiver per group marks every chunk done, in reverse order.
  for (const Group& g : dests) {
    for (uint32_t c = 10; c-- > 0;) ASSERT_TRUE(isOk(table.markDone(g.back(), id, c)));
  }
  table.checkInvariants();
  s = table.stats();
  EXPECT_EQ(s.items, 0u);
  EXPECT_EQ(s.chunks, 0u);
  EXPECT_EQ(s.bytesHeld, 0u);
  EXPECT_EQ(s.chunksCompleted, 10u);
  EXPECT_TRUE(hooks.live.empty());
  (void)t;
}

TEST_F(TableTest, MixedStreamingOneToOne) {
  mixedStreaming(*this, hooks, *table, {0}, kTo2, false,
                 [&] { return tensor(Dtype::kBFloat16, {3, 3584}); });
}

TEST_F(TableTest, MixedStreamingGroupToGroupEverySenderCloses) {
  mixedStreaming(*this, hooks, *table, {0, 1}, kTo23, true,
                 [&] { return tensor(Dtype::kBFloat16, {5, 3584}); });
  EXPECT_TRUE(table->dataIds().empty());
}

TEST_F(TableTest, MixedStreamingGroupToGroupOneSenderCloses) {
  mixedStreaming(*this, hooks, *table, {0, 1}, kTo23, false,
                 [&] { return tensor(Dtype::kBFloat16, {1, 3584}); });
}

// ---- the tensor scenario shapes -------------------------------------------------------------------

struct Shape {
  const char* name;
  Group senders;
  std::vector<Group> dests;
  uint32_t chunks;
  std::vector<int64_t> row;
  Dtype dtype;
  int count;
};

class ScenarioTest : public TableTest, public ::testing::WithParamInterface<Shape> {};

TEST_P(ScenarioTest, EveryReceiverGetsEveryChunkThenMarksDone) {
  const Shape& p = GetParam();
  uint64_t expectBytes = 0;
  for (int i = 0; i < p.count; ++i) {
    std::string id = std::string(p.name) + "-" + std::to_string(i);
    std::vector<Rank> receivers;
    for (const Group& g : p.dests) receivers.insert(receivers.end(), g.begin(), g.end());
    std::vector<std::vector<shm::Allocation>> want(p.chunks);
    for (uint32_t c = 0; c < p.chunks; ++c) {
      for (Rank s : p.senders) {
        std::vector<int64_t> shape = {static_cast<int64_t>(1 + (i + c) % 7)};
        shape.insert(shape.end(), p.row.begin(), p.row.end());
        TensorChunk t = tensor(p.dtype, shape);
        if (s == p.senders.front()) {
          want[c].push_back(t.allocation);
          expectBytes += t.allocation.sizeBytes;
        }
        ASSERT_TRUE(isOk(send(s, p.senders, id, c, p.chunks, p.dests, t)));
      }
    }
    EXPECT_EQ(table->stats().bytesHeld, expectBytes);
    for (Rank r : receivers) {
      for (uint32_t c = 0; c <= p.chunks + 1; ++c) {
        TestWaiter w;
        recv(r, id, c, w);
        if (c >= p.chunks) {
          EXPECT_TRUE(w.isEnd());
        } else {
          ASSERT_NE(w.tensor(), nullptr);
          EXPECT_EQ(w.tensor()->allocation, want[c][0]);
          EXPECT_EQ(w.tensor()->dtype, p.dtype);
        }
      }
    }
    for (const Group& g : p.dests) {
      for (uint32_t c = 0; c < p.chunks; ++c) ASSERT_TRUE(isOk(markDone(g.front(), id, c)));
    }
    expectBytes = 0;
    EXPECT_EQ(table->stats().bytesHeld, 0u);
  }
  auto s = table->stats();
  EXPECT_EQ(s.items, 0u);
  EXPECT_EQ(s.chunksCompleted, static_cast<uint64_t>(p.count) * p.chunks);
  EXPECT_EQ(s.duplicatesDropped, static_cast<uint64_t>(p.count) * p.chunks * (p.senders.size() - 1));
  EXPECT_TRUE(hooks.live.empty());
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, ScenarioTest,
    ::testing::Values(Shape{"single_corner", {0}, {{2}}, 1, {100}, Dtype::kBFloat16, 4},
                      Shape{"single_small", {0}, {{2}}, 1, {100}, Dtype::kFloat64, 5},
                      Shape{"single_medium", {0, 1}, {{2}}, 2, {1176}, Dtype::kBFloat16, 6},
                      Shape{"single_large", {0, 1}, {{2, 3}}, 4, {29, 4096}, Dtype::kBFloat16, 7},
                      Shape{"concurrent_small", {0}, {{2}}, 4, {13, 4096}, Dtype::kBFloat16, 8},
                      Shape{"concurrent_large", {0, 1}, {{2, 3}}, 1, {100}, Dtype::kFloat64, 10},
                      Shape{"dtype_int64", {0, 1}, {{2, 3}}, 1, {10, 10}, Dtype::kInt64, 2},
                      Shape{"bool_to_two_groups", {0}, {{2, 3}, {4}}, 3, {5}, Dtype::kBool, 3}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(TableTest, ObjectsScenario) {
  const std::vector<std::pair<Group, std::vector<Group>>> setups = {{{0}, {{2}}}, {{0, 1}, {{2, 3}}}};
  int n = 0;
  for (const auto& [senders, dests] : setups) {
    for (std::string v : {"another string", "different bytes", "100", "1.6666", "True"}) {
      std::string id = "obj" + std::to_string(n++);
      for (Rank s : senders) ASSERT_TRUE(isOk(sendObject(s, senders, id, 0, 1, dests, v)));
      for (Rank r : dests[0]) {
        TestWaiter w;
        recv(r, id, 0, w);
        ASSERT_NE(w.object(), nullptr);
        EXPECT_EQ(w.object()->bytes, v);
      }
      ASSERT_TRUE(isOk(markDone(dests[0].back(), id, 0)));
    }
  }
  EXPECT_EQ(table->stats().items, 0u);
  EXPECT_EQ(table->stats().chunksCompleted, 10u);
}

// ---- re-sending, tombstones and late replicas -----------------------------------------------------

TEST_F(TableTest, ResendingAnIdAfterItIsDone) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "again", 0, 1, kTo2, "first")));
  ASSERT_TRUE(isOk(markDone(2, "again", 0)));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "again", 0, 1, kTo2, "second")));
  EXPECT_EQ(table->stats().items, 1u);
  TestWaiter w;
  recv(2, "again", 0, w);
  ASSERT_NE(w.object(), nullptr);
  EXPECT_EQ(w.object()->bytes, "second");
  ASSERT_TRUE(isOk(markDone(2, "again", 0)));
  // Tensors too, to other destinations, from another group.
  TensorChunk t = tensor(Dtype::kFloat32, {2});
  ASSERT_TRUE(isOk(send(5, {4, 5}, "again", 0, 1, {{6}}, t)));
  TestWaiter w6;
  recv(6, "again", 0, w6);
  ASSERT_NE(w6.tensor(), nullptr);
  EXPECT_EQ(w6.tensor()->allocation, t.allocation);
}

TEST_F(TableTest, LateReplicaAfterTheItemIsDoneIsDropped) {
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "late", 0, 1, kTo2, "v")));
  ASSERT_TRUE(isOk(markDone(2, "late", 0)));
  EXPECT_TRUE(table->dataIds().empty());
  TensorChunk t = tensor(Dtype::kUint8, {3});
  // Payload kinds may differ between replicas; it is dropped all the same.
  ASSERT_TRUE(isOk(send(1, {0, 1}, "late", 0, 1, kTo2, t)));
  EXPECT_FALSE(hooks.isLive(t.allocation.offset));
  EXPECT_TRUE(table->dataIds().empty());
  EXPECT_EQ(table->stats().duplicatesDropped, 1u);
  // Rank 0 already delivered chunk 0: its send starts a new item.
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "late", 0, 1, kTo2, "new")));
  EXPECT_EQ(table->dataIds(), (std::vector<std::string>{"late"}));
  ASSERT_TRUE(isOk(sendObject(1, {0, 1}, "late", 0, 1, kTo2, "new")));  // its replica
  EXPECT_EQ(table->stats().duplicatesDropped, 2u);
  TestWaiter w;
  recv(2, "late", 0, w);
  EXPECT_EQ(w.object()->bytes, "new");
}

TEST_F(TableTest, LaggingMemberAcrossGenerations) {
  // Rank 0 delivers both chunks of generation 1; the receiver finishes; rank 0 starts generation 2
  // before rank 1's generation-1 replicas arrive. They must not leak into generation 2.
  const Group g = {0, 1};
  ASSERT_TRUE(isOk(sendObject(0, g, "gen", 0, 2, kTo2, "g1c0")));
  ASSERT_TRUE(isOk(sendObject(0, g, "gen", 1, 2, kTo2, "g1c1")));
  ASSERT_TRUE(isOk(markDone(2, "gen", 0)));
  ASSERT_TRUE(isOk(markDone(2, "gen", 1)));
  ASSERT_TRUE(isOk(sendObject(0, g, "gen", 0, 2, kTo2, "g2c0")));
  ASSERT_TRUE(isOk(sendObject(1, g, "gen", 0, 2, kTo2, "g1c0")));  // late, generation 1
  ASSERT_TRUE(isOk(sendObject(1, g, "gen", 1, 2, kTo2, "g1c1")));  // late, generation 1
  EXPECT_EQ(table->stats().chunks, 1u);
  ASSERT_TRUE(isOk(sendObject(1, g, "gen", 0, 2, kTo2, "g2c0")));  // generation 2 replica
  ASSERT_TRUE(isOk(sendObject(1, g, "gen", 1, 2, kTo2, "g2c1")));  // first of chunk 1
  ASSERT_TRUE(isOk(sendObject(0, g, "gen", 1, 2, kTo2, "g2c1")));
  EXPECT_EQ(table->stats().duplicatesDropped, 4u);
  for (uint32_t c = 0; c < 2; ++c) {
    TestWaiter w;
    recv(2, "gen", c, w);
    ASSERT_NE(w.object(), nullptr);
    EXPECT_EQ(w.object()->bytes, "g2c" + std::to_string(c));
  }
  EXPECT_EQ(codeOf(sendObject(1, g, "gen", 1, 2, kTo2, "x")), Errc::kAlreadySent);
}

TEST_F(TableTest, LateCloseStreamIsDropped) {
  const Group g = {0, 1};
  for (Rank s : g) ASSERT_TRUE(isOk(sendObject(s, g, "lc", 0, 0, kTo2, "a")));
  ASSERT_TRUE(isOk(table->closeStream(0, "lc", 1, kTo2)));
  ASSERT_TRUE(isOk(markDone(2, "lc", 0)));
  EXPECT_TRUE(table->dataIds().empty());
  ASSERT_TRUE(isOk(table->closeStream(1, "lc", 1, kTo2)));  // rank 1's close of the same stream
  EXPECT_TRUE(table->dataIds().empty());
  ASSERT_TRUE(isOk(table->closeStream(0, "lc", 1, kTo2)));  // rank 0 again: a new stream
  EXPECT_EQ(table->dataIds(), (std::vector<std::string>{"lc"}));
}

TEST_F(TableTest, AlreadySentWhileOtherChunksAreLive) {
  ASSERT_TRUE(isOk(sendObject(0, {0}, "as", 0, 2, kTo2, "a")));
  ASSERT_TRUE(isOk(markDone(2, "as", 0)));
  auto again = sendObject(0, {0}, "as", 0, 2, kTo2, "a");
  EXPECT_EQ(codeOf(again), Errc::kAlreadySent);
  EXPECT_THAT(messageOf(again), HasSubstr("still in flight"));
  // Another member's replica of the consumed chunk is still just dropped.
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "as2", 0, 2, kTo2, "a")));
  ASSERT_TRUE(isOk(markDone(2, "as2", 0)));
  ASSERT_TRUE(isOk(sendObject(1, {0, 1}, "as2", 0, 2, kTo2, "a")));
  EXPECT_EQ(table->stats().duplicatesDropped, 1u);
}

TEST_F(TableTest, TombstonesAreForgottenAfterTheirTime) {
  makeTable(TransferLimits{.tombstoneMs = 1000});
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "tomb", 0, 1, kTo2, "v")));
  ASSERT_TRUE(isOk(markDone(2, "tomb", 0)));
  hooks.now += 999;
  table->expire();
  ASSERT_TRUE(table->describe("tomb").has_value());
  EXPECT_THAT(*table->describe("tomb"), HasSubstr("tombstone"));
  hooks.now += 1;
  table->expire();
  table->checkInvariants();
  EXPECT_FALSE(table->describe("tomb").has_value());
  // After that a replica is news: it starts an item.
  ASSERT_TRUE(isOk(sendObject(1, {0, 1}, "tomb", 0, 1, kTo2, "v")));
  EXPECT_EQ(table->stats().items, 1u);
  // And a recv for a forgotten id waits again.
  TestWaiter w;
  recv(2, "other", 0, w);
  EXPECT_FALSE(w.done());
  table->cancel(w);
}

// Tombstones end oldest first, each tombstoneMs after it began; one revived meanwhile (the id sent
// again) is live and stays, and ends only tombstoneMs after its new generation finished.
TEST_F(TableTest, TombstonesEndInTheirOrderAndRevivedOnesStay) {
  makeTable(TransferLimits{.tombstoneMs = 1000});
  const uint64_t t0 = hooks.now;
  for (const char* id : {"t1", "t2", "t3"}) {
    ASSERT_TRUE(isOk(sendObject(0, {0}, id, 0, 1, kTo2, "v")));
    ASSERT_TRUE(isOk(markDone(2, id, 0)));
    hooks.now += 100;  // t1 ends at 1000, t2 at 1100, t3 at 1200
  }
  // t2 comes again (live), finishes at 400: its new tombstone ends at 1400.
  ASSERT_TRUE(isOk(sendObject(0, {0}, "t2", 0, 1, kTo2, "again")));
  hooks.now += 100;
  ASSERT_TRUE(isOk(markDone(2, "t2", 0)));
  auto known = [&](const char* id) { return table->describe(id).has_value(); };
  hooks.now = t0 + 1050;
  table->expire();
  table->checkInvariants();
  EXPECT_FALSE(known("t1"));
  EXPECT_TRUE(known("t2"));
  EXPECT_TRUE(known("t3"));
  hooks.now = t0 + 1250;
  table->expire();
  table->checkInvariants();
  EXPECT_TRUE(known("t2")) << "its first tombstone's end must not forget the second";
  EXPECT_FALSE(known("t3"));
  hooks.now = t0 + 1400;
  table->expire();
  table->checkInvariants();
  EXPECT_FALSE(known("t2"));
  EXPECT_EQ(table->stats().items, 0u);
}

// ---- time-to-live ---------------------------------------------------------------------------------

TEST_F(TableTest, HoldsOfUnregisteredGroupsExpire) {
  makeTable(TransferLimits{.ttlMs = 5000});
  table->rankRegistered(2);
  const std::vector<Group> dests = {{2}, {5, 6}};
  TensorChunk t = tensor(Dtype::kFloat16, {16});
  ASSERT_TRUE(isOk(send(0, {0}, "ttl", 0, 1, dests, t)));
  hooks.now += 4999;
  table->expire();
  EXPECT_EQ(table->stats().expiredHolds, 0u);
  hooks.now += 1;
  table->expire();
  table->checkInvariants();
  EXPECT_EQ(table->stats().expiredHolds, 1u);  // group [5,6]; [2] is registered: never expires
  EXPECT_TRUE(hooks.isLive(t.allocation.offset));
  TestWaiter w5;
  recv(5, "ttl", 0, w5);
  EXPECT_EQ(w5.code(), Errc::kExpired);
  EXPECT_THAT(w5.message(), HasSubstr("group [5,6]"));
  EXPECT_EQ(codeOf(markDone(6, "ttl", 0)), Errc::kExpired);
  hooks.now += 1'000'000;
  table->expire();
  TestWaiter w2;
  recv(2, "ttl", 0, w2);
  ASSERT_NE(w2.tensor(), nullptr);
  ASSERT_TRUE(isOk(markDone(2, "ttl", 0)));
  EXPECT_FALSE(hooks.isLive(t.allocation.offset));
  EXPECT_EQ(table->stats().chunksCompleted, 0u);  // not every group marked it done
  EXPECT_EQ(table->stats().items, 0u);
}

TEST_F(TableTest, ExpiryReleasesWhenNoHoldRemains) {
  makeTable(TransferLimits{.ttlMs = 100});
  table->rankRegistered(9);
  table->rankRegistered(7);
  table->rankGone(7);  // gone again: its group's hold can expire
  TensorChunk a = tensor(Dtype::kInt16, {4});
  TensorChunk b = tensor(Dtype::kInt16, {4});
  ASSERT_TRUE(isOk(send(0, {0}, "e", 0, 2, {{7}}, a)));
  hooks.now += 50;
  ASSERT_TRUE(isOk(send(0, {0}, "e", 1, 2, {{7}}, b)));
  hooks.now += 50;
  table->expire();
  EXPECT_FALSE(hooks.isLive(a.allocation.offset));
  EXPECT_TRUE(hooks.isLive(b.allocation.offset));
  EXPECT_EQ(table->stats().items, 1u);
  hooks.now += 50;
  table->expire();
  table->checkInvariants();
  EXPECT_FALSE(hooks.isLive(b.allocation.offset));
  EXPECT_EQ(table->stats().expiredHolds, 2u);
  EXPECT_EQ(table->stats().items, 0u);
  EXPECT_EQ(table->stats().bytesHeld, 0u);
}

TEST_F(TableTest, AbandonedStreamIsForgotten) {
  makeTable(TransferLimits{.ttlMs = 100});
  ASSERT_TRUE(isOk(sendObject(0, {0}, "open", 0, 0, kTo2, "a")));
  ASSERT_TRUE(isOk(markDone(2, "open", 0)));
  EXPECT_EQ(table->stats().items, 1u);  // never closed: might go on
  hooks.now += 100;
  table->expire();
  EXPECT_EQ(table->stats().items, 0u);
}

// ---- validation -----------------------------------------------------------------------------------

struct BadSend {
  const char* name;
  Rank sender;
  Group group;
  std::string id;
  uint32_t chunk;
  uint32_t numChunks;
  std::vector<Group> dests;
  int payload;  // 0 good tensor, 1 bad dtype, 2 negative dim, 3 size mismatch, 4 small allocation, 5 big object
  Errc code;
  const char* says;
};

TEST_F(TableTest, BadSendsChangeNothing) {
  makeTable(TransferLimits{.objectBytesMax = 16, .worldSize = 2000});
  ASSERT_TRUE(isOk(sendObject(0, {0}, "keep", 0, 2, kTo2, "x")));
  TestWaiter waiting;
  recv(2, "keep", 1, waiting);
  const std::vector<BadSend> cases = {
      {"negative sender", -1, {-1}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "negative"},
      {"sender outside world", 2000, {2000}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "outside the world"},
      {"negative in group", 0, {-3, 0}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "negative"},
      {"empty group", 0, {}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "empty"},
      {"unsorted group", 0, {1, 0}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "not sorted"},
      {"duplicate in group", 0, {0, 0}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "twice"},
      {"sender not in group", 0, {1, 2}, "id", 0, 1, kTo2, 0, Errc::kInvalidArgument, "not a member"},
      {"empty id", 0, {0}, "", 0, 1, kTo2, 0, Errc::kInvalidArgument, "data id is empty"},
      {"no destinations", 0, {0}, "id", 0, 1, {}, 0, Errc::kInvalidArgument, "no destinations"},
      {"empty destination", 0, {0}, "id", 0, 1, {{}}, 0, Errc::kInvalidArgument, "empty"},
      {"unsorted destination", 0, {0}, "id", 0, 1, {{3, 2}}, 0, Errc::kInvalidArgument, "not sorted"},
      {"negative destination", 0, {0}, "id", 0, 1, {{-2}}, 0, Errc::kInvalidArgument, "negative"},
      {"destination outside world", 0, {0}, "id", 0, 1, {{5000}}, 0, Errc::kInvalidArgument, "outside"},
      {"rank in two groups", 0, {0}, "id", 0, 1, {{2, 3}, {3}}, 0, Errc::kInvalidArgument, "two destination groups"},
      {"same group twice", 0, {0}, "id", 0, 1, {{2}, {2}}, 0, Errc::kInvalidArgument, "two destination groups"},
      {"chunk past its count", 0, {0}, "id", 4, 4, kTo2, 0, Errc::kChunkOutOfRange, "out of range"},
      {"bad dtype", 0, {0}, "id", 0, 1, kTo2, 1, Errc::kInvalidArgument, "unknown dtype"},
      {"negative dim", 0, {0}, "id", 0, 1, kTo2, 2, Errc::kInvalidArgument, "negative dimension"},
      {"size mismatch", 0, {0}, "id", 0, 1, kTo2, 3, Errc::kInvalidArgument, "bytes, but shape"},
      {"small allocation", 0, {0}, "id", 0, 1, kTo2, 4, Errc::kInvalidArgument, "holds only"},
      {"big object", 0, {0}, "id", 0, 1, kTo2, 5, Errc::kTooLarge, "limit"},
      // Against the live item "keep".
      {"other sender group", 1, {1}, "keep", 1, 2, kTo2, 0, Errc::kInvalidArgument, "being sent by group [0]"},
      {"other destinations", 0, {0}, "keep", 1, 2, {{3}}, 0, Errc::kInvalidArgument, "same destinations"},
      {"count changes", 0, {0}, "keep", 1, 3, kTo2, 0, Errc::kNumChunksMismatch, "has 2 chunks"},
      {"chunk past the item's count", 0, {0}, "keep", 2, 0, kTo2, 0, Errc::kChunkOutOfRange, "out of range"},
      {"same rank again", 0, {0}, "keep", 0, 2, kTo2, 5, Errc::kTooLarge, "limit"},
      {"same rank again, small", 0, {0}, "keep", 0, 2, kTo2, 6, Errc::kAlreadySent, "already sent"},
  };
  for (const BadSend& c : cases) {
    SCOPED_TRACE(c.name);
    auto before = table->stats();
    auto ids = table->dataIds();
    Payload payload;
    if (c.payload >= 5) {
      payload = object(c.payload == 5 ? std::string(17, 'x') : "ok");
    } else {
      TensorChunk t = tensor(Dtype::kFloat32, {2, 3});
      if (c.payload == 1) t.dtype = static_cast<Dtype>(99);
      if (c.payload == 2) t.shape = {2, -3};
      if (c.payload == 3) t.sizeBytes = 20;
      if (c.payload == 4) t.allocation.sizeBytes = 8;
      payload = t;
    }
    std::optional<shm::Allocation> a;
    if (auto* t = std::get_if<TensorChunk>(&payload)) a = t->allocation;
    auto result = table->send(c.sender, c.group, c.id, c.chunk, c.numChunks, c.dests, payload);
    ASSERT_EQ(codeOf(result), c.code) << messageOf(result);
    EXPECT_THAT(messageOf(result), HasSubstr(c.says));
    if (a) {
      EXPECT_EQ(hooks.live.count(a->offset), 1u) << "the caller keeps a refused allocation";
      hooks.live.erase(a->offset);
    }
    table->checkInvariants();
    auto after = table->stats();
    EXPECT_EQ(after.items, before.items);
    EXPECT_EQ(after.chunks, before.chunks);
    EXPECT_EQ(after.bytesHeld, before.bytesHeld);
    EXPECT_EQ(after.waiters, before.waiters);
    EXPECT_EQ(after.duplicatesDropped, before.duplicatesDropped);
    EXPECT_EQ(table->dataIds(), ids);
    EXPECT_FALSE(waiting.done());
  }
  // Bad closeStream and recv arguments.
  EXPECT_EQ(codeOf(table->closeStream(-1, "keep", 2, kTo2)), Errc::kInvalidArgument);
  EXPECT_EQ(codeOf(table->closeStream(0, "", 2, kTo2)), Errc::kInvalidArgument);
  EXPECT_EQ(codeOf(table->closeStream(0, "keep", 2, {})), Errc::kInvalidArgument);
  TestWaiter bad;
  recv(-4, "keep", 0, bad);
  EXPECT_EQ(bad.code(), Errc::kInvalidArgument);
  bad.reset();
  recv(2, "", 0, bad);
  EXPECT_EQ(bad.code(), Errc::kInvalidArgument);
  bad.reset();
  recv(2001, "keep", 0, bad);
  EXPECT_EQ(bad.code(), Errc::kInvalidArgument);
  EXPECT_EQ(table->stats().items, 1u);
  EXPECT_TRUE(table->cancel(waiting));
}

TEST_F(TableTest, ZeroSizedAndScalarTensors) {
  TensorChunk empty = tensor(Dtype::kFloat32, {0, 4096});
  EXPECT_EQ(empty.sizeBytes, 0u);
  TensorChunk scalar = tensor(Dtype::kInt64, {});
  EXPECT_EQ(scalar.sizeBytes, 8u);
  ASSERT_TRUE(isOk(send(0, {0}, "z", 0, 2, kTo2, empty)));
  ASSERT_TRUE(isOk(send(0, {0}, "z", 1, 2, kTo2, scalar)));
  TestWaiter w;
  recv(2, "z", 1, w);
  ASSERT_NE(w.tensor(), nullptr);
  EXPECT_TRUE(w.tensor()->shape.empty());
  ASSERT_TRUE(isOk(markDone(2, "z", 0)));
  EXPECT_FALSE(hooks.isLive(empty.allocation.offset));  // released even though empty
}

// ---- big ranks, chunk ids and groups --------------------------------------------------------------

TEST_F(TableTest, RanksAndChunkIdsBeyondAThousand) {
  const Group senders = {1500, 1501};
  const std::vector<Group> dests = {{2500, 2501}, {99999}};
  ASSERT_TRUE(isOk(send(1501, senders, "big", 4999, 5000, dests, tensor(Dtype::kUint8, {7}))));
  ASSERT_TRUE(isOk(send(1500, senders, "big", 4999, 5000, dests, tensor(Dtype::kUint8, {7}))));
  ASSERT_TRUE(isOk(send(1500, senders, "big", 1234, 5000, dests, tensor(Dtype::kUint8, {7}))));
  TestWaiter w, q, end;
  recv(2501, "big", 4999, w);
  ASSERT_NE(w.tensor(), nullptr);
  recv(99999, "big", 3000, q);
  EXPECT_FALSE(q.done());
  recv(2500, "big", 5000, end);
  EXPECT_TRUE(end.isEnd());
  ASSERT_TRUE(isOk(markDone(2500, "big", 4999)));
  ASSERT_TRUE(isOk(markDone(99999, "big", 4999)));
  EXPECT_EQ(table->stats().chunks, 1u);
  EXPECT_EQ(codeOf(markDone(2500, "big", 5000)), Errc::kChunkOutOfRange);
  ASSERT_TRUE(isOk(send(1501, senders, "big", 3000, 5000, dests, tensor(Dtype::kUint8, {7}))));
  EXPECT_NE(q.tensor(), nullptr);
  // A huge stream chunk id does not make the table allocate per id.
  ASSERT_TRUE(isOk(sendObject(1500, senders, "huge", 4'000'000'000u, 0, dests, "x")));
  TestWaiter far;
  recv(2500, "huge", 4'000'000'000u, far);
  EXPECT_NE(far.object(), nullptr);
}

TEST_F(TableTest, GroupsLargerThanSixtyFourRanks) {
  Group senders;
  for (Rank r = 1000; r < 1100; ++r) senders.push_back(r);
  std::vector<Group> dests;
  for (Rank r = 2000; r < 2070; ++r) dests.push_back({r});
  for (Rank s : senders) ASSERT_TRUE(isOk(send(s, senders, "wide", 0, 1, dests, tensor(Dtype::kUint8, {1}))));
  EXPECT_EQ(table->stats().duplicatesDropped, 99u);
  EXPECT_EQ(codeOf(send(1099, senders, "wide", 0, 1, dests, tensor(Dtype::kUint8, {1}))), Errc::kAlreadySent);
  for (Rank r = 2000; r < 2070; ++r) {
    TestWaiter w;
    recv(r, "wide", 0, w);
    ASSERT_NE(w.tensor(), nullptr);
    ASSERT_TRUE(isOk(markDone(r, "wide", 0)));
    EXPECT_EQ(table->stats().chunks, r == 2069 ? 0u : 1u);
  }
  EXPECT_EQ(codeOf(markDone(2068, "wide", 0)), Errc::kAlreadyDone);
  EXPECT_EQ(table->stats().chunksCompleted, 1u);
}

// ---- re-entrant waiters ---------------------------------------------------------------------------

TEST_F(TableTest, CallbackMarksDoneBeforeItsGroupMateIsServed) {
  TestWaiter first, second;
  recv(2, "re", 0, first);
  recv(3, "re", 0, second);
  first.onComplete = [&](TestWaiter& w) {
    ASSERT_NE(w.tensor(), nullptr);
    EXPECT_TRUE(hooks.isLive(w.tensor()->allocation.offset));
    ASSERT_TRUE(isOk(table->markDone(2, "re", 0)));
  };
  ASSERT_TRUE(isOk(send(0, {0}, "re", 0, 1, kTo23, tensor(Dtype::kFloat32, {4}))));
  EXPECT_EQ(first.calls, 1);
  EXPECT_EQ(second.calls, 1);
  EXPECT_EQ(second.code(), Errc::kAlreadyDone);  // never a view of released memory
  EXPECT_TRUE(hooks.live.empty());
}

TEST_F(TableTest, CallbackRecvsAgainWithTheSameWaiter) {
  TestWaiter w;
  int seen = 0;
  w.onComplete = [&](TestWaiter& self) {
    ++seen;
    if (seen < 3 && self.object() != nullptr) table->recv(2, "loop", static_cast<uint32_t>(seen), self);
  };
  recv(2, "loop", 0, w);
  ASSERT_TRUE(isOk(sendObject(0, {0}, "loop", 0, 0, kTo2, "a")));
  EXPECT_EQ(seen, 1);
  EXPECT_TRUE(w.queued());
  ASSERT_TRUE(isOk(sendObject(0, {0}, "loop", 1, 0, kTo2, "b")));
  EXPECT_EQ(seen, 2);
  ASSERT_TRUE(isOk(table->closeStream(0, "loop", 2, kTo2)));
  EXPECT_EQ(seen, 3);
  EXPECT_TRUE(w.isEnd());
  EXPECT_FALSE(w.queued());
}

TEST_F(TableTest, CallbackCancelsAndDestroysAnotherWaiterOfTheSameBatch) {
  auto victim = std::make_unique<TestWaiter>();
  TestWaiter killer;
  recv(2, "k", 0, killer);
  recv(2, "k", 0, *victim);
  killer.onComplete = [&](TestWaiter&) {
    EXPECT_TRUE(victim->queued());  // collected for completion but not yet completed
    EXPECT_TRUE(table->cancel(*victim));
    victim.reset();
  };
  ASSERT_TRUE(isOk(sendObject(0, {0}, "k", 0, 1, kTo2, "v")));
  EXPECT_EQ(killer.calls, 1);
  EXPECT_EQ(victim, nullptr);
  EXPECT_EQ(table->stats().waiters, 0u);
}

TEST_F(TableTest, CallbackSendsAndTheChainCompletes) {
  TestWaiter a, b;
  recv(2, "chain", 1, b);
  recv(2, "chain", 0, a);
  a.onComplete = [&](TestWaiter&) {
    ASSERT_TRUE(isOk(table->send(0, {0}, "chain", 1, 2, kTo2, object("second"))));
  };
  ASSERT_TRUE(isOk(sendObject(0, {0}, "chain", 0, 2, kTo2, "first")));
  ASSERT_NE(b.object(), nullptr);
  EXPECT_EQ(b.object()->bytes, "second");
}

TEST_F(TableTest, RankGoneFromInsideACallback) {
  TestWaiter a, b;
  recv(2, "rg", 0, a);
  recv(3, "rg", 1, b);
  a.onComplete = [&](TestWaiter&) { table->rankGone(3); };
  ASSERT_TRUE(isOk(sendObject(0, {0}, "rg", 0, 2, {{2}, {3}}, "v")));
  EXPECT_EQ(a.calls, 1);
  EXPECT_EQ(b.code(), Errc::kCancelled);
}

// ---- views and misuse -----------------------------------------------------------------------------

TEST_F(TableTest, ViewsStayPutWhileOtherChunksArrive) {
  ASSERT_TRUE(isOk(send(0, {0}, "v", 500, 0, kTo2, tensor(Dtype::kInt32, {3, 3}))));
  TestWaiter w;
  recv(2, "v", 500, w);
  const TensorChunk* view = w.tensor();
  ASSERT_NE(view, nullptr);
  for (uint32_t c = 0; c < 300; ++c) {  // grows and shifts the chunk vector many times
    ASSERT_TRUE(isOk(sendObject(0, {0}, "v", c, 0, kTo2, std::string(40, 'p'))));
  }
  EXPECT_EQ(view->shape, (std::vector<int64_t>{3, 3}));  // ASan: no use after free
  EXPECT_EQ(view->sizeBytes, 36u);
  TestWaiter again;
  recv(2, "v", 500, again);
  EXPECT_EQ(again.tensor(), view);
}

using TableDeathTest = TableTest;

TEST_F(TableDeathTest, MisusedWaitersAbort) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  EXPECT_DEATH(
      {
        TestWaiter w;
        table->recv(2, "x", 0, w);
        table->recv(2, "x", 1, w);
      },
      "already queued");
  EXPECT_DEATH(
      {
        auto w = std::make_unique<TestWaiter>();
        table->recv(2, "x", 0, *w);
        w.reset();
      },
      "destroyed while the transfer table still holds it");
}

// ---- inspection -----------------------------------------------------------------------------------

TEST_F(TableTest, DescribeAndDataIds) {
  EXPECT_EQ(table->describe("none"), std::nullopt);
  ASSERT_TRUE(isOk(send(0, {0, 1}, "b-id", 0, 0, {{2, 3}, {4}}, tensor(Dtype::kBFloat16, {5, 3584}))));
  ASSERT_TRUE(isOk(sendObject(0, {0, 1}, "b-id", 2, 0, {{2, 3}, {4}}, "hello")));
  ASSERT_TRUE(isOk(markDone(4, "b-id", 2)));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "a-id", 0, 1, kTo2, "x")));
  TestWaiter w;
  recv(3, "b-id", 1, w);
  EXPECT_EQ(table->dataIds(), (std::vector<std::string>{"a-id", "b-id"}));
  auto text = table->describe("b-id");
  ASSERT_TRUE(text.has_value());
  EXPECT_THAT(*text, HasSubstr("chunks unknown (stream)"));
  EXPECT_THAT(*text, HasSubstr("from [0,1] to [[2,3],[4]]"));
  EXPECT_THAT(*text, HasSubstr("chunk 0: tensor bfloat16 [5,3584], 35840 bytes"));
  EXPECT_THAT(*text, HasSubstr("chunk 2: object type 1, 5 bytes; held by [2,3]; done by [4]"));
  EXPECT_THAT(*text, HasSubstr("waiting: rank 3 for chunk 1"));
  table->cancel(w);
}

TEST_F(TableTest, StatsAreExact) {
  TestWaiter w;
  recv(2, "s1", 1, w);
  ASSERT_TRUE(isOk(send(0, {0, 1}, "s1", 0, 2, kTo2, tensor(Dtype::kFloat32, {100}))));
  ASSERT_TRUE(isOk(send(1, {0, 1}, "s1", 0, 2, kTo2, tensor(Dtype::kFloat32, {100}))));
  ASSERT_TRUE(isOk(send(0, {0}, "s2", 0, 1, kTo2, tensor(Dtype::kFloat32, {1}))));
  auto s = table->stats();
  EXPECT_EQ(s.items, 2u);
  EXPECT_EQ(s.chunks, 2u);
  EXPECT_EQ(s.bytesHeld, 448u + 64u);  // allocations round up to 64-byte units
  EXPECT_EQ(s.waiters, 1u);
  EXPECT_EQ(s.duplicatesDropped, 1u);
  EXPECT_EQ(s.expiredHolds, 0u);
  EXPECT_EQ(s.chunksCompleted, 0u);
  table->cancel(w);
}

}  // namespace
}  // namespace sidecar::transfer::testing

namespace sidecar::transfer::testing {
TEST(TensorBytes, CountsAndRefusesWhatCannotBeCounted) {
  EXPECT_EQ(tensorBytes(Dtype::kFloat32, {10}), 40u);
  EXPECT_EQ(tensorBytes(Dtype::kBFloat16, {}), 2u);  // a 0-d tensor is one element
  EXPECT_EQ(tensorBytes(Dtype::kInt64, {3, 0}), 0u);
  EXPECT_EQ(tensorBytes(Dtype::kUint8, {-1}), std::nullopt);
  EXPECT_EQ(tensorBytes(Dtype::kUint8, {int64_t{1} << 62, 8}), std::nullopt);  // 2^65 would wrap to 0
  EXPECT_EQ(tensorBytes(static_cast<Dtype>(200), {1}), std::nullopt);
}

// allChunksArrived: what a node asks before it forgets that a link was delivering an id.
TEST_F(TableTest, AllChunksArrivedOnlyWhenNoChunkIsStillToCome) {
  EXPECT_TRUE(table->allChunksArrived("never-seen"));
  TestWaiter waiting;
  recv(2, "awaited", 0, waiting);  // a recv queued before any chunk: the id is known, incomplete
  EXPECT_FALSE(table->allChunksArrived("awaited"));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "awaited", 0, 1, kTo2, "v")));
  EXPECT_TRUE(table->allChunksArrived("awaited"));

  ASSERT_TRUE(isOk(sendObject(0, {0}, "two", 0, 2, kTo2, "a")));
  EXPECT_FALSE(table->allChunksArrived("two"));
  ASSERT_TRUE(isOk(sendObject(0, {0}, "two", 1, 2, kTo2, "b")));
  EXPECT_TRUE(table->allChunksArrived("two"));

  ASSERT_TRUE(isOk(sendObject(0, {0}, "stream", 0, 0, kTo2, "a")));  // count unknown yet
  EXPECT_FALSE(table->allChunksArrived("stream"));
  ASSERT_TRUE(isOk(table->closeStream(0, "stream", 1, kTo2)));
  EXPECT_TRUE(table->allChunksArrived("stream"));

  ASSERT_TRUE(isOk(markDone(2, "two", 0)));
  ASSERT_TRUE(isOk(markDone(2, "two", 1)));
  EXPECT_TRUE(table->allChunksArrived("two")) << "a finished id (tombstone) waits for nothing";
  table->checkInvariants();
}

}  // namespace sidecar::transfer::testing
