// Lanes (docs/LANES.md) against the real sidecard ($SIDECARD):
// - a raw client (Cap'n Proto and the lane ring, no libsidecar) opens its session's lane, and a
//   send pushed as a LaneRequest record is answered `done` and reaches a libsidecar receiver:
//   the lane carries traffic, it is not only set up;
// - bad requests on the lane get the same typed errors as calls; a second openLane is refused;
// - a client that scribbles on its ring, pushes a record that is not a LaneRequest, or never reads
//   its completions gets its lane closed with a logged reason; the daemon, the same session's calls
//   and other clients go on working;
// - through libsidecar, objects (also one over the lane's 16 KiB answer limit, which falls back to
//   a call), inline and zero-copy tensors, idempotent recv and the errors after markDone behave the
//   same with lanes as with calls only (SIDECAR_LANE=0);
// - a recv waiting on the lane when the daemon is killed fails with kDisconnected.

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/serialize.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../common/watchdog.h"
#include "kj_errors.h"
#include "local_daemon.h"
#include "reactor/kj_event_port.h"
#include "reactor/socket.h"
#include "reactor/uring_stream.h"
#include "shm/lane_ring.h"
#include "sidecar.capnp.h"

namespace {

using namespace sidecar::systest;
using namespace std::chrono_literals;
namespace proto = sidecar::proto;
using sidecar::Dtype;
using sidecar::Error;
using sidecar::ErrorCode;
using sidecar::Object;
using sidecar::Received;
using sidecar::Sidecar;
using sidecar::shm::LaneMemory;
using sidecar::shm::LaneRing;

constexpr uint32_t kRecvTimeoutMs = 20'000;

// A client that speaks Cap'n Proto itself and drives its lane by hand.
class RawLaneClient {
 public:
  RawLaneClient(const std::string& socket, int32_t rank)
      : stream_(kj::heap<sidecar::reactor::UringStream>(loop_.reactor(), sidecar::reactor::connectUnix(socket))),
        rpc_(static_cast<kj::AsyncCapabilityStream&>(*stream_), 4),
        main_(rpc_.bootstrap().castAs<proto::Sidecar>()) {
    stream_->setReadAhead(false);  // fds follow
    auto reg = main_.registerRequest();
    auto r = reg.initRegistration();
    r.setRank(rank);
    r.initGroup(1).set(0, rank);
    r.initSendHint().setDtype(proto::Dtype::UINT8);
    r.getSendHint().initRowShape(1).set(0, 64);
    r.initRecvHint().setDtype(proto::Dtype::UINT8);
    r.getRecvHint().initRowShape(1).set(0, 64);
    auto registered = reg.send().wait(ws());
    session_ = registered.getSession();
  }

  kj::WaitScope& ws() { return loop_.waitScope(); }
  proto::Session::Client& session() { return session_; }
  proto::Sidecar::Client& main() { return main_; }

  // Opens the lane; returns objectMaxBytes.
  uint32_t openLane() {
    auto response = session_.openLaneRequest().send().wait(ws());
    memoryFd_ = takeFd(response.getMemory());
    requestBell_ = takeFd(response.getRequestBell());
    completionBell_ = takeFd(response.getCompletionBell());
    auto memory = LaneMemory::map(memoryFd_.get());
    EXPECT_TRUE(memory.ok()) << memory.error().message;
    memory_.emplace(std::move(memory).value());
    return response.getObjectMaxBytes();
  }

  LaneRing requests() { return memory_->requests(); }
  LaneRing completions() { return memory_->completions(); }

  // Pushes raw bytes as one record and rings the daemon if it sleeps.
  bool pushRaw(const void* bytes, uint64_t size) {
    LaneRing ring = requests();
    if (!ring.tryPush(bytes, size)) return false;
    if (ring.takeDoorbell()) {
      uint64_t one = 1;
      EXPECT_EQ(write(requestBell_.get(), &one, sizeof one), 8);
    }
    return true;
  }

  // Wakes the daemon whether or not it armed (as a hostile client might).
  void ringBell() {
    uint64_t one = 1;
    EXPECT_EQ(write(requestBell_.get(), &one, sizeof one), 8);
  }

