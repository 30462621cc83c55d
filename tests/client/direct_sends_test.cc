// DirectSends alone: a fake Session answers directRoute and a fake DirectWire records what would
// go on the wire. Checks that a send never waits for a route, that what goes out is the deliver
// the daemon would have sent, packed (base/packed_deliver.h; seq from the session's block, the route's tag), that a
// busy or failing wire and a used-up block all mean "send it the usual way", and that a daemon
// without the method is not asked again.
#include "client/direct_sends.h"

#include <gtest/gtest.h>
#include <kj/async.h>

#include <deque>
#include <span>
#include <string>
#include <vector>

#include "base/packed_deliver.h"

namespace sidecar::client {
namespace {

struct RouteAnswer {
  bool ucx = true;
  bool unimplemented = false;
  uint32_t link = 7;
  uint32_t seqBase = 0x80010000u;
  uint32_t seqCount = 3;
  uint32_t retryMs = 60'000;
  uint64_t maxBytes = 128 << 10;
};

// Answers directRoute from `answers` (the last one again once they run out) and counts the asks.
class FakeSession final : public proto::Session::Server {
 public:
  explicit FakeSession(std::deque<RouteAnswer>& answers, std::vector<bool>& renews)
      : answers_(answers), renews_(renews) {}

 protected:
  kj::Promise<void> directRoute(DirectRouteContext context) override {
    renews_.push_back(context.getParams().getRenew());
    RouteAnswer a = answers_.front();
    if (answers_.size() > 1) answers_.pop_front();
    if (a.unimplemented) {
      return kj::Exception(kj::Exception::Type::UNIMPLEMENTED, __FILE__, __LINE__, kj::str("old daemon"));
    }
    auto route = context.getResults().initRoute();
    route.setRetryMs(a.retryMs);
    if (!a.ucx) {
      route.setNone("every destination lives on this node");
      return kj::READY_NOW;
    }
    auto ucx = route.initUcx();
    std::string address = "worker-of-node-b";
    ucx.setWorkerAddress(kj::arrayPtr(reinterpret_cast<const kj::byte*>(address.data()), address.size()));
    ucx.setDeliverTag(0x100000000ull | a.link);
    ucx.setLinkSerial(a.link);
    ucx.setSeqBase(a.seqBase);
    ucx.setSeqCount(a.seqCount);
    ucx.setMessageMaxBytes(a.maxBytes);
    return kj::READY_NOW;
  }

 private:
  std::deque<RouteAnswer>& answers_;
  std::vector<bool>& renews_;
};

struct WireLog {
  struct Message {
    std::string address;
    uint64_t tag;
    std::vector<capnp::word> words;
  };
  std::vector<Message> sent;
  std::vector<std::string> forgotten;
  DirectWire::Sent next = DirectWire::Sent::kYes;
};

class FakeWire final : public DirectWire {
 public:
  explicit FakeWire(WireLog& log) : log_(log) {}
  Sent send(const std::string& address, uint64_t tag, const void* bytes, uint64_t sizeBytes,
            std::string& error) override {
    if (log_.next == Sent::kYes) {
      std::vector<capnp::word> words(sizeBytes / sizeof(capnp::word));
      memcpy(words.data(), bytes, sizeBytes);
      log_.sent.push_back({address, tag, std::move(words)});
    } else if (log_.next == Sent::kFailed) {
      error = "the peer's network is not reachable from here";
    }
    return log_.next;
  }
  void forget(const std::string& address) override { log_.forgotten.push_back(address); }

 private:
  WireLog& log_;
};

base::PackedRead read(const WireLog::Message& message, base::PackedDeliver& out, std::string& why) {
  return base::readPackedDeliver(std::as_bytes(std::span(message.words)), out, why);
}

class DirectSendsTest : public ::testing::Test {
 protected:
  DirectSendsTest()
      : waitScope(loop),
        direct(proto::Session::Client(kj::heap<FakeSession>(answers, renews)), 4,
               [this]() -> std::unique_ptr<DirectWire> {
                 ++wiresMade;
                 if (noUcx) return nullptr;
                 return std::make_unique<FakeWire>(wire);
               }) {}
  ~DirectSendsTest() noexcept override {}

  std::optional<DirectSends::Sent> send(const std::string& id, uint64_t bytes = 4096) {
    body.assign(bytes, std::byte{0x5a});
    DirectSends::Tensor t{proto::Dtype::UINT8, shape = {int64_t(bytes)}, body.data(), bytes};
    return direct.trySend({{2}}, id, 0, 1, t);
  }
  void settle() { waitScope.poll(); }

