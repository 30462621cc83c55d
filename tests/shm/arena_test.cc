// The arena: page kind selection and its explanation, mapping the fd elsewhere, mlock errors.
// Hugetlb tests run only when the machine has free huge pages (tools/reserve-hugepages 2M 64).
#include "shm/arena.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "shm/sizes.h"

namespace sidecar::shm {
namespace {

TEST(ShmArena, AutoGetsAKindAndSaysWhy) {
  Result<Arena> arena = Arena::create({.sizeBytes = 8 * kMiB});
  ASSERT_TRUE(arena.ok()) << arena.error().message;
  EXPECT_NE(arena->pageKind(), PageKind::Auto);
  EXPECT_GE(arena->sizeBytes(), 8 * kMiB);
  EXPECT_GE(arena->fd(), 0);
  EXPECT_FALSE(arena->pageKindReason().empty());
  if (arena->pageKind() != PageKind::Hugetlb2M) {
    // It must say why hugetlb was refused, with the numbers.
    EXPECT_NE(arena->pageKindReason().find("hugetlb 2MiB unavailable"), std::string::npos)
        << arena->pageKindReason();
  }
  std::memset(arena->base(), 0xab, arena->sizeBytes());
  EXPECT_EQ(static_cast<unsigned char>(*arena->at(arena->sizeBytes() - 1)), 0xab);
}

TEST(ShmArena, PlainIsAlwaysAvailable) {
  Result<Arena> arena = Arena::create({.sizeBytes = 4097, .pageKind = PageKind::Plain});
  ASSERT_TRUE(arena.ok()) << arena.error().message;
  EXPECT_EQ(arena->pageKind(), PageKind::Plain);
  EXPECT_EQ(arena->sizeBytes(), 8192u) << "rounded up to the page size";
}

// Pages of the arena's mapping that are in memory (mincore), out of all of them.
size_t residentPages(const Arena& arena) {
  auto pageBytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((arena.sizeBytes() + pageBytes - 1) / pageBytes);
  EXPECT_EQ(mincore(arena.base(), arena.sizeBytes(), resident.data()), 0) << std::strerror(errno);
  return static_cast<size_t>(std::count_if(resident.begin(), resident.end(),
                                           [](unsigned char r) { return (r & 1) != 0; }));
}

TEST(ShmArena, PopulateFaultsEveryPageInAtCreate) {
  auto pageBytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  Result<Arena> lazy = Arena::create({.sizeBytes = 4 * kMiB, .pageKind = PageKind::Plain});
  ASSERT_TRUE(lazy.ok()) << lazy.error().message;
  EXPECT_EQ(residentPages(*lazy), 0u) << "a plain arena is backed on first touch";
  Result<Arena> populated =
      Arena::create({.sizeBytes = 4 * kMiB, .pageKind = PageKind::Plain, .populate = true});
  ASSERT_TRUE(populated.ok()) << populated.error().message;
  EXPECT_EQ(residentPages(*populated), 4 * kMiB / pageBytes);
}

TEST(ShmArena, ZeroSizeIsRejected) {
  Result<Arena> arena = Arena::create({.sizeBytes = 0});
  ASSERT_FALSE(arena.ok());
  EXPECT_EQ(arena.code(), ShmErrc::BadSize);
}

TEST(ShmArena, ExplicitHugetlbFailsInsteadOfFallingBack) {
  uint64_t freePages = freeHugePages(2 * kMiB);
  // Ask for more huge pages than are free: must fail with the counts, never fall back.
  uint64_t size = (freePages + 1) * 2 * kMiB;
  Result<Arena> arena = Arena::create({.sizeBytes = size, .pageKind = PageKind::Hugetlb2M});
  ASSERT_FALSE(arena.ok());
  EXPECT_EQ(arena.code(), ShmErrc::PageKindUnavailable);
  EXPECT_NE(arena.error().message.find("hugetlb-2m was requested"), std::string::npos)
      << arena.error().message;
  EXPECT_NE(arena.error().message.find("need " + std::to_string(freePages + 1)),
            std::string::npos)
      << arena.error().message;
}

TEST(ShmArena, HugetlbWhenHugePagesAreFree) {
  if (freeHugePages(2 * kMiB) < 4) {
    GTEST_SKIP() << "fewer than 4 free 2 MiB huge pages (HugePages_Free in /proc/meminfo); "
                    "run tools/reserve-hugepages 2M 64 as root to exercise this path";
  }
  Result<Arena> arena = Arena::create({.sizeBytes = 3 * kMiB, .pageKind = PageKind::Hugetlb2M});
  ASSERT_TRUE(arena.ok()) << arena.error().message;
  EXPECT_EQ(arena->pageKind(), PageKind::Hugetlb2M);
  EXPECT_EQ(arena->pageSizeBytes(), 2 * kMiB);
  EXPECT_EQ(arena->sizeBytes(), 4 * kMiB);
  Result<Arena> autoArena = Arena::create({.sizeBytes = 4 * kMiB});
  ASSERT_TRUE(autoArena.ok());
  EXPECT_EQ(autoArena->pageKind(), PageKind::Hugetlb2M) << autoArena->pageKindReason();
  // A second mapping of the hugetlb fd sees the same bytes.
  std::memcpy(arena->at(2 * kMiB + 8, 5), "hello", 5);
  Result<ArenaView> view = ArenaView::map(arena->fd(), arena->sizeBytes());
  ASSERT_TRUE(view.ok()) << view.error().message;
  EXPECT_EQ(std::memcmp(view->at(2 * kMiB + 8, 5), "hello", 5), 0);
}

TEST(ShmArena, ThpWhenTheKernelAllowsIt) {
  Result<Arena> arena = Arena::create({.sizeBytes = 4 * kMiB, .pageKind = PageKind::Thp});
  if (!arena.ok()) {
    EXPECT_EQ(arena.code(), ShmErrc::PageKindUnavailable);
    EXPECT_NE(arena.error().message.find("shmem_enabled"), std::string::npos)
        << arena.error().message;
    GTEST_SKIP() << arena.error().message;
  }
  EXPECT_EQ(arena->pageKind(), PageKind::Thp);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(arena->base()) % (2 * kMiB), 0u) << "PMD aligned";
}

TEST(ShmArena, ForkedChildSeesAndWritesDataAtAnOffset) {
  Result<Arena> arena = Arena::create({.sizeBytes = 4 * kMiB});
  ASSERT_TRUE(arena.ok()) << arena.error().message;
  const uint64_t offset = 3 * kMiB + 128;
  std::memcpy(arena->at(offset, 6), "parent", 6);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child maps the fd afresh, as a client process would after receiving it.
    Result<ArenaView> view = ArenaView::map(arena->fd(), arena->sizeBytes());
    if (!view.ok()) ::_exit(2);
    if (std::memcmp(view->at(offset, 6), "parent", 6) != 0) ::_exit(3);
    std::memcpy(view->at(offset + 4096, 5), "child", 5);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0) << "2: map failed, 3: data not visible in child";
  EXPECT_EQ(std::memcmp(arena->at(offset + 4096, 5), "child", 5), 0);
}

