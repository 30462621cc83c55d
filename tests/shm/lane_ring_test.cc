// The lane ring and its memory (shm/lane_ring.h):
//   LaneMemory   create() refuses bad ring sizes with BadSize and seals its memfd against shrink
//                and grow; map() of that fd sees the same two rings, and refuses (with a message,
//                never a crash) a memfd whose header is zero, garbage, another version or whose
//                size does not match it.
//   LaneRing     records of every size from 0 to maxRecordBytes() arrive byte-exact with their
//                exact size, in order, across the ring's end many times; a full ring refuses and
//                recovers; a push never fails when the ring's free room is at least the record's
//                worst case (its framed size plus the padding of one wrap); the doorbell rings
//                once per sleep and never for a consumer that is awake.
//   Hostile peer a producer that scribbles on the shared state or frames gets kCorrupt with a
//                reason, and a consumer that moves the producer's position gets refused pushes;
//                the ring's data lies between PROT_NONE guard pages here, so any access outside
//                it crashes the test instead of passing unseen.
//   Concurrency  two threads (200k records, the consumer sleeping on an eventfd whenever arm()
//                lets it) and two processes (a forked child that maps the memfd): every record
//                arrives once and in order, and no wake-up is lost (a sleep is bounded by 5 s).

#include "shm/lane_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using sidecar::shm::LaneMemory;
using sidecar::shm::LaneRing;
using sidecar::shm::LaneRingState;
using sidecar::shm::ShmErrc;
using Pop = LaneRing::Pop;
using Clock = std::chrono::steady_clock;

// The record format (lane_ring.cc), for the tests that play a producer breaking it.
constexpr uint32_t kRecordMagic = 0x4c414e45;  // "LANE"
constexpr uint32_t kWrapMagic = 0x57524150;    // "WRAP"
constexpr uint64_t kHeaderPageBytes = 4096;

// ---- helpers -------------------------------------------------------------------------------------

uint64_t round8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

// Ring bytes a record of `size` may take: its frame and padding, plus the padding of a wrap before
// it, which is shorter than the framed record (what LaneRing::worstCaseBytes was before it was
// dropped; LaneCredits relies on the same bound).
uint64_t worstCaseBytes(uint64_t size) {
  return 2 * (LaneRing::kFrameBytes + round8(size)) - LaneRing::kFrameBytes;
}

// Bytes that differ for every (size, seed), so a record read from the wrong place shows.
std::vector<unsigned char> pattern(size_t n, uint64_t seed) {
  std::vector<unsigned char> out(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ULL + n + 1;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return out;
}

// `bytes` mapped read-write between two PROT_NONE pages: a ring over it that reads or writes one
// byte outside it dies of SIGSEGV.
class GuardedBytes {
 public:
  explicit GuardedBytes(size_t bytes) : bytes_(bytes) {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_t inner = (bytes + page_ - 1) / page_ * page_;
    total_ = inner + 2 * page_;
    void* p = mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<std::byte*>(p);
    if (mprotect(base_ + page_, inner, PROT_READ | PROT_WRITE) != 0) std::abort();
    // The data ends exactly at the upper guard page (bytes is a multiple of the page here).
    data_ = base_ + page_ + (inner - bytes);
  }
  ~GuardedBytes() { munmap(base_, total_); }
  GuardedBytes(const GuardedBytes&) = delete;
  GuardedBytes& operator=(const GuardedBytes&) = delete;

  std::byte* data() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  size_t bytes_, page_ = 0, total_ = 0;
  std::byte* base_ = nullptr;
  std::byte* data_ = nullptr;
};

// A ring over memory the test owns, so a test can read and write the shared state directly.
struct TestRing {
  explicit TestRing(uint64_t capacity) : data(capacity), ring(&state, data.data(), capacity) {}
  LaneRingState state{};
  GuardedBytes data;
  LaneRing ring;

  uint64_t used() const { return state.head.load() - state.tail.load(); }
  // Writes a frame (size, magic) at a byte offset of the ring's data.
  void writeFrame(uint64_t offset, uint32_t size, uint32_t magic) {
    std::memcpy(data.data() + offset, &size, 4);
    std::memcpy(data.data() + offset + 4, &magic, 4);
  }
};

// Pops one record and checks it equals `expected` (size exact, bytes exact, words rounded up).
void expectRecord(LaneRing& ring, const unsigned char* expected, size_t expectedBytes) {
  std::vector<uint64_t> words(3, 0xdeadbeefdeadbeefULL);  // stale contents must not matter
  uint64_t size = ~uint64_t{0};
  std::string why;
  ASSERT_EQ(ring.tryPop(words, size, &why), Pop::kRecord) << why;
  ASSERT_EQ(size, expectedBytes);
  ASSERT_EQ(words.size(), round8(size) / 8);
  if (size > 0) {
    ASSERT_EQ(0, std::memcmp(words.data(), expected, size)) << "record of " << size << " bytes";
  }
}

void expectRecord(LaneRing& ring, const std::vector<unsigned char>& expected) {
  expectRecord(ring, expected.data(), expected.size());
}

void expectEmpty(LaneRing& ring) {
  std::vector<uint64_t> words;
  uint64_t size = 0;
  std::string why;
  EXPECT_EQ(ring.tryPop(words, size, &why), Pop::kEmpty) << why;
  EXPECT_TRUE(ring.empty());
}

// A memfd of `bytes` bytes holding `contents` at its start.
int makeMemfd(uint64_t bytes, const void* contents = nullptr, size_t contentBytes = 0) {
  int fd = memfd_create("lane-ring-test", MFD_CLOEXEC);
  if (fd < 0) return -1;
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0 ||
      (contentBytes > 0 && pwrite(fd, contents, contentBytes, 0) != static_cast<ssize_t>(contentBytes))) {
    close(fd);
    return -1;
  }
  return fd;
}

// Closes an fd at the end of a scope.
struct Fd {
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int fd;
};

// ---- LaneMemory::create --------------------------------------------------------------------------

TEST(LaneMemory, CreateRejectsSizesThatAreNotAPowerOfTwoFrom4KiB) {
  const uint64_t bad[] = {0,
                          1,
                          8,
                          1000,
                          2048,
                          4095,
                          4097,
                          4096 + 8,
                          3 * 4096,
                          (uint64_t{1} << 20) + 4096,
                          uint64_t{1} << 31,  // a power of two, but over the 1 GiB maximum
                          uint64_t{1} << 63,
                          ~uint64_t{0}};
  for (uint64_t bytes : bad) {
    auto memory = LaneMemory::create(bytes);
    ASSERT_FALSE(memory.ok()) << bytes;
    EXPECT_EQ(memory.error().code, ShmErrc::BadSize) << bytes;
    EXPECT_NE(memory.error().message.find("power of two"), std::string::npos) << memory.error().message;
    EXPECT_NE(memory.error().message.find(std::to_string(bytes)), std::string::npos)
        << "the message names the size asked for: " << memory.error().message;
  }
}

