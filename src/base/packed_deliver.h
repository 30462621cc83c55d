#pragma once
// The packed deliver message: a small tensor's delivery to another node's daemon as one UCX
// tagged message in a fixed little-endian layout, instead of a Cap'n Proto PeerMessage.deliver
// (docs/PROTOCOL.md, "Packed delivers"). Written by executors' direct sends, read by the
// receiving daemon, which tells the two apart by the first word (a Cap'n Proto message starts
// with its segment count, never this magic).
//
// Why: it is the 4 KiB latency path, and building and reading the Cap'n Proto message (pointer
// checks on every list, a message reader, a conversion) was ~40 % of the instructions the
// receiving daemon spent on it, and a good part of the sender's (callgrind, docs/PERFORMANCE.md).
// Objects, and tensors that outgrow the layout's counts, go through the sender's daemon, which
// sends a PeerMessage.deliver.
//
// Layout (offsets in bytes; the message is 8-byte aligned and its length a multiple of 8):
//    0 u32 magic (kPackedDeliverMagic)     4 u32 seq
//    8 u32 chunkId                        12 u32 numChunks
//   16 i32 senderRank                     20 u32 dataIdBytes
//   24 u64 sizeBytes (the body)
//   32 u16 dtype (schema Dtype ordinal)   34 u16 shapeRank
//   36 u16 senderGroupSize                38 u16 destinationCount
//   40 i64 shape[shapeRank]
//      i32 senderGroup[senderGroupSize]
//      u32 groupSize[destinationCount]
//      i32 ranks[sum of groupSize]        (the destination groups, one after the other)
//      dataId bytes, zeros to a multiple of 8
//      body (sizeBytes), zeros to a multiple of 8 (the end of the message)
// A reader takes nothing on trust: every count is checked against the message's length, and
// the length must be exactly what the counts add up to.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sidecar::base {

inline constexpr uint32_t kPackedDeliverMagic = 0x31544353;  // "SCT1"
inline constexpr size_t kPackedDeliverFixedBytes = 40;

// What a packed deliver says besides its body, for writing (views of the sender's data).
struct PackedDeliverFields {
  uint32_t seq = 0;
  uint32_t chunkId = 0;
  uint32_t numChunks = 1;
  int32_t senderRank = 0;
  std::string_view dataId;
  uint16_t dtype = 0;
  std::span<const int64_t> shape;
  std::span<const int32_t> senderGroup;
  std::span<const std::vector<int32_t>> destinations;
  uint64_t sizeBytes = 0;
};

// A packed deliver as read: the header copied out, the body where the message holds it.
struct PackedDeliver {
  uint32_t seq = 0;
  uint32_t chunkId = 0;
  uint32_t numChunks = 0;
  int32_t senderRank = 0;
  uint16_t dtype = 0;
  uint64_t sizeBytes = 0;
  std::string dataId;
  std::vector<int64_t> shape;
  std::vector<int32_t> senderGroup;
  std::vector<std::vector<int32_t>> destinations;
  std::span<const std::byte> body;
};

namespace packed_detail {

constexpr uint64_t roundUp8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

// memcpy, but also for an empty range (whose pointer may be null, which memcpy must not get).
inline void copy(void* to, const void* from, size_t bytes) {
  if (bytes != 0) std::memcpy(to, from, bytes);
}

template <typename T>
void put(std::byte* at, T value) {
  std::memcpy(at, &value, sizeof value);
}

template <typename T>
T get(const std::byte* at) {
  T value;
  std::memcpy(&value, at, sizeof value);
  return value;
}

}  // namespace packed_detail

// The message's length in bytes, or 0 when the chunk does not fit the layout (more than 65535
// dimensions, sender group members or destination groups; an id or a group over 4 GiB).
inline size_t packedDeliverBytes(const PackedDeliverFields& f) {
  using packed_detail::roundUp8;
  const auto& groups = f.destinations;
  if (f.shape.size() > UINT16_MAX || f.senderGroup.size() > UINT16_MAX || groups.size() > UINT16_MAX ||
      f.dataId.size() > UINT32_MAX) {
    return 0;
  }
  uint64_t ranks = 0;
  for (const auto& group : groups) {
    if (group.size() > UINT32_MAX) return 0;
    ranks += group.size();
  }
  uint64_t bytes = kPackedDeliverFixedBytes + 8 * f.shape.size() + 4 * f.senderGroup.size() +
                   4 * groups.size() + 4 * ranks;
  return roundUp8(roundUp8(bytes + f.dataId.size()) + f.sizeBytes);
}

