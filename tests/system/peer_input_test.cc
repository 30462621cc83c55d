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
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/packed_deliver.h"
#include "daemon_process.h"
#include "kj_errors.h"
#include "sidecar.capnp.h"
#include "sidecar_build_config.h"

#if SIDECAR_HAVE_UCX
#include <capnp/serialize.h>
#include <ucp/api/ucp.h>

#include <optional>
#endif

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
                             {"UCX_TLS=tcp"}, dir_ + "/out", dir_ + "/err");
    ASSERT_NE(daemon_, nullptr);
    ASSERT_EQ(awaitSocket(*daemon_, socket_), "");
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

#if SIDECAR_HAVE_UCX

// A UCX worker of this test, driven by polling: the fake peer's side of small deliveries sent as
// UCX messages (schema PeerMessage). Plain UCX calls, independent of any KJ loop.
class RawUcxPeer {
 public:
  RawUcxPeer() {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG;
    ucp_config_t* config = nullptr;
    ok_ = ucp_config_read(nullptr, nullptr, &config) == UCS_OK;
    if (ok_) {
      ok_ = ucp_init(&params, config, &context_) == UCS_OK;
      ucp_config_release(config);
    }
    ucp_worker_params_t workerParams{};
    workerParams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    workerParams.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (ok_) ok_ = ucp_worker_create(context_, &workerParams, &worker_) == UCS_OK;
    ucp_address_t* address = nullptr;
    size_t bytes = 0;
    if (ok_) ok_ = ucp_worker_get_address(worker_, &address, &bytes) == UCS_OK;
    if (ok_) {
      address_.assign(reinterpret_cast<const char*>(address), bytes);
      ucp_worker_release_address(worker_, address);
    }
  }
  ~RawUcxPeer() {
    if (endpoint_ != nullptr) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_EP_CLOSE_FLAG_FORCE;
      wait(ucp_ep_close_nbx(endpoint_, &param));
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }
  bool ok() const { return ok_; }
  const std::string& address() const { return address_; }

  void connect(const std::string& remote) {
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.address = reinterpret_cast<const ucp_address_t*>(remote.data());
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ASSERT_EQ(ucp_ep_create(worker_, &params, &endpoint_), UCS_OK);
  }

  void send(uint64_t tag, const void* data, size_t bytes) {
    ucp_request_param_t param{};
    ucs_status_ptr_t request = ucp_tag_send_nbx(endpoint_, data, bytes, tag, &param);
    ASSERT_FALSE(UCS_PTR_IS_ERR(request));
    wait(request);
  }
  void send(uint64_t tag, kj::ArrayPtr<const capnp::word> words) {
    send(tag, words.begin(), words.size() * sizeof(capnp::word));
  }

  // The next message with exactly `tag`, or none within `timeout`.
  std::optional<std::vector<capnp::word>> receive(uint64_t tag, std::chrono::milliseconds timeout) {
    struct Done {
      bool done = false;
      ucs_status_t status = UCS_OK;
      size_t length = 0;
    } done;
    std::vector<capnp::word> buffer(4096);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    param.user_data = &done;
    param.cb.recv = [](void*, ucs_status_t status, const ucp_tag_recv_info_t* info, void* user) {
      auto* d = static_cast<Done*>(user);
      d->done = true;
      d->status = status;
      d->length = status == UCS_OK ? info->length : 0;
    };
    ucs_status_ptr_t request = ucp_tag_recv_nbx(worker_, buffer.data(), buffer.size() * sizeof(capnp::word),
                                                tag, ~uint64_t{0}, &param);
    if (UCS_PTR_IS_ERR(request)) return std::nullopt;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!done.done && std::chrono::steady_clock::now() < deadline) ucp_worker_progress(worker_);
    if (!done.done) {
      ucp_request_cancel(worker_, request);
      while (!done.done) ucp_worker_progress(worker_);
    }
    ucp_request_free(request);
    if (done.status != UCS_OK) return std::nullopt;
    buffer.resize(done.length / sizeof(capnp::word));
    return buffer;
  }

 private:
  void wait(ucs_status_ptr_t request) {
    if (request == nullptr || UCS_PTR_IS_ERR(request)) return;
    while (ucp_request_check_status(request) == UCS_INPROGRESS) ucp_worker_progress(worker_);
    ucp_request_free(request);
  }

  bool ok_ = false;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h endpoint_ = nullptr;
  std::string address_;
};