TEST(LaneMemory, CreateMakesTwoEmptyRingsInASealedMemfd) {
  for (uint64_t bytes : {uint64_t{4096}, uint64_t{8192}, uint64_t{1} << 16}) {
    auto memory = LaneMemory::create(bytes);
    ASSERT_TRUE(memory.ok()) << memory.error().message;
    const LaneMemory& m = memory.value();
    EXPECT_EQ(m.ringBytes(), bytes);
    ASSERT_GE(m.fd(), 0);
    struct stat st {};
    ASSERT_EQ(fstat(m.fd(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kHeaderPageBytes + 2 * bytes);
    EXPECT_TRUE(fcntl(m.fd(), F_GETFD) & FD_CLOEXEC);

    int seals = fcntl(m.fd(), F_GET_SEALS);
    ASSERT_GE(seals, 0) << std::strerror(errno);
    EXPECT_TRUE(seals & F_SEAL_SHRINK);
    EXPECT_TRUE(seals & F_SEAL_GROW);
    EXPECT_TRUE(seals & F_SEAL_SEAL) << "the client could add seals (F_SEAL_WRITE) to the daemon's memory";
    errno = 0;
    EXPECT_NE(ftruncate(m.fd(), 0), 0) << "a client could shrink the daemon's mapping (SIGBUS)";
    EXPECT_EQ(errno, EPERM);
    EXPECT_NE(ftruncate(m.fd(), static_cast<off_t>(st.st_size + 4096)), 0) << "grown";
    errno = 0;
    EXPECT_NE(fcntl(m.fd(), F_ADD_SEALS, F_SEAL_WRITE), 0) << "the seals themselves are sealed";
    EXPECT_EQ(errno, EPERM);
    ASSERT_EQ(fstat(m.fd(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kHeaderPageBytes + 2 * bytes);

    for (LaneRing ring : {m.requests(), m.completions()}) {
      EXPECT_EQ(ring.capacityBytes(), bytes);
      EXPECT_EQ(ring.maxRecordBytes(), bytes / 2 - LaneRing::kFrameBytes);
      EXPECT_TRUE(ring.empty());
      EXPECT_EQ(ring.sharedState().head.load(), 0u);
      EXPECT_EQ(ring.sharedState().tail.load(), 0u);
      EXPECT_EQ(ring.sharedState().armed.load(), 0u);
    }
  }
  auto byDefault = LaneMemory::create();
  ASSERT_TRUE(byDefault.ok()) << byDefault.error().message;
  EXPECT_EQ(byDefault.value().ringBytes(), LaneMemory::kDefaultRingBytes);
}

TEST(LaneMemory, TheTwoRingsAreSeparate) {
  auto memory = LaneMemory::create(4096);
  ASSERT_TRUE(memory.ok()) << memory.error().message;
  LaneRing requests = memory.value().requests();
  LaneRing completions = memory.value().completions();
  // Fill both to the brim with different bytes: neither may spill into the other.
  auto a = pattern(requests.maxRecordBytes(), 1), b = pattern(completions.maxRecordBytes(), 2);
  while (requests.tryPush(a.data(), a.size())) {
  }
  while (completions.tryPush(b.data(), b.size())) {
  }
  ASSERT_NO_FATAL_FAILURE(expectRecord(requests, a));
  ASSERT_NO_FATAL_FAILURE(expectRecord(completions, b));
  ASSERT_NO_FATAL_FAILURE(expectRecord(requests, a));
  ASSERT_NO_FATAL_FAILURE(expectRecord(completions, b));
  expectEmpty(requests);
  expectEmpty(completions);
}

TEST(LaneMemory, MovedMemoryKeepsItsRings) {
  auto created = LaneMemory::create(8192);
  ASSERT_TRUE(created.ok()) << created.error().message;
  LaneMemory first = std::move(created.value());
  int fd = first.fd();
  auto bytes = pattern(77, 3);
  ASSERT_TRUE(first.requests().tryPush(bytes.data(), bytes.size()));
  LaneMemory second = std::move(first);
  EXPECT_EQ(second.fd(), fd);
  EXPECT_EQ(second.ringBytes(), 8192u);
  auto other = LaneMemory::create(4096);
  ASSERT_TRUE(other.ok());
  other.value() = std::move(second);  // frees the 4 KiB lane, takes the 8 KiB one
  EXPECT_EQ(other.value().fd(), fd);
  LaneRing ring = other.value().requests();
  ASSERT_NO_FATAL_FAILURE(expectRecord(ring, bytes));
  EXPECT_GE(fcntl(fd, F_GETFD), 0) << "the fd stays open while its owner lives";
}

// ---- LaneMemory::map -----------------------------------------------------------------------------

TEST(LaneMemory, MapSeesTheSameRingsBothWays) {
  auto created = LaneMemory::create(8192);
  ASSERT_TRUE(created.ok()) << created.error().message;
  auto mapped = LaneMemory::map(created.value().fd());
  ASSERT_TRUE(mapped.ok()) << mapped.error().message;
  EXPECT_EQ(mapped.value().ringBytes(), 8192u);
  EXPECT_EQ(mapped.value().fd(), -1) << "map() does not take the fd";

  // Requests: the creator pushes, the mapping pops; completions the other way.
  LaneRing daemonRequests = created.value().requests(), clientRequests = mapped.value().requests();
  LaneRing daemonCompletions = created.value().completions();
  LaneRing clientCompletions = mapped.value().completions();
  for (uint64_t i = 0; i < 200; ++i) {
    auto request = pattern(i * 13 % 500, i);
    ASSERT_TRUE(clientRequests.tryPush(request.data(), request.size()));
    ASSERT_NO_FATAL_FAILURE(expectRecord(daemonRequests, request));
    auto completion = pattern(i * 29 % 900, i + 1000);
    ASSERT_TRUE(daemonCompletions.tryPush(completion.data(), completion.size()));
    EXPECT_TRUE(daemonRequests.empty());
    ASSERT_NO_FATAL_FAILURE(expectRecord(clientCompletions, completion));
  }
  auto bytes = pattern(123, 9);
  ASSERT_TRUE(daemonRequests.tryPush(bytes.data(), bytes.size()));  // also the creator as producer
  ASSERT_NO_FATAL_FAILURE(expectRecord(clientRequests, bytes));
  expectEmpty(clientRequests);
  expectEmpty(clientCompletions);

  // The doorbell flag is shared too.
  EXPECT_TRUE(clientCompletions.arm());
  ASSERT_TRUE(daemonCompletions.tryPush(bytes.data(), bytes.size()));
  EXPECT_TRUE(daemonCompletions.takeDoorbell());
  ASSERT_NO_FATAL_FAILURE(expectRecord(clientCompletions, bytes));

  // The mapping outlives the creator (its unmap and close).
  ASSERT_TRUE(clientRequests.tryPush(bytes.data(), bytes.size()));
  int fd = created.value().fd();
  auto again = LaneMemory::map(fd);
  ASSERT_TRUE(again.ok()) << again.error().message;
  { LaneMemory gone = std::move(created.value()); }
  LaneRing stillThere = again.value().requests();
  ASSERT_NO_FATAL_FAILURE(expectRecord(stillThere, bytes));
}

// map() of memory that is not a lane of this layout: an error that says so, never a crash.
TEST(LaneMemory, MapRefusesWhatIsNotALane) {
  constexpr uint64_t kRing = 8192, kFile = kHeaderPageBytes + 2 * kRing;
  auto expectRefused = [](int fd, const char* what) -> std::string {
    auto memory = LaneMemory::map(fd);
    EXPECT_FALSE(memory.ok()) << what;
    if (memory.ok()) return "";
    EXPECT_EQ(memory.error().code, ShmErrc::MapFailed) << what;
    EXPECT_FALSE(memory.error().message.empty()) << what;
    return memory.error().message;
  };

  // A real lane's header page, to copy into memfds of other sizes.
  auto created = LaneMemory::create(kRing);
  ASSERT_TRUE(created.ok()) << created.error().message;
  std::vector<unsigned char> header(kHeaderPageBytes);
  ASSERT_EQ(pread(created.value().fd(), header.data(), header.size(), 0),
            static_cast<ssize_t>(header.size()));

  {  // The copy in a file of the right size is a lane: the refusals below are the edits'.
    Fd fd(makeMemfd(kFile, header.data(), header.size()));
    ASSERT_GE(fd.fd, 0);
    auto memory = LaneMemory::map(fd.fd);
    ASSERT_TRUE(memory.ok()) << memory.error().message;
    EXPECT_EQ(memory.value().ringBytes(), kRing);
  }
  {
    Fd fd(makeMemfd(kFile));
    ASSERT_GE(fd.fd, 0);
    auto message = expectRefused(fd.fd, "a zeroed header");
    EXPECT_NE(message.find("layout"), std::string::npos) << message;
  }
  {
    auto garbage = pattern(kHeaderPageBytes, 42);
    Fd fd(makeMemfd(kFile, garbage.data(), garbage.size()));
    ASSERT_GE(fd.fd, 0);
    expectRefused(fd.fd, "a garbage header");
  }
  {
    auto edited = header;
    edited[0] ^= 0xff;
    Fd fd(makeMemfd(kFile, edited.data(), edited.size()));
    ASSERT_GE(fd.fd, 0);
    expectRefused(fd.fd, "a wrong magic");
  }
  {
    // LaneHeader (lane_ring.cc): magic (8 bytes), version (4), reserved (4), ringBytes (8).
    auto edited = header;
    uint32_t version;
    std::memcpy(&version, edited.data() + 8, 4);
    ++version;
    std::memcpy(edited.data() + 8, &version, 4);
    Fd fd(makeMemfd(kFile, edited.data(), edited.size()));
    ASSERT_GE(fd.fd, 0);
    auto message = expectRefused(fd.fd, "another version");
    EXPECT_NE(message.find("version"), std::string::npos) << message;
  }
  for (uint64_t ringBytes : {kRing + 8, uint64_t{4096}, uint64_t{1} << 40, uint64_t{0}}) {
    auto edited = header;
    std::memcpy(edited.data() + 16, &ringBytes, 8);
    Fd fd(makeMemfd(kFile, edited.data(), edited.size()));
    ASSERT_GE(fd.fd, 0);
    expectRefused(fd.fd, ("a header of rings of " + std::to_string(ringBytes) + " bytes").c_str());
  }
  for (uint64_t bytes : {kFile + 4096, kFile - 4096, kHeaderPageBytes + kRing, kHeaderPageBytes}) {
    Fd fd(makeMemfd(bytes, header.data(), header.size()));
    ASSERT_GE(fd.fd, 0);
    expectRefused(fd.fd, ("a valid header in " + std::to_string(bytes) + " bytes").c_str());
  }
  for (uint64_t bytes : {uint64_t{0}, uint64_t{100}, kHeaderPageBytes - 8}) {
    Fd fd(makeMemfd(bytes));
    ASSERT_GE(fd.fd, 0);
    expectRefused(fd.fd, ("a file of " + std::to_string(bytes) + " bytes").c_str());
  }
  {
    int pipeFds[2];
    ASSERT_EQ(pipe2(pipeFds, O_CLOEXEC), 0);
    Fd readEnd(pipeFds[0]), writeEnd(pipeFds[1]);
    expectRefused(readEnd.fd, "a pipe");
  }
  expectRefused(-1, "no fd");
}

// ---- LaneRing: records -----------------------------------------------------------------------------

TEST(LaneRing, RecordsOfEverySizeArriveIntact) {
  for (uint64_t capacity : {uint64_t{4096}, uint64_t{64} * 1024}) {
    TestRing r(capacity);
    const uint64_t max = r.ring.maxRecordBytes();
    ASSERT_EQ(max, capacity / 2 - 8);
    std::vector<uint64_t> sizes;
    for (uint64_t s = 0; s <= 80; ++s) sizes.push_back(s);
    for (uint64_t s : {uint64_t{127}, uint64_t{128}, uint64_t{129}, uint64_t{1000}, uint64_t{1023},
                       max / 2, max - 9, max - 8, max - 7, max - 1, max}) {
      sizes.push_back(s);
    }
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto bytes = pattern(sizes[i], i);
      uint64_t head = r.state.head.load();
      ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size())) << sizes[i];
      EXPECT_FALSE(r.ring.empty());
      EXPECT_EQ(r.state.head.load() % 8, 0u);
      EXPECT_GE(r.state.head.load() - head, 8 + round8(sizes[i]));
      ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes)) << "capacity " << capacity;
      EXPECT_EQ(r.state.tail.load(), r.state.head.load());
    }
    expectEmpty(r.ring);
  }
}

