#include "rpc/peer_service.h"

#include "rpc/session_service.h"
#include "rpc/transfer_backend.h"

namespace sidecar::rpc {

PeerIdentity readHello(proto::PeerHello::Reader hello) {
  PeerIdentity out;
  out.protocolVersion = hello.getProtocolVersion();
  out.nodeId = hello.getNodeId();
  out.incarnation = hello.getIncarnation();
  out.address = hello.getAddress();
  auto ucx = hello.getUcxAddress();
  out.ucxAddress.assign(reinterpret_cast<const char*>(ucx.begin()), ucx.size());
  out.linkId = hello.getLinkId();
  out.ucxMessageMaxBytes = hello.getUcxMessageMaxBytes();
  return out;
}

void writeHello(const PeerIdentity& identity, proto::PeerHello::Builder hello) {
  hello.setProtocolVersion(identity.protocolVersion);
  hello.setNodeId(identity.nodeId);
  hello.setIncarnation(identity.incarnation);
  hello.setAddress(identity.address);
  hello.setUcxAddress(kj::arrayPtr(reinterpret_cast<const kj::byte*>(identity.ucxAddress.data()),
                                   identity.ucxAddress.size()));
  hello.setLinkId(identity.linkId);
  hello.setUcxMessageMaxBytes(identity.ucxMessageMaxBytes);
}

PeerService::~PeerService() { backend_.closePeerLink(linkId_); }

PeerChunk readPeerChunk(proto::PeerChunk::Reader c, bool viewInline) {
  PeerChunk chunk;
  chunk.dataId = c.getDataId();
  chunk.chunkId = c.getChunkId();
  chunk.numChunks = c.getNumChunks();
  chunk.senderRank = c.getSenderRank();
  for (int32_t rank : c.getSenderGroup()) chunk.senderGroup.push_back(rank);
  chunk.destinations = readDestinations(c.getDestinations());
  auto payload = c.getPayload();
  if (payload.isObject()) {
    auto o = payload.getObject();
    auto bytes = o.getBytes();
    chunk.payload = transfer::ObjectChunk{
        o.getTypeTag(), std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size())};
    return chunk;
  }
  auto t = payload.getTensor();
  PeerTensor tensor;
  tensor.dtype = fromProto(t.getDtype());
  for (int64_t dim : t.getShape()) tensor.shape.push_back(dim);
  tensor.sizeBytes = t.getSizeBytes();
  auto body = t.getBody();
  if (body.isInline()) {
    auto bytes = body.getInline();
    if (bytes.size() != tensor.sizeBytes) {
      throw transferError("invalid-argument",
                          "peer sent " + std::to_string(bytes.size()) +
                              " inline bytes for a tensor of " + std::to_string(tensor.sizeBytes) +
                              " bytes");
    }
    if (viewInline) {
      tensor.inlineView = bytes;
    } else {
      tensor.inlineBytes.assign(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
    }
  } else {
    auto ucx = body.getUcx();
    tensor.viaUcx = true;
    tensor.tag = ucx.getTag();
    tensor.pieces = ucx.getPieces();
    tensor.pieceBytes = ucx.getPieceBytes();
  }
  chunk.payload = std::move(tensor);
  return chunk;
}

kj::Promise<void> PeerService::deliver(DeliverContext context) {
  // The sending daemon gives up on a delivery only when the link dies; the backend then fails it.
  context.allowCancellation();
  PeerChunk chunk;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions(
                     [&]() { chunk = readPeerChunk(context.getParams().getChunk()); })) {
    return kj::mv(*e);
  }
  return backend_.deliver(linkId_, std::move(chunk));
}

kj::Promise<void> PeerService::closeStream(CloseStreamContext context) {
  auto p = context.getParams();
  return backend_.peerCloseStream(linkId_, p.getDataId(), p.getNumChunks(), p.getSenderRank(),
                                  readDestinations(p.getDestinations()));
}

kj::Promise<void> PeerService::heartbeat(HeartbeatContext context) {
  return backend_.heartbeat(linkId_);
}

}  // namespace sidecar::rpc
