// The deliver message as the receiving daemon reads it: built in place with its frame header in
// front (no copy of the body), and still whole when the descriptor outgrows the first segment.
#include "daemon/peer_messages.h"

#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "rpc/peer_service.h"

namespace sidecar::daemon {
namespace {

OutgoingChunk tensorChunk(const std::vector<std::byte>& body, std::string dataId,
                          std::vector<transfer::Group> destinations) {
  OutgoingChunk chunk;
  chunk.dataId = std::move(dataId);
  chunk.chunkId = 3;
  chunk.numChunks = 5;
  chunk.senderRank = 1;
  chunk.senderGroup = {0, 1};
  chunk.destinations = std::move(destinations);
  chunk.isTensor = true;
  chunk.dtype = transfer::Dtype::kUint8;
  chunk.shape = {static_cast<int64_t>(body.size())};
  chunk.sizeBytes = body.size();
  chunk.body = body.data();
  return chunk;
}

std::vector<std::byte> pattern(size_t n) {
  std::vector<std::byte> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>(i * 7 + 1);
  return out;
}

// Reads the message as takeDeliverMessage does: a framed flat array, a PeerMessage deliver.
rpc::PeerChunk decode(const kj::Array<capnp::word>& words, uint32_t& seq) {
  capnp::FlatArrayMessageReader reader(words);
  EXPECT_EQ(reader.getEnd(), words.end()) << "the frame covers the whole array";
  auto root = reader.getRoot<proto::PeerMessage>();
  EXPECT_TRUE(root.isDeliver());
  seq = root.getDeliver().getSeq();
  return rpc::readPeerChunk(root.getDeliver().getChunk());
}

TEST(PeerMessages, ASmallTensorIsOneFramedSegmentThatReadsBackWhole) {
  auto body = pattern(4096);
  auto chunk = tensorChunk(body, "xfer-4096-7", {{2}, {4, 5}});
  auto words = encodePeerDeliver(41, chunk);
  // One segment: the table word says so, and the array is the frame and the segment only.
  uint32_t table[2];
  std::memcpy(table, words.begin(), sizeof table);
  EXPECT_EQ(table[0], 0u);
  EXPECT_EQ(table[1] + 1, words.size());
  uint32_t seq = 0;
  rpc::PeerChunk read = decode(words, seq);
  EXPECT_EQ(seq, 41u);
  EXPECT_EQ(read.dataId, "xfer-4096-7");
  EXPECT_EQ(read.chunkId, 3u);
  EXPECT_EQ(read.numChunks, 5u);
  EXPECT_EQ(read.senderRank, 1);
  EXPECT_EQ(read.senderGroup, (transfer::Group{0, 1}));
  EXPECT_EQ(read.destinations, (std::vector<transfer::Group>{{2}, {4, 5}}));
  auto& tensor = std::get<rpc::PeerTensor>(read.payload);
  EXPECT_FALSE(tensor.viaUcx);
  EXPECT_EQ(tensor.shape, (std::vector<int64_t>{4096}));
  ASSERT_EQ(tensor.inlineBytes.size(), body.size());
  EXPECT_EQ(std::memcmp(tensor.inlineBytes.data(), body.data(), body.size()), 0);
}

TEST(PeerMessages, AnInlineBodyCanBeReadWhereTheMessageHoldsIt) {
  auto body = pattern(4096);
  auto words = encodePeerDeliver(2, tensorChunk(body, "v", {{2}}));
  capnp::FlatArrayMessageReader reader(words);
  auto chunk = rpc::readPeerChunk(reader.getRoot<proto::PeerMessage>().getDeliver().getChunk(),
                                  /*viewInline=*/true);
  auto& tensor = std::get<rpc::PeerTensor>(chunk.payload);
  EXPECT_TRUE(tensor.inlineBytes.empty()) << "not copied";
  auto data = tensor.inlineData();
  ASSERT_EQ(data.size(), body.size());
  EXPECT_GE(data.begin(), words.asBytes().begin());
  EXPECT_LE(data.end(), words.asBytes().end());
  EXPECT_EQ(std::memcmp(data.begin(), body.data(), body.size()), 0);
}

TEST(PeerMessages, ADescriptorLargerThanTheEstimateStillReadsBackWhole) {
  // 1 KiB of room is estimated for the descriptor: a long id and 600 destination ranks overflow
  // the first segment, and the message is flattened from several.
  auto body = pattern(64);
  std::vector<transfer::Group> destinations;
  for (int32_t r = 10; r < 610; ++r) destinations.push_back({r});
  std::string dataId(3000, 'x');
  auto chunk = tensorChunk(body, dataId, destinations);
  auto words = encodePeerDeliver(7, chunk);
  uint32_t seq = 0;
  rpc::PeerChunk read = decode(words, seq);
  EXPECT_EQ(seq, 7u);
  EXPECT_EQ(read.dataId, dataId);
  EXPECT_EQ(read.destinations, destinations);
  auto& tensor = std::get<rpc::PeerTensor>(read.payload);
  ASSERT_EQ(tensor.inlineBytes.size(), body.size());
  EXPECT_EQ(std::memcmp(tensor.inlineBytes.data(), body.data(), body.size()), 0);
}

TEST(PeerMessages, AnObjectReadsBackWhole) {
  OutgoingChunk chunk;
  chunk.dataId = "obj";
  chunk.senderGroup = {0};
  chunk.destinations = {{2}};
  chunk.object = transfer::ObjectChunk{9, std::string("{\"k\": 1}")};
  auto words = encodePeerDeliver(1, chunk);
  uint32_t seq = 0;
  rpc::PeerChunk read = decode(words, seq);
  auto& object = std::get<transfer::ObjectChunk>(read.payload);
  EXPECT_EQ(object.typeTag, 9u);
  EXPECT_EQ(object.bytes, "{\"k\": 1}");
}

}  // namespace
}  // namespace sidecar::daemon
