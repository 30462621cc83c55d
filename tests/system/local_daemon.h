#pragma once
// A sidecard ($SIDECARD) listening on a unix socket in a fresh temp folder (no TCP): the daemon
// of the system tests that exercise one node's client paths. start() records a fatal failure
// (call it under ASSERT_NO_FATAL_FAILURE) when the daemon does not create its socket within 15 s.
// The destructor stops the daemon and removes the folder.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <sidecar/sidecar.h>

#include "daemon_process.h"

namespace sidecar::systest {

class LocalDaemon {
 public:
  LocalDaemon() = default;
  LocalDaemon(const LocalDaemon&) = delete;
  LocalDaemon& operator=(const LocalDaemon&) = delete;
  ~LocalDaemon() {
    process_.reset();
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }

  // `nodeId` also names the temp folder (/tmp/sidecar-<nodeId>-XXXXXX); `extraArgs` go to
  // sidecard after the defaults.
  void start(const std::string& nodeId, const std::string& arenaSize = "64MiB",
             const std::vector<std::string>& extraArgs = {}) {
    ASSERT_FALSE(sidecardPath().empty()) << "$SIDECARD must name the sidecard binary";
    std::string tmpl = "/tmp/sidecar-" + nodeId + "-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr) << strerror(errno);
    dir_ = tmpl;
    socket_ = dir_ + "/sidecar.sock";
    std::vector<std::string> args = {sidecardPath(), "--socket", socket_, "--tcp", "off", "--arena-size",
                                     arenaSize, "--cores", "1", "--node-id", nodeId};
    args.insert(args.end(), extraArgs.begin(), extraArgs.end());
    process_ = Process::start(args, {}, dir_ + "/sidecard.out", dir_ + "/sidecard.err");
    ASSERT_NE(process_, nullptr);
    ASSERT_EQ(awaitSocket(*process_, socket_), "");
  }

  const std::string& socket() const { return socket_; }

  // A rank of this daemon with `sendHint` (the receive hint follows it unless set).
  sidecar::RankConfig rankConfig(int32_t rank,
                                 sidecar::MemoryHint sendHint = {sidecar::Dtype::kUint8, {64}}) const {
    sidecar::RankConfig c;
    c.rank = rank;
    c.sendHint = std::move(sendHint);
    c.socketPath = socket_;
    return c;
  }
  Process& process() { return *process_; }

 private:
  std::string dir_, socket_;
  std::unique_ptr<Process> process_;
};

}  // namespace sidecar::systest
