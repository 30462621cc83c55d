// The hop trace: off without SIDECAR_HOP_TRACE; on, it keeps steps in order and writes them as
// "ns point-name" lines to PREFIX.<pid>.

#include "base/hop_trace.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace sidecar::hop {
namespace {

TEST(HopTrace, OffWithoutTheVariable) {
  unsetenv("SIDECAR_HOP_TRACE");
  Recorder recorder;
  EXPECT_FALSE(recorder.enabled);
  recorder.writeOut();  // nothing to write, no file, no crash
}

TEST(HopTrace, KeepsStepsInOrderAndWritesThem) {
  std::string prefix = testing::TempDir() + "hop_trace_test";
  setenv("SIDECAR_HOP_TRACE", prefix.c_str(), 1);
  Recorder recorder;
  unsetenv("SIDECAR_HOP_TRACE");
  ASSERT_TRUE(recorder.enabled);
  recorder.record(Point::kLaneTaken);
  recorder.record(Point::kMessageSending);
  recorder.record(Point::kLaneCompletion);
  recorder.writeOut();
  std::string path = prefix + "." + std::to_string(getpid());
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path;
  std::vector<std::string> names;
  uint64_t last = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    uint64_t ns = 0;
    std::string name;
    fields >> ns >> name;
    EXPECT_GE(ns, last) << line;
    last = ns;
    names.push_back(name);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"lane-taken", "message-sending", "lane-completion"}));
  std::remove(path.c_str());
}

TEST(HopTrace, AnUnwritablePrefixIsReportedNotFatal) {
  setenv("SIDECAR_HOP_TRACE", "/nonexistent-dir/hop", 1);
  Recorder recorder;
  unsetenv("SIDECAR_HOP_TRACE");
  recorder.record(Point::kWoke);
  testing::internal::CaptureStderr();
  recorder.writeOut();
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("SIDECAR_HOP_TRACE: cannot write /nonexistent-dir/hop."), std::string::npos) << err;
  EXPECT_NE(err.find("writable path prefix"), std::string::npos) << err;
}

}  // namespace
}  // namespace sidecar::hop