TEST(LaneRing, SeveralRecordsQueueInOrder) {
  TestRing r(8192);
  std::vector<std::vector<unsigned char>> records;
  for (uint64_t i = 0; i < 40; ++i) {
    records.push_back(pattern(i * 37 % 150, i));
    ASSERT_TRUE(r.ring.tryPush(records.back().data(), records.back().size()));
  }
  for (const auto& record : records) ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, record));
  expectEmpty(r.ring);
}

TEST(LaneRing, ARecordOverTheMaximumIsRefusedAndChangesNothing) {
  TestRing r(4096);
  auto small = pattern(5, 1);
  ASSERT_TRUE(r.ring.tryPush(small.data(), small.size()));
  uint64_t head = r.state.head.load();
  auto tooBig = pattern(r.ring.maxRecordBytes() + 1, 0);
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), tooBig.size()));
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), r.ring.maxRecordBytes() + 8));
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), r.ring.capacityBytes()));
  // Sizes that a 32-bit frame would truncate to something small must not slip through.
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), (uint64_t{1} << 32) + 8));
  EXPECT_FALSE(r.ring.tryPush(tooBig.data(), ~uint64_t{0}));
  EXPECT_EQ(r.state.head.load(), head);
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, small));
  expectEmpty(r.ring);
  // An empty record needs no bytes to read.
  ASSERT_TRUE(r.ring.tryPush(nullptr, 0));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, {}));
}

