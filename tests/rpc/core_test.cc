// The daemon's Core (src/daemon/core.h) with a fake NodeState, driven through the public client
// library (include/sidecar/client.h): listening on unix and TCP sockets, several clients at once,
// a hostile client sending garbage, clean stop/join.
//
// Note: a sidecar::Client runs its own KJ event loop on the thread that created it, and a thread
// can hold one KJ event loop at a time, so concurrent clients live on separate threads.

#include "daemon/core.h"

#include <gtest/gtest.h>
#include <sidecar/client.h>
#include <sidecar/error.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "fake_node.h"
#include "reactor/socket.h"
#include "test_support.h"

namespace sidecar::daemon {
namespace {

using sidecar::rpc::testing::FakeNode;
using sidecar::testing::eventually;
using sidecar::testing::Watchdog;

class CoreTest : public ::testing::Test {
 protected:
  CoreTest() {
    char tmpl[] = "/tmp/sidecar-core-test-XXXXXX";
    dir_ = mkdtemp(tmpl);
    path_ = dir_ + "/sidecar.sock";
  }
  ~CoreTest() override {
    core_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void startCore(CoreOptions options = {}) {
    core_ = std::make_unique<Core>(options, node_);
    core_->start();
    Core* core = core_.get();
    core_->listen(reactor::listenUnix(path_, 0600), true,
                  [core](kj::AutoCloseFd fd, bool unixSocket) { core->adopt(kj::mv(fd), unixSocket); });
  }

  uint16_t listenTcpToo() {
    auto fd = reactor::listenTcp(reactor::HostPort{"127.0.0.1", 0});
    uint16_t port = reactor::localPort(fd.get());
    Core* core = core_.get();
    core_->listen(kj::mv(fd), false,
                  [core](kj::AutoCloseFd fd, bool unixSocket) { core->adopt(kj::mv(fd), unixSocket); });
    return port;
  }

  Watchdog watchdog_{"core test", std::chrono::seconds(40)};
  FakeNode node_;
  std::string dir_, path_;
  std::unique_ptr<Core> core_;
};

TEST_F(CoreTest, StatusAndPingOverUnixSocket) {
  startCore();
  auto client = Client::connectUnix(path_);
  NodeStatus status = client.status();
  EXPECT_EQ(status.protocolVersion, protocolVersion());
  EXPECT_EQ(status.nodeId, "fake-node");
  EXPECT_EQ(status.version, "9.9.9-test");
  ASSERT_EQ(status.cores.size(), 2u);
  EXPECT_EQ(status.cores[0].cpu, 10);
  EXPECT_FALSE(status.arena.has_value());
  EXPECT_EQ(client.ping("hello"), "hello");
  EXPECT_EQ(client.ping(), "");
  EXPECT_TRUE(eventually([&]() { return core_->connections() == 1; }));
  EXPECT_NE(core_->reactorStats(), nullptr);
  core_->requestStop();
  core_->join();
}

TEST_F(CoreTest, StatusAndPingOverTcp) {
  startCore();
  uint16_t port = listenTcpToo();
  auto client = Client::connectTcp("127.0.0.1:" + std::to_string(port));
  EXPECT_EQ(client.status().nodeId, "fake-node");
  EXPECT_EQ(client.ping("tcp"), "tcp");
}

TEST_F(CoreTest, OversizePingIsInvalidArgumentAndTheClientKeepsWorking) {
  startCore();
  auto client = Client::connectUnix(path_);
  try {
    client.ping(std::string(70 * 1024, 'x'));
    ADD_FAILURE() << "an oversize ping succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("64 KiB"), std::string::npos) << e.what();
  }
  EXPECT_EQ(client.ping("after"), "after");
}

TEST_F(CoreTest, SeveralClientsAtOnce) {
  startCore();
  constexpr int kClients = 6;
  constexpr int kCalls = 30;
  std::atomic<int> ok{0};
  std::atomic<int> connected{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c]() {
      try {
        auto client = Client::connectUnix(path_);
        connected.fetch_add(1);
        // All clients are connected before anyone finishes: they are served concurrently.
        eventually([&]() { return connected.load() == kClients; });
        for (int i = 0; i < kCalls; ++i) {
          std::string payload = "c" + std::to_string(c) + "-" + std::to_string(i);
          if (client.ping(payload) == payload) ok.fetch_add(1);
        }
        if (client.status().nodeId == "fake-node") ok.fetch_add(1);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "client " << c << ": " << e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kClients * (kCalls + 1));
  // Every client has gone: the core closes their connections.
  EXPECT_TRUE(eventually([&]() { return core_->connections() == 0; }));
}

TEST_F(CoreTest, GarbageFromOneClientDoesNotHurtTheOthers) {
  startCore();
  auto good = Client::connectUnix(path_);
  EXPECT_EQ(good.ping("before"), "before");

  const std::string garbage[] = {
      std::string("GET / HTTP/1.1\r\nHost: sidecar\r\n\r\n"),
      std::string(64, '\xff'),
      std::string("\x00\x00\x00\x00\x10\x00\x00\x00", 8) + std::string(40, '\xab'),
      // A frame header that announces a 32 MiB segment, then hangs up halfway.
      std::string("\x00\x00\x00\x00\x00\x00\x40\x00", 8) + std::string(1000, '\x01'),
  };
  for (const auto& bytes : garbage) {
    auto raw = reactor::connectUnix(path_);
    ASSERT_EQ(::send(raw.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
    EXPECT_EQ(good.ping("during"), "during");
  }
  // A client that sends garbage and stays connected.
  auto lingering = reactor::connectUnix(path_);
  std::string junk(4096, '\x5a');
  ::send(lingering.get(), junk.data(), junk.size(), MSG_NOSIGNAL);

  EXPECT_EQ(good.ping("after"), "after");
  EXPECT_EQ(good.status().nodeId, "fake-node");
  // A new client (on its own thread: one client event loop per thread) is served too.
  std::atomic<bool> alive{false};
  std::thread([&]() {
    auto another = Client::connectUnix(path_);
    alive.store(another.ping("new client") == "new client");
  }).join();
  EXPECT_TRUE(alive.load());
  // The core drops the garbage connections (and the other client has left): only `good` stays.
  EXPECT_TRUE(eventually([&]() { return core_->connections() == 1; }))
      << "connections: " << core_->connections();
}

TEST_F(CoreTest, RequestStopClosesConnectionsAndJoins) {
  startCore();
  auto client = Client::connectUnix(path_);
  EXPECT_EQ(client.ping("x"), "x");
  core_->requestStop();
  core_->join();
  EXPECT_EQ(core_->reactorStats(), nullptr);
  try {
    client.ping("after stop");
    ADD_FAILURE() << "ping after stop succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDisconnected) << e.what();
  }
  // Nobody listens any more.
  try {
    Client::connectUnix(path_);
    ADD_FAILURE() << "connect after stop succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable) << e.what();
  }
}

TEST_F(CoreTest, DestructorStopsARunningCore) {
  startCore();
  {
    auto client = Client::connectUnix(path_);
    EXPECT_EQ(client.ping("x"), "x");
  }
  core_.reset();  // ~Core requests stop and joins
}

TEST_F(CoreTest, ProtocolMismatchIsReported) {
  node_.protocolVersion = protocolVersion() + 1;
  startCore();
  try {
    Client::connectUnix(path_);
    ADD_FAILURE() << "connected to a daemon of another protocol";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kProtocolMismatch) << e.what();
  }
}

TEST(CoreClient, ConnectToMissingSocketIsUnavailable) {
  try {
    Client::connectUnix("/tmp/sidecar-core-test-no-such.sock");
    ADD_FAILURE() << "connected to nothing";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_NE(std::string(e.what()).find("sidecar-core-test-no-such.sock"), std::string::npos);
  }
}

TEST(CoreClient, PostRunsOnTheCoreThread) {
  Watchdog watchdog("core post");
  FakeNode node;
  Core core(CoreOptions{}, node);
  core.start();
  std::atomic<bool> ran{false};
  std::thread::id ranOn;
  core.post([&]() {
    ranOn = std::this_thread::get_id();
    ran.store(true);
  });
  ASSERT_TRUE(eventually([&]() { return ran.load(); }));
  EXPECT_NE(ranOn, std::this_thread::get_id());
  core.requestStop();
  core.join();
}

}  // namespace
}  // namespace sidecar::daemon
