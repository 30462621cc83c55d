// A peer daemon's bad input (issue 5): a real sidecard on 127.0.0.1, and this test playing a
// peer that speaks Cap'n Proto (capnp::EzRpcClient) but sends what a correct daemon never would:
// another protocol version, tensor headers that do not add up, inline bodies of the wrong size,
// UCX pieces that do not cover the tensor, chunks for ranks that do not live there. Each gets a
// typed "[kind] message" error; the daemon then still stores a correct chunk and serves it.

#include <capnp/ez-rpc.h>
#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "daemon_process.h"
#include "kj_errors.h"
#include "sidecar.capnp.h"

namespace {

using namespace sidecar::systest;
using namespace std::chrono_literals;
namespace proto = sidecar::proto;

class PeerInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(sidecardPath().empty()) << "$SIDECARD must name the sidecard binary";
    char tmpl[] = "/tmp/sidecar-peer-input-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/sidecar.sock";
    // Ranks 0-1 live here; 2-3 on a node that does not exist (never contacted by this test).
    port_ = freeLoopbackTcpPort();
    address_ = "127.0.0.1:" + std::to_string(port_);
    daemon_ = Process::start({sidecardPath(), "--socket", socket_, "--tcp", address_, "--peers",
                              "0-1=" + address_ + ",2-3=127.0.0.1:1", "--arena-size", "64MiB",
                              "--node-id", "peer-input"},
                             {}, dir_ + "/out", dir_ + "/err");
    ASSERT_NE(daemon_, nullptr);
    auto deadline = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < deadline) {
      ASSERT_TRUE(daemon_->running()) << daemon_->err();
      struct stat st {};
      if (lstat(socket_.c_str(), &st) == 0) return;
      std::this_thread::sleep_for(20ms);
    }
    FAIL() << "sidecard did not start: " << daemon_->err();
  }
  void TearDown() override {
    if (daemon_ && daemon_->running()) {
      daemon_->signal(SIGTERM);
      auto status = daemon_->waitFor(10s);
      EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << daemon_->err();
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string dir_, socket_, address_;
  int port_ = 0;
  std::unique_ptr<Process> daemon_;
};

void hello(proto::PeerHello::Builder h, uint32_t version) {
  h.setProtocolVersion(version);
  h.setNodeId("fake-peer");
  h.setIncarnation(42);
  h.setAddress("");
}

void fillChunk(proto::PeerChunk::Builder c, const std::string& id, std::vector<int32_t> to) {
  c.setDataId(id);
  c.setChunkId(0);
  c.setNumChunks(1);
  c.setSenderRank(2);
  c.initSenderGroup(1).set(0, 2);
  auto dst = c.initDestinations(1)[0].initRanks(static_cast<unsigned>(to.size()));
  for (unsigned i = 0; i < to.size(); ++i) dst.set(i, to[i]);
}

TEST_F(PeerInputTest, BadPeerInputGetsTypedErrorsAndHarmsNothing) {
  capnp::EzRpcClient client(address_);
  auto& waitScope = client.getWaitScope();
  auto sidecar = client.getMain<proto::Sidecar>();

  // Another protocol version is refused.
  {
    auto request = sidecar.peerRequest();
    hello(request.initHello(), proto::PROTOCOL_VERSION + 1);
    std::string error = errorOf([&] { request.send().wait(waitScope); });
    EXPECT_NE(error.find("[version-mismatch]"), std::string::npos) << error;
  }

  auto request = sidecar.peerRequest();
  hello(request.initHello(), proto::PROTOCOL_VERSION);
  auto answer = request.send().wait(waitScope);
  EXPECT_EQ(std::string(answer.getHello().getNodeId().cStr()), "peer-input");
  EXPECT_GT(answer.getHello().getLinkId(), 0u);
  auto peer = answer.getPeer();
  peer.heartbeatRequest().send().wait(waitScope);

  auto deliverError = [&](auto fill) {
    auto deliver = peer.deliverRequest();
    fill(deliver.initChunk());
    return errorOf([&] { deliver.send().wait(waitScope); });
  };

  // A tensor header whose shape and dtype disagree with its size.
  std::string e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "bad-header", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::FLOAT32);
    t.initShape(1).set(0, 10);
    t.setSizeBytes(41);
    t.initBody().setInline(kj::heapArray<kj::byte>(41));
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  EXPECT_NE(e.find("does not add up"), std::string::npos) << e;

  // A shape whose element count overflows 64 bits (it must not wrap around to the size).
  e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "overflow", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::UINT8);
    auto shape = t.initShape(2);
    shape.set(0, int64_t{1} << 62);
    shape.set(1, 8);  // 2^65 wraps to 0 in 64 bits
    t.setSizeBytes(0);
    t.initBody().setInline(kj::heapArray<kj::byte>(0));
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;

  // Inline bytes of the wrong length.
  e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "bad-inline", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::UINT8);
    t.initShape(1).set(0, 16);
    t.setSizeBytes(16);
    t.initBody().setInline(kj::heapArray<kj::byte>(8));
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;

  // UCX pieces that do not cover the tensor (or no UCX here: also refused).
  e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "bad-pieces", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::UINT8);
    t.initShape(1).set(0, 1 << 20);
    t.setSizeBytes(1 << 20);
    auto ucx = t.initBody().initUcx();
    ucx.setTag(7);
    ucx.setPieces(1);
    ucx.setPieceBytes(4096);
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;

  // A chunk for a rank that does not live on this node.
  e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "not-here", {3});
    auto o = c.initPayload().initObject();
    o.setTypeTag(1);
    o.setBytes(kj::heapArray<kj::byte>(4));
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  EXPECT_NE(e.find("do not live on this node"), std::string::npos) << e;

  // A malformed sender (not in its group) is the table's usual invalid-argument.
  e = deliverError([](proto::PeerChunk::Builder c) {
    fillChunk(c, "bad-sender", {0});
    c.setSenderRank(3);  // group is [2]
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(1));
  });
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;

  // A correct chunk is stored, and a local rank receives it.
  {
    auto deliver = peer.deliverRequest();
    auto c = deliver.initChunk();
    fillChunk(c, "good", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::INT32);
    t.initShape(1).set(0, 4);
    t.setSizeBytes(16);
    auto bytes = kj::heapArray<kj::byte>(16);
    for (size_t i = 0; i < 16; ++i) bytes[i] = static_cast<kj::byte>(i);
    t.initBody().setInline(bytes);
    deliver.send().wait(waitScope);
  }
  std::thread([&] {
    sidecar::RankConfig config;
    config.rank = 0;
    config.sendHint = {sidecar::Dtype::kInt32, {4}};
    config.socketPath = socket_;
    auto sc = sidecar::Sidecar::connect(config);
    sidecar::Received r = sc.recv("good", 0, 10'000);
    ASSERT_EQ(r.kind, sidecar::Received::Kind::kTensor);
    ASSERT_EQ(r.tensor.sizeBytes, 16u);
    EXPECT_EQ(static_cast<const uint8_t*>(r.tensor.data)[15], 15);
    sc.markDone("good", 0);
    auto status = sidecar::Client::connectUnix(socket_).transfers();
    EXPECT_EQ(status.bytesHeld, 0u);
    ASSERT_FALSE(status.peers.empty());
    EXPECT_FALSE(status.peers[0].outgoing);
    EXPECT_EQ(status.peers[0].nodeId, "fake-peer");
    EXPECT_EQ(status.peers[0].chunks, 1u);
  }).join();
  EXPECT_TRUE(daemon_->running());
}

}  // namespace
