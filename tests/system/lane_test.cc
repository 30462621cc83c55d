// Lanes (docs/LANES.md) against the real sidecard ($SIDECARD):
// - a raw client (Cap'n Proto and the lane ring, no libsidecar) opens its session's lane, and a
//   send pushed as a LaneRequest record is answered `done` and reaches a libsidecar receiver:
//   the lane carries traffic, it is not only set up; completions come back matched by seq, a
//   waiting recv not holding back the requests behind it; an object over objectMaxBytes is
//   answered useCall and the same recv as a call gets it;
// - bad requests on the lane get the same typed errors as calls (a request kind the daemon does
//   not know included, a long failure cut to 512 bytes), and the lane stays open; a second
//   openLane is refused; an allocate on the lane is answered with a place in the arena that the
//   session then holds (a release call takes it back), one larger than the arena [too-large];
//   one still waiting for space when its lane breaks gives the space back once it comes;
// - a client that scribbles on its ring (each way the ring's consumer checks: bad magic, a size
//   past the producer's position or over the largest record, a stray wrap marker, a misaligned or
//   backward position), pushes a record that is not a LaneRequest, never reads its completions or
//   ignores its credits gets its lane closed with a logged reason; the daemon, the same session's
//   calls (send and recv) and other clients go on working;
// - through libsidecar, objects (also one over the lane's 16 KiB answer limit, which falls back to
//   a call), inline and zero-copy tensors (allocateTensor included), idempotent recv, the errors
//   after markDone and of bad input (an allocation larger than the arena, one that waits past
//   its timeout for a full arena) behave the same with lanes as with calls only
//   (SIDECAR_LANE=0), and with lanes every one
//   of those requests is seen to travel on the lane (its rings, read through libsidecar's own
//   mapping), so a libsidecar that quietly stops using its lane fails here;
// - a recv waiting on the lane when the daemon is killed fails with kDisconnected;
// - a SIDECAR_LANE that is neither 0 nor 1 is refused at connect.

#include <capnp/any.h>
#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/serialize.h>
#include <capnp/schema.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/sidecar.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../common/watchdog.h"
#include "kj_errors.h"
#include "local_daemon.h"
#include "raw_session.h"
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

// A raw client (raw_session.h) that drives its lane by hand.
class RawLaneClient : public RawSession {
 public:
  RawLaneClient(const std::string& socket, int32_t rank) : RawSession(socket, rank) {}

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

  // Writes `bytes` at `offset` of the request ring's data (as a producer breaking the format would).
  void scribbleRequests(uint64_t offset, const void* bytes, size_t size) {
    if (mapping_ == nullptr) {
      mappedBytes_ = 4096 + 2 * memory_->ringBytes();  // the header page, then both rings
      void* p = mmap(nullptr, mappedBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, memoryFd_.get(), 0);
      ASSERT_NE(p, MAP_FAILED) << strerror(errno);
      mapping_ = static_cast<std::byte*>(p);
    }
    ASSERT_LE(offset + size, memory_->ringBytes());
    memcpy(mapping_ + 4096 + offset, bytes, size);
  }

