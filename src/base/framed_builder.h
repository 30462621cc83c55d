#pragma once
// A Cap'n Proto message built in one zeroed array with a word free in front for the frame header,
// so that the framed message is sent from where it was built (messageToFlatArray would allocate
// and copy it, body included, once more). Used for PeerMessage.deliver by the daemon and by
// clients' direct sends.

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace sidecar::base {

// Segments past the first, if the estimate was short, come from the heap, and the message is
// then flattened as usual.
class FramedBuilder final : public capnp::MessageBuilder {
 public:
  explicit FramedBuilder(size_t firstSegmentWords)
      : buffer_(kj::heapArray<capnp::word>(firstSegmentWords + 1)) {
    std::memset(buffer_.begin(), 0, buffer_.asBytes().size());
  }

  kj::ArrayPtr<capnp::word> allocateSegment(unsigned minimumSize) override {
    if (!firstGiven_) {
      firstGiven_ = true;
      if (minimumSize <= buffer_.size() - 1) return buffer_.slice(1, buffer_.size());
    }
    auto more = kj::heapArray<capnp::word>(std::max<size_t>(minimumSize, 1024));
    std::memset(more.begin(), 0, more.asBytes().size());
    auto segment = more.asPtr();
    more_.push_back(kj::mv(more));
    return segment;
  }

  // The framed message (segment table, then the segments); the builder is spent.
  kj::Array<capnp::word> finish() {
    auto segments = getSegmentsForOutput();
    if (segments.size() != 1 || segments[0].begin() != buffer_.begin() + 1) {
      return capnp::messageToFlatArray(segments);
    }
    // The table of a one-segment message: (segment count - 1, segment size in words).
    uint32_t table[2] = {0, static_cast<uint32_t>(segments[0].size())};
    std::memcpy(buffer_.begin(), table, sizeof table);
    return buffer_.slice(0, 1 + segments[0].size()).attach(kj::mv(buffer_));
  }

 private:
  kj::Array<capnp::word> buffer_;
  bool firstGiven_ = false;
  std::vector<kj::Array<capnp::word>> more_;
};

}  // namespace sidecar::base
