// What a client claims about its direct sends (docs/PROTOCOL.md, "Direct sends") is checked by
// its daemon, never trusted: two real sidecards on loopback (node A serves ranks 0-1, node B
// ranks 2-3, UCX over TCP), and a raw client (raw_session.h) on node A that gets a direct route
// and then names, in its sends, seqs that are not its own (another session's block, a seq of the
// daemon's own space, a link that does not exist) and a seq of its own block that it never put
// on the wire. The first kind is forwarded by node A itself, so every such tensor reaches rank 2
// on node B once and intact; the unsent one fails [timeout] within the daemon's bound
// (send_timeout_ms + 2 x peers.timeout_ms) and its chunk is freed. The link survives for
// everyone, and node A holds nothing afterwards. And a daemon stopped while such an ack is awaited
// (its link held by the send in flight) stops cleanly: the link lets go of UCX before the worker
// goes.

#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <sys/stat.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../common/watchdog.h"
#include "daemon_process.h"
#include "kj_errors.h"
#include "raw_session.h"
#include "sidecar.capnp.h"
#include "sidecar_build_config.h"

namespace {

using namespace sidecar::systest;
using namespace std::chrono_literals;
namespace proto = sidecar::proto;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kSendTimeoutMs = 1000;
constexpr uint32_t kPeerTimeoutMs = 500;
constexpr const char* kOk = "(no error)";  // errorOf's answer when the call succeeded
constexpr uint32_t kDirectAckBoundMs = kSendTimeoutMs + 2 * kPeerTimeoutMs;  // the daemon's bound

class DirectClaimsTest : public ::testing::Test {
 protected:
  void SetUp() override {
#if !SIDECAR_HAVE_UCX
    GTEST_SKIP() << "direct sends need UCX, which this build lacks";
#endif
    ASSERT_FALSE(sidecardPath().empty()) << "$SIDECARD must name the sidecard binary";
    char tmpl[] = "/tmp/sidecar-direct-claims-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    int ports[2] = {freeLoopbackTcpPort(), freeLoopbackTcpPort()};
    std::string map = "0-1=127.0.0.1:" + std::to_string(ports[0]) + ",2-3=127.0.0.1:" + std::to_string(ports[1]);
    for (int i = 0; i < 2; ++i) {
      std::string node = i == 0 ? "a" : "b";
      sockets_[i] = dir_ + "/" + node + ".sock";
      daemons_[i] = Process::start(
          {sidecardPath(), "--socket", sockets_[i], "--tcp", "127.0.0.1:" + std::to_string(ports[i]),
           "--peers", map, "--arena-size", "64MiB", "--cores", "1", "--node-id", "claims-" + node,
           "--send-timeout-ms", std::to_string(kSendTimeoutMs), "--peer-timeout-ms",
           std::to_string(kPeerTimeoutMs)},
          {"UCX_TLS=tcp"}, dir_ + "/" + node + ".out", dir_ + "/" + node + ".err");
      ASSERT_NE(daemons_[i], nullptr);
    }
    for (int i = 0; i < 2; ++i) ASSERT_EQ(awaitSocket(*daemons_[i], sockets_[i]), "");
  }

