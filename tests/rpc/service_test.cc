// SidecarService over Cap'n Proto two-party RPC on io_uring streams (UringStream), over a unix
// socketpair and over TCP loopback: the server side is rpc::RpcConnection, the client side
// capnp::TwoPartyClient, both on one ReactorLoop (and, in one test, on two threads).

#include "rpc/sidecar_service.h"

#include <capnp/rpc-twoparty.h>
#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

#include "fake_node.h"
#include "reactor/kj_event_port.h"
#include "reactor/socket.h"
#include "reactor/uring_stream.h"
#include "rpc/rpc_connection.h"
#include "sidecar.capnp.h"
#include "test_support.h"

namespace sidecar::rpc {
namespace {

using reactor::ReactorLoop;
using reactor::UringStream;
using sidecar::rpc::testing::FakeNode;
using sidecar::testing::Watchdog;

enum class Transport { kUnix, kTcp };

std::pair<kj::AutoCloseFd, kj::AutoCloseFd> connectedPair(Transport transport) {
  if (transport == Transport::kUnix) {
    auto [a, b] = sidecar::testing::unixSocketPair();
    return {kj::AutoCloseFd(a), kj::AutoCloseFd(b)};
  }
  auto listener = reactor::listenTcp(reactor::HostPort{"127.0.0.1", 0});
  auto client = reactor::connectTcp(reactor::HostPort{"127.0.0.1", reactor::localPort(listener.get())});
  int server = -1;
  for (int i = 0; i < 1000 && server < 0; ++i) {
    server = accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (server < 0) usleep(1000);
  }
  KJ_ASSERT(server >= 0);
  return {kj::mv(client), kj::AutoCloseFd(server)};
}

// Client and server of one connection on one reactor loop.
struct Pair {
  Pair(ReactorLoop& loop, NodeState& node, Transport transport) {
    auto [clientFd, serverFd] = connectedPair(transport);
    auto serverStream = kj::heap<UringStream>(loop.reactor(), kj::mv(serverFd));
    capnp::Capability::Client service = kj::heap<SidecarService>(node);
    if (transport == Transport::kUnix) {
      server = kj::heap<RpcConnection>(kj::Own<kj::AsyncCapabilityStream>(kj::mv(serverStream)),
                                       kj::mv(service));
    } else {
      server = kj::heap<RpcConnection>(kj::Own<kj::AsyncIoStream>(kj::mv(serverStream)),
                                       kj::mv(service));
    }
    clientStream = kj::heap<UringStream>(loop.reactor(), kj::mv(clientFd));
    rpc = transport == Transport::kUnix
              ? kj::heap<capnp::TwoPartyClient>(
                    static_cast<kj::AsyncCapabilityStream&>(*clientStream), 4)
              : kj::heap<capnp::TwoPartyClient>(static_cast<kj::AsyncIoStream&>(*clientStream));
    sidecar = rpc->bootstrap().castAs<proto::Sidecar>();
  }
  ~Pair() noexcept(false) {
    sidecar = nullptr;
    rpc = nullptr;
    clientStream = nullptr;
    server = nullptr;
  }

