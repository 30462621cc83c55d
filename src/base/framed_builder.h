#pragma once
// A Cap'n Proto message built in one zeroed array with a word free in front for the frame header,
// so that the framed message is sent from where it was built (messageToFlatArray would allocate
// and copy it, body included, once more). Used for the daemon's PeerMessage.deliver and for
// lane answers (in a buffer the lane keeps).

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
      : owned_(kj::heapArray<capnp::word>(firstSegmentWords + 1)), buffer_(owned_) {
    std::memset(buffer_.begin(), 0, buffer_.asBytes().size());
  }
  // In the caller's buffer, which must be zeroed where the message will go (it is not taken:
  // a sender that keeps one buffer zeroes only what the last message wrote).
  explicit FramedBuilder(kj::ArrayPtr<capnp::word> zeroedBuffer) : buffer_(zeroedBuffer) {}

  // The framed message where it was built (its segment table written in the word in front), or
  // an empty array when it took more than the first segment (then use finish()).
  kj::ArrayPtr<capnp::word> framedInPlace() {
    auto segments = getSegmentsForOutput();
    if (segments.size() != 1 || segments[0].begin() != buffer_.begin() + 1) return nullptr;
    uint32_t table[2] = {0, static_cast<uint32_t>(segments[0].size())};
    std::memcpy(buffer_.begin(), table, sizeof table);
    return buffer_.slice(0, 1 + segments[0].size());
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

  // The framed message (segment table, then the segments); the builder is spent. With the
  // caller's buffer, a message built in place is copied out (use framedInPlace() to avoid it).
  kj::Array<capnp::word> finish() {
    auto framed = framedInPlace();
    if (framed.size() == 0) return capnp::messageToFlatArray(getSegmentsForOutput());
    if (owned_.size() == 0) return kj::heapArray<capnp::word>(framed);
    // The table of a one-segment message, (segment count - 1, segment size in words), is in
    // the word in front.
    return framed.attach(kj::mv(owned_));
  }

 private:
  kj::Array<capnp::word> owned_;
  kj::ArrayPtr<capnp::word> buffer_;
  bool firstGiven_ = false;
  std::vector<kj::Array<capnp::word>> more_;
};

}  // namespace sidecar::base