  bool push(capnp::MallocMessageBuilder& message) {
    auto flat = capnp::messageToFlatArray(message);
    return pushRaw(flat.begin(), flat.size() * sizeof(capnp::word));
  }

  // The next completion (copied), waiting up to 10 s; an empty vector if none came.
  std::vector<uint64_t> nextCompletion(uint64_t& size) {
    LaneRing ring = completions();
    std::vector<uint64_t> words;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::string why;
      auto result = ring.tryPop(words, size, &why);
      EXPECT_NE(result, LaneRing::Pop::kCorrupt) << why;
      if (result == LaneRing::Pop::kRecord) return words;
      std::this_thread::sleep_for(1ms);
    }
    return {};
  }

 private:
  template <typename Handle>
  kj::AutoCloseFd takeFd(Handle handle) {
    KJ_IF_MAYBE(fd, handle.getFd().wait(ws())) { return kj::AutoCloseFd(fcntl(*fd, F_DUPFD_CLOEXEC, 0)); }
    ADD_FAILURE() << "openLane passed no fd";
    return kj::AutoCloseFd();
  }

  sidecar::reactor::ReactorLoop loop_;
  kj::Own<sidecar::reactor::UringStream> stream_;
  capnp::TwoPartyClient rpc_;
  proto::Sidecar::Client main_;
  proto::Session::Client session_ = nullptr;
  kj::AutoCloseFd memoryFd_, requestBell_, completionBell_;
  std::optional<LaneMemory> memory_;
};

// A LaneRequest send of an object to rank `to`.
void buildObjectSend(capnp::MallocMessageBuilder& message, uint64_t seq, const std::string& id,
                     const std::string& bytes, uint32_t chunkId = 0, uint32_t numChunks = 1, int32_t to = 1) {
  auto request = message.initRoot<proto::LaneRequest>();
  request.setSeq(seq);
  request.setDataId(id);
  request.setChunkId(chunkId);
  auto send = request.initSend();
  send.setNumChunks(numChunks);
  send.initDestinations(1)[0].initRanks(1).set(0, to);
  auto object = send.initPayload().initObject();
  object.setTypeTag(3);
  object.setBytes(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
}

struct Completion {
  uint64_t seq = 0;
  std::string what;  // "done", "received", "useCall" or the failure's text
};

Completion readCompletion(RawLaneClient& client) {
  uint64_t size = 0;
  auto words = client.nextCompletion(size);
  if (words.empty()) return {0, "(no completion within 10 s)"};
  capnp::FlatArrayMessageReader reader(kj::arrayPtr(reinterpret_cast<const capnp::word*>(words.data()), size / 8));
  auto c = reader.getRoot<proto::LaneCompletion>();
  switch (c.which()) {
    case proto::LaneCompletion::DONE: return {c.getSeq(), "done"};
    case proto::LaneCompletion::RECEIVED: return {c.getSeq(), "received"};
    case proto::LaneCompletion::USE_CALL: return {c.getSeq(), "useCall"};
    case proto::LaneCompletion::FAILED: return {c.getSeq(), c.getFailed().cStr()};
  }
  return {c.getSeq(), "(unknown)"};
}

class LaneTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(daemon_.start("lanes")); }

  // The daemon is alive and a fresh pair of libsidecar clients still moves an object.
  void expectDaemonServes(const std::string& id) {
    ASSERT_TRUE(daemon_.process().running()) << daemon_.process().err();
    Sidecar a = Sidecar::connect(daemon_.rankConfig(10));
    Sidecar b = Sidecar::connect(daemon_.rankConfig(11));
    a.send(id, Object{1, "still serving"}, {{11}}).wait();
    Received r = b.recv(id, 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kObject);
    EXPECT_EQ(r.object.bytes, "still serving");
    b.markDone(id, 0);
  }

  Watchdog watchdog_{"lane test", std::chrono::seconds(90)};
  LocalDaemon daemon_;
};

