#pragma once
// Small deliveries between daemons as single UCX tagged messages (schema: PeerMessage; see
// docs/PROTOCOL.md, "Small deliveries over UCX"): the tag layout, encoding a deliver or an ack
// as a flat Cap'n Proto message, and reading an executor's packed deliver.
//
// Why: a Peer.deliver call costs a Cap'n Proto dispatch on each daemon and a TCP hop through the
// reactors' io_uring; a tagged message is taken by the UCX worker the reactor already progresses
// while it spins, which is the latency path for tensors of a few KiB. Large bodies still go as
// tagged pieces behind a deliver call (peer_links.h); the control connection still carries the
// handshake, heartbeats, closeStream and every delivery to a peer that takes no messages.

#include <capnp/common.h>
#include <kj/array.h>

#include <cstdint>
#include <string_view>

#include "base/packed_deliver.h"
#include "daemon/peer_links.h"
#include "rpc/peer_backend.h"
#include "sidecar.capnp.h"

namespace sidecar::daemon {

// Tags: top 24 bits zero (a body tag has the receiver's non-zero link id there), the kind in bits
// 32-39, the id of the link at the message's receiving end in the low 32 bits.
inline constexpr uint64_t kPeerMessageKindMask = 0xffffffff00000000ull;
inline constexpr uint64_t kPeerDeliverKind = 1ull << 32;
inline constexpr uint64_t kPeerAckKind = 2ull << 32;

inline uint64_t peerDeliverTag(uint32_t receiverLinkId) { return kPeerDeliverKind | receiverLinkId; }
inline uint64_t peerAckTag(uint32_t senderLinkId) { return kPeerAckKind | senderLinkId; }
inline uint32_t peerMessageLinkId(uint64_t tag) { return static_cast<uint32_t>(tag); }

// The largest deliver message a daemon takes (announced as PeerHello.ucxMessageMaxBytes): room
// for a 64 KiB inline tensor or object and its descriptor. Larger deliveries are calls.
inline constexpr uint64_t kPeerMessageMaxBytes = 128 << 10;
// An ack's error text is cut to this (on a UTF-8 boundary); its buffer is this plus the header.
inline constexpr uint64_t kPeerAckErrorMaxBytes = 1024;
inline constexpr uint64_t kPeerAckMaxBytes = 2048;

// Appended to a link's `bodies` in status when its small deliveries go as messages.
inline constexpr const char* kSmallAsMessages = ", small ones as messages";

// Writes the chunk's descriptor and, for an object, its bytes. A tensor's body union is left for
// the caller (inline bytes, or UCX pieces).
void writeChunkHeader(const OutgoingChunk& chunk, proto::PeerChunk::Builder out);

// A deliver message with the body inline (the chunk is an object, or a tensor of all its bytes).
kj::Array<capnp::word> encodePeerDeliver(uint32_t seq, const OutgoingChunk& chunk);
// A packed deliver (an executor's direct send, base/packed_deliver.h) as the chunk a
// PeerMessage.deliver would have carried; its body stays a view into the message. Throws
// [invalid-argument] for a dtype this daemon does not know.
rpc::PeerChunk readPackedChunk(base::PackedDeliver&& packed);
// An ack: `error` empty when stored, else "[kind] message" (cut to kPeerAckErrorMaxBytes).
kj::Array<capnp::word> encodePeerAck(uint32_t seq, std::string_view error);

}  // namespace sidecar::daemon
