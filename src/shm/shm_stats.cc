#include "shm/shm_stats.h"

namespace sidecar::shm {

ShmStats collectShmStats(const Arena& arena, const SlabAllocator& allocator) {
  AllocatorStats a = allocator.stats();
  ShmStats s;
  s.arenaBytes = arena.sizeBytes();
  s.pageKind = std::string(pageKindName(arena.pageKind()));
  s.pageKindReason = arena.pageKindReason();
  s.mlocked = arena.mlocked();
  s.slabSizeBytes = a.slabSizeBytes;
  s.slabsTotal = a.slabsTotal;
  s.slabsFree = a.slabsFree;
  s.usedBytes = a.usedBytes;
  s.freeBytes = a.freeBytes;
  s.waitersQueued = a.waitersQueued;
  s.hints = std::move(a.hints);
  return s;
}

}  // namespace sidecar::shm
