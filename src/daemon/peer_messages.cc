#include "daemon/peer_messages.h"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "base/utf8.h"
#include "rpc/session_service.h"

namespace sidecar::daemon {
namespace {

// Builds a message in one zeroed array with a word free in front for the frame header, so that
// the framed message is sent from where it was built: messageToFlatArray would allocate and copy
// it (body included) once more. Segments past the first, if the estimate was short, come from the
// heap, and the message is then flattened as usual.
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

}  // namespace

void writeChunkHeader(const OutgoingChunk& chunk, proto::PeerChunk::Builder c) {
  c.setDataId(chunk.dataId);
  c.setChunkId(chunk.chunkId);
  c.setNumChunks(chunk.numChunks);
  c.setSenderRank(chunk.senderRank);
  auto group = c.initSenderGroup(static_cast<unsigned>(chunk.senderGroup.size()));
  for (size_t i = 0; i < chunk.senderGroup.size(); ++i) {
    group.set(static_cast<unsigned>(i), chunk.senderGroup[i]);
  }
  rpc::writeDestinations(c.initDestinations(static_cast<unsigned>(chunk.destinations.size())),
                         chunk.destinations);
  if (!chunk.isTensor) {
    auto o = c.initPayload().initObject();
    o.setTypeTag(chunk.object.typeTag);
    o.setBytes(kj::arrayPtr(reinterpret_cast<const kj::byte*>(chunk.object.bytes.data()),
                            chunk.object.bytes.size()));
    return;
  }
  auto t = c.initPayload().initTensor();
  t.setDtype(rpc::toProto(chunk.dtype));
  auto shape = t.initShape(static_cast<unsigned>(chunk.shape.size()));
  for (size_t i = 0; i < chunk.shape.size(); ++i) shape.set(static_cast<unsigned>(i), chunk.shape[i]);
  t.setSizeBytes(chunk.sizeBytes);
}

kj::Array<capnp::word> encodePeerDeliver(uint32_t seq, const OutgoingChunk& chunk) {
  uint64_t bodyBytes = chunk.isTensor ? chunk.sizeBytes : chunk.object.bytes.size();
  // One segment for the usual case: the body plus a descriptor of a few hundred bytes.
  FramedBuilder message((bodyBytes + 1024) / sizeof(capnp::word));
  auto deliver = message.initRoot<proto::PeerMessage>().initDeliver();
  deliver.setSeq(seq);
  auto c = deliver.initChunk();
  writeChunkHeader(chunk, c);
  if (chunk.isTensor) {
    c.getPayload().getTensor().initBody().setInline(
        kj::arrayPtr(static_cast<const kj::byte*>(chunk.body), chunk.sizeBytes));
  }
  return message.finish();
}

kj::Array<capnp::word> encodePeerAck(uint32_t seq, std::string_view error) {
  capnp::MallocMessageBuilder message(64 + kPeerAckErrorMaxBytes / sizeof(capnp::word));
  auto ack = message.initRoot<proto::PeerMessage>().initAck();
  ack.setSeq(seq);
  auto text = utf8Prefix(error, kPeerAckErrorMaxBytes);
  ack.setError(capnp::Text::Reader(text.data(), text.size()));
  return capnp::messageToFlatArray(message);
}

}  // namespace sidecar::daemon