TEST(ShmArena, ViewRejectsSizesBeyondTheFd) {
  Result<Arena> arena = Arena::create({.sizeBytes = 2 * kMiB, .pageKind = PageKind::Plain});
  ASSERT_TRUE(arena.ok());
  Result<ArenaView> view = ArenaView::map(arena->fd(), 4 * kMiB);
  ASSERT_FALSE(view.ok());
  EXPECT_EQ(view.code(), ShmErrc::MapFailed);
  EXPECT_NE(view.error().message.find("holds only 2 MiB"), std::string::npos)
      << view.error().message;
  EXPECT_FALSE(ArenaView::map(-1, kMiB).ok());
}

TEST(ShmArena, MlockFailureNamesRlimitMemlock) {
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &old), 0);
  pid_t pid = ::fork();  // lower the limit in a child so the test process keeps its own
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    struct rlimit low = {64 * 1024, 64 * 1024};
    ::setrlimit(RLIMIT_MEMLOCK, &low);
    Result<Arena> arena =
        Arena::create({.sizeBytes = 8 * kMiB, .pageKind = PageKind::Plain, .lockMemory = true});
    if (arena.ok()) ::_exit(arena->mlocked() ? 10 : 1);  // 10: privileged (CAP_IPC_LOCK)
    if (arena.code() != ShmErrc::MlockFailed) ::_exit(2);
    if (arena.error().message.find("RLIMIT_MEMLOCK is 64 KiB") == std::string::npos) ::_exit(3);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 10) GTEST_SKIP() << "mlock ignores RLIMIT_MEMLOCK here (CAP_IPC_LOCK)";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(ShmArena, MlockSucceedsWithinTheLimit) {
  Result<Arena> arena =
      Arena::create({.sizeBytes = 64 * 1024, .pageKind = PageKind::Plain, .lockMemory = true});
  if (!arena.ok()) GTEST_SKIP() << arena.error().message;
  EXPECT_TRUE(arena->mlocked());
}

TEST(ShmArena, PageKindNamesRoundTrip) {
  for (auto kind : {PageKind::Auto, PageKind::Hugetlb1G, PageKind::Hugetlb2M, PageKind::Thp,
                    PageKind::Plain}) {
    EXPECT_EQ(*parsePageKind(pageKindName(kind)), kind);
  }
  Result<PageKind> bad = parsePageKind("huge");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("hugetlb-2m"), std::string::npos);
}

}  // namespace
}  // namespace sidecar::shm
