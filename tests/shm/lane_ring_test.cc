// The lane ring (shm/lane_ring.h): records of every size arrive intact and in order, also across
// the ring's end and across processes; a full ring refuses and recovers; the doorbell protocol
// rings once per sleep and never loses a wake-up (two threads, an eventfd as the sleep); a
// producer that scribbles on the ring gets kCorrupt with a reason, never a read outside it; the
// memfd is sealed and its header checked.

#include "shm/lane_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using sidecar::shm::LaneMemory;
using sidecar::shm::LaneRing;
using sidecar::shm::LaneRingState;
using sidecar::shm::ShmErrc;
using Pop = LaneRing::Pop;

// A ring over memory the test owns, so a test can write the shared state directly.
struct OwnedRing {
  explicit OwnedRing(uint64_t capacity) : data(capacity) { ring = LaneRing(&state, data.data(), capacity); }
  LaneRingState state{};
  std::vector<std::byte> data;
  LaneRing ring;
};

std::vector<unsigned char> pattern(size_t n, unsigned seed) {
  std::vector<unsigned char> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<unsigned char>(i * 31 + seed * 17 + (i >> 7));
  return out;
}

// Pops one record and checks it equals `expected`.
void expectRecord(LaneRing& ring, const std::vector<unsigned char>& expected) {
  std::vector<uint64_t> words;
  uint64_t size = 0;
  std::string why;
  ASSERT_EQ(ring.tryPop(words, size, &why), Pop::kRecord) << why;
  ASSERT_EQ(size, expected.size());
  if (size > 0) ASSERT_EQ(0, std::memcmp(words.data(), expected.data(), size));
}

TEST(LaneRing, RecordsOfEverySizeArriveIntact) {
  OwnedRing r(64 * 1024);
  std::vector<size_t> sizes = {0, 1, 7, 8, 9, 63, 64, 65, 1000, 4096, r.ring.maxRecordBytes()};
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto bytes = pattern(sizes[i], static_cast<unsigned>(i));
    ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size())) << sizes[i];
    expectRecord(r.ring, bytes);
  }
  std::vector<uint64_t> words;
  uint64_t size = 0;
  EXPECT_EQ(r.ring.tryPop(words, size, nullptr), Pop::kEmpty);
  auto tooBig = pattern(r.ring.maxRecordBytes() + 1, 0);
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), tooBig.size()));
}

TEST(LaneRing, FullRingRefusesAndRecovers) {
  OwnedRing r(4096);
  auto bytes = pattern(500, 1);
  int pushed = 0;
  while (r.ring.tryPush(bytes.data(), bytes.size())) ++pushed;
  EXPECT_EQ(pushed, 4096 / 512);  // 500 bytes + 8 of frame, padded to 512
  expectRecord(r.ring, bytes);
  EXPECT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.tryPush(bytes.data(), bytes.size()));
}

TEST(LaneRing, WrapsManyTimesInOrder) {
  OwnedRing r(4096);
  std::mt19937 random(7);
  std::vector<std::vector<unsigned char>> inFlight;
  size_t popped = 0;
  for (unsigned i = 0; i < 5000; ++i) {
    auto bytes = pattern(random() % 700, i);
    if (r.ring.tryPush(bytes.data(), bytes.size())) {
      inFlight.push_back(std::move(bytes));
    } else {
      ASSERT_FALSE(inFlight.empty()) << "an empty ring refused " << bytes.size() << " bytes";
    }
    // Pop about as often as we push, so positions go around the ring hundreds of times.
    while (!inFlight.empty() && (random() % 2 == 0 || inFlight.size() > 6)) {
      ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, inFlight.front()));
      inFlight.erase(inFlight.begin());
      ++popped;
    }
  }
  EXPECT_GT(popped, 4000u);
  EXPECT_GT(r.state.head.load(), uint64_t{100} * 4096);
}

