#include "shm/arena.h"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

#include "shm/sizes.h"

namespace sidecar::shm {
namespace {

constexpr uint64_t kSmallPageBytes = 4096;
constexpr uint64_t kThpBytes = 2 * kMiB;

std::string errnoText(int err) { return std::strerror(err); }

std::string readSysfsLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return {};
  return line;
}

uint64_t readSysfsNumber(const std::string& path) {
  std::string line = readSysfsLine(path);
  if (line.empty()) return 0;
  return std::strtoull(line.c_str(), nullptr, 10);
}

// "always within_size advise [never] deny force" -> "never".
std::string bracketedChoice(const std::string& line) {
  size_t open = line.find('[');
  size_t close = line.find(']', open);
  if (open == std::string::npos || close == std::string::npos) return line;
  return line.substr(open + 1, close - open - 1);
}

const char* hugetlbLabel(uint64_t pageBytes) { return pageBytes == kGiB ? "1GiB" : "2MiB"; }

// Maps `sizeBytes` of `fd` at an address aligned to `alignBytes` (huge pages need it; THP gets
// PMD mappings only on 2 MiB aligned addresses). Returns nullptr with errno set on failure.
std::byte* mapAligned(int fd, uint64_t sizeBytes, uint64_t alignBytes, int extraFlags) {
  uint64_t reserveBytes = sizeBytes + alignBytes;
  void* reserve = ::mmap(nullptr, reserveBytes, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return nullptr;
  auto start = reinterpret_cast<uintptr_t>(reserve);
  uintptr_t aligned = (start + alignBytes - 1) & ~(uintptr_t{alignBytes} - 1);
  void* mapped = ::mmap(reinterpret_cast<void*>(aligned), sizeBytes, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_FIXED | extraFlags, fd, 0);
  if (mapped == MAP_FAILED) {
    int err = errno;
    ::munmap(reserve, reserveBytes);
    errno = err;
    return nullptr;
  }
  if (aligned > start) ::munmap(reserve, aligned - start);
  uintptr_t end = aligned + sizeBytes;
  uintptr_t reserveEnd = start + reserveBytes;
  if (reserveEnd > end) ::munmap(reinterpret_cast<void*>(end), reserveEnd - end);
  return static_cast<std::byte*>(mapped);
}

// Faults every page of a new shmem mapping in, writable; returns 0 or the errno of the failure
// (ENOMEM: the memory is not there). MADV_POPULATE_WRITE (Linux 5.14) does it in one call; a
// kernel without it (EINVAL) gets one store per page (the arena is new and all zero, and nobody
// else maps it yet, so storing a zero changes nothing).
int prefault(std::byte* base, uint64_t sizeBytes) {
  if (::madvise(base, sizeBytes, MADV_POPULATE_WRITE) == 0) return 0;
  if (errno != EINVAL) return errno;
  auto pageBytes = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  volatile std::byte* bytes = base;
  for (uint64_t offset = 0; offset < sizeBytes; offset += pageBytes) bytes[offset] = std::byte{0};
  return 0;
}

bool isHugetlb(PageKind kind) { return kind == PageKind::Hugetlb1G || kind == PageKind::Hugetlb2M; }

struct Attempt {
  int fd = -1;
  std::byte* base = nullptr;
  uint64_t sizeBytes = 0;
  uint64_t pageBytes = 0;
  std::string why;  // on failure: why this kind is unavailable; on success: a note
};

Attempt tryHugetlb(const ArenaOptions& options, uint64_t pageBytes) {
  Attempt a;
  a.pageBytes = pageBytes;
  a.sizeBytes = roundUpBytes(options.sizeBytes, pageBytes);
  uint64_t needPages = a.sizeBytes / pageBytes;
  std::string dir = "/sys/kernel/mm/hugepages/hugepages-" +
                    std::to_string(pageBytes / kKiB) + "kB/";
  const std::string label = std::string("hugetlb ") + hugetlbLabel(pageBytes);
  if (::access(dir.c_str(), F_OK) != 0) {
    a.why = label + " unavailable: the kernel offers no " + hugetlbLabel(pageBytes) +
            " huge pages (" + dir + " missing)";
    return a;
  }
  uint64_t available = freeHugePages(pageBytes);
  if (available < needPages) {
    a.why = label + " unavailable: only " + std::to_string(available) +
            " free huge pages (need " + std::to_string(needPages) +
            "; reserve them with tools/reserve-hugepages " +
            (pageBytes == kGiB ? "1G " : "2M ") + std::to_string(needPages) + ")";
    return a;
  }
  unsigned flags = MFD_CLOEXEC | MFD_HUGETLB | (pageBytes == kGiB ? MFD_HUGE_1GB : MFD_HUGE_2MB);
  a.fd = ::memfd_create(options.name.c_str(), flags);
  if (a.fd < 0) {
    a.why = label + " unavailable: memfd_create(MFD_HUGETLB) failed: " + errnoText(errno);
    return a;
  }
  if (::ftruncate(a.fd, static_cast<off_t>(a.sizeBytes)) != 0) {
    a.why = label + " unavailable: ftruncate to " + formatBytes(a.sizeBytes) +
            " failed: " + errnoText(errno);
  } else if ((a.base = mapAligned(a.fd, a.sizeBytes, pageBytes,
                                  options.populate ? MAP_POPULATE : 0)) == nullptr) {
    a.why = label + " unavailable: mmap of " + std::to_string(needPages) +
            " huge pages failed: " + errnoText(errno) +
            " (another process may hold them, or a cgroup hugetlb limit applies)";
  } else {
    return a;
  }
  ::close(a.fd);
  a.fd = -1;
  return a;
}

// The effective shmem THP policy for 2 MiB pages: the per-size knob (kernels >= 6.11) wins over
// the global one unless it says "inherit".
std::string shmemThpPolicy() {
  std::string perSize = bracketedChoice(readSysfsLine(
      "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"));
  std::string global =
      bracketedChoice(readSysfsLine("/sys/kernel/mm/transparent_hugepage/shmem_enabled"));
  if (!perSize.empty() && perSize != "inherit") return perSize;
  return global;
}

Attempt tryShmem(const ArenaOptions& options, bool wantThp) {
  Attempt a;
  a.pageBytes = wantThp ? kThpBytes : kSmallPageBytes;
  a.sizeBytes = roundUpBytes(options.sizeBytes, wantThp ? kThpBytes : kSmallPageBytes);
  if (wantThp) {
    std::string policy = shmemThpPolicy();
    if (policy.empty()) {
      a.why = "THP unavailable: /sys/kernel/mm/transparent_hugepage/shmem_enabled is missing "
              "(kernel built without transparent huge pages)";
      return a;
    }
    if (policy == "never" || policy == "deny") {
      a.why = "THP unavailable: shmem THP is disabled (/sys/kernel/mm/transparent_hugepage/"
              "shmem_enabled = " + policy + "; set it to 'advise' to allow it)";
      return a;
    }
    a.why = "shmem_enabled = " + policy;
  }
  a.fd = ::memfd_create(options.name.c_str(), MFD_CLOEXEC);
  if (a.fd < 0) {
    a.why = std::string(wantThp ? "THP" : "plain") +
            " unavailable: memfd_create failed: " + errnoText(errno);
    return a;
  }
  if (::ftruncate(a.fd, static_cast<off_t>(a.sizeBytes)) != 0) {
    a.why = std::string(wantThp ? "THP" : "plain") + " unavailable: ftruncate to " +
            formatBytes(a.sizeBytes) + " failed: " + errnoText(errno);
  } else if ((a.base = mapAligned(a.fd, a.sizeBytes, kThpBytes, 0)) == nullptr) {
    a.why = std::string(wantThp ? "THP" : "plain") + " unavailable: mmap of " +
            formatBytes(a.sizeBytes) + " failed: " + errnoText(errno);
  } else if (wantThp && ::madvise(a.base, a.sizeBytes, MADV_HUGEPAGE) != 0) {
    a.why = "THP unavailable: madvise(MADV_HUGEPAGE) failed: " + errnoText(errno);
    ::munmap(a.base, a.sizeBytes);
    a.base = nullptr;
  } else {
    return a;  // populated by create(), after madvise(MADV_HUGEPAGE) (MAP_POPULATE would be before)
  }
  ::close(a.fd);
  a.fd = -1;
  return a;
}

}  // namespace

std::string_view pageKindName(PageKind kind) noexcept {
  switch (kind) {
    case PageKind::Auto: return "auto";
    case PageKind::Hugetlb1G: return "hugetlb-1g";
    case PageKind::Hugetlb2M: return "hugetlb-2m";
    case PageKind::Thp: return "thp";
    case PageKind::Plain: return "plain";
  }
  return "unknown";
}

Result<PageKind> parsePageKind(std::string_view name) {
  for (PageKind kind : {PageKind::Auto, PageKind::Hugetlb1G, PageKind::Hugetlb2M, PageKind::Thp,
                        PageKind::Plain}) {
    if (pageKindName(kind) == name) return kind;
  }
  return ShmError{ShmErrc::PageKindUnavailable,
                  "unknown page kind '" + std::string(name) +
                      "'; expected one of auto, hugetlb-1g, hugetlb-2m, thp, plain"};
}

uint64_t freeHugePages(uint64_t pageSizeBytes) noexcept {
  try {
    std::string dir = "/sys/kernel/mm/hugepages/hugepages-" +
                      std::to_string(pageSizeBytes / kKiB) + "kB/";
    uint64_t freePages = readSysfsNumber(dir + "free_hugepages");
    uint64_t reserved = readSysfsNumber(dir + "resv_hugepages");
    return freePages > reserved ? freePages - reserved : 0;
  } catch (...) {
    return 0;
  }
}

Result<Arena> Arena::create(const ArenaOptions& options) {
  if (options.sizeBytes == 0) {
    return ShmError{ShmErrc::BadSize, "arena size is 0 bytes; configure a size such as '64GiB'"};
  }
  if (options.sizeBytes > (uint64_t{1} << 56)) {
    return ShmError{ShmErrc::BadSize, "arena size " + formatBytes(options.sizeBytes) +
                                          " is beyond what Linux can map"};
  }
  std::string refused;  // why better kinds were skipped, "; "-separated
  auto note = [&](const std::string& why) {
    if (!refused.empty()) refused += "; ";
    refused += why;
  };
  Attempt got;
  PageKind kind = PageKind::Plain;
  const PageKind want = options.pageKind;
  auto explicitFailure = [&](const Attempt& a) {
    return ShmError{ShmErrc::PageKindUnavailable,
                    "page kind " + std::string(pageKindName(want)) + " was requested for a " +
                        formatBytes(options.sizeBytes) + " arena but " + a.why};
  };

  if (isHugetlb(want)) {
    uint64_t pageBytes = want == PageKind::Hugetlb1G ? kGiB : 2 * kMiB;
    got = tryHugetlb(options, pageBytes);
    if (!got.base) return explicitFailure(got);
    kind = want;
    refused = std::string("hugetlb ") + hugetlbLabel(pageBytes) + " as requested";
  } else if (want == PageKind::Thp) {
    got = tryShmem(options, true);
    if (!got.base) return explicitFailure(got);
    kind = PageKind::Thp;
    refused = "THP as requested (" + got.why + ")";
  } else if (want == PageKind::Plain) {
    got = tryShmem(options, false);
    if (!got.base) return explicitFailure(got);
    kind = PageKind::Plain;
    refused = "plain pages as requested";
  } else {
    got = tryHugetlb(options, 2 * kMiB);
    if (got.base) {
      kind = PageKind::Hugetlb2M;
      refused = "using hugetlb 2MiB";
    } else {
      note(got.why);
      Attempt thp = tryShmem(options, true);
      if (thp.base) {
        got = std::move(thp);
        kind = PageKind::Thp;
        note("using THP (" + got.why + ")");
      } else {
        note(thp.why);
        got = tryShmem(options, false);
        if (!got.base) {
          return ShmError{ShmErrc::MapFailed, "cannot create a " + formatBytes(options.sizeBytes) +
                                                  " arena: " + refused + "; " + got.why};
        }
        kind = PageKind::Plain;
        note("using plain 4KiB pages");
      }
    }
  }

  Arena arena;
  arena.fd_ = got.fd;
  arena.base_ = got.base;
  arena.sizeBytes_ = got.sizeBytes;
  arena.pageSizeBytes_ = got.pageBytes;
  arena.kind_ = kind;
  arena.reason_ = std::move(refused);
  // Hugetlb mappings were made with MAP_POPULATE.
  if (options.populate && !isHugetlb(kind)) {
    if (int err = prefault(arena.base_, arena.sizeBytes_); err != 0) {
      return ShmError{ShmErrc::MapFailed,
                      "faulting in the " + formatBytes(arena.sizeBytes_) + " arena failed: " +
                          errnoText(err) + " (is that much memory free? use a smaller arena, or "
                          "turn populate off to back it on first touch)"};
    }
  }
  if (options.lockMemory) {
    if (::mlock(arena.base_, arena.sizeBytes_) != 0) {
      int err = errno;
      struct rlimit limit {};
      ::getrlimit(RLIMIT_MEMLOCK, &limit);
      std::string limitText = limit.rlim_cur == RLIM_INFINITY ? std::string("unlimited")
                                                              : formatBytes(limit.rlim_cur);
      return ShmError{ShmErrc::MlockFailed,
                      "mlock of the " + formatBytes(arena.sizeBytes_) + " arena failed: " +
                          errnoText(err) + "; RLIMIT_MEMLOCK is " + limitText +
                          " (raise it with 'ulimit -l unlimited' or LimitMEMLOCK=infinity in the "
                          "systemd unit, or turn memory locking off)"};
    }
    arena.mlocked_ = true;
  }
  return arena;
}

Arena::Arena(Arena&& other) noexcept { *this = std::move(other); }

Arena& Arena::operator=(Arena&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = std::exchange(other.fd_, -1);
    base_ = std::exchange(other.base_, nullptr);
    sizeBytes_ = std::exchange(other.sizeBytes_, 0);
    pageSizeBytes_ = other.pageSizeBytes_;
    kind_ = other.kind_;
    mlocked_ = std::exchange(other.mlocked_, false);
    reason_ = std::move(other.reason_);
  }
  return *this;
}