  kj::EventLoop loop;
  kj::WaitScope waitScope;
  std::deque<RouteAnswer> answers{RouteAnswer{}};
  std::vector<bool> renews;
  WireLog wire;
  int wiresMade = 0;
  bool noUcx = false;
  std::vector<std::byte> body;
  std::vector<int64_t> shape;
  DirectSends direct;
};

TEST_F(DirectSendsTest, FirstSendAsksAndGoesTheUsualWayThenSendsDirect) {
  EXPECT_FALSE(send("a").has_value()) << "a send never waits for a route";
  EXPECT_EQ(wiresMade, 0) << "UCX starts only once a route is known";
  settle();
  ASSERT_EQ(renews.size(), 1u);
  auto sent = send("b");
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(sent->link, 7u);
  EXPECT_EQ(sent->seq, 0x80010000u);
  ASSERT_EQ(wire.sent.size(), 1u);
  EXPECT_EQ(wire.sent[0].address, "worker-of-node-b");
  EXPECT_EQ(wire.sent[0].tag, 0x100000007ull);
  // The deliver message the daemon would have sent, packed.
  base::PackedDeliver m;
  std::string why;
  ASSERT_EQ(read(wire.sent[0], m, why), base::PackedRead::kOk) << why;
  EXPECT_EQ(m.seq, 0x80010000u);
  EXPECT_EQ(m.dataId, "b");
  EXPECT_EQ(m.senderRank, 4);
  EXPECT_EQ(m.senderGroup, std::vector<int32_t>{4});
  EXPECT_EQ(m.destinations, (std::vector<std::vector<int32_t>>{{2}}));
  EXPECT_EQ(m.dtype, static_cast<uint16_t>(proto::Dtype::UINT8));
  EXPECT_EQ(m.sizeBytes, 4096u);
  ASSERT_EQ(m.body.size(), 4096u);
  EXPECT_EQ(m.body[4095], std::byte{0x5a});
  EXPECT_EQ(send("c")->seq, 0x80010001u) << "seqs count up within the block";
}

// The message buffer is kept across sends: a shorter message after a longer one, an odd size, an
// empty tensor, a header far longer than usual, and a message that outgrows the buffer (which
// then grows) all read back exactly.
TEST_F(DirectSendsTest, MessagesReadBackExactlyWhateverCameBefore) {
  answers.front().seqCount = 100;
  send("warm");
  settle();
  struct Case {
    std::string id;
    uint64_t bytes;
  };
  const std::vector<Case> cases = {{std::string(300, 'L'), 64 << 10}, {"s", 5}, {"e", 0},
                                   {std::string(9000, 'H'), 100}, {std::string(6000, 'O'), 64 << 10},
                                   {"t", 4096}};
  for (const Case& c : cases) {
    size_t before = wire.sent.size();
    auto sent = send(c.id, c.bytes);
    ASSERT_TRUE(sent.has_value()) << c.id.size() << " / " << c.bytes;
    ASSERT_EQ(wire.sent.size(), before + 1);
    base::PackedDeliver m;
    std::string why;
    ASSERT_EQ(read(wire.sent.back(), m, why), base::PackedRead::kOk) << why;
    EXPECT_EQ(m.dataId, c.id);
    EXPECT_EQ(m.sizeBytes, c.bytes);
    EXPECT_EQ(m.shape, std::vector<int64_t>{int64_t(c.bytes)});
    ASSERT_EQ(m.body.size(), c.bytes);
    for (size_t i = 0; i < m.body.size(); ++i) {
      ASSERT_EQ(m.body[i], std::byte{0x5a}) << "byte " << i << " of " << c.bytes;
    }
  }
}

TEST_F(DirectSendsTest, BusyWireTakesNoSeqAndFailedWireIsForgotten) {
  send("a");
  settle();
  wire.next = DirectWire::Sent::kBusy;
  EXPECT_FALSE(send("b").has_value());
  wire.next = DirectWire::Sent::kYes;
  EXPECT_EQ(send("c")->seq, 0x80010000u) << "a busy wire used no seq";
  wire.next = DirectWire::Sent::kFailed;
  EXPECT_FALSE(send("d").has_value());
  ASSERT_EQ(wire.forgotten.size(), 1u);
  wire.next = DirectWire::Sent::kYes;
  EXPECT_FALSE(send("e").has_value()) << "after a failure the daemon sends for a while";
  EXPECT_EQ(wire.sent.size(), 1u);
}

// An endpoint that worked and then failed (the peer's side closed it, the peer restarted) is
// made anew at the next send, with no pause; one that never worked pauses direct sends.
TEST_F(DirectSendsTest, LostEndpointIsMadeAgainAtOnce) {
  send("a");
  settle();
  ASSERT_TRUE(send("b").has_value());
  wire.next = DirectWire::Sent::kLost;
  EXPECT_FALSE(send("c").has_value());
  ASSERT_EQ(wire.forgotten.size(), 1u);
  wire.next = DirectWire::Sent::kYes;
  auto sent = send("d");
  ASSERT_TRUE(sent.has_value()) << "a lost endpoint does not pause direct sends";
  EXPECT_EQ(sent->seq, 0x80010001u);
}

TEST_F(DirectSendsTest, UsedUpBlockIsRenewed) {
  answers = {RouteAnswer{}, RouteAnswer{true, false, 7, 0x80020000u, 3}};
  send("a");
  settle();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(send("x" + std::to_string(i)).has_value());
  EXPECT_FALSE(send("y").has_value()) << "the block is used up";
  settle();
  ASSERT_EQ(renews.size(), 2u);
  EXPECT_TRUE(renews[1]) << "the second ask renews the block";
  auto sent = send("z");
  ASSERT_TRUE(sent.has_value());
  EXPECT_EQ(sent->seq, 0x80020000u);
}

TEST_F(DirectSendsTest, NoRouteNoUcxOrAnOldDaemonMeanTheUsualWay) {
  answers = {RouteAnswer{false}};
  send("a");
  settle();
  EXPECT_FALSE(send("b").has_value());
  EXPECT_EQ(renews.size(), 1u) << "not asked again before retryMs";
  EXPECT_EQ(wiresMade, 0);
  EXPECT_FALSE(send("big", 128 << 10).has_value()) << "larger tensors go through the daemon";
}

TEST_F(DirectSendsTest, OldDaemonIsNotAskedAgain) {
  answers = {RouteAnswer{true, true}};
  send("a");
  settle();
  EXPECT_FALSE(send("b").has_value());
  settle();
  EXPECT_EQ(renews.size(), 1u);
}

TEST_F(DirectSendsTest, WithoutUcxNothingGoesDirect) {
  noUcx = true;
  send("a");
  settle();
  EXPECT_FALSE(send("b").has_value());
  EXPECT_FALSE(send("c").has_value());
  EXPECT_EQ(wiresMade, 1) << "UCX is tried once";
}

}  // namespace
}  // namespace sidecar::client