TEST(LaneRing, DoorbellRingsOncePerSleep) {
  OwnedRing r(4096);
  auto bytes = pattern(10, 3);
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "the consumer never armed";
  EXPECT_FALSE(r.ring.arm()) << "a record is waiting: the consumer must not sleep";
  EXPECT_FALSE(r.ring.takeDoorbell());
  expectRecord(r.ring, bytes);
  EXPECT_TRUE(r.ring.arm());
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_TRUE(r.ring.takeDoorbell());
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "one wake-up per sleep";
  expectRecord(r.ring, bytes);
  expectRecord(r.ring, bytes);
  EXPECT_TRUE(r.ring.arm());
  r.ring.disarm();
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "a disarmed consumer is awake";
}

// Writes a frame (size, magic) at a byte offset of the ring's data.
void writeFrame(OwnedRing& r, uint64_t offset, uint32_t size, uint32_t magic) {
  std::memcpy(r.data.data() + offset, &size, 4);
  std::memcpy(r.data.data() + offset + 4, &magic, 4);
}

TEST(LaneRing, ScribblingProducerIsCorruptNeverOutOfBounds) {
  constexpr uint32_t kRecord = 0x4c414e45, kWrap = 0x57524150;
  struct Case {
    const char* name;
    void (*scribble)(OwnedRing&);
  };
  const Case cases[] = {
      {"head far ahead", [](OwnedRing& r) { r.state.head = uint64_t{1} << 40; }},
      {"head not a multiple of 8", [](OwnedRing& r) { r.state.head = 12; }},
      {"bad magic", [](OwnedRing& r) { writeFrame(r, 0, 8, 0x12345678); r.state.head = 16; }},
      {"size past head", [](OwnedRing& r) { writeFrame(r, 0, 1000, kRecord); r.state.head = 16; }},
      {"size past the ring", [](OwnedRing& r) { writeFrame(r, 0, 1u << 31, kRecord); r.state.head = 4096; }},
      {"record across the end",
       [](OwnedRing& r) {
         r.state.tail = 4096 - 16;
         writeFrame(r, 4096 - 16, 64, kRecord);
         r.state.head = 4096 - 16 + 72;
       }},
      {"wrap past head",
       [](OwnedRing& r) {
         r.state.tail = 2048;
         writeFrame(r, 2048, 0, kWrap);
         r.state.head = 2048 + 64;
       }},
  };
  for (const auto& c : cases) {
    OwnedRing r(4096);
    c.scribble(r);
    std::vector<uint64_t> words;
    uint64_t size = 0;
    std::string why;
    EXPECT_EQ(r.ring.tryPop(words, size, &why), Pop::kCorrupt) << c.name;
    EXPECT_FALSE(why.empty()) << c.name;
  }
}

TEST(LaneMemory, RejectsBadSizesAndIsSealed) {
  for (uint64_t bytes : {uint64_t{0}, uint64_t{1000}, uint64_t{2048}, uint64_t{4096 + 8}}) {
    auto memory = LaneMemory::create(bytes);
    ASSERT_FALSE(memory.ok()) << bytes;
    EXPECT_EQ(memory.error().code, ShmErrc::BadSize);
    EXPECT_NE(memory.error().message.find("power of two"), std::string::npos);
  }
  auto memory = LaneMemory::create(4096);
  ASSERT_TRUE(memory.ok()) << memory.error().message;
  int seals = fcntl(memory.value().fd(), F_GET_SEALS);
  EXPECT_TRUE(seals & F_SEAL_SHRINK);
  EXPECT_TRUE(seals & F_SEAL_GROW);
  EXPECT_NE(ftruncate(memory.value().fd(), 0), 0) << "a client could shrink the daemon's mapping";
}