  kj::Own<RpcConnection> server;
  kj::Own<UringStream> clientStream;
  kj::Own<capnp::TwoPartyClient> rpc;
  proto::Sidecar::Client sidecar = nullptr;
};

std::string ping(proto::Sidecar::Client& client, kj::WaitScope& ws, const std::string& payload) {
  auto request = client.pingRequest();
  request.setPayload(
      kj::arrayPtr(reinterpret_cast<const kj::byte*>(payload.data()), payload.size()));
  auto response = request.send().wait(ws);
  auto data = response.getPayload();
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

class ServiceTest : public ::testing::TestWithParam<Transport> {
 protected:
  ServiceTest() : loop_(reactor::ReactorOptions{}, 0), pair_(kj::heap<Pair>(loop_, node_, GetParam())) {}
  ~ServiceTest() noexcept override {}
  kj::WaitScope& ws() { return loop_.waitScope(); }
  proto::Sidecar::Client& client() { return pair_->sidecar; }

  Watchdog watchdog_{"rpc service test", std::chrono::seconds(30)};
  FakeNode node_;
  ReactorLoop loop_;
  kj::Own<Pair> pair_;
};

TEST_P(ServiceTest, PingEchoesPayload) {
  EXPECT_EQ(ping(client(), ws(), ""), "");
  EXPECT_EQ(ping(client(), ws(), "hello sidecar"), "hello sidecar");
  std::string binary("\0\x01\xff zero inside", 16);
  EXPECT_EQ(ping(client(), ws(), binary), binary);
}

TEST_P(ServiceTest, PingAtTheLimitIsAccepted) {
  std::string payload(SidecarService::kPingBytesMax, 'p');
  EXPECT_EQ(ping(client(), ws(), payload), payload);
}

TEST_P(ServiceTest, OversizePingIsRefusedAndTheConnectionStillWorks) {
  std::string payload(SidecarService::kPingBytesMax + 1, 'x');
  auto error = kj::runCatchingExceptions([&]() { ping(client(), ws(), payload); });
  KJ_IF_MAYBE(e, error) {
    std::string description = e->getDescription().cStr();
    EXPECT_NE(description.find("64 KiB"), std::string::npos) << description;
    EXPECT_EQ(e->getType(), kj::Exception::Type::FAILED);
  } else {
    ADD_FAILURE() << "a ping over 64 KiB was accepted";
  }
  EXPECT_EQ(ping(client(), ws(), "still alive"), "still alive");
  auto huge = std::string(1 << 20, 'h');
  EXPECT_TRUE(kj::runCatchingExceptions([&]() { ping(client(), ws(), huge); }) != nullptr);
  EXPECT_EQ(ping(client(), ws(), "and again"), "and again");
}

TEST_P(ServiceTest, InfoReturnsWhatNodeStateFilled) {
  auto response = client().infoRequest().send().wait(ws());
  auto info = response.getInfo();
  EXPECT_EQ(info.getProtocolVersion(), proto::PROTOCOL_VERSION);
  EXPECT_EQ(std::string(info.getVersion().cStr()), "9.9.9-test");
  EXPECT_EQ(std::string(info.getNodeId().cStr()), "fake-node");
  EXPECT_EQ(info.getIncarnation(), 0xC0FFEEu);
  EXPECT_EQ(info.getPid(), 4242);
  EXPECT_TRUE(info.getUcxAvailable());
  EXPECT_FALSE(info.getCudaAvailable());
  EXPECT_FALSE(info.hasArena());
  ASSERT_EQ(info.getCores().size(), 2u);
  EXPECT_EQ(info.getCores()[1].getCpu(), 11);
  EXPECT_EQ(info.getCores()[1].getCompletions(), 101u);
  EXPECT_EQ(node_.calls.load(), 1);
}

TEST_P(ServiceTest, ManyCallsInFlightAtOnce) {
  kj::Vector<kj::Promise<void>> calls;
  int ok = 0;
  for (int i = 0; i < 200; ++i) {
    auto request = client().pingRequest();
    std::string payload = "call-" + std::to_string(i) + std::string(static_cast<size_t>(i) * 50, '.');
    request.setPayload(kj::arrayPtr(reinterpret_cast<const kj::byte*>(payload.data()), payload.size()));
    calls.add(request.send().then([payload, &ok](auto response) {
      auto data = response.getPayload();
      if (std::string(reinterpret_cast<const char*>(data.begin()), data.size()) == payload) ++ok;
    }));
    if (i % 10 == 0) calls.add(client().infoRequest().send().ignoreResult());
  }
  kj::joinPromises(calls.releaseAsArray()).wait(ws());
  EXPECT_EQ(ok, 200);
}

TEST_P(ServiceTest, ServerSeesClientDisconnect) {
  auto disconnected = pair_->server->onDisconnect();
  EXPECT_EQ(ping(client(), ws(), "x"), "x");
  pair_->sidecar = nullptr;
  pair_->rpc = nullptr;
  pair_->clientStream = nullptr;
  disconnected.wait(ws());  // resolves, never rejects
}

TEST_P(ServiceTest, ClientCallFailsWithDisconnectedWhenServerGoes) {
  EXPECT_EQ(ping(client(), ws(), "x"), "x");
  pair_->server = nullptr;
  auto error = kj::runCatchingExceptions([&]() { ping(client(), ws(), "y"); });
  KJ_IF_MAYBE(e, error) {
    EXPECT_EQ(e->getType(), kj::Exception::Type::DISCONNECTED) << e->getDescription().cStr();
  } else {
    ADD_FAILURE() << "a call to a closed server succeeded";
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ServiceTest,
                         ::testing::Values(Transport::kUnix, Transport::kTcp),
                         [](const auto& info) {
                           return info.param == Transport::kUnix ? "Unix" : "Tcp";
                         });

// The server on its own reactor thread, the client on the test thread: what the daemon does.
TEST(ServiceAcrossThreads, ServerLoopOnAnotherThread) {
  Watchdog watchdog("rpc across threads");
  FakeNode node;
  auto [clientFd, serverFd] = sidecar::testing::unixSocketPair();
  std::atomic<bool> serverReady{false};
  std::thread server([&, fd = serverFd]() {
    ReactorLoop loop(reactor::ReactorOptions{}, 50);
    auto stream = kj::heap<UringStream>(loop.reactor(), kj::AutoCloseFd(fd));
    RpcConnection connection(kj::Own<kj::AsyncCapabilityStream>(kj::mv(stream)),
                             kj::heap<SidecarService>(node));
    serverReady.store(true);
    connection.onDisconnect().wait(loop.waitScope());
  });
  while (!serverReady.load()) std::this_thread::yield();
  {
    ReactorLoop loop(reactor::ReactorOptions{}, 0);
    UringStream stream(loop.reactor(), kj::AutoCloseFd(clientFd));
    capnp::TwoPartyClient rpc(static_cast<kj::AsyncCapabilityStream&>(stream), 4);
    auto client = rpc.bootstrap().castAs<proto::Sidecar>();
    for (int i = 0; i < 100; ++i) {
      std::string payload = "ping " + std::to_string(i);
      ASSERT_EQ(ping(client, loop.waitScope(), payload), payload);
    }
    auto info = client.infoRequest().send().wait(loop.waitScope());
    EXPECT_EQ(std::string(info.getInfo().getNodeId().cStr()), "fake-node");
  }  // the client closes: the server's onDisconnect ends its loop
  server.join();
}

}  // namespace
}  // namespace sidecar::rpc