TEST(LaneRing, FullRingRefusesAndRecovers) {
  TestRing r(4096);
  auto bytes = pattern(500, 1);
  int pushed = 0;
  while (r.ring.tryPush(bytes.data(), bytes.size())) ++pushed;
  EXPECT_EQ(pushed, 4096 / 512);  // 500 bytes + 8 of frame, padded to 512
  EXPECT_EQ(r.used(), 4096u);
  EXPECT_FALSE(r.ring.tryPush(nullptr, 0)) << "not even an empty record fits a full ring";
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  EXPECT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.tryPush(bytes.data(), bytes.size()));
  for (int i = 0; i < pushed; ++i) ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  expectEmpty(r.ring);

  // Empty records: 8 bytes each, so exactly capacity / 8 fit.
  int empties = 0;
  while (r.ring.tryPush(nullptr, 0)) ++empties;
  EXPECT_EQ(empties, 4096 / 8);
  for (int i = 0; i < empties; ++i) ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, {}));
  expectEmpty(r.ring);
}

// A record never straddles the end: it needs room for the wrap padding too, and is refused while
// the free bytes would hold it but not the padding before it.
TEST(LaneRing, ARecordThatMustWrapNeedsRoomForThePadding) {
  TestRing r(4096);
  auto quarter = pattern(1024 - 8, 1);  // 1024 framed
  auto half = pattern(2048 - 8, 2);     // 2048 framed: the largest record
  ASSERT_EQ(half.size(), r.ring.maxRecordBytes());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.ring.tryPush(quarter.data(), quarter.size()));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, quarter));
  // Head at 3072, 2048 bytes free, but the record needs 1024 of padding first.
  EXPECT_EQ(4096 - r.used(), 2048u);
  EXPECT_FALSE(r.ring.tryPush(half.data(), half.size()));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, quarter));
  EXPECT_TRUE(r.ring.tryPush(half.data(), half.size()));
  EXPECT_EQ(r.state.head.load(), 4096u + 2048u) << "the record starts at the ring's start";
  EXPECT_EQ(r.used(), 4096u) << "the padding is in use until the consumer passes it";
  EXPECT_FALSE(r.ring.tryPush(nullptr, 0));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, quarter));
  auto last = pattern(1024 - 8, 3);
  EXPECT_TRUE(r.ring.tryPush(last.data(), last.size()));  // fills the ring exactly again
  EXPECT_EQ(r.used(), 4096u);
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, half));  // past the wrap marker
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, last));
  expectEmpty(r.ring);

  // A record that ends exactly at the ring's end needs no wrap.
  TestRing exact(4096);
  ASSERT_TRUE(exact.ring.tryPush(half.data(), half.size()));
  ASSERT_TRUE(exact.ring.tryPush(half.data(), half.size()));
  EXPECT_EQ(exact.used(), 4096u);
  ASSERT_NO_FATAL_FAILURE(expectRecord(exact.ring, half));
  ASSERT_TRUE(exact.ring.tryPush(half.data(), half.size()));
  ASSERT_NO_FATAL_FAILURE(expectRecord(exact.ring, half));
  ASSERT_NO_FATAL_FAILURE(expectRecord(exact.ring, half));
  expectEmpty(exact.ring);
}

TEST(LaneRing, WrapsManyTimesInOrder) {
  for (uint64_t capacity : {uint64_t{4096}, uint64_t{16384}}) {
    TestRing r(capacity);
    std::mt19937_64 random(capacity);
    std::deque<std::vector<unsigned char>> inFlight;
    uint64_t popped = 0;
    for (uint64_t i = 0; i < 10000; ++i) {
      // Odd sizes, mostly small, sometimes up to the maximum.
      uint64_t size = random() % 4 == 0 ? random() % (r.ring.maxRecordBytes() + 1) : random() % 300;
      auto bytes = pattern(size, i);
      if (r.ring.tryPush(bytes.data(), bytes.size())) {
        inFlight.push_back(std::move(bytes));
      } else {
        ASSERT_FALSE(inFlight.empty()) << "an empty ring refused " << size << " bytes";
      }
      while (!inFlight.empty() && (random() % 2 == 0 || inFlight.size() > 8)) {
        ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, inFlight.front()));
        inFlight.pop_front();
        ++popped;
      }
      ASSERT_LE(r.used(), capacity);
    }
    while (!inFlight.empty()) {
      ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, inFlight.front()));
      inFlight.pop_front();
    }
    expectEmpty(r.ring);
    EXPECT_GT(popped, 7000u);
    EXPECT_GT(r.state.head.load(), uint64_t{100} * capacity) << "positions went round many times";
  }
}

// Positions are 64-bit byte counts that only grow; starting near 2^64 they wrap to 0 and on.
TEST(LaneRing, PositionsWrapAroundUint64) {
  TestRing r(4096);
  uint64_t start = ~uint64_t{0} - 4096 * 3 + 1;  // a multiple of 8, 3 rings before 2^64
  r.state.head = start;
  r.state.tail = start;
  std::deque<std::vector<unsigned char>> inFlight;
  for (uint64_t i = 0; i < 300; ++i) {
    auto bytes = pattern(i * 53 % 700, i);
    while (!r.ring.tryPush(bytes.data(), bytes.size())) {
      ASSERT_FALSE(inFlight.empty());
      ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, inFlight.front()));
      inFlight.pop_front();
    }
    inFlight.push_back(std::move(bytes));
  }
  for (; !inFlight.empty(); inFlight.pop_front()) {
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, inFlight.front()));
  }
  expectEmpty(r.ring);
  EXPECT_LT(r.state.head.load(), start) << "the positions did pass 2^64";
}

// ---- LaneRing: worst case --------------------------------------------------------------------------

