#include "daemon/peer_messages.h"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "base/framed_builder.h"
#include "base/utf8.h"
#include "rpc/session_service.h"

namespace sidecar::daemon {

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
  base::FramedBuilder message((bodyBytes + 1024) / sizeof(capnp::word));
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

rpc::PeerChunk readPackedChunk(base::PackedDeliver&& packed) {
  rpc::PeerChunk chunk;
  chunk.dataId = std::move(packed.dataId);
  chunk.chunkId = packed.chunkId;
  chunk.numChunks = packed.numChunks;
  chunk.senderRank = packed.senderRank;
  chunk.senderGroup = std::move(packed.senderGroup);
  chunk.destinations = std::move(packed.destinations);
  rpc::PeerTensor tensor;
  tensor.dtype = rpc::fromProto(static_cast<proto::Dtype>(packed.dtype));
  tensor.shape = std::move(packed.shape);
  tensor.sizeBytes = packed.sizeBytes;
  tensor.inlineView = kj::arrayPtr(reinterpret_cast<const kj::byte*>(packed.body.data()), packed.body.size());
  chunk.payload = std::move(tensor);
  return chunk;
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
