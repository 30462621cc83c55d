// One compact snapshot of the arena and its allocator, for the daemon's status report.
// Cost: one SlabAllocator::stats() call (walks all slab metadata); owner thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "shm/arena.h"
#include "shm/slab_allocator.h"

namespace sidecar::shm {

struct ShmStats {
  uint64_t arenaBytes = 0;
  std::string pageKind;        // "hugetlb-2m", "thp", ...
  std::string pageKindReason;  // why that kind (and not a better one)
  bool mlocked = false;
  uint64_t slabSizeBytes = 0;
  uint64_t slabsTotal = 0;
  uint64_t slabsFree = 0;
  uint64_t usedBytes = 0;
  uint64_t freeBytes = 0;
  uint64_t waitersQueued = 0;
  std::vector<HintStats> hints;  // sorted by hint
};

ShmStats collectShmStats(const Arena& arena, const SlabAllocator& allocator);

}  // namespace sidecar::shm