kj::Array<capnp::word> deliverMessage(uint32_t seq, const std::function<void(proto::PeerChunk::Builder)>& fill) {
  capnp::MallocMessageBuilder message;
  auto deliver = message.initRoot<proto::PeerMessage>().initDeliver();
  deliver.setSeq(seq);
  fill(deliver.initChunk());
  return capnp::messageToFlatArray(message);
}

// A packed deliver (base/packed_deliver.h), as an executor's direct send puts on the wire.
std::vector<uint64_t> packedMessage(uint32_t seq, const std::string& id,
                                    const std::vector<std::vector<int32_t>>& destinations,
                                    uint16_t dtype, const std::vector<uint8_t>& body) {
  std::vector<int64_t> shape = {int64_t(body.size())};
  int32_t sender = 0;
  sidecar::base::PackedDeliverFields f;
  f.seq = seq;
  f.dataId = id;
  f.dtype = dtype;
  f.shape = shape;
  f.senderGroup = std::span<const int32_t>(&sender, 1);
  f.destinations = destinations;
  f.sizeBytes = body.size();
  std::vector<uint64_t> words(sidecar::base::packedDeliverBytes(f) / 8);
  sidecar::base::writePackedDeliver(reinterpret_cast<std::byte*>(words.data()), f, body.data());
  return words;
}

