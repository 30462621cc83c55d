#pragma once
// Concurrent copy of a sender group (issue 6, item 3): which part of a tensor each member copies.
//
// Every member of a tensor-parallel group holds the same replica. With concurrent copy on, member
// i (its position in the sorted group) copies only slice i of its replica, so the group's GPUs copy
// in parallel into ONE shared arena allocation. The split is by elements, as even as possible: the
// first `elements % members` members take one element more. A member whose slice is empty (more
// members than elements) copies nothing. Slices are contiguous, in member order, and cover the
// tensor exactly.

#include <cstdint>

namespace sidecar::daemon {

struct GroupSlice {
  uint64_t offsetBytes = 0;  // from the tensor's first byte
  uint64_t sizeBytes = 0;    // 0: this member copies nothing
};

// Slice of member `position` (0-based, < members) of a tensor of `totalBytes` made of elements of
// `elementBytes` (0 is taken as 1; a ragged tail, which a well-formed tensor never has, goes to
// the last non-empty slice). `members` 0 is taken as 1.
GroupSlice groupSlice(uint64_t totalBytes, uint32_t elementBytes, uint32_t members,
                      uint32_t position);

}  // namespace sidecar::daemon