Arena::~Arena() { reset(); }

void Arena::reset() noexcept {
  if (base_) ::munmap(base_, sizeBytes_);
  if (fd_ >= 0) ::close(fd_);
  base_ = nullptr;
  fd_ = -1;
}

std::byte* Arena::at(uint64_t offset, uint64_t lengthBytes) const {
  SIDECAR_SHM_CHECK(offset <= sizeBytes_ && lengthBytes <= sizeBytes_ - offset,
                    "offset " + std::to_string(offset) + " + " + std::to_string(lengthBytes) +
                        " B is outside the " + formatBytes(sizeBytes_) + " arena");
  return base_ + offset;
}

Result<ArenaView> ArenaView::map(int fd, uint64_t sizeBytes) {
  if (sizeBytes == 0) return ShmError{ShmErrc::BadSize, "cannot map an arena of 0 bytes"};
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    return ShmError{ShmErrc::MapFailed,
                    "cannot map arena fd " + std::to_string(fd) + ": fstat failed: " +
                        errnoText(errno)};
  }
  if (static_cast<uint64_t>(st.st_size) < sizeBytes) {
    return ShmError{ShmErrc::MapFailed, "cannot map " + formatBytes(sizeBytes) + " of arena fd " +
                                            std::to_string(fd) + ": it holds only " +
                                            formatBytes(static_cast<uint64_t>(st.st_size))};
  }
  // Hugetlb files report their page size as st_blksize; map at that alignment.
  uint64_t alignBytes = std::max<uint64_t>(static_cast<uint64_t>(st.st_blksize), kThpBytes);
  std::byte* base = mapAligned(fd, sizeBytes, alignBytes, 0);
  if (!base) {
    return ShmError{ShmErrc::MapFailed, "mmap of " + formatBytes(sizeBytes) + " of arena fd " +
                                            std::to_string(fd) + " failed: " + errnoText(errno)};
  }
  ArenaView view;
  view.base_ = base;
  view.sizeBytes_ = sizeBytes;
  return view;
}

ArenaView::ArenaView(ArenaView&& other) noexcept { *this = std::move(other); }

ArenaView& ArenaView::operator=(ArenaView&& other) noexcept {
  if (this != &other) {
    if (base_) ::munmap(base_, sizeBytes_);
    base_ = std::exchange(other.base_, nullptr);
    sizeBytes_ = std::exchange(other.sizeBytes_, 0);
  }
  return *this;
}

ArenaView::~ArenaView() {
  if (base_) ::munmap(base_, sizeBytes_);
}

std::byte* ArenaView::at(uint64_t offset, uint64_t lengthBytes) const {
  SIDECAR_SHM_CHECK(offset <= sizeBytes_ && lengthBytes <= sizeBytes_ - offset,
                    "offset " + std::to_string(offset) + " + " + std::to_string(lengthBytes) +
                        " B is outside the " + formatBytes(sizeBytes_) + " arena view");
  return base_ + offset;
}

}  // namespace sidecar::shm