TEST_F(LaneTest, RawLaneRequestsAreAnsweredAndTyped) {
  {
  // The raw client has its own KJ event loop: libsidecar's (one per thread) only after it is gone.
  RawLaneClient raw(daemon_.socket(), 0);
  EXPECT_EQ(raw.openLane(), 16u * 1024);
  std::string second = errorOf([&] { raw.session().openLaneRequest().send().wait(raw.ws()); });
  EXPECT_NE(second.find("[invalid-argument]"), std::string::npos) << second;

  capnp::MallocMessageBuilder good;
  buildObjectSend(good, 5, "lane-raw", "over the lane");
  ASSERT_TRUE(raw.push(good));
  Completion c = readCompletion(raw);
  EXPECT_EQ(c.seq, 5u);
  EXPECT_EQ(c.what, "done");

  capnp::MallocMessageBuilder outOfRange;
  buildObjectSend(outOfRange, 6, "lane-bad", "x", /*chunkId=*/3, /*numChunks=*/2);
  ASSERT_TRUE(raw.push(outOfRange));
  c = readCompletion(raw);
  EXPECT_EQ(c.seq, 6u);
  EXPECT_EQ(c.what.rfind("[chunk-out-of-range]", 0), 0u) << c.what;

  capnp::MallocMessageBuilder mismatch;  // an inline tensor whose bytes do not match its shape
  auto request = mismatch.initRoot<proto::LaneRequest>();
  request.setSeq(7);
  request.setDataId("lane-mismatch");
  auto send = request.initSend();
  send.setNumChunks(1);
  send.initDestinations(1)[0].initRanks(1).set(0, 1);
  auto t = send.initPayload().initInlineTensor();
  t.setDtype(proto::Dtype::FLOAT32);
  t.initShape(1).set(0, 100);
  t.initBytes(64);
  ASSERT_TRUE(raw.push(mismatch));
  c = readCompletion(raw);
  EXPECT_EQ(c.seq, 7u);
  EXPECT_EQ(c.what.rfind("[invalid-argument]", 0), 0u) << c.what;

  }
  // The good send arrived, through libsidecar on the other end.
  Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
  Received r = receiver.recv("lane-raw", 0, kRecvTimeoutMs);
  ASSERT_EQ(r.kind, Received::Kind::kObject);
  EXPECT_EQ(r.object.typeTag, 3u);
  EXPECT_EQ(r.object.bytes, "over the lane");
  receiver.markDone("lane-raw", 0);
  EXPECT_THROW(receiver.recv("lane-mismatch", 0, 100), Error);
}