// The small-delivery path between daemons (PeerMessage over UCX, docs/PROTOCOL.md), driven by a
// fake peer: a good delivery is acked and stored; a refused one is acked with the typed error; a
// message for a link that is not open is dropped, as is one that is no Cap'n Proto; packed
// delivers are checked as strictly.
// The daemon stays up and serves what it stored.
TEST_F(PeerInputTest, UcxMessagesFromABadPeerAreRefusedAndHarmNothing) {
  setenv("UCX_TLS", "tcp", 1);
  RawUcxPeer ucx;
  if (!ucx.ok()) GTEST_SKIP() << "UCX does not initialize here";
  capnp::EzRpcClient client(address_);
  auto& waitScope = client.getWaitScope();
  auto request = client.getMain<proto::Sidecar>().peerRequest();
  auto h = request.initHello();
  hello(h, proto::PROTOCOL_VERSION);
  constexpr uint32_t kOurLinkId = 77;
  h.setUcxAddress(kj::arrayPtr(reinterpret_cast<const kj::byte*>(ucx.address().data()), ucx.address().size()));
  h.setLinkId(kOurLinkId);
  h.setUcxMessageMaxBytes(4096);
  auto answer = request.send().wait(waitScope);
  auto daemonUcx = answer.getHello().getUcxAddress();
  if (daemonUcx.size() == 0) GTEST_SKIP() << "the daemon runs without UCX";
  ASSERT_GT(answer.getHello().getUcxMessageMaxBytes(), 0u) << "the daemon takes no UCX messages";
  uint32_t linkId = answer.getHello().getLinkId();
  auto peer = answer.getPeer();
  ucx.connect(std::string(reinterpret_cast<const char*>(daemonUcx.begin()), daemonUcx.size()));
  const uint64_t deliverTag = (1ull << 32) | linkId, ackTag = (2ull << 32) | kOurLinkId;
  // Within the daemon's peer timeout (5 s): a link silent for longer is dropped.
  auto ackOf = [&](uint32_t seq, std::chrono::milliseconds timeout = 4s) -> std::string {
    auto words = ucx.receive(ackTag, timeout);
    if (!words) return "(no ack)";
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words->data(), words->size()));
    auto ack = reader.getRoot<proto::PeerMessage>().getAck();
    EXPECT_EQ(ack.getSeq(), seq);
    return ack.getError();
  };

  // A good delivery: acked with no error.
  ucx.send(deliverTag, deliverMessage(5, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-good", {0});
    auto o = c.initPayload().initObject();
    o.setTypeTag(1);
    o.setBytes(kj::heapArray<kj::byte>({1, 2, 3}));
  }));
  EXPECT_EQ(ackOf(5), "");
  // A chunk for a rank that does not live here: acked with the typed error.
  ucx.send(deliverTag, deliverMessage(6, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-not-here", {3});
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(4));
  }));
  std::string e = ackOf(6);
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  EXPECT_NE(e.find("do not live on this node"), std::string::npos) << e;
  // A tensor whose body would follow as UCX pieces: messages carry bodies inline.
  ucx.send(deliverTag, deliverMessage(7, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-pieces", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::UINT8);
    t.initShape(1).set(0, 4096);
    t.setSizeBytes(4096);
    auto body = t.initBody().initUcx();
    body.setTag(9);
    body.setPieces(1);
    body.setPieceBytes(4096);
  }));
  e = ackOf(7);
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  // Inline bytes of the wrong length.
  ucx.send(deliverTag, deliverMessage(8, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-short", {0});
    auto t = c.initPayload().initTensor();
    t.setDtype(proto::Dtype::UINT8);
    t.initShape(1).set(0, 16);
    t.setSizeBytes(16);
    t.initBody().setInline(kj::heapArray<kj::byte>(8));
  }));
  e = ackOf(8);
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  // A link that is not open: dropped, no ack.
  ucx.send((1ull << 32) | (linkId + 1000), deliverMessage(9, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-nowhere", {0});
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(4));
  }));
  EXPECT_EQ(ackOf(9, 1s), "(no ack)");
  peer.heartbeatRequest().send().wait(waitScope);  // the link is still open
  // A message larger than the daemon takes (its hello said how large): UCX drops it there, and
  // the daemon goes on taking the next ones.
  std::vector<capnp::word> huge(answer.getHello().getUcxMessageMaxBytes() / sizeof(capnp::word) + 1024);
  ucx.send(deliverTag, huge.data(), huge.size() * sizeof(capnp::word));
  ucx.send(deliverTag, deliverMessage(10, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-after-huge", {0});
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(2));
  }));
  EXPECT_EQ(ackOf(10), "");
  EXPECT_NE(daemon_->err().find("delivery message could not be received"), std::string::npos)
      << daemon_->err();
  peer.heartbeatRequest().send().wait(waitScope);
  // Bytes that are no Cap'n Proto message: dropped and logged. The link and its other deliveries
  // go on (with direct sends, any executor of the sending node may have sent it).
  const char garbage[13] = "not capnp!!!";
  ucx.send(deliverTag, garbage, sizeof garbage);
  ucx.send(deliverTag, deliverMessage(11, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-after-garbage", {0});
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(5));
  }));
  EXPECT_EQ(ackOf(11), "");
  peer.heartbeatRequest().send().wait(waitScope);  // the link is still open
  EXPECT_NE(daemon_->err().find("not a PeerMessage deliver, dropped"), std::string::npos) << daemon_->err();

  // A flood of garbage does not flood the log: 300 such messages write at most a few lines (10 a
  // second), and the next line after a quiet second says how many were left out.
  auto garbageLines = [&] {
    size_t n = 0;
    std::string log = daemon_->err();
    for (size_t at = 0; (at = log.find("which is neither a Cap'n Proto", at)) != std::string::npos; ++at) ++n;
    return n;
  };
  size_t linesBefore = garbageLines();
  for (int i = 0; i < 300; ++i) ucx.send(deliverTag, garbage, sizeof garbage);
  ucx.send(deliverTag, deliverMessage(16, [](proto::PeerChunk::Builder c) {
    fillChunk(c, "ucx-after-flood", {0});
    c.initPayload().initObject().setBytes(kj::heapArray<kj::byte>(6));
  }));
  EXPECT_EQ(ackOf(16), "");  // taken after the 300: they were all read
  size_t floodLines = garbageLines() - linesBefore;
  EXPECT_GE(floodLines, 1u);
  EXPECT_LE(floodLines, 20u) << "the flood wrote a line per message";
  std::this_thread::sleep_for(1100ms);
  ucx.send(deliverTag, garbage, sizeof garbage);
  peer.heartbeatRequest().send().wait(waitScope);  // the link is still open
  std::string log;
  for (int i = 0; i < 100 && (log = daemon_->err()).find("more dropped messages not logged") == std::string::npos; ++i) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_NE(log.find("more dropped messages not logged"), std::string::npos) << log.substr(log.size() > 4000 ? log.size() - 4000 : 0);

  // Packed delivers (what executors' direct sends put on the wire): a good one is stored; one
  // whose length and counts disagree, one of an unknown dtype and one for a rank that does not
  // live here are each acked with the typed error.
  const std::vector<uint8_t> sixteen = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const auto uint8Dtype = static_cast<uint16_t>(proto::Dtype::UINT8);
  auto sendWords = [&](const std::vector<uint64_t>& words) { ucx.send(deliverTag, words.data(), words.size() * 8); };
  sendWords(packedMessage(12, "ucx-packed", {{0}}, uint8Dtype, sixteen));
  EXPECT_EQ(ackOf(12), "");
  auto lying = packedMessage(13, "ucx-packed-lying", {{0}}, uint8Dtype, sixteen);
  lying.push_back(0);  // eight bytes more than its counts add up to
  sendWords(lying);
  e = ackOf(13);
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  EXPECT_NE(e.find("does not hold its 16-byte body exactly"), std::string::npos) << e;
  sendWords(packedMessage(14, "ucx-packed-dtype", {{0}}, 999, sixteen));
  e = ackOf(14);
  EXPECT_NE(e.find("[invalid-argument]"), std::string::npos) << e;
  EXPECT_NE(e.find("dtype"), std::string::npos) << e;
  sendWords(packedMessage(15, "ucx-packed-not-here", {{3}}, uint8Dtype, sixteen));
  e = ackOf(15);
  EXPECT_NE(e.find("do not live on this node"), std::string::npos) << e;
  peer.heartbeatRequest().send().wait(waitScope);  // the link is still open

  // What was stored is served; nothing else is held.
  std::thread([&] {
    sidecar::RankConfig config;
    config.rank = 0;
    config.sendHint = {sidecar::Dtype::kUint8, {64}};
    config.socketPath = socket_;
    auto sc = sidecar::Sidecar::connect(config);
    sidecar::Received r = sc.recv("ucx-good", 0, 10'000);
    ASSERT_EQ(r.kind, sidecar::Received::Kind::kObject);
    EXPECT_EQ(r.object.bytes.size(), 3u);
    sc.markDone("ucx-good", 0);
    EXPECT_EQ(sc.recv("ucx-after-huge", 0, 10'000).object.bytes.size(), 2u);
    sc.markDone("ucx-after-huge", 0);
    EXPECT_EQ(sc.recv("ucx-after-garbage", 0, 10'000).object.bytes.size(), 5u);
    sc.markDone("ucx-after-garbage", 0);
    EXPECT_EQ(sc.recv("ucx-after-flood", 0, 10'000).object.bytes.size(), 6u);
    sc.markDone("ucx-after-flood", 0);
    sidecar::Received packed = sc.recv("ucx-packed", 0, 10'000);
    ASSERT_EQ(packed.kind, sidecar::Received::Kind::kTensor);
    ASSERT_EQ(packed.tensor.sizeBytes, 16u);
    EXPECT_EQ(std::memcmp(packed.tensor.data, sixteen.data(), 16), 0);
    sc.markDone("ucx-packed", 0);
    auto status = sidecar::Client::connectUnix(socket_).transfers();
    EXPECT_EQ(status.bytesHeld, 0u);
    EXPECT_EQ(status.items, 0u);
  }).join();
  EXPECT_TRUE(daemon_->running());
}

#endif  // SIDECAR_HAVE_UCX

}  // namespace