TEST(LaneMemory, MapSeesTheSameRingsAndRefusesGarbage) {
  auto created = LaneMemory::create(8192);
  ASSERT_TRUE(created.ok());
  auto mapped = LaneMemory::map(created.value().fd());
  ASSERT_TRUE(mapped.ok()) << mapped.error().message;
  EXPECT_EQ(mapped.value().ringBytes(), 8192u);
  auto bytes = pattern(123, 9);
  LaneRing in = created.value().requests();
  ASSERT_TRUE(in.tryPush(bytes.data(), bytes.size()));
  LaneRing out = mapped.value().requests();
  expectRecord(out, bytes);
  LaneRing completions = mapped.value().completions();
  EXPECT_TRUE(completions.empty());

  int zeros = memfd_create("lane-garbage", MFD_CLOEXEC);
  ASSERT_GE(zeros, 0);
  ASSERT_EQ(ftruncate(zeros, 4096 + 2 * 8192), 0);
  auto garbage = LaneMemory::map(zeros);
  EXPECT_FALSE(garbage.ok());
  EXPECT_NE(garbage.error().message.find("layout"), std::string::npos);
  ASSERT_EQ(ftruncate(zeros, 100), 0);
  EXPECT_FALSE(LaneMemory::map(zeros).ok());
  close(zeros);
}

// One producer thread, one consumer thread that sleeps on an eventfd whenever arm() lets it: every
// record arrives once and in order, and no sleep outlasts a pushed record (a lost wake-up would
// show as a poll timeout with records still coming).
TEST(LaneRing, NoWakeUpIsLostBetweenThreads) {
  constexpr uint64_t kRecords = 200'000;
  OwnedRing r(16 * 1024);
  int bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  ASSERT_GE(bell, 0);
  std::atomic<bool> lost{false};
  std::thread producer([&]() {
    for (uint64_t i = 0; i < kRecords && !lost;) {
      if (!r.ring.tryPush(&i, sizeof i)) {
        std::this_thread::yield();
        continue;
      }
      ++i;
      if (r.ring.takeDoorbell()) {
        uint64_t one = 1;
        ASSERT_EQ(write(bell, &one, sizeof one), 8);
      }
    }
  });
  uint64_t expected = 0, sleeps = 0;
  std::vector<uint64_t> words;
  while (expected < kRecords) {
    uint64_t size = 0;
    auto result = r.ring.tryPop(words, size, nullptr);
    if (result == Pop::kRecord) {
      ASSERT_EQ(size, 8u);
      ASSERT_EQ(words[0], expected) << "out of order or duplicated";
      ++expected;
      continue;
    }
    ASSERT_EQ(result, Pop::kEmpty);
    if (!r.ring.arm()) continue;
    ++sleeps;
    pollfd p{bell, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1) {
      lost = true;
      break;
    }
    uint64_t count;
    ASSERT_EQ(read(bell, &count, sizeof count), 8);
    r.ring.disarm();
  }
  producer.join();
  close(bell);
  EXPECT_FALSE(lost) << "the consumer slept 5 s with records pending: a lost wake-up";
  EXPECT_EQ(expected, kRecords);
  RecordProperty("sleeps", static_cast<int>(sleeps));
}

TEST(LaneMemory, RecordsCrossProcesses) {
  auto memory = LaneMemory::create(4096);
  ASSERT_TRUE(memory.ok());
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto mapped = LaneMemory::map(memory.value().fd());
    if (!mapped.ok()) _exit(2);
    LaneRing ring = mapped.value().completions();
    for (unsigned i = 0; i < 1000;) {
      auto bytes = pattern(i % 300, i);
      if (ring.tryPush(bytes.data(), bytes.size())) ++i;
    }
    _exit(0);
  }
  LaneRing ring = memory.value().completions();
  for (unsigned i = 0; i < 1000;) {
    std::vector<uint64_t> words;
    uint64_t size = 0;
    std::string why;
    auto result = ring.tryPop(words, size, &why);
    ASSERT_NE(result, Pop::kCorrupt) << why;
    if (result == Pop::kEmpty) continue;
    auto expected = pattern(i % 300, i);
    ASSERT_EQ(size, expected.size());
    if (size > 0) ASSERT_EQ(0, std::memcmp(words.data(), expected.data(), size)) << i;
    ++i;
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

}  // namespace