  ~RawLaneClient() {
    if (mapping_ != nullptr) munmap(mapping_, mappedBytes_);
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

  kj::AutoCloseFd memoryFd_, requestBell_, completionBell_;
  std::optional<LaneMemory> memory_;
  std::byte* mapping_ = nullptr;
  size_t mappedBytes_ = 0;
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
  std::string what;    // "done", "received", "useCall", "allocated" or the failure's text
  std::string object;  // a received object's bytes
  uint64_t offset = 0, sizeBytes = 0;  // an allocate's answer
};

Completion readCompletion(RawLaneClient& client) {
  uint64_t size = 0;
  auto words = client.nextCompletion(size);
  if (words.empty()) return {0, "(no completion within 10 s)"};
  capnp::FlatArrayMessageReader reader(kj::arrayPtr(reinterpret_cast<const capnp::word*>(words.data()), size / 8));
  auto c = reader.getRoot<proto::LaneCompletion>();
  switch (c.which()) {
    case proto::LaneCompletion::DONE: return {c.getSeq(), "done"};
    case proto::LaneCompletion::RECEIVED: {
      std::string object;
      if (c.getReceived().isObject()) {
        auto bytes = c.getReceived().getObject().getBytes();
        object.assign(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
      }
      return {c.getSeq(), "received", object};
    }
    case proto::LaneCompletion::USE_CALL: return {c.getSeq(), "useCall"};
    case proto::LaneCompletion::FAILED: return {c.getSeq(), c.getFailed().cStr()};
    case proto::LaneCompletion::ALLOCATED:
      return {c.getSeq(), "allocated", "", c.getAllocated().getOffset(), c.getAllocated().getSizeBytes()};
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

  // Allocations over the lane: answered with the place (within the 64 MiB arena, at least the
  // size asked, at least a byte for an empty one); one larger than the arena is refused, typed.
  auto allocate = [&](uint64_t seq, uint64_t sizeBytes) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::LaneRequest>();
    request.setSeq(seq);
    request.initAllocate().setSizeBytes(sizeBytes);
    EXPECT_TRUE(raw.push(message));
    return readCompletion(raw);
  };
  for (uint64_t sizeBytes : {uint64_t{4096}, uint64_t{0}, uint64_t{3} << 20}) {
    c = allocate(10, sizeBytes);
    EXPECT_EQ(c.seq, 10u);
    EXPECT_EQ(c.what, "allocated") << sizeBytes;
    EXPECT_GE(c.sizeBytes, std::max<uint64_t>(sizeBytes, 1));
    EXPECT_LE(c.offset + c.sizeBytes, uint64_t{64} << 20);
    // Each is this session's, as a call's: release (a call) takes it back.
    auto release = raw.session().releaseRequest();
    release.setOffset(c.offset);
    EXPECT_NO_THROW(release.send().wait(raw.ws())) << sizeBytes;
  }
  c = allocate(11, uint64_t{1} << 40);
  EXPECT_EQ(c.seq, 11u);
  EXPECT_EQ(c.what.rfind("[too-large]", 0), 0u) << c.what;

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

// A LaneRequest recv.
void buildRecv(capnp::MallocMessageBuilder& message, uint64_t seq, const std::string& id, uint32_t timeoutMs) {
  auto request = message.initRoot<proto::LaneRequest>();
  request.setSeq(seq);
  request.setDataId(id);
  request.initRecv().setTimeoutMs(timeoutMs);
}

void buildMarkDone(capnp::MallocMessageBuilder& message, uint64_t seq, const std::string& id) {
  auto request = message.initRoot<proto::LaneRequest>();
  request.setSeq(seq);
  request.setDataId(id);
  request.setMarkDone();
}

// The daemon's waiters (from `sidecarctl status`'s transfer summary), once they are `expected`
// or after 5 s. Asked from a thread of its own: this one may have a raw client's event loop.
uint64_t waitersOnceThey(const LocalDaemon& daemon, uint64_t expected) {
  uint64_t waiters = 0;
  std::thread asker([&] {
    for (int i = 0; i < 500; ++i) {
      waiters = sidecar::Client::connectUnix(daemon.socket()).transfers().waiters;
      if (waiters == expected) break;
      std::this_thread::sleep_for(10ms);
    }
  });
  asker.join();
  return waiters;
}

// Rank `rank`'s bytes allocated and not sent (`sidecarctl transfers`), once they are `expected` or
// after 5 s. From a thread of its own, as waitersOnceThey.
uint64_t allocatedOnceThey(const LocalDaemon& daemon, int32_t rank, uint64_t expected) {
  uint64_t bytes = 0;
  std::thread asker([&] {
    for (int i = 0; i < 500; ++i) {
      bytes = 0;
      for (const auto& r : sidecar::Client::connectUnix(daemon.socket()).transfers().ranks) {
        if (r.rank == rank) bytes = r.bytesAllocated;
      }
      if (bytes == expected) break;
      std::this_thread::sleep_for(10ms);
    }
  });
  asker.join();
  return bytes;
}

// A `cancel` request withdraws a waiting recv: the recv is answered [cancelled] (its credits come
// back), the cancel `done`; cancelling it again, or a seq that is no waiting recv, is `done` and
// changes nothing.
TEST_F(LaneTest, RawCancelWithdrawsAWaitingRecv) {
  RawLaneClient raw(daemon_.socket(), 0);
  ASSERT_GT(raw.openLane(), 0u);
  capnp::MallocMessageBuilder recv;
  buildRecv(recv, 1, "lane-never-sent", 60'000);
  ASSERT_TRUE(raw.push(recv));
  EXPECT_EQ(waitersOnceThey(daemon_, 1), 1u);
  auto cancel = [&](uint64_t seq, uint64_t target) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::LaneRequest>();
    request.setSeq(seq);
    request.setCancel(target);
    return raw.push(message);
  };
  ASSERT_TRUE(cancel(2, 1));
  Completion c = readCompletion(raw);
  EXPECT_EQ(c.seq, 1u);
  EXPECT_EQ(c.what.rfind("[cancelled]", 0), 0u) << c.what;
  c = readCompletion(raw);
  EXPECT_EQ(c.seq, 2u);
  EXPECT_EQ(c.what, "done");
  EXPECT_EQ(waitersOnceThey(daemon_, 0), 0u);
  ASSERT_TRUE(cancel(3, 1));   // again
  ASSERT_TRUE(cancel(4, 99));  // never a request
  c = readCompletion(raw);
  EXPECT_EQ(c.seq, 3u);
  EXPECT_EQ(c.what, "done");
  c = readCompletion(raw);
  EXPECT_EQ(c.seq, 4u);
  EXPECT_EQ(c.what, "done");
}

// recvAsync handles dropped unwaited withdraw their recvs from the daemon: none is left waiting,
// and the lane's credits come back, so later requests still go over the lane (without the cancel,
// each held ~17 KiB of credit until its 60 s timeout, and the lane ran dry after ~60).
TEST_F(LaneTest, DroppedRecvsAreWithdrawnFromTheDaemon) {
  Sidecar receiver = Sidecar::connect(daemon_.rankConfig(2));
  Sidecar sender = Sidecar::connect(daemon_.rankConfig(3));
  for (int i = 0; i < 200; ++i) {
    sidecar::RecvHandle dropped = receiver.recvAsync("lane-dropped-" + std::to_string(i), 0, 60'000);
  }
  EXPECT_EQ(waitersOnceThey(daemon_, 0), 0u);
  // A round trip runs this client's loop: the answers to the cancelled recvs come in, and with
  // them their credits.
  sender.send("lane-round-trip", Object{1, "x"}, {{2}}).wait();
  receiver.recv("lane-round-trip", 0, kRecvTimeoutMs);
  receiver.markDone("lane-round-trip", 0);
  // A recv goes over the lane again: it is in the daemon's table at once, while this thread only
  // waits for the count (a call would stay in this client's write buffer until its loop runs).
  sidecar::RecvHandle pending = receiver.recvAsync("lane-after-drops", 0, kRecvTimeoutMs);
  EXPECT_EQ(waitersOnceThey(daemon_, 1), 1u);
  sender.send("lane-after-drops", Object{1, "still on the lane"}, {{2}}).wait();
  Received r = pending.wait();
  ASSERT_EQ(r.kind, Received::Kind::kObject);
  EXPECT_EQ(r.object.bytes, "still on the lane");
  receiver.markDone("lane-after-drops", 0);
}

// The same from a session on a core that does not own the transfers (the recv reaches the table
// through the owner's executor, and its withdrawal through the same).
TEST(LaneOtherCore, DroppedRecvsAreWithdrawnToo) {
  if (coresToUse() < 2) GTEST_SKIP() << "needs 2 CPUs for a daemon with 2 cores";
  LocalDaemon daemon;
  ASSERT_NO_FATAL_FAILURE(daemon.start("lanes-2cores", "64MiB", {"--cores", "2"}));
  // Connections are dealt to the cores in turn: this one takes core 0, the receiver's core 1.
  sidecar::Client first = sidecar::Client::connectUnix(daemon.socket());
  Sidecar receiver = Sidecar::connect(daemon.rankConfig(2));
  auto cores = first.status().cores;
  ASSERT_EQ(cores.size(), 2u);
  ASSERT_EQ(cores[1].lanes, 1u) << "the receiver's lane is not on core 1";
  for (int i = 0; i < 100; ++i) {
    sidecar::RecvHandle dropped = receiver.recvAsync("lane-dropped-" + std::to_string(i), 0, 60'000);
  }
  EXPECT_EQ(waitersOnceThey(daemon, 0), 0u);
}

TEST_F(LaneTest, RawLaneAnswersOutOfOrderAndKeepsTheLaneOpenOnBadRequests) {
  {
    RawLaneClient raw(daemon_.socket(), 0);
    ASSERT_EQ(raw.openLane(), 16u * 1024);

    // A recv that waits does not hold back the requests behind it: completions match by seq.
    capnp::MallocMessageBuilder waiting;
    buildRecv(waiting, 100, "later", kRecvTimeoutMs);
    ASSERT_TRUE(raw.push(waiting));
    capnp::MallocMessageBuilder other;
    buildObjectSend(other, 101, "other", "to rank 1");
    ASSERT_TRUE(raw.push(other));
    Completion c = readCompletion(raw);
    EXPECT_EQ(c.seq, 101u) << c.what;
    EXPECT_EQ(c.what, "done");
    capnp::MallocMessageBuilder later;
    buildObjectSend(later, 102, "later", "to myself", 0, 1, /*to=*/0);
    ASSERT_TRUE(raw.push(later));
    std::map<uint64_t, Completion> answers;
    for (int i = 0; i < 2; ++i) {
      c = readCompletion(raw);
      answers[c.seq] = c;
    }
    EXPECT_EQ(answers[102].what, "done");
    EXPECT_EQ(answers[100].what, "received");
    EXPECT_EQ(answers[100].object, "to myself");

    // Objects up to objectMaxBytes come back over the lane; a larger one is answered useCall, and
    // the same recv as a call gets it.
    std::string small(16 * 1024 - 64, 's'), large(16 * 1024 + 1, 'L');
    large.back() = 'e';
    capnp::MallocMessageBuilder sendSmall, sendLarge, recvSmall, recvLarge;
    buildObjectSend(sendSmall, 110, "small", small, 0, 1, 0);
    buildObjectSend(sendLarge, 111, "large", large, 0, 1, 0);
    ASSERT_TRUE(raw.push(sendSmall));
    ASSERT_TRUE(raw.push(sendLarge));
    EXPECT_EQ(readCompletion(raw).what, "done");
    EXPECT_EQ(readCompletion(raw).what, "done");
    buildRecv(recvSmall, 112, "small", kRecvTimeoutMs);
    buildRecv(recvLarge, 113, "large", kRecvTimeoutMs);
    ASSERT_TRUE(raw.push(recvSmall));
    c = readCompletion(raw);
    EXPECT_EQ(c.seq, 112u);
    EXPECT_EQ(c.what, "received");
    EXPECT_EQ(c.object, small);
    ASSERT_TRUE(raw.push(recvLarge));
    c = readCompletion(raw);
    EXPECT_EQ(c.seq, 113u);
    EXPECT_EQ(c.what, "useCall");
    auto call = raw.session().recvRequest();
    call.setDataId("large");
    auto response = call.send().wait(raw.ws());
    auto result = response.getResult();
    ASSERT_TRUE(result.isObject());
    auto bytes = result.getObject().getBytes();
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size()), large);

    // A request of a kind this daemon does not know (a newer client's): a typed failure, and the
    // lane goes on.
    capnp::MallocMessageBuilder unknown;
    buildMarkDone(unknown, 120, "small");
    auto discriminant = capnp::Schema::from<proto::LaneRequest>().getProto().getStruct().getDiscriminantOffset();
    auto data = capnp::AnyStruct::Builder(unknown.getRoot<proto::LaneRequest>()).getDataSection();
    ASSERT_GE(data.size(), (discriminant + 1) * 2u);
    uint16_t kind = 7;
    memcpy(data.begin() + discriminant * 2, &kind, sizeof kind);
    ASSERT_EQ(static_cast<uint16_t>(unknown.getRoot<proto::LaneRequest>().which()), 7);
    ASSERT_TRUE(raw.push(unknown));
    c = readCompletion(raw);
    EXPECT_EQ(c.seq, 120u);
    EXPECT_EQ(c.what.rfind("[invalid-argument]", 0), 0u) << c.what;

    // A failure whose text is long (a data id of 150 destination groups) is cut to 512 bytes,
    // its kind first.
    capnp::MallocMessageBuilder wide;
    {
      auto request = wide.initRoot<proto::LaneRequest>();
      request.setSeq(130);
      request.setDataId("wide");
      auto send = request.initSend();
      send.setNumChunks(1);
      auto groups = send.initDestinations(150);
      for (unsigned i = 0; i < 150; ++i) groups[i].initRanks(1).set(0, static_cast<int32_t>(1000 + i));
      send.initPayload().initObject().setTypeTag(1);
    }
    ASSERT_TRUE(raw.push(wide));
    EXPECT_EQ(readCompletion(raw).what, "done");
    capnp::MallocMessageBuilder notReceiver;
    buildMarkDone(notReceiver, 131, "wide");
    ASSERT_TRUE(raw.push(notReceiver));
    c = readCompletion(raw);
    EXPECT_EQ(c.seq, 131u);
    EXPECT_EQ(c.what.rfind("[not-receiver]", 0), 0u) << c.what;
    EXPECT_LE(c.what.size(), 512u);
    std::string byCall = errorOf([&] {
      auto markDone = raw.session().markDoneRequest();
      markDone.setDataId("wide");
      markDone.send().wait(raw.ws());
    });
    size_t at = byCall.find("[not-receiver]");  // a call's error may carry a prefix of Cap'n Proto's
    ASSERT_NE(at, std::string::npos) << byCall;
    EXPECT_GT(byCall.size() - at, 512u) << "the case meant to test the cut is too short: " << byCall;
    EXPECT_EQ(byCall.substr(at, 512), c.what);

    // After all that the lane still carries traffic.
    capnp::MallocMessageBuilder last;
    buildObjectSend(last, 140, "last", "still open");
    ASSERT_TRUE(raw.push(last));
    c = readCompletion(raw);
    EXPECT_EQ(c.seq, 140u);
    EXPECT_EQ(c.what, "done");
    EXPECT_EQ(daemon_.process().err().find("lane closed"), std::string::npos) << daemon_.process().err();
  }
  Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
  for (const char* id : {"other", "last"}) {
    Received r = receiver.recv(id, 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kObject) << id;
    receiver.markDone(id, 0);
  }
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

// The `n`th (from 1) "lane closed" line of the daemon's log, or "" when there are fewer.
std::string laneClosedLine(const std::string& log, size_t n) {
  size_t at = std::string::npos;
  for (size_t i = 0; i < n; ++i) {
    at = log.find("lane closed", at == std::string::npos ? 0 : at + 1);
    if (at == std::string::npos) return "";
  }
  size_t begin = log.rfind('\n', at);
  size_t end = log.find('\n', at);
  begin = begin == std::string::npos ? 0 : begin + 1;
  return log.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
}

// A producer that breaks the ring's format in each way the daemon checks: the lane is closed
// with the reason logged, the daemon stays up, and the same session's calls (send and recv) work.
TEST_F(LaneTest, ScribbledFramesCloseTheLaneAndTheSessionsCallsGoOn) {
  // The frame of src/shm/lane_ring.cc: 4 bytes of size, 4 of magic, the record padded to 8.
  constexpr uint32_t kRecordMagic = 0x4c414e45, kWrapMagic = 0x57524150;
  struct Frame {
    uint32_t size, magic;
  };
  struct Case {
    std::string name;
    std::string reason;  // in the daemon's log line
    // Breaks the ring whose producer position is `head` (everything before it consumed).
    std::function<void(RawLaneClient&, uint64_t head)> scribble;
  };
  auto frameThenAdvance = [](Frame frame, uint64_t advance) {
    return [frame, advance](RawLaneClient& raw, uint64_t head) {
      uint64_t words[2] = {0, 0};
      memcpy(words, &frame, sizeof frame);
      raw.scribbleRequests(head & (raw.requests().capacityBytes() - 1), words, sizeof words);
      raw.requests().sharedState().head.store(head + advance);
    };
  };
  std::vector<Case> cases = {
      {"bad magic", "a record frame that is not one", frameThenAdvance({8, 0x12345678}, 16)},
      {"size past the producer's position", "a record frame that is not one",
       frameThenAdvance({4096, kRecordMagic}, 16)},
      {"size over the largest record", "a record frame that is not one",
       frameThenAdvance({0xffffffffu, kRecordMagic}, 16)},
      {"wrap marker past the producer's position", "a wrap marker past the producer's position",
       frameThenAdvance({0, kWrapMagic}, 8)},
      {"position not a multiple of 8", "bytes ahead of the consumer's", frameThenAdvance({0, kRecordMagic}, 12)},
      {"position behind the consumer's", "bytes ahead of the consumer's",
       [](RawLaneClient& raw, uint64_t head) { raw.requests().sharedState().head.store(head - 8); }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(c.name);
    std::string seed = "seed-" + std::to_string(i), byCall = "by-call-" + std::to_string(i);
    {
      // Something for the raw client to receive by call once its lane is closed.
      Sidecar seeder = Sidecar::connect(daemon_.rankConfig(5));
      seeder.send(seed, Object{2, "seeded " + seed}, {{0}}).wait();
    }
    {
      RawLaneClient raw(daemon_.socket(), 0);
      raw.openLane();
      capnp::MallocMessageBuilder good;
      buildObjectSend(good, 1, "good-" + std::to_string(i), "x");
      ASSERT_TRUE(raw.push(good));
      ASSERT_EQ(readCompletion(raw).what, "done");  // the daemon consumed the ring up to its head
      LaneRing requests = raw.requests();
      uint64_t head = requests.sharedState().head.load();
      ASSERT_EQ(requests.sharedState().tail.load(), head);
      c.scribble(raw, head);
      raw.ringBell();
      expectLaneClosedLogged(daemon_, i + 1, c.reason);
      std::string line = laneClosedLine(daemon_.process().err(), i + 1);
      EXPECT_NE(line.find("request ring is corrupt"), std::string::npos) << line;
      EXPECT_NE(line.find(c.reason), std::string::npos) << line;
      EXPECT_NE(line.find("rank 0"), std::string::npos) << line;
      ASSERT_TRUE(daemon_.process().running()) << daemon_.process().err();

      // The same session's calls: a recv and a send.
      auto recv = raw.session().recvRequest();
      recv.setDataId(seed);
      recv.setTimeoutMs(kRecvTimeoutMs);
      auto response = recv.send().wait(raw.ws());
      auto result = response.getResult();
      ASSERT_TRUE(result.isObject());
      EXPECT_EQ(std::string(result.getObject().getBytes().asChars().begin(), result.getObject().getBytes().size()),
                "seeded " + seed);
      auto markDone = raw.session().markDoneRequest();
      markDone.setDataId(seed);
      markDone.send().wait(raw.ws());
      auto send = raw.session().sendRequest();
      send.setDataId(byCall);
      send.setNumChunks(1);
      send.initDestinations(1)[0].initRanks(1).set(0, 1);
      send.initPayload().initObject().setBytes(kj::StringPtr("sent by call").asBytes());
      send.send().wait(raw.ws());
    }
    Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
    Received r = receiver.recv(byCall, 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kObject);
    EXPECT_EQ(r.object.bytes, "sent by call");
    receiver.markDone(byCall, 0);
  }
  ASSERT_NO_FATAL_FAILURE(expectDaemonServes("after-scribbles"));
}

// An allocate that waits for space on a lane that then breaks: when the space comes, nobody can be
// told, so the daemon gives it back at once instead of leaving it with the session until it ends.
TEST_F(LaneTest, AllocateWaitingWhenItsLaneBreaksGivesTheSpaceBack) {
  constexpr uint64_t kMost = uint64_t{48} << 20;  // of the 64 MiB arena: two do not fit
  RawLaneClient raw(daemon_.socket(), 0);
  ASSERT_GT(raw.openLane(), 0u);
  auto byCall = raw.session().allocateRequest();
  byCall.setSizeBytes(kMost);
  uint64_t first = byCall.send().wait(raw.ws()).getOffset();
  // The lane's allocate waits (the arena is full) ...
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::LaneRequest>();
  request.setSeq(1);
  auto allocate = request.initAllocate();
  allocate.setSizeBytes(kMost);
  allocate.setTimeoutMs(20'000);
  ASSERT_TRUE(raw.push(message));
  LaneRing requests = raw.requests();
  uint64_t head = requests.sharedState().head.load();
  for (int i = 0; i < 500 && requests.sharedState().tail.load() != head; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(requests.sharedState().tail.load(), head) << "the daemon did not take the allocate";
  // ... when the client breaks its lane (a frame with a bad magic) ...
  uint64_t words[2] = {0x1234567800000008ull, 0};
  raw.scribbleRequests(head & (requests.capacityBytes() - 1), words, sizeof words);
  requests.sharedState().head.store(head + 16);
  raw.ringBell();
  expectLaneClosedLogged(daemon_, 1, "a record frame that is not one");
  // ... and then the space comes: it goes back, not to the session.
  auto release = raw.session().releaseRequest();
  release.setOffset(first);
  release.send().wait(raw.ws());
  EXPECT_EQ(allocatedOnceThey(daemon_, 0, 0), 0u);
  auto again = raw.session().allocateRequest();
  again.setSizeBytes(kMost);
  again.setTimeoutMs(2'000);
  EXPECT_NO_THROW(again.send().wait(raw.ws())) << "the space did not come back";
}

// The daemon's own positions live in the shared memory too (the request ring's tail, the
// completion ring's head): a client that moves them off the 8-byte frame grid, next to the end of
// a ring, must not make the daemon read or write a frame across the ring's end. The completion
// ring is the last thing in the mapping, so a wrap marker written there would land past it.
TEST_F(LaneTest, ScribbledDaemonPositionsCloseTheLane) {
  struct Case {
    std::string name;
    std::function<void(RawLaneClient&)> scribble;
  };
  std::vector<Case> cases = {
      {"completion ring's producer position 4 bytes before its end",
       [](RawLaneClient& raw) {
         LaneRing completions = raw.completions();
         uint64_t at = completions.capacityBytes() - 4;
         completions.sharedState().tail.store(at);
         completions.sharedState().head.store(at);  // empty, so the daemon will write there
       }},
      {"request ring's consumer position 4 bytes before its end",
       [](RawLaneClient& raw) {
         LaneRing requests = raw.requests();
         uint64_t at = requests.capacityBytes() - 4;
         requests.sharedState().tail.store(at);
         requests.sharedState().head.store(at + 16);
       }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(c.name);
    std::string byCall = "positions-by-call-" + std::to_string(i);
    {
      RawLaneClient raw(daemon_.socket(), 0);
      raw.openLane();
      capnp::MallocMessageBuilder good;
      buildObjectSend(good, 1, "positions-good-" + std::to_string(i), "x");
      ASSERT_TRUE(raw.push(good));
      ASSERT_EQ(readCompletion(raw).what, "done");
      c.scribble(raw);
      capnp::MallocMessageBuilder answerMe;  // a request the daemon answers at once (a failure)
      buildMarkDone(answerMe, 2, "positions-unknown");
      raw.push(answerMe);
      raw.ringBell();
      expectLaneClosedLogged(daemon_, i + 1, "lane closed");
      ASSERT_TRUE(daemon_.process().running()) << daemon_.process().err();

      auto send = raw.session().sendRequest();
      send.setDataId(byCall);
      send.setNumChunks(1);
      send.initDestinations(1)[0].initRanks(1).set(0, 1);
      send.initPayload().initObject().setBytes(kj::StringPtr("sent by call").asBytes());
      send.send().wait(raw.ws());
    }
    ASSERT_TRUE(daemon_.process().running()) << daemon_.process().err();
    Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
    Received r = receiver.recv(byCall, 0, kRecvTimeoutMs);
    ASSERT_EQ(r.kind, Received::Kind::kObject);
    receiver.markDone(byCall, 0);
  }
  ASSERT_NO_FATAL_FAILURE(expectDaemonServes("after-positions"));
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
    // The flood of markDones ends either way: the daemon may read a batch of them before it
    // answers any, so their credits can run out before the completion ring fills.
    expectLaneClosedLogged(daemon_, closedBefore + 1, waitingRecvs ? "ignores its credits" : "lane closed, ");
    if (!waitingRecvs) {
      std::string err = daemon_.process().err();
      EXPECT_TRUE(err.find("completion ring is full") != std::string::npos ||
                  err.find("ignores its credits") != std::string::npos)
          << err;
    }
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

// libsidecar's lanes as this process maps them (a Sidecar keeps no fd of its lane, only the
// mapping), from /proc/self/maps: start address -> bytes.
std::map<uintptr_t, uint64_t> laneMappings() {
  std::map<uintptr_t, uint64_t> out;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    if (line.find("/memfd:sidecar-lane") == std::string::npos) continue;
    uintptr_t start = 0, end = 0;
    if (sscanf(line.c_str(), "%lx-%lx", &start, &end) == 2) out.emplace(start, end - start);
  }
  return out;
}

// The header page of a lane's memory, as src/shm/lane_ring.cc lays it out (its LaneHeader), then
// the request ring and the completion ring. Checked against the magic and version below: a test
// that fails there needs this mirror updated, not the daemon fixed.
struct LaneHeaderMirror {
  uint64_t magic;
  uint32_t version;
  uint32_t reserved;
  uint64_t ringBytes;
  alignas(64) sidecar::shm::LaneRingState requests;
  alignas(64) sidecar::shm::LaneRingState completions;
};
constexpr uint64_t kLaneMagic = 0x31454e414c524353;  // "SCRLANE1"
constexpr uint32_t kLaneLayoutVersion = 1;
constexpr uint64_t kLaneHeaderPageBytes = 4096;

// A libsidecar lane watched in place: its rings, read through the Sidecar's own mapping (valid
// while that Sidecar lives).
struct LaneView {
  LaneRing requests, completions;
};

// The lane of the Sidecar connected since `before` (a snapshot of laneMappings()); nullopt when
// that Sidecar has no lane.
std::optional<LaneView> laneSince(const std::map<uintptr_t, uint64_t>& before) {
  std::optional<LaneView> lane;
  for (const auto& [start, bytes] : laneMappings()) {
    if (before.count(start) != 0) continue;
    EXPECT_FALSE(lane.has_value()) << "more than one new lane mapping";
    auto* header = reinterpret_cast<LaneHeaderMirror*>(start);
    if (header->magic != kLaneMagic || header->version != kLaneLayoutVersion ||
        kLaneHeaderPageBytes + 2 * header->ringBytes != bytes) {
      ADD_FAILURE() << "a lane mapping of " << bytes << " bytes with magic " << std::hex << header->magic
                    << std::dec << ", version " << header->version << ": the lane layout changed, "
                    << "update LaneHeaderMirror in this test";
      continue;
    }
    auto* base = reinterpret_cast<std::byte*>(start) + kLaneHeaderPageBytes;
    lane = LaneView{LaneRing(&header->requests, base, header->ringBytes),
                    LaneRing(&header->completions, base + header->ringBytes, header->ringBytes)};
  }
  return lane;
}

// Bytes ever pushed into a lane's rings (the producers' positions).
struct LaneBytes {
  uint64_t requests = 0, completions = 0;
};
LaneBytes laneBytes(const std::optional<LaneView>& lane) {
  if (!lane) return {};
  return {lane->requests.sharedState().head.load(), lane->completions.sharedState().head.load()};
}
// What `step` pushed into the lane (zeros without one).
template <typename Step>
LaneBytes pushedBy(const std::optional<LaneView>& lane, Step&& step) {
  LaneBytes before = laneBytes(lane);
  step();
  LaneBytes after = laneBytes(lane);
  return {after.requests - before.requests, after.completions - before.completions};
}

// What one pass of the API cases saw: one line per case, compared between lanes and calls. With
// `lanes`, each Sidecar must have its lane and each request must travel on it (watched through a
// second mapping of the lane's memory), so a lane that libsidecar stops using fails here.
std::vector<std::string> apiCases(LocalDaemon& daemon, const std::string& prefix, bool lanes) {
  std::vector<std::string> seen;
  auto none = laneMappings();
  Sidecar sender = Sidecar::connect(daemon.rankConfig(0));
  std::optional<LaneView> senderLane = laneSince(none);
  auto one = laneMappings();
  Sidecar receiver = Sidecar::connect(daemon.rankConfig(1));
  std::optional<LaneView> receiverLane = laneSince(one);
  EXPECT_EQ(senderLane.has_value(), lanes);
  EXPECT_EQ(receiverLane.has_value(), lanes);
  // Whether `moved` (the bytes a step pushed) lies in [min, max] for requests and completions;
  // checked only with lanes (without, nothing may move: there is no lane memory).
  auto expectMoved = [&](const char* what, LaneBytes moved, uint64_t minRequests, uint64_t maxRequests,
                         uint64_t minCompletions, uint64_t maxCompletions) {
    if (!lanes) return;
    EXPECT_GE(moved.requests, minRequests) << what;
    EXPECT_LE(moved.requests, maxRequests) << what;
    EXPECT_GE(moved.completions, minCompletions) << what;
    EXPECT_LE(moved.completions, maxCompletions) << what;
  };
  constexpr uint64_t kSmall = 1024;  // a request or completion without a payload is under this
  auto code = [](auto&& call) -> std::string {
    try {
      call();
      return "ok";
    } catch (const Error& e) {
      return sidecar::toString(e.code());
    }
  };
  // Objects: small, and one over the lane's answer limit (16 KiB), which recv asks over the lane
  // and, answered useCall, fetches by call.
  for (size_t bytes : {size_t{64}, size_t{17 * 1024}}) {
    std::string id = prefix + "obj-" + std::to_string(bytes);
    std::string payload(bytes, 'a');
    for (size_t i = 0; i < bytes; ++i) payload[i] = static_cast<char>('a' + (i * 7 + bytes) % 26);
    expectMoved("send", pushedBy(senderLane, [&] { sender.send(id, Object{9, payload}, {{1}}).wait(); }),
                bytes, bytes + kSmall, 1, kSmall);
    bool overLimit = bytes > 16 * 1024;
    Received first, again;
    LaneBytes moved = pushedBy(receiverLane, [&] { first = receiver.recv(id, 0, kRecvTimeoutMs); });
    expectMoved("recv", moved, 1, kSmall, overLimit ? 1 : bytes, overLimit ? kSmall : bytes + kSmall);
    again = receiver.recv(id, 0, kRecvTimeoutMs);  // idempotent until markDone
    EXPECT_EQ(first.kind, Received::Kind::kObject);
    EXPECT_EQ(first.object.bytes, payload) << id;
    EXPECT_EQ(again.object.bytes, payload) << id;
    EXPECT_EQ(first.object.typeTag, 9u);
    expectMoved("markDone", pushedBy(receiverLane, [&] { receiver.markDone(id, 0); }), 1, kSmall, 1, kSmall);
    seen.push_back("recv after markDone: " + code([&] { receiver.recv(id, 0, 100); }));
    seen.push_back("second markDone: " + code([&] { receiver.markDone(id, 0); }));
  }
  // A 4 KiB inline tensor (its bytes in the request) and a zero-copy one (only its place).
  std::vector<float> values(1024);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f;
  expectMoved("inline send", pushedBy(senderLane, [&] {
                sender.send(prefix + "inline", sidecar::TensorRef{Dtype::kFloat32, {4, 256}, {}, values.data()}, {{1}})
                    .wait();
              }),
              4096, 4096 + kSmall, 1, kSmall);
  sidecar::ArenaTensor arena;
  expectMoved("allocate", pushedBy(senderLane, [&] { arena = sender.allocateTensor(Dtype::kFloat32, {1024}); }), 1,
              kSmall, 1, kSmall);
  memcpy(arena.data(), values.data(), 4096);
  expectMoved("zero-copy send",
              pushedBy(senderLane, [&] { sender.send(prefix + "zero-copy", std::move(arena), {{1}}).wait(); }), 1,
              kSmall, 1, kSmall);
  for (const char* name : {"inline", "zero-copy"}) {
    Received r;
    expectMoved("tensor recv", pushedBy(receiverLane, [&] { r = receiver.recv(prefix + name, 0, kRecvTimeoutMs); }),
                1, kSmall, 1, kSmall);
    EXPECT_EQ(r.kind, Received::Kind::kTensor);
    EXPECT_EQ(r.tensor.dtype, Dtype::kFloat32);
    EXPECT_EQ(r.tensor.sizeBytes, 4096u);
    if (r.tensor.sizeBytes == 4096) {
      EXPECT_EQ(memcmp(r.tensor.data, values.data(), 4096), 0) << name;
    }
    receiver.markDone(prefix + name, 0);
  }
  // Bad input gives the same codes.
  seen.push_back("chunk out of range: " +
                 code([&] { sender.send(prefix + "bad", Object{1, "x"}, {{1}}, 5, 2).wait(); }));
  seen.push_back("negative rank: " + code([&] { sender.send(prefix + "neg", Object{1, "x"}, {{-3}}).wait(); }));
  seen.push_back("recv timeout: " + code([&] { receiver.recv(prefix + "never", 0, 50); }));
  seen.push_back("allocate over the arena: " +
                 code([&] { (void)sender.allocateTensor(Dtype::kUint8, {int64_t{1} << 40}); }));
  {
    // The arena (64 MiB) taken up by one allocation: the next waits for space, then times out.
    auto most = sender.allocateTensor(Dtype::kUint8, {int64_t{48} << 20});
    seen.push_back("allocate with the arena full: " +
                   code([&] { (void)sender.allocateTensor(Dtype::kUint8, {int64_t{48} << 20}, 50); }));
    sender.release(std::move(most));
  }
  // A failure whose text is longer than the lane's 512 bytes (cut there): the code survives.
  sidecar::Groups wide;
  for (int32_t r = 1000; r < 1150; ++r) wide.push_back({r});
  sender.send(prefix + "wide", Object{1, "x"}, wide).wait();
  seen.push_back("not a receiver: " + code([&] { receiver.markDone(prefix + "wide", 0); }));
  // Everything pushed was read: the daemon consumed every request, the client every completion.
  for (const auto* lane : {&senderLane, &receiverLane}) {
    if (!*lane) continue;
    EXPECT_EQ((*lane)->requests.sharedState().tail.load(), (*lane)->requests.sharedState().head.load());
    EXPECT_EQ((*lane)->completions.sharedState().tail.load(), (*lane)->completions.sharedState().head.load());
  }
  return seen;
}

TEST_F(LaneTest, LibsidecarBehavesTheSameWithAndWithoutLanes) {
  std::vector<std::string> withLane, withCalls;
  withLanes(true, [&] { withLane = apiCases(daemon_, "l-", true); });
  withLanes(false, [&] { withCalls = apiCases(daemon_, "c-", false); });
  EXPECT_EQ(withLane, withCalls);
  // And the codes are the documented ones.
  EXPECT_EQ(withLane, (std::vector<std::string>{
                          "recv after markDone: already-done",
                          "second markDone: already-done",
                          "recv after markDone: already-done",
                          "second markDone: already-done",
                          "chunk out of range: chunk-out-of-range",
                          "negative rank: invalid-argument",
                          "recv timeout: timeout",
                          "allocate over the arena: too-large",
                          "allocate with the arena full: arena-full",
                          "not a receiver: not-receiver",
                      }));

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
  auto before = laneMappings();
  Sidecar receiver = Sidecar::connect(daemon_.rankConfig(1));
  std::optional<LaneView> lane = laneSince(before);
  ASSERT_TRUE(lane.has_value()) << "the Sidecar has no lane";
  // The daemon is killed once it has taken the recv off the lane (it waits there for data that
  // never comes), so the recv is sure to be waiting on the lane, not on a call.
  std::atomic<bool> taken{false};
  std::thread killer([&] {
    LaneRing requests = lane->requests;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      uint64_t head = requests.sharedState().head.load();
      if (head > 0 && requests.sharedState().tail.load() == head) {
        taken = true;
        break;
      }
      std::this_thread::sleep_for(1ms);
    }
    std::this_thread::sleep_for(50ms);  // let the daemon start waiting (not needed for the outcome)
    daemon_.process().kill9();
  });
  try {
    receiver.recv("never-sent", 0, 60'000);
    ADD_FAILURE() << "recv returned after the daemon died";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDisconnected) << e.what();
  }
  killer.join();
  EXPECT_TRUE(taken) << "the recv never went over the lane";
}

// A SIDECAR_LANE that is neither 0 nor 1 is refused at connect, and leaves the rank free.
TEST_F(LaneTest, BadLaneSettingIsRefusedAtConnect) {
  setenv("SIDECAR_LANE", "yes", 1);
  try {
    Sidecar::connect(daemon_.rankConfig(0));
    ADD_FAILURE() << "connect took SIDECAR_LANE=yes";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("SIDECAR_LANE"), std::string::npos) << e.what();
  }
  unsetenv("SIDECAR_LANE");
  Sidecar again = Sidecar::connect(daemon_.rankConfig(0));  // not kAlreadyRegistered
  EXPECT_EQ(again.rank(), 0);
}

// Whether `s` is well-formed UTF-8 (what the Python package needs to make an error's message).
bool validUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    }
    i += n;
  }
  return true;
}

// A failure over the lane is cut to 512 bytes; the cut must not split a character of a non-ASCII
// data id (a call's error is whole and valid UTF-8; the Python package decodes the message as
// UTF-8 and would raise UnicodeDecodeError instead of the sidecar error).
TEST_F(LaneTest, LongFailureIsCutOnACharacterBoundary) {
  RawLaneClient raw(daemon_.socket(), 0);
  raw.openLane();
  uint64_t seq = 0;
  // Rank k in two destination groups, [0..k] and [k]: the message lists the first group, then
  // the id; growing k (and an odd or even start of the id) moves the id across the cut.
  for (std::string id : {std::string(), std::string("x")}) {
    for (int i = 0; i < 40; ++i) id += "\xc3\xa9";  // é
    for (int32_t k = 100; k < 160; ++k) {
      capnp::MallocMessageBuilder message;
      auto request = message.initRoot<proto::LaneRequest>();
      request.setSeq(++seq);
      request.setDataId(id);
      auto send = request.initSend();
      send.setNumChunks(1);
      auto groups = send.initDestinations(2);
      auto first = groups[0].initRanks(static_cast<unsigned>(k + 1));
      for (int32_t r = 0; r <= k; ++r) first.set(static_cast<unsigned>(r), r);
      groups[1].initRanks(1).set(0, k);
      send.initPayload().initObject();
      ASSERT_TRUE(raw.push(message));
      Completion c = readCompletion(raw);
      ASSERT_EQ(c.seq, seq);
      ASSERT_EQ(c.what.rfind("[invalid-argument]", 0), 0u) << c.what;
      EXPECT_LE(c.what.size(), 512u);
      ASSERT_TRUE(validUtf8(c.what)) << "k " << k << ": the cut split a character: ..."
                                     << c.what.substr(c.what.size() - 40);
    }
  }
}

}  // namespace