  void TearDown() override {
    for (auto& d : daemons_) {
      if (d && d->running()) {
        d->signal(SIGTERM);
        auto status = d->waitFor(10s);
        EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << d->err();
      }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // From a thread of its own: the caller's may hold a raw session's event loop.
  template <typename Fn>
  static void onOwnThread(Fn&& fn) {
    std::thread t(std::forward<Fn>(fn));
    t.join();
  }

  Watchdog watchdog_{"direct claims test", std::chrono::seconds(60)};
  std::string dir_;
  std::string sockets_[2];
  std::unique_ptr<Process> daemons_[2];
};

struct Route {
  uint32_t link = 0, seqBase = 0, seqCount = 0;
};

Route directRouteTo2(proto::Session::Client& session, kj::WaitScope& ws) {
  // The first ask opens the link; ask until it is up (bounded).
  for (int i = 0; i < 100; ++i) {
    auto request = session.directRouteRequest();
    request.initDestinations(1)[0].initRanks(1).set(0, 2);
    auto route = request.send().wait(ws).getRoute();
    if (route.isUcx()) {
      auto u = route.getUcx();
      return {u.getLinkSerial(), u.getSeqBase(), u.getSeqCount()};
    }
    std::this_thread::sleep_for(50ms);
  }
  ADD_FAILURE() << "no direct route to rank 2 in 5 s";
  return {};
}

std::vector<uint8_t> bytesFor(const std::string& id) {
  std::vector<uint8_t> bytes(64);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(id[i % id.size()] + i);
  return bytes;
}

// A Session.send of a 64-byte inline tensor for rank 2, naming `link` and `seq` as its direct
// message, sent; the caller waits for its answer.
kj::Promise<capnp::Response<proto::Session::SendResults>> claim(proto::Session::Client& session,
                                                               const std::string& id, uint32_t link,
                                                               uint32_t seq) {
  auto request = session.sendRequest();
  request.setDataId(id);
  request.setChunkId(0);
  request.setNumChunks(1);
  request.initDestinations(1)[0].initRanks(1).set(0, 2);
  auto t = request.initPayload().initInlineTensor();
  t.setDtype(proto::Dtype::UINT8);
  t.initShape(1).set(0, 64);
  auto bytes = bytesFor(id);
  t.setBytes(kj::arrayPtr(bytes.data(), bytes.size()));
  request.setDirectLink(link);
  request.setDirectSeq(seq);
  return request.send();
}

// claim(), waited for: errorOf's "(no error)" when it succeeded, else its error.
std::string sendClaiming(proto::Session::Client& session, kj::WaitScope& ws, const std::string& id,
                         uint32_t link, uint32_t seq) {
  return errorOf([&] { claim(session, id, link, seq).wait(ws); });
}

TEST_F(DirectClaimsTest, ForgedDirectSeqsAreForwardedAndUnsentOnesTimeOut) {
  const std::vector<std::string> forwarded = {"claims-other-session", "claims-daemon-seq",
                                              "claims-no-such-link", "claims-after"};
  {
    RawSession raw(sockets_[0], 0);
    Route mine = directRouteTo2(raw.session(), raw.ws());
    ASSERT_NE(mine.link, 0u);
    ASSERT_GT(mine.seqCount, 0u);
    // A second session on the same connection (rank 1): its own block on the same link.
    auto reg = raw.main().registerRequest();
    auto r = reg.initRegistration();
    r.setRank(1);
    r.initGroup(1).set(0, 1);
    r.initSendHint().setDtype(proto::Dtype::UINT8);
    r.getSendHint().initRowShape(1).set(0, 64);
    auto other = reg.send().wait(raw.ws()).getSession();
    Route theirs = directRouteTo2(other, raw.ws());
    ASSERT_EQ(theirs.link, mine.link);
    ASSERT_NE(theirs.seqBase, mine.seqBase) << "each session has a block of its own";

    EXPECT_EQ(sendClaiming(raw.session(), raw.ws(), forwarded[0], mine.link, theirs.seqBase), kOk)
        << "a seq of another session's block is forwarded by the daemon";
    EXPECT_EQ(sendClaiming(raw.session(), raw.ws(), forwarded[1], mine.link, 1), kOk)
        << "a seq of the daemon's own space is forwarded";
    EXPECT_EQ(sendClaiming(raw.session(), raw.ws(), forwarded[2], mine.link + 1000, mine.seqBase), kOk)
        << "a link that does not exist: forwarded";

    auto started = Clock::now();
    std::string unsent = sendClaiming(raw.session(), raw.ws(), "claims-unsent", mine.link, mine.seqBase);
    auto tookMs = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count();
    EXPECT_NE(unsent.find("[timeout]"), std::string::npos) << unsent;
    EXPECT_NE(unsent.find("never arrived"), std::string::npos) << unsent;
    EXPECT_GE(tookMs, kDirectAckBoundMs - 100);
    EXPECT_LT(tookMs, kDirectAckBoundMs + 5000) << "the unacked claim failed within its bound";

    // The link survived: a plain send (no claim) still goes through.
    EXPECT_EQ(sendClaiming(raw.session(), raw.ws(), forwarded[3], 0, 0), kOk);
  }

  onOwnThread([&] {
    sidecar::RankConfig config;
    config.rank = 2;
    config.sendHint = {sidecar::Dtype::kUint8, {64}};
    config.socketPath = sockets_[1];
    sidecar::Sidecar receiver = sidecar::Sidecar::connect(config);
    for (const std::string& id : forwarded) {
      sidecar::Received got = receiver.recv(id, 0, 10'000);
      ASSERT_EQ(got.kind, sidecar::Received::Kind::kTensor) << id;
      auto want = bytesFor(id);
      ASSERT_EQ(got.tensor.sizeBytes, want.size()) << id;
      EXPECT_EQ(std::memcmp(got.tensor.data, want.data(), want.size()), 0) << id << " arrived intact";
      receiver.markDone(id, 0);
    }
    try {
      receiver.recv("claims-unsent", 0, 300);
      ADD_FAILURE() << "the unsent claim reached node B";
    } catch (const sidecar::Error& e) {
      EXPECT_EQ(e.code(), sidecar::ErrorCode::kTimeout) << "the unsent claim never reached node B: " << e.what();
    }

    // Each forwarded tensor was stored once on node B (none twice), and node A holds nothing.
    auto b = sidecar::Client::connectUnix(sockets_[1]).transfers();
    EXPECT_EQ(b.duplicatesDropped, 0u);
    auto a = sidecar::Client::connectUnix(sockets_[0]);
    uint64_t used = 1;
    for (int i = 0; i < 250 && used != 0; ++i) {
      auto arena = a.status().arena;
      used = arena ? arena->usedBytes : 1;
      if (used != 0) std::this_thread::sleep_for(20ms);
    }
    EXPECT_EQ(used, 0u) << "node A freed every chunk, the timed-out one too";
    EXPECT_EQ(a.transfers().bytesHeld, 0u);
  });
  for (auto& d : daemons_) ASSERT_TRUE(d->running()) << d->err();
}

TEST_F(DirectClaimsTest, StoppingWhileAnAckIsAwaitedIsClean) {
  RawSession raw(sockets_[0], 0);
  Route mine = directRouteTo2(raw.session(), raw.ws());
  ASSERT_NE(mine.link, 0u);
  // A seq of its own it never sent: node A awaits its ack.
  auto inFlight = claim(raw.session(), "claims-in-flight", mine.link, mine.seqBase);
  // Until node A has taken the send (its answer cannot come before the bound).
  for (int i = 0; i < 20; ++i) {
    EXPECT_FALSE(inFlight.poll(raw.ws()));
    std::this_thread::sleep_for(10ms);
  }
  daemons_[0]->signal(SIGTERM);
  auto status = daemons_[0]->waitFor(10s);
  ASSERT_TRUE(status.has_value()) << "node A did not stop";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
      << "node A did not stop cleanly (status " << *status << "):\n" << daemons_[0]->err();
}

}  // namespace