// A producer that pushes only when the ring's free bytes are at least worstCaseBytes(size) is
// never refused: the bound covers the padding of a wrap. Also, the bytes in use never exceed the
// sum of the worst cases of the records in flight (what LaneCredits relies on).
TEST(LaneRing, PushNeverFailsWithinTheWorstCase) {
  for (uint64_t capacity : {uint64_t{4096}, uint64_t{8192}, uint64_t{16384}}) {
    TestRing r(capacity);
    const uint64_t max = r.ring.maxRecordBytes();
    ASSERT_LE(worstCaseBytes(max), capacity);
    // Record i is `size` bytes of `source` from offset i % 4096: distinct, and cheap to make.
    const auto source = pattern(max + 4096, capacity);
    struct InFlight {
      uint64_t offset, size, worst;
    };
    std::deque<InFlight> inFlight;
    std::mt19937_64 random(capacity + 1);
    uint64_t reserved = 0, pushes = 0, refusals = 0;
    auto popOne = [&]() {
      ASSERT_FALSE(inFlight.empty());
      const InFlight& front = inFlight.front();
      ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, source.data() + front.offset, front.size));
      reserved -= front.worst;
      inFlight.pop_front();
      ASSERT_LE(r.used(), reserved) << "more in use than the worst cases of the records in flight";
    };
    for (uint64_t i = 0; i < 8000; ++i) {
      uint64_t size;
      switch (random() % 4) {
        case 0: size = random() % 64; break;
        case 1: size = max - random() % 64; break;
        default: size = random() % (max + 1); break;
      }
      const unsigned char* bytes = source.data() + i % 4096;
      uint64_t worst = worstCaseBytes(size);
      uint64_t freeBytes = capacity - r.used();
      if (freeBytes >= worst) {
        ASSERT_TRUE(r.ring.tryPush(bytes, size))
            << size << " bytes refused with " << freeBytes << " free (worst case " << worst << ")";
      } else if (!r.ring.tryPush(bytes, size)) {
        ++refusals;  // below the worst case a push may or may not fit
        ASSERT_NO_FATAL_FAILURE(popOne());
        continue;
      }
      ++pushes;
      reserved += worst;
      inFlight.push_back({i % 4096, size, worst});
      ASSERT_LE(r.used(), reserved) << "more in use than the worst cases of the records in flight";
      // Pop at random, so the free room is sometimes just above and sometimes just below the bound.
      while (!inFlight.empty() && random() % 3 == 0) ASSERT_NO_FATAL_FAILURE(popOne());
    }
    while (!inFlight.empty()) ASSERT_NO_FATAL_FAILURE(popOne());
    expectEmpty(r.ring);
    EXPECT_GT(pushes, 4000u);
    EXPECT_GT(refusals, 0u) << "the test never got close to the bound";
  }
}

// The worst case is also the least that always suffices: 8 bytes less can be refused.
TEST(LaneRing, TheWorstCaseBoundIsTight) {
  auto half = pattern(2040, 1);  // 2048 framed, worst case 4088 in a ring of 4096
  ASSERT_EQ(worstCaseBytes(half.size()), 4088u);
  {
    TestRing r(4096);  // head at offset 2056, 8 bytes in use: 4088 free
    auto a = pattern(2040, 2);
    ASSERT_TRUE(r.ring.tryPush(a.data(), a.size()));
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, a));
    ASSERT_TRUE(r.ring.tryPush(nullptr, 0));
    ASSERT_EQ(4096 - r.used(), 4088u);
    EXPECT_TRUE(r.ring.tryPush(half.data(), half.size()));
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, {}));
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, half));
  }
  {
    TestRing r(4096);  // head at offset 2056, 16 bytes in use: 4080 free
    auto a = pattern(2032, 2);
    ASSERT_TRUE(r.ring.tryPush(a.data(), a.size()));
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, a));
    ASSERT_TRUE(r.ring.tryPush(nullptr, 0));
    ASSERT_TRUE(r.ring.tryPush(nullptr, 0));
    ASSERT_EQ(4096 - r.used(), 4080u);
    EXPECT_FALSE(r.ring.tryPush(half.data(), half.size()));
  }
}

// ---- LaneRing: doorbell ----------------------------------------------------------------------------

TEST(LaneRing, NoDoorbellForAConsumerThatNeverArmed) {
  TestRing r(4096);
  auto bytes = pattern(10, 3);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
    EXPECT_FALSE(r.ring.takeDoorbell());
  }
  EXPECT_EQ(r.state.armed.load(), 0u);
}

TEST(LaneRing, DoorbellRingsOncePerSleep) {
  TestRing r(4096);
  auto bytes = pattern(10, 3);
  EXPECT_TRUE(r.ring.arm()) << "an empty ring: the consumer may sleep";
  EXPECT_EQ(r.state.armed.load(), 1u);
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_TRUE(r.ring.takeDoorbell());
  EXPECT_EQ(r.state.armed.load(), 0u) << "taking the doorbell clears the flag";
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "one wake-up per sleep";
  EXPECT_FALSE(r.ring.takeDoorbell());
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));

  // The flag alone decides, even before any push; arming twice is still one sleep.
  EXPECT_TRUE(r.ring.arm());
  EXPECT_TRUE(r.ring.arm());
  EXPECT_TRUE(r.ring.takeDoorbell());
  EXPECT_FALSE(r.ring.takeDoorbell());

  // Every sleep gets its own wake-up.
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(r.ring.arm());
    ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
    EXPECT_TRUE(r.ring.takeDoorbell()) << i;
    ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  }
}

TEST(LaneRing, ArmRefusesWhileRecordsArePending) {
  TestRing r(4096);
  auto bytes = pattern(10, 3);
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.arm()) << "a record is waiting: the consumer must not sleep";
  EXPECT_EQ(r.state.armed.load(), 0u) << "a refused arm leaves the flag clear";
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "an awake consumer is not rung";
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  EXPECT_FALSE(r.ring.arm()) << "one record is still there";
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  EXPECT_TRUE(r.ring.arm());

  // Only a wrap marker and then records: still pending.
  TestRing w(4096);
  auto big = pattern(2040, 4);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(w.ring.tryPush(bytes.data(), bytes.size()));
    ASSERT_NO_FATAL_FAILURE(expectRecord(w.ring, bytes));
  }
  ASSERT_TRUE(w.ring.tryPush(big.data(), big.size()));  // wraps
  EXPECT_FALSE(w.ring.arm());
}

TEST(LaneRing, DisarmClearsTheFlag) {
  TestRing r(4096);
  auto bytes = pattern(10, 3);
  EXPECT_TRUE(r.ring.arm());
  r.ring.disarm();
  EXPECT_EQ(r.state.armed.load(), 0u);
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_FALSE(r.ring.takeDoorbell()) << "a disarmed consumer is awake";
  r.ring.disarm();  // disarming twice, or unarmed, is harmless
  EXPECT_EQ(r.state.armed.load(), 0u);
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, bytes));
  EXPECT_TRUE(r.ring.arm()) << "and it may arm again";
  EXPECT_TRUE(r.ring.takeDoorbell());
}

