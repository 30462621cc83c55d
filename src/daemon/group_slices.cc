#include "daemon/group_slices.h"

namespace sidecar::daemon {

GroupSlice groupSlice(uint64_t totalBytes, uint32_t elementBytes, uint32_t members,
                      uint32_t position) {
  uint64_t element = elementBytes == 0 ? 1 : elementBytes;
  uint64_t count = members == 0 ? 1 : members;
  if (position >= count) return {};
  uint64_t elements = totalBytes / element;
  uint64_t base = elements / count;
  uint64_t extra = elements % count;  // the first `extra` members take one element more
  uint64_t firstElement = position * base + (position < extra ? position : extra);
  uint64_t mine = base + (position < extra ? 1 : 0);
  GroupSlice slice{firstElement * element, mine * element};
  // The tail past the last whole element (never, for a tensor) rides with the last real slice.
  uint64_t nonEmpty = elements < count ? elements : count;
  if (nonEmpty == 0) {
    if (position == 0) slice = {0, totalBytes};
  } else if (position == nonEmpty - 1) {
    slice.sizeBytes += totalBytes - elements * element;
  }
  return slice;
}

}  // namespace sidecar::daemon
