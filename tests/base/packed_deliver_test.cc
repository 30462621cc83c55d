// The packed deliver layout alone (base/packed_deliver.h): what is written reads back exactly
// (ids, shapes, groups and bodies of every size the limits allow, padding zeroed), and a reader
// given anything else (every truncation, a count or length that lies, stray bytes, another
// magic) says so instead of reading past the message.
#include "base/packed_deliver.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace sidecar::base {
namespace {

struct Chunk {
  std::string dataId = "kv-7";
  std::vector<int64_t> shape = {2, 3};
  std::vector<int32_t> senderGroup = {4, 5};
  std::vector<std::vector<int32_t>> destinations = {{1}, {2, 3}};
  std::vector<std::byte> body = std::vector<std::byte>(24, std::byte{0x5a});
};

PackedDeliverFields fieldsOf(const Chunk& c, uint32_t seq = 77) {
  PackedDeliverFields f;
  f.seq = seq;
  f.chunkId = 1;
  f.numChunks = 3;
  f.senderRank = 4;
  f.dataId = c.dataId;
  f.dtype = 8;
  f.shape = c.shape;
  f.senderGroup = c.senderGroup;
  f.destinations = c.destinations;
  f.sizeBytes = c.body.size();
  return f;
}

// The message, in 8-byte words as it arrives (a word array), pre-filled with garbage so that
// unwritten bytes would show.
std::vector<uint64_t> pack(const Chunk& c, uint32_t seq = 77) {
  auto f = fieldsOf(c, seq);
  size_t bytes = packedDeliverBytes(f);
  EXPECT_EQ(bytes % 8, 0u);
  std::vector<uint64_t> words(bytes / 8, 0xdededededededededeull);
  writePackedDeliver(reinterpret_cast<std::byte*>(words.data()), f, c.body.data());
  return words;
}

PackedRead read(std::span<const uint64_t> words, size_t bytes, PackedDeliver& out, std::string& why) {
  return readPackedDeliver(std::as_bytes(words).first(bytes), out, why);
}

void expectReadsBack(const Chunk& c) {
  auto words = pack(c);
  PackedDeliver m;
  std::string why;
  ASSERT_EQ(read(words, words.size() * 8, m, why), PackedRead::kOk) << why;
  EXPECT_EQ(m.seq, 77u);
  EXPECT_EQ(m.chunkId, 1u);
  EXPECT_EQ(m.numChunks, 3u);
  EXPECT_EQ(m.senderRank, 4);
  EXPECT_EQ(m.dtype, 8);
  EXPECT_EQ(m.dataId, c.dataId);
  EXPECT_EQ(m.shape, c.shape);
  EXPECT_EQ(m.senderGroup, c.senderGroup);
  EXPECT_EQ(m.destinations, c.destinations);
  ASSERT_EQ(m.sizeBytes, c.body.size());
  ASSERT_EQ(m.body.size(), c.body.size());
  EXPECT_TRUE(std::equal(m.body.begin(), m.body.end(), c.body.begin()));
  // Padding is zeroed: the bytes after the body up to the message's end.
  auto all = std::as_bytes(std::span(words));
  size_t bodyEnd = static_cast<size_t>(m.body.data() + m.body.size() - all.data());
  for (size_t i = bodyEnd; i < all.size(); ++i) EXPECT_EQ(all[i], std::byte{0}) << "byte " << i;
}

TEST(PackedDeliver, ReadsBackWhatWasWritten) {
  expectReadsBack(Chunk{});
  Chunk odd;
  odd.dataId = "an id of an odd length";
  odd.body.assign(4099, std::byte{0x11});
  expectReadsBack(odd);
  Chunk empty;  // a 0-d tensor of no bytes, no id, a sender group of none, one empty group
  empty.dataId.clear();
  empty.shape.clear();
  empty.senderGroup.clear();
  empty.destinations = {{}};
  empty.body.clear();
  expectReadsBack(empty);
  Chunk wide;
  wide.shape.assign(300, 1);
  wide.destinations.assign(70, {1, 2, 3});
  wide.dataId.assign(5000, 'x');
  wide.body.assign(64 << 10, std::byte{0x7f});
  expectReadsBack(wide);
}

TEST(PackedDeliver, OverTheLayoutsCountsIsNotPacked) {
  Chunk c;
  c.shape.assign(65536, 1);
  EXPECT_EQ(packedDeliverBytes(fieldsOf(c)), 0u);
  Chunk groups;
  groups.destinations.assign(65536, {1});
  EXPECT_EQ(packedDeliverBytes(fieldsOf(groups)), 0u);
}

TEST(PackedDeliver, EveryTruncationIsRefused) {
  Chunk c;
  auto words = pack(c, 9);
  for (size_t bytes = 0; bytes < words.size() * 8; ++bytes) {
    PackedDeliver m;
    std::string why;
    auto result = read(words, bytes, m, why);
    if (bytes < 4) {
      EXPECT_EQ(result, PackedRead::kNotPacked) << bytes;
      continue;
    }
    ASSERT_EQ(result, PackedRead::kMalformed) << bytes;
    EXPECT_FALSE(why.empty());
    if (bytes >= 8) EXPECT_EQ(m.seq, 9u) << "the seq is read whenever it is there (the ack names it)";
  }
}

TEST(PackedDeliver, LiesAndStrayBytesAreRefused) {
  Chunk c;
  auto good = pack(c);
  auto bytesOf = [](std::vector<uint64_t>& words) { return reinterpret_cast<std::byte*>(words.data()); };
  auto expectMalformed = [](std::vector<uint64_t> words, size_t bytes, const char* what) {
    PackedDeliver m;
    std::string why;
    EXPECT_EQ(read(words, bytes, m, why), PackedRead::kMalformed) << what;
  };
  {
    auto w = good;  // a body size one byte longer than the message holds
    uint64_t size = c.body.size() + 9;
    std::memcpy(bytesOf(w) + 24, &size, 8);
    expectMalformed(w, w.size() * 8, "body size");
  }
  {
    auto w = good;  // a body size near 2^64
    uint64_t size = ~uint64_t{0} - 3;
    std::memcpy(bytesOf(w) + 24, &size, 8);
    expectMalformed(w, w.size() * 8, "huge body size");
  }
  {
    auto w = good;  // an id longer than the message
    uint32_t idBytes = 0xffffffffu;
    std::memcpy(bytesOf(w) + 20, &idBytes, 4);
    expectMalformed(w, w.size() * 8, "id length");
  }
  {
    auto w = good;  // a destination group of 2^32 - 1 ranks
    uint32_t groupSize = 0xffffffffu;
    size_t groupSizesAt = 40 + 8 * c.shape.size() + 4 * c.senderGroup.size();
    std::memcpy(bytesOf(w) + groupSizesAt, &groupSize, 4);
    expectMalformed(w, w.size() * 8, "group size");
  }
  {
    auto w = good;  // 65535 dimensions
    uint16_t rank = 0xffff;
    std::memcpy(bytesOf(w) + 34, &rank, 2);
    expectMalformed(w, w.size() * 8, "shape rank");
  }
  {
    auto w = good;  // eight stray bytes at the end
    w.push_back(0);
    expectMalformed(w, w.size() * 8, "stray bytes");
  }
  {
    auto w = good;  // another magic: not packed at all (e.g. a Cap'n Proto message)
    w[0] = 0;
    PackedDeliver m;
    std::string why;
    EXPECT_EQ(read(w, w.size() * 8, m, why), PackedRead::kNotPacked);
  }
}

}  // namespace
}  // namespace sidecar::base
