// Size parsing and formatting: what operators type in configs and what error messages print.
#include "shm/sizes.h"

#include <gtest/gtest.h>

namespace sidecar::shm {
namespace {

TEST(ShmSizes, ParsesUnits) {
  EXPECT_EQ(*parseSizeBytes("64GiB"), 64 * kGiB);
  EXPECT_EQ(*parseSizeBytes("512MiB"), 512 * kMiB);
  EXPECT_EQ(*parseSizeBytes("1G"), kGiB);
  EXPECT_EQ(*parseSizeBytes("4096"), 4096u);
  EXPECT_EQ(*parseSizeBytes("4096B"), 4096u);
  EXPECT_EQ(*parseSizeBytes(" 2 mb "), 2 * kMiB);
  EXPECT_EQ(*parseSizeBytes("1t"), kTiB);
  EXPECT_EQ(*parseSizeBytes("8KiB"), 8 * kKiB);
}

TEST(ShmSizes, RejectsBadStringsWithAClearError) {
  for (const char* bad : {"", "GiB", "-1G", "1.5GiB", "12 parsecs", "99999999999999999999",
                          "17179869184GiB"}) {
    Result<uint64_t> r = parseSizeBytes(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.code(), ShmErrc::BadSize);
    EXPECT_NE(r.error().message.find("bad size '"), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("64GiB"), std::string::npos) << "shows an example";
  }
}

TEST(ShmSizes, FormatsBytes) {
  EXPECT_EQ(formatBytes(100), "100 B");
  EXPECT_EQ(formatBytes(8192), "8 KiB");
  EXPECT_EQ(formatBytes(1536 * kKiB), "1.5 MiB");
  EXPECT_EQ(formatBytes(64 * kGiB), "64 GiB");
  EXPECT_EQ(formatBytes(kMiB - 1), "1023.9 KiB");
}

TEST(ShmSizes, DefaultArenaSizeIsAQuarterOfRamCappedAndAligned) {
  uint64_t size = defaultArenaSizeBytes(2 * kMiB);
  EXPECT_EQ(size % (2 * kMiB), 0u);
  EXPECT_LE(size, 64 * kGiB);
  EXPECT_GE(size, 2 * kMiB);
  if (physicalMemoryBytes() >= 16 * kMiB) {
    EXPECT_LE(size, physicalMemoryBytes() / 4);
  }
}

TEST(ShmSizes, Rounding) {
  EXPECT_EQ(roundUpBytes(1, 4096), 4096u);
  EXPECT_EQ(roundUpBytes(4096, 4096), 4096u);
  EXPECT_EQ(roundDownBytes(4097, 4096), 4096u);
}

}  // namespace
}  // namespace sidecar::shm