// ---- LaneRing: a hostile producer (the consumer's checks) -----------------------------------------

struct CorruptCase {
  const char* name;
  void (*scribble)(TestRing&);
};

const CorruptCase kCorruptCases[] = {
    {"head far ahead", [](TestRing& r) { r.state.head = uint64_t{1} << 40; }},
    {"head one ring and 8 bytes ahead",
     [](TestRing& r) {
       r.writeFrame(0, 0, kRecordMagic);
       r.state.head = 4096 + 8;
     }},
    {"head behind tail",
     [](TestRing& r) {
       r.state.tail = 4096;
       r.state.head = 8;
     }},
    {"head not a multiple of 8",
     [](TestRing& r) {
       r.writeFrame(0, 4, kRecordMagic);
       r.state.head = 12;
     }},
    {"head 1 byte ahead", [](TestRing& r) { r.state.head = 1; }},
    {"tail moved off 8 bytes, 4 before the end",
     [](TestRing& r) {
       r.state.tail = 4096 - 4;
       r.state.head = 4096 + 4;
     }},
    {"tail moved off 8 bytes, 1 before the end",
     [](TestRing& r) {
       r.state.tail = 2 * 4096 - 1;
       r.state.head = 2 * 4096 + 7;
     }},
    {"tail moved off 8 bytes, inside",
     [](TestRing& r) {
       r.writeFrame(4, 8, kRecordMagic);
       r.state.tail = 4;
       r.state.head = 20;
     }},
    {"bad magic",
     [](TestRing& r) {
       r.writeFrame(0, 8, 0x12345678);
       r.state.head = 16;
     }},
    {"a zeroed frame", [](TestRing& r) { r.state.head = 64; }},
    {"size past head",
     [](TestRing& r) {
       r.writeFrame(0, 1000, kRecordMagic);
       r.state.head = 16;
     }},
    {"size past the ring",
     [](TestRing& r) {
       r.writeFrame(0, 1u << 31, kRecordMagic);
       r.state.head = 4096;
     }},
    {"size 2^32 - 1",
     [](TestRing& r) {
       r.writeFrame(0, 0xffffffffu, kRecordMagic);
       r.state.head = 4096;
     }},
    {"size one over the maximum",
     [](TestRing& r) {
       r.writeFrame(0, static_cast<uint32_t>(r.ring.maxRecordBytes() + 1), kRecordMagic);
       r.state.head = 4096;
     }},
    {"record across the end",
     [](TestRing& r) {
       r.state.tail = 4096 - 16;
       r.writeFrame(4096 - 16, 64, kRecordMagic);
       r.state.head = 4096 - 16 + 72;
     }},
    {"record frame in the last 8 bytes, larger than they are",
     [](TestRing& r) {
       r.state.tail = 4096 - 8;
       r.writeFrame(4096 - 8, 1, kRecordMagic);
       r.state.head = 4096 + 64;
     }},
    {"wrap marker past head",
     [](TestRing& r) {
       r.state.tail = 2048;
       r.writeFrame(2048, 0, kWrapMagic);
       r.state.head = 2048 + 64;
     }},
    {"wrap marker then a bad frame",
     [](TestRing& r) {
       r.state.tail = 2048;
       r.writeFrame(2048, 0, kWrapMagic);
       r.writeFrame(0, 8, 0x0bad0bad);
       r.state.head = 4096 + 16;
     }},
    {"a wrap marker at the ring's start (a whole ring of padding)",
     [](TestRing& r) {
       r.writeFrame(0, 0, kWrapMagic);
       r.state.head = 2048;
     }},
};

TEST(LaneRingCorrupt, ScribblingProducerIsCorruptNeverOutOfBounds) {
  for (const auto& c : kCorruptCases) {
    SCOPED_TRACE(c.name);
    TestRing r(4096);  // between guard pages: a read outside the ring crashes here
    c.scribble(r);
    std::vector<uint64_t> words;
    uint64_t size = 0;
    std::string why;
    EXPECT_EQ(r.ring.tryPop(words, size, &why), Pop::kCorrupt);
    EXPECT_FALSE(why.empty());
    // The ring stays unusable, and a caller that does not want the reason may pass none.
    EXPECT_EQ(r.ring.tryPop(words, size, nullptr), Pop::kCorrupt);
  }
}

TEST(LaneRingCorrupt, GoodRecordsBeforeTheScribbleStillArrive) {
  TestRing r(4096);
  auto a = pattern(30, 1), b = pattern(0, 2);
  ASSERT_TRUE(r.ring.tryPush(a.data(), a.size()));
  ASSERT_TRUE(r.ring.tryPush(b.data(), b.size()));
  uint64_t head = r.state.head.load();
  r.writeFrame(head & 4095, 16, 0xfeedface);
  r.state.head = head + 24;
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, a));
  ASSERT_NO_FATAL_FAILURE(expectRecord(r.ring, b));
  std::vector<uint64_t> words;
  uint64_t size = 0;
  std::string why;
  EXPECT_EQ(r.ring.tryPop(words, size, &why), Pop::kCorrupt);
  EXPECT_NE(why.find("frame"), std::string::npos) << why;
}

// A record's frame is read once: a producer that changes it after the consumer looked cannot
// make the consumer copy more than it checked. (The copy is what the caller parses.)
TEST(LaneRingCorrupt, TheRecordComesOutAsACopy) {
  TestRing r(4096);
  auto a = pattern(24, 1);
  ASSERT_TRUE(r.ring.tryPush(a.data(), a.size()));
  std::vector<uint64_t> words;
  uint64_t size = 0;
  ASSERT_EQ(r.ring.tryPop(words, size, nullptr), Pop::kRecord);
  std::memset(r.data.data(), 0xee, 64);  // the producer scribbles over what was read
  ASSERT_EQ(size, 24u);
  EXPECT_EQ(0, std::memcmp(words.data(), a.data(), a.size()));
}

