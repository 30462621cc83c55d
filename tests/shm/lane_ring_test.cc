#include <gtest/gtest.h>
#include "shm/lane_ring.h"
TEST(LaneRing, Placeholder) { auto m = sidecar::shm::LaneMemory::create(); ASSERT_TRUE(m.ok()); }