// Waits (up to 10 s) until the daemon's log says a lane was closed `times` times.
void expectLaneClosedLogged(LocalDaemon& daemon, size_t times, const std::string& reason) {
  auto count = [&]() {
    std::string err = daemon.process().err();
    size_t n = 0;
    for (size_t at = err.find("lane closed"); at != std::string::npos; at = err.find("lane closed", at + 1)) ++n;
    return n;
  };
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (count() < times && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
  std::string err = daemon.process().err();
  EXPECT_EQ(count(), times) << err;
  EXPECT_NE(err.find(reason), std::string::npos) << err;
}

TEST_F(LaneTest, BrokenLanesCloseAloneAndCallsGoOn) {
  // 1. A record that is not a LaneRequest.
  {
    RawLaneClient raw(daemon_.socket(), 0);
    raw.openLane();
    uint64_t garbage[4] = {0xdeadbeefdeadbeef, 1, 2, 3};
    ASSERT_TRUE(raw.pushRaw(garbage, sizeof garbage));
    raw.ringBell();
    expectLaneClosedLogged(daemon_, 1, "not a LaneRequest");
    // Requests after that are not read.
    capnp::MallocMessageBuilder later;
    buildObjectSend(later, 2, "after-close", "x");
    ASSERT_TRUE(raw.push(later));
    raw.ringBell();
    std::this_thread::sleep_for(200ms);
    std::vector<uint64_t> words;
    uint64_t size = 0;
    EXPECT_EQ(raw.completions().tryPop(words, size, nullptr), LaneRing::Pop::kEmpty);

    // The same session's calls still work.
    auto call = raw.session().sendRequest();
    call.setDataId("by-call");
    call.setNumChunks(1);
    call.initDestinations(1)[0].initRanks(1).set(0, 1);
    std::string bytes = "by call";
    call.initPayload().initObject().setBytes(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
    call.send().wait(raw.ws());
  }
  {
    Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
    Received r = receiver.recv("by-call", 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kObject);
    EXPECT_EQ(r.object.bytes, "by call");
    receiver.markDone("by-call", 0);
  }
  ASSERT_NO_FATAL_FAILURE(expectDaemonServes("after-garbage"));

  // 2. A producer position far past the consumer's.
  {
    RawLaneClient raw(daemon_.socket(), 0);
    raw.openLane();
    capnp::MallocMessageBuilder good;
    buildObjectSend(good, 1, "before-scribble", "x");
    ASSERT_TRUE(raw.push(good));
    ASSERT_EQ(readCompletion(raw).what, "done");
    raw.requests().sharedState().head.fetch_add(uint64_t{1} << 40);
    raw.ringBell();
    expectLaneClosedLogged(daemon_, 2, "request ring is corrupt");
  }
  ASSERT_NO_FATAL_FAILURE(expectDaemonServes("after-scribble"));

  // 3. A client that never reads its completions: each markDone of an unknown id is answered with
  // a failure at once; when the completion ring is full the daemon closes the lane rather than
  // wait for room.
  // 4. A client that ignores its credits with recvs that wait (no data, no timeout): the daemon
  // would hold ever more waiters; it closes the lane once they are more than the ring can answer.
  for (bool waitingRecvs : {false, true}) {
    RawLaneClient raw(daemon_.socket(), 0);
    raw.openLane();
    int pushed = 0;
    size_t closedBefore = waitingRecvs ? 3 : 2;
    auto closed = [&]() {
      std::string err = daemon_.process().err();
      size_t n = 0;
      for (size_t at = err.find("lane closed"); at != std::string::npos; at = err.find("lane closed", at + 1)) ++n;
      return n > closedBefore;
    };
    for (int i = 0; i < 40'000 && !closed(); ++i) {
      capnp::MallocMessageBuilder message;
      auto request = message.initRoot<proto::LaneRequest>();
      request.setSeq(static_cast<uint64_t>(i));
      request.setDataId("unknown-" + std::to_string(i));
      if (waitingRecvs) {
        request.initRecv().setTimeoutMs(0);
      } else {
        request.setMarkDone();
      }
      if (raw.push(message)) {
        ++pushed;
      } else {
        std::this_thread::sleep_for(1ms);  // the request ring is full: the daemon reads on
      }
      if (i % 100 == 99) raw.ringBell();
    }
    raw.ringBell();
    expectLaneClosedLogged(daemon_, closedBefore + 1,
                           waitingRecvs ? "ignores its credits" : "completion ring is full");
    EXPECT_GT(pushed, waitingRecvs ? 50 : 900);
  }
  ASSERT_NO_FATAL_FAILURE(expectDaemonServes("after-flood"));
}

// Runs `body` with libsidecar's lanes on or off (SIDECAR_LANE), restoring the environment.
template <typename Body>
void withLanes(bool on, Body&& body) {
  setenv("SIDECAR_LANE", on ? "1" : "0", 1);
  body();
  unsetenv("SIDECAR_LANE");
}

// What one pass of the API cases saw: one line per case, compared between lanes and calls.
std::vector<std::string> apiCases(LocalDaemon& daemon, const std::string& prefix) {
  std::vector<std::string> seen;
  Sidecar sender = Sidecar::connect(daemon.rankConfig(0));
  Sidecar receiver = Sidecar::connect(daemon.rankConfig(1));
  auto code = [](auto&& call) -> std::string {
    try {
      call();
      return "ok";
    } catch (const Error& e) {
      return sidecar::toString(e.code());
    }
  };
  // Objects: small, and one over the lane's answer limit (16 KiB), which recv fetches by call.
  for (size_t bytes : {size_t{64}, size_t{17 * 1024}}) {
    std::string id = prefix + "obj-" + std::to_string(bytes);
    std::string payload(bytes, 'a');
    for (size_t i = 0; i < bytes; ++i) payload[i] = static_cast<char>('a' + (i * 7 + bytes) % 26);
    sender.send(id, Object{9, payload}, {{1}}).wait();
    Received first = receiver.recv(id, 0, kRecvTimeoutMs);
    Received again = receiver.recv(id, 0, kRecvTimeoutMs);  // idempotent until markDone
    EXPECT_EQ(first.kind, Received::Kind::kObject);
    EXPECT_EQ(first.object.bytes, payload) << id;
    EXPECT_EQ(again.object.bytes, payload) << id;
    EXPECT_EQ(first.object.typeTag, 9u);
    receiver.markDone(id, 0);
    seen.push_back("recv after markDone: " + code([&] { receiver.recv(id, 0, 100); }));
    seen.push_back("second markDone: " + code([&] { receiver.markDone(id, 0); }));
  }
  // A 4 KiB inline tensor and a zero-copy one.
  std::vector<float> values(1024);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f;
  sender.send(prefix + "inline", sidecar::TensorRef{Dtype::kFloat32, {4, 256}, {}, values.data()}, {{1}}).wait();
  auto arena = sender.allocateTensor(Dtype::kFloat32, {1024});
  memcpy(arena.data(), values.data(), 4096);
  sender.send(prefix + "zero-copy", std::move(arena), {{1}}).wait();
  for (const char* name : {"inline", "zero-copy"}) {
    Received r = receiver.recv(prefix + name, 0, kRecvTimeoutMs);
    EXPECT_EQ(r.kind, Received::Kind::kTensor);
    EXPECT_EQ(r.tensor.dtype, Dtype::kFloat32);
    EXPECT_EQ(r.tensor.sizeBytes, 4096u);
    if (r.tensor.sizeBytes == 4096) EXPECT_EQ(memcmp(r.tensor.data, values.data(), 4096), 0) << name;
    receiver.markDone(prefix + name, 0);
  }
  // Bad input gives the same codes.
  seen.push_back("chunk out of range: " +
                 code([&] { sender.send(prefix + "bad", Object{1, "x"}, {{1}}, 5, 2).wait(); }));
  seen.push_back("negative rank: " + code([&] { sender.send(prefix + "neg", Object{1, "x"}, {{-3}}).wait(); }));
  seen.push_back("recv timeout: " + code([&] { receiver.recv(prefix + "never", 0, 50); }));
  return seen;
}

TEST_F(LaneTest, LibsidecarBehavesTheSameWithAndWithoutLanes) {
  std::vector<std::string> withLane, withCalls;
  withLanes(true, [&] { withLane = apiCases(daemon_, "l-"); });
  withLanes(false, [&] { withCalls = apiCases(daemon_, "c-"); });
  EXPECT_EQ(withLane, withCalls);
  ASSERT_FALSE(withLane.empty());
  EXPECT_EQ(withLane.front(), "recv after markDone: already-done");

  // `sidecarctl status` counts the lanes a core serves: one per Sidecar with lanes, none without,
  // and none once the Sidecar is gone.
  auto lanesOpen = [&](uint32_t expected) {
    uint32_t lanes = 0;
    for (int i = 0; i < 200; ++i) {
      lanes = 0;
      for (const auto& core : sidecar::Client::connectUnix(daemon_.socket()).status().cores) lanes += core.lanes;
      if (lanes == expected) break;
      std::this_thread::sleep_for(10ms);
    }
    return lanes;
  };
  withLanes(true, [&] {
    Sidecar a = Sidecar::connect(daemon_.rankConfig(0));
    EXPECT_EQ(lanesOpen(1), 1u);
  });
  EXPECT_EQ(lanesOpen(0), 0u);
  withLanes(false, [&] {
    Sidecar a = Sidecar::connect(daemon_.rankConfig(0));
    EXPECT_EQ(lanesOpen(0), 0u);
  });
}

TEST_F(LaneTest, RecvWaitingOnTheLaneFailsWhenTheDaemonDies) {
  Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
  std::thread killer([&] {
    std::this_thread::sleep_for(300ms);
    daemon_.process().kill9();
  });
  try {
    receiver.recv("never-sent", 0, 60'000);
    ADD_FAILURE() << "recv returned after the daemon died";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDisconnected) << e.what();
  }
  killer.join();
}

}  // namespace
