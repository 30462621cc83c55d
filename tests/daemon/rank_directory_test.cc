// Where ranks live (RankDirectory) and the [peers] configuration that feeds it.

#include "daemon/rank_directory.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>


namespace sidecar::daemon {
namespace {

TEST(RankMap, ParsesRangesSinglesAndSeparators) {
  auto ranks = parseRankMap(" 0-3=10.77.0.1:7650, 4=10.77.0.2:7650;5-7 = host-b:9000 ");
  ASSERT_EQ(ranks.size(), 3u);
  EXPECT_EQ(ranks[0].first, 0);
  EXPECT_EQ(ranks[0].last, 3);
  EXPECT_EQ(ranks[0].address, "10.77.0.1:7650");
  EXPECT_EQ(ranks[1].first, 4);
  EXPECT_EQ(ranks[1].last, 4);
  EXPECT_EQ(ranks[2].address, "host-b:9000");
}

TEST(RankMap, RefusesBadEntriesWithTheReason) {
  auto message = [](const char* text) {
    try {
      parseRankMap(text);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  EXPECT_NE(message("0-3").find("has no '='"), std::string::npos);
  EXPECT_NE(message("3-0=h:1").find("ends before it starts"), std::string::npos);
  EXPECT_NE(message("-1=h:1").find("is not a rank"), std::string::npos);
  EXPECT_NE(message("0=host").find("is not host:port"), std::string::npos);
  EXPECT_NE(message("0=host:0").find("port from 1 to 65535"), std::string::npos);
  EXPECT_NE(message("0-3=a:1,2-5=b:1").find("mapped twice"), std::string::npos);
}

TEST(RankSet, ParsesListsAndRanges) {
  EXPECT_EQ(parseRankSet("0-2,6"), (std::set<int32_t>{0, 1, 2, 6}));
  EXPECT_EQ(parseRankSet("4, 5"), (std::set<int32_t>{4, 5}));
  EXPECT_THROW(parseRankSet("a"), std::invalid_argument);
}

TEST(RankDirectory, NoPeersMeansEveryRankIsLocal) {
  RankDirectory directory(PeerSettings{});
  EXPECT_FALSE(directory.distributed());
  EXPECT_EQ(directory.remoteAddress(0), std::nullopt);
  EXPECT_EQ(directory.remoteAddress(12345), std::nullopt);
}

TEST(RankDirectory, StaticMapComparesWithTheAdvertisedAddress) {
  PeerSettings settings;
  settings.ranks = parseRankMap("0-1=10.77.0.1:7650,2-3=10.77.0.2:7650");
  settings.advertise = "10.77.0.1:7650";
  RankDirectory directory(settings);
  EXPECT_TRUE(directory.distributed());
  EXPECT_EQ(directory.remoteAddress(1), std::nullopt);
  EXPECT_EQ(directory.remoteAddress(2), "10.77.0.2:7650");
  // A rank the map does not name stays local (served here if it registers).
  EXPECT_EQ(directory.remoteAddress(9), std::nullopt);
}

TEST(RankDirectory, LocalRanksWinAndOthersNeedAnAddress) {
  PeerSettings settings;
  settings.localRanks = {0, 1};
  settings.dnsTemplate = "sidecar-{rank}.sidecar.default.svc.cluster.local:7650";
  RankDirectory directory(settings);
  EXPECT_EQ(directory.remoteAddress(0), std::nullopt);
  EXPECT_EQ(directory.remoteAddress(7), "sidecar-7.sidecar.default.svc.cluster.local:7650");

  PeerSettings noAddress;
  noAddress.localRanks = {0};
  RankDirectory strict(noAddress);
  try {
    strict.remoteAddress(3);
    FAIL() << "rank 3 has no address";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("rank 3 is not one of this node's local_ranks"),
              std::string::npos);
  }
}

}  // namespace
}  // namespace sidecar::daemon