// Random shared state and random frames: whatever the producer writes, tryPop returns records no
// larger than the maximum, never moves the consumer past the producer, and touches nothing
// outside the ring (the guard pages).
TEST(LaneRingCorrupt, RandomScribblesNeverEscapeTheRing) {
  constexpr uint64_t kCapacity = 4096;
  TestRing r(kCapacity);
  std::mt19937_64 random(2024);
  uint64_t records = 0, corrupt = 0;
  std::vector<uint64_t> words;
  for (int iteration = 0; iteration < 3000; ++iteration) {
    // Random bytes, with plausible frames here and there so the checks beyond the magic are reached.
    for (uint64_t offset = 0; offset < kCapacity; offset += 8) {
      uint64_t word = random();
      switch (word % 8) {
        case 0: r.writeFrame(offset, static_cast<uint32_t>(word >> 40) % 96, kRecordMagic); break;
        case 1: r.writeFrame(offset, static_cast<uint32_t>(word >> 32), kRecordMagic); break;
        case 2: r.writeFrame(offset, 0, kWrapMagic); break;
        default: std::memcpy(r.data.data() + offset, &word, 8); break;
      }
    }
    uint64_t base = random() % 3 == 0 ? ~uint64_t{0} - random() % 65536 : random() % (1u << 20);
    uint64_t tail = base, head;
    switch (random() % 4) {
      case 0: tail &= ~uint64_t{7}; head = tail + 8 * (random() % (kCapacity / 8 + 1)); break;
      case 1: head = tail + random() % (kCapacity + 16); break;   // any alignment
      case 2: tail |= 7; head = tail + 8 * (random() % 64); break;  // both off 8 the same way
      default: head = random(); break;                             // anything
    }
    r.state.tail = tail;
    r.state.head = head;
    for (int pop = 0; pop < 64; ++pop) {
      uint64_t size = 0;
      std::string why;
      Pop result = r.ring.tryPop(words, size, &why);
      if (result == Pop::kEmpty) break;
      if (result == Pop::kCorrupt) {
        ++corrupt;
        ASSERT_FALSE(why.empty());
        break;
      }
      ++records;
      ASSERT_LE(size, r.ring.maxRecordBytes());
      ASSERT_EQ(words.size(), round8(size) / 8);
      uint64_t left = r.state.head.load() - r.state.tail.load();
      ASSERT_LE(left, kCapacity) << "the consumer moved past the producer";
      ASSERT_EQ(left % 8, 0u);
    }
  }
  EXPECT_GT(records, 0u);
  EXPECT_GT(corrupt, 0u);
}

// ---- LaneRing: a hostile consumer (the producer's bounds) -----------------------------------------

// The consumer may move the producer's position (it lives in the shared memory too). The producer
// must then refuse, never write outside the ring (the guard pages would catch it).
TEST(LaneRingCorrupt, ProducerRefusesAPositionMovedOffItsFrames) {
  auto bytes = pattern(40, 5);
  for (uint64_t head : {uint64_t{4096 - 4}, uint64_t{4096 - 1}, uint64_t{4096 - 7}, uint64_t{4},
                        uint64_t{2 * 4096 + 2048 + 3}}) {
    SCOPED_TRACE(head);
    TestRing r(4096);
    r.state.head = head;
    r.state.tail = head;
    EXPECT_FALSE(r.ring.tryPush(bytes.data(), bytes.size()));
    EXPECT_FALSE(r.ring.tryPush(nullptr, 0));
    EXPECT_EQ(r.state.head.load(), head);
  }
}

TEST(LaneRingCorrupt, ProducerRefusesATailOutsideTheRing) {
  auto bytes = pattern(40, 5);
  TestRing r(4096);
  ASSERT_TRUE(r.ring.tryPush(bytes.data(), bytes.size()));
  uint64_t head = r.state.head.load();
  r.state.tail = head + 8;  // the consumer claims to have read what was never written
  EXPECT_FALSE(r.ring.tryPush(bytes.data(), bytes.size()));
  r.state.tail = head - 4096 - 8;  // more than a ring behind
  EXPECT_FALSE(r.ring.tryPush(bytes.data(), bytes.size()));
  EXPECT_EQ(r.state.head.load(), head);
  r.state.tail = 0;
  EXPECT_TRUE(r.ring.tryPush(bytes.data(), bytes.size())) << "a sane tail again: pushes go on";
}

TEST(LaneRingCorrupt, RandomConsumerPositionsNeverMakeTheProducerWriteOutside) {
  constexpr uint64_t kCapacity = 4096;
  TestRing r(kCapacity);
  std::mt19937_64 random(77);
  auto bytes = pattern(kCapacity / 2, 1);
  uint64_t pushed = 0;
  for (int iteration = 0; iteration < 20000; ++iteration) {
    uint64_t head = random() % 2 == 0 ? random() : (random() % (1u << 20)) & ~uint64_t{7};
    uint64_t tail = random() % 2 == 0 ? head - random() % (kCapacity + 64) : random();
    r.state.head = head;
    r.state.tail = tail;
    uint64_t size = random() % (r.ring.maxRecordBytes() + 1);
    if (r.ring.tryPush(bytes.data(), size)) {
      ++pushed;
      uint64_t newHead = r.state.head.load();
      ASSERT_EQ(newHead % 8, 0u);
      ASSERT_LE(newHead - tail, kCapacity) << "the push overwrote bytes the consumer has not read";
    }
  }
  EXPECT_GT(pushed, 0u);
}

// ---- concurrency: two threads ---------------------------------------------------------------------

