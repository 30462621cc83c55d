// The node's shared-memory arena: one memfd, mapped read/write, sized once at startup.
//
// Contract
// - `Arena::create` makes one memfd of `sizeBytes` (rounded up to the page size it got) and maps
//   it. Page kinds are tried in order hugetlb (2 MiB, or 1 GiB when asked) -> shmem with
//   transparent huge pages (madvise(MADV_HUGEPAGE)) -> plain 4 KiB pages, when `pageKind` is
//   Auto. `pageKindReason()` says, in words, which kind it got and why each better kind was
//   refused ("hugetlb 2MiB unavailable: only 0 free huge pages (need 512); using THP").
//   An explicit kind (Hugetlb1G, Hugetlb2M, Thp, Plain) never falls back: it fails with
//   PageKindUnavailable and the same explanation.
// - Memory is identified across processes by offsets (uint64, from the start of the arena),
//   never by pointers. `fd()` is passed to clients (SCM_RIGHTS), which map it with
//   `ArenaView::map(fd, sizeBytes)`.
// - `lockMemory` mlocks the whole mapping; failure is MlockFailed naming RLIMIT_MEMLOCK.
// - Hugetlb memory is reserved at map time, so a created hugetlb arena cannot SIGBUS later for
//   lack of huge pages. THP and plain arenas are backed lazily unless `populate` is set.
//   `populate` faults them all in at create; failure (e.g. the memory is not free) is MapFailed.
//
// Cost: create is a few syscalls plus, with populate or lockMemory, touching every page (about
// 0.1-0.3 s per GiB with 4 KiB pages, far less with huge pages). Nothing here is on a data path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "shm/result.h"

namespace sidecar::shm {

enum class PageKind : unsigned char { Auto, Hugetlb1G, Hugetlb2M, Thp, Plain };

// "auto" | "hugetlb-1g" | "hugetlb-2m" | "thp" | "plain".
std::string_view pageKindName(PageKind kind) noexcept;
// Inverse of pageKindName; BadSize-free: unknown names fail with PageKindUnavailable listing the
// accepted names.
Result<PageKind> parsePageKind(std::string_view name);

struct ArenaOptions {
  uint64_t sizeBytes = 0;           // required, > 0; rounded up to the page size obtained
  PageKind pageKind = PageKind::Auto;
  bool lockMemory = false;          // mlock the mapping (needs RLIMIT_MEMLOCK >= sizeBytes)
  bool populate = false;            // pre-fault every page at create time (MAP_POPULATE for
                                    // hugetlb; else MADV_POPULATE_WRITE, or a store per page)
  std::string name = "sidecar-arena";  // memfd name, visible in /proc/<pid>/fd and maps
};

// Free huge pages of the given size (2 MiB or 1 GiB) according to sysfs; 0 if unknown.
uint64_t freeHugePages(uint64_t pageSizeBytes) noexcept;

class Arena {
 public:
  static Result<Arena> create(const ArenaOptions& options);

  Arena(Arena&& other) noexcept;
  Arena& operator=(Arena&& other) noexcept;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();  // unmaps and closes the fd; clients' mappings stay valid (the memfd lives on)

  int fd() const noexcept { return fd_; }
  std::byte* base() const noexcept { return base_; }
  uint64_t sizeBytes() const noexcept { return sizeBytes_; }
  // The kind obtained (never Auto) and its page size in bytes.
  PageKind pageKind() const noexcept { return kind_; }
  uint64_t pageSizeBytes() const noexcept { return pageSizeBytes_; }
  // Which kind was obtained and why the better ones were not, for logs and stats.
  const std::string& pageKindReason() const noexcept { return reason_; }
  bool mlocked() const noexcept { return mlocked_; }

  // Pointer to `offset` in this process's mapping. Checked: offset + lengthBytes <= sizeBytes.
  std::byte* at(uint64_t offset, uint64_t lengthBytes = 0) const;

 private:
  Arena() = default;
  void reset() noexcept;

  int fd_ = -1;
  std::byte* base_ = nullptr;
  uint64_t sizeBytes_ = 0;
  uint64_t pageSizeBytes_ = 0;
  PageKind kind_ = PageKind::Plain;
  bool mlocked_ = false;
  std::string reason_;
};

// A client's mapping of an arena it received as an fd. Read/write, MAP_SHARED, 2 MiB aligned so
// THP-backed arenas can be mapped with huge pages here too. Does not take ownership of `fd`
// (the caller may close it after map returns).
class ArenaView {
 public:
  static Result<ArenaView> map(int fd, uint64_t sizeBytes);

  ArenaView(ArenaView&& other) noexcept;
  ArenaView& operator=(ArenaView&& other) noexcept;
  ArenaView(const ArenaView&) = delete;
  ArenaView& operator=(const ArenaView&) = delete;
  ~ArenaView();

  std::byte* base() const noexcept { return base_; }
  uint64_t sizeBytes() const noexcept { return sizeBytes_; }
  std::byte* at(uint64_t offset, uint64_t lengthBytes = 0) const;

 private:
  ArenaView() = default;
  std::byte* base_ = nullptr;
  uint64_t sizeBytes_ = 0;
};

}  // namespace sidecar::shm