// Writes the message (packedDeliverBytes(f) long) at `out`, every byte of it (padding zeroed),
// with f.sizeBytes of `body`.
inline void writePackedDeliver(std::byte* out, const PackedDeliverFields& f, const void* body) {
  using packed_detail::put;
  using packed_detail::roundUp8;
  const auto& groups = f.destinations;
  put<uint32_t>(out + 0, kPackedDeliverMagic);
  put<uint32_t>(out + 4, f.seq);
  put<uint32_t>(out + 8, f.chunkId);
  put<uint32_t>(out + 12, f.numChunks);
  put<int32_t>(out + 16, f.senderRank);
  put<uint32_t>(out + 20, static_cast<uint32_t>(f.dataId.size()));
  put<uint64_t>(out + 24, f.sizeBytes);
  put<uint16_t>(out + 32, f.dtype);
  put<uint16_t>(out + 34, static_cast<uint16_t>(f.shape.size()));
  put<uint16_t>(out + 36, static_cast<uint16_t>(f.senderGroup.size()));
  put<uint16_t>(out + 38, static_cast<uint16_t>(groups.size()));
  std::byte* at = out + kPackedDeliverFixedBytes;
  packed_detail::copy(at, f.shape.data(), 8 * f.shape.size());
  at += 8 * f.shape.size();
  packed_detail::copy(at, f.senderGroup.data(), 4 * f.senderGroup.size());
  at += 4 * f.senderGroup.size();
  for (const auto& group : groups) {
    put<uint32_t>(at, static_cast<uint32_t>(group.size()));
    at += 4;
  }
  for (const auto& group : groups) {
    packed_detail::copy(at, group.data(), 4 * group.size());
    at += 4 * group.size();
  }
  packed_detail::copy(at, f.dataId.data(), f.dataId.size());
  at += f.dataId.size();
  std::byte* bodyAt = out + roundUp8(static_cast<uint64_t>(at - out));
  std::memset(at, 0, static_cast<size_t>(bodyAt - at));
  packed_detail::copy(bodyAt, body, f.sizeBytes);
  std::byte* end = out + roundUp8(static_cast<uint64_t>(bodyAt - out) + f.sizeBytes);
  std::memset(bodyAt + f.sizeBytes, 0, static_cast<size_t>(end - (bodyAt + f.sizeBytes)));
}

enum class PackedRead {
  kNotPacked,  // no packed magic: another kind of message (or garbage)
  kMalformed,  // packed, but its counts and length disagree; `out.seq` is set when it was readable
  kOk,
};

// Reads a packed deliver. The body is a view into `message`; nothing else refers to it.
inline PackedRead readPackedDeliver(std::span<const std::byte> message, PackedDeliver& out,
                                    std::string& why) {
  using packed_detail::get;
  using packed_detail::roundUp8;
  const std::byte* m = message.data();
  uint64_t length = message.size();
  if (length < 4 || get<uint32_t>(m) != kPackedDeliverMagic) return PackedRead::kNotPacked;
  if (length < 8) {
    why = "a packed deliver of " + std::to_string(length) + " bytes has no seq";
    return PackedRead::kMalformed;
  }
  out.seq = get<uint32_t>(m + 4);
  if (length < kPackedDeliverFixedBytes) {
    why = "a packed deliver of " + std::to_string(length) + " bytes is shorter than its header";
    return PackedRead::kMalformed;
  }
  out.chunkId = get<uint32_t>(m + 8);
  out.numChunks = get<uint32_t>(m + 12);
  out.senderRank = get<int32_t>(m + 16);
  uint64_t dataIdBytes = get<uint32_t>(m + 20);
  out.sizeBytes = get<uint64_t>(m + 24);
  out.dtype = get<uint16_t>(m + 32);
  uint64_t shapeRank = get<uint16_t>(m + 34);
  uint64_t senderGroupSize = get<uint16_t>(m + 36);
  uint64_t destinationCount = get<uint16_t>(m + 38);
  // Counts of at most 65535 each: this cannot overflow.
  uint64_t at = kPackedDeliverFixedBytes;
  uint64_t groupSizesAt = at + 8 * shapeRank + 4 * senderGroupSize;
  uint64_t ranksAt = groupSizesAt + 4 * destinationCount;
  if (ranksAt > length) {
    why = "a packed deliver's counts run past its " + std::to_string(length) + " bytes";
    return PackedRead::kMalformed;
  }
  uint64_t ranks = 0;
  for (uint64_t i = 0; i < destinationCount; ++i) ranks += get<uint32_t>(m + groupSizesAt + 4 * i);
  // ranks < 2^48 (65535 groups of < 2^32): no overflow below either.
  uint64_t dataIdAt = ranksAt + 4 * ranks;
  if (dataIdAt > length || dataIdBytes > length - dataIdAt) {
    why = "a packed deliver's groups and id run past its " + std::to_string(length) + " bytes";
    return PackedRead::kMalformed;
  }
  uint64_t bodyAt = roundUp8(dataIdAt + dataIdBytes);
  if (bodyAt > length || out.sizeBytes > length - bodyAt ||
      roundUp8(bodyAt + out.sizeBytes) != length) {
    why = "a packed deliver of " + std::to_string(length) + " bytes does not hold its " +
          std::to_string(out.sizeBytes) + "-byte body exactly";
    return PackedRead::kMalformed;
  }
  out.shape.resize(shapeRank);
  packed_detail::copy(out.shape.data(), m + at, 8 * shapeRank);
  at += 8 * shapeRank;
  out.senderGroup.resize(senderGroupSize);
  packed_detail::copy(out.senderGroup.data(), m + at, 4 * senderGroupSize);
  out.destinations.resize(destinationCount);
  uint64_t rankAt = ranksAt;
  for (uint64_t i = 0; i < destinationCount; ++i) {
    uint64_t size = get<uint32_t>(m + groupSizesAt + 4 * i);
    out.destinations[i].resize(size);
    packed_detail::copy(out.destinations[i].data(), m + rankAt, 4 * size);
    rankAt += 4 * size;
  }
  out.dataId.assign(reinterpret_cast<const char*>(m + dataIdAt), dataIdBytes);
  out.body = message.subspan(bodyAt, out.sizeBytes);
  return PackedRead::kOk;
}

}  // namespace sidecar::base