// One producer thread, one consumer thread that sleeps on an eventfd whenever arm() lets it: every
// record arrives once and in order, and no sleep outlasts a pushed record. A lost wake-up shows
// as a 5 s poll timeout with records waiting. Every 8192 records the producer waits until the
// consumer has armed, so the sleep path and its race with a push are exercised for sure.
TEST(LaneRingConcurrency, NoRecordAndNoWakeUpIsLostBetweenThreads) {
  constexpr uint64_t kRecords = 200'000;
  constexpr int kSleepLimitMs = 5000;
  TestRing r(16 * 1024);  // small: the producer often finds it full, positions wrap often
  int bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  ASSERT_GE(bell, 0);
  Fd bellFd(bell);
  auto recordSize = [](uint64_t seq) { return 8 + seq % 41; };  // 8..48 bytes: odd sizes, wraps
  auto fill = [](unsigned char* p, uint64_t seq, uint64_t size) {
    std::memcpy(p, &seq, 8);
    for (uint64_t i = 8; i < size; ++i) p[i] = static_cast<unsigned char>(seq * 7 + i);
  };

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> rings{0};
  std::string producerError;
  std::thread producer([&]() {
    unsigned char buffer[64];
    for (uint64_t seq = 0; seq < kRecords && !stop.load(std::memory_order_relaxed);) {
      if (seq % 8192 == 0 && seq > 0) {
        auto deadline = Clock::now() + std::chrono::seconds(5);
        while (r.state.armed.load(std::memory_order_relaxed) == 0 && !stop.load(std::memory_order_relaxed) &&
               Clock::now() < deadline) {
          std::this_thread::yield();
        }
      }
      uint64_t size = recordSize(seq);
      fill(buffer, seq, size);
      if (!r.ring.tryPush(buffer, size)) {
        std::this_thread::yield();
        continue;
      }
      ++seq;
      if (r.ring.takeDoorbell()) {
        rings.fetch_add(1, std::memory_order_relaxed);
        uint64_t one = 1;
        if (write(bell, &one, sizeof one) != 8) {
          producerError = std::string("eventfd write: ") + std::strerror(errno);
          return;
        }
      }
    }
  });

  uint64_t next = 0, sleeps = 0, arms = 0;
  std::string consumerError;
  std::vector<uint64_t> words;
  unsigned char expected[64];
  while (next < kRecords) {
    uint64_t size = 0;
    std::string why;
    Pop result = r.ring.tryPop(words, size, &why);
    if (result == Pop::kRecord) {
      fill(expected, next, recordSize(next));
      if (size != recordSize(next) || std::memcmp(words.data(), expected, size) != 0) {
        uint64_t seq = 0;
        if (size >= 8) std::memcpy(&seq, words.data(), 8);
        consumerError = "record " + std::to_string(next) + " came as " + std::to_string(size) +
                        " bytes of record " + std::to_string(seq) + " (lost, duplicated or reordered)";
        break;
      }
      ++next;
      continue;
    }
    if (result == Pop::kCorrupt) {
      consumerError = "corrupt: " + why;
      break;
    }
    ++arms;
    if (!r.ring.arm()) continue;  // records arrived meanwhile
    ++sleeps;
    pollfd p{bell, POLLIN, 0};
    int n = poll(&p, 1, kSleepLimitMs);
    if (n != 1) {
      consumerError = r.ring.empty() ? "the consumer slept 5 s and the producer pushed nothing"
                                     : "a lost wake-up: the consumer slept 5 s with records waiting";
      break;
    }
    uint64_t count;
    if (read(bell, &count, sizeof count) != 8) {
      consumerError = std::string("eventfd read: ") + std::strerror(errno);
      break;
    }
    r.ring.disarm();
  }
  stop = true;
  producer.join();

  EXPECT_TRUE(producerError.empty()) << producerError;
  ASSERT_TRUE(consumerError.empty()) << consumerError;
  EXPECT_EQ(next, kRecords);
  expectEmpty(r.ring);
  EXPECT_GT(sleeps, 0u) << "the sleep path was never taken";
  EXPECT_GT(rings.load(), 0u);
  EXPECT_LE(rings.load(), arms) << "more doorbells than times the consumer armed";
  RecordProperty("sleeps", static_cast<int>(sleeps));
  RecordProperty("doorbells", static_cast<int>(rings.load()));
}

// ---- concurrency: two processes --------------------------------------------------------------------

// Kills and reaps a child that a failed assertion left running.
struct ChildGuard {
  explicit ChildGuard(pid_t p) : pid(p) {}
  ~ChildGuard() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  // Waits for the child's exit; its status, or -1 when it did not exit by itself in time.
  int wait() {
    auto deadline = Clock::now() + std::chrono::seconds(10);
    int status = 0;
    while (Clock::now() < deadline) {
      pid_t got = waitpid(pid, &status, WNOHANG);
      if (got == pid) {
        pid = -1;
        return status;
      }
      if (got < 0) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return -1;
  }
  pid_t pid;
};

constexpr uint64_t kChildRecords = 3000;
constexpr uint64_t kChildSeed = 0x5eed;

uint64_t childRecordSize(uint64_t i) { return i * 97 % 1500; }

// The child: maps the lane, reads one start record from requests (the record count and a seed),
// then pushes that many records on completions, ringing the parent's eventfd when it armed.
// Exit codes name what went wrong, as a child may not use gtest.
int childPushesCompletions(int memoryFd, int completionBell) {
  auto mapped = LaneMemory::map(memoryFd);
  if (!mapped.ok()) return 2;
  LaneRing requests = mapped.value().requests();
  LaneRing completions = mapped.value().completions();
  auto deadline = Clock::now() + std::chrono::seconds(10);
  std::vector<uint64_t> words;
  uint64_t size = 0;
  for (;;) {
    Pop result = requests.tryPop(words, size, nullptr);
    if (result == Pop::kRecord) break;
    if (result == Pop::kCorrupt) return 3;
    if (Clock::now() > deadline) return 4;
    sched_yield();
  }
  if (size != 16 || words[0] != kChildRecords || words[1] != kChildSeed) return 5;
  for (uint64_t i = 0; i < kChildRecords;) {
    auto bytes = pattern(childRecordSize(i), kChildSeed + i);
    if (!completions.tryPush(bytes.data(), bytes.size())) {
      if (Clock::now() > deadline) return 6;
      sched_yield();
      continue;
    }
    ++i;
    if (completions.takeDoorbell()) {
      uint64_t one = 1;
      if (write(completionBell, &one, sizeof one) != 8) return 7;
    }
  }
  return 0;
}

TEST(LaneRingConcurrency, AChildProcessPushesThroughTheMappedMemory) {
  auto memory = LaneMemory::create(8192);
  ASSERT_TRUE(memory.ok()) << memory.error().message;
  int bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  ASSERT_GE(bell, 0);
  Fd bellFd(bell);
  pid_t pid = fork();
  ASSERT_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) _exit(childPushesCompletions(memory.value().fd(), bell));
  ChildGuard child(pid);

  LaneRing requests = memory.value().requests();
  LaneRing completions = memory.value().completions();
  const uint64_t start[2] = {kChildRecords, kChildSeed};
  ASSERT_TRUE(requests.tryPush(start, sizeof start));

  uint64_t sleeps = 0;
  std::vector<uint64_t> words;
  for (uint64_t i = 0; i < kChildRecords;) {
    uint64_t size = 0;
    std::string why;
    Pop result = completions.tryPop(words, size, &why);
    ASSERT_NE(result, Pop::kCorrupt) << why;
    if (result == Pop::kRecord) {
      auto expected = pattern(childRecordSize(i), kChildSeed + i);
      ASSERT_EQ(size, expected.size()) << "record " << i;
      if (size > 0) {
        ASSERT_EQ(0, std::memcmp(words.data(), expected.data(), size)) << "record " << i;
      }
      ++i;
      continue;
    }
    if (!completions.arm()) continue;
    ++sleeps;
    pollfd p{bell, POLLIN, 0};
    ASSERT_EQ(poll(&p, 1, 5000), 1) << (completions.empty() ? "the child pushed nothing for 5 s (died?)"
                                                            : "a lost wake-up across processes");
    uint64_t count;
    ASSERT_EQ(read(bell, &count, sizeof count), 8);
    completions.disarm();
  }
  int status = child.wait();
  ASSERT_NE(status, -1) << "the child did not exit";
  EXPECT_TRUE(WIFEXITED(status)) << "the child died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see childPushesCompletions for what the code means";
  expectEmpty(completions);
  EXPECT_TRUE(requests.empty()) << "the child read the start record";
  RecordProperty("sleeps", static_cast<int>(sleeps));
}

}  // namespace
