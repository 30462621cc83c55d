// Socket set-up (socket.h): parseHostPort, listenUnix's stale/live socket handling, the io_uring
// Acceptor, and one reactor serving many concurrent connections.

#include "reactor/socket.h"

#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/debug.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "reactor/kj_event_port.h"
#include "reactor/uring_stream.h"
#include "test_support.h"

namespace sidecar::reactor {
namespace {

using sidecar::testing::openFdCount;
using sidecar::testing::Watchdog;

std::string descriptionOf(kj::Maybe<kj::Exception> maybe) {
  KJ_IF_MAYBE(e, maybe) { return e->getDescription().cStr(); }
  return "";
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/sidecar-socket-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// ---- parseHostPort

TEST(ParseHostPort, Valid) {
  auto a = parseHostPort("127.0.0.1:7650");
  EXPECT_EQ(a.host, "127.0.0.1");
  EXPECT_EQ(a.port, 7650);
  auto b = parseHostPort("[::1]:80");
  EXPECT_EQ(b.host, "::1");
  EXPECT_EQ(b.port, 80);
  auto c = parseHostPort(":0");
  EXPECT_EQ(c.host, "");
  EXPECT_EQ(c.port, 0);
  auto d = parseHostPort("node-7.example:65535");
  EXPECT_EQ(d.host, "node-7.example");
  EXPECT_EQ(d.port, 65535);
  auto e = parseHostPort("[fe80::1:2]:9");
  EXPECT_EQ(e.host, "fe80::1:2");
  EXPECT_EQ(e.port, 9);
}

TEST(ParseHostPort, Invalid) {
  for (const char* text : {"", "localhost", "host:", "host:65536", "host:-1", "host:12ab",
                           "host:99999999999999999999", "[::1]", "host:port"}) {
    auto error = kj::runCatchingExceptions([&]() { parseHostPort(text); });
    EXPECT_TRUE(error != nullptr) << "'" << text << "' was accepted";
    std::string description = descriptionOf(kj::mv(error));
    EXPECT_NE(description.find(text), std::string::npos)
        << "the error should name the input: " << description;
  }
}

// ---- listenUnix

TEST(ListenUnix, CreatesSocketWithModeAndParentDirectory) {
  TempDir dir;
  std::string path = dir.path("sub/dir/s.sock");
  auto fd = listenUnix(path, 0660);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  auto client = connectUnix(path);
  EXPECT_GE(client.get(), 0);
}

TEST(ListenUnix, ReplacesAStaleSocketFile) {
  TempDir dir;
  std::string path = dir.path("stale.sock");
  {
    auto first = listenUnix(path, 0600);
  }  // closed without unlinking: what a crashed daemon leaves behind
  ASSERT_TRUE(std::filesystem::exists(path));
  auto second = listenUnix(path, 0600);
  auto client = connectUnix(path);
  EXPECT_GE(client.get(), 0);
}

TEST(ListenUnix, RefusesALiveSocketWithAClearError) {
  TempDir dir;
  std::string path = dir.path("live.sock");
  auto live = listenUnix(path, 0600);
  auto error = kj::runCatchingExceptions([&]() { listenUnix(path, 0600); });
  ASSERT_TRUE(error != nullptr);
  std::string description = descriptionOf(kj::mv(error));
  EXPECT_NE(description.find("already serving"), std::string::npos) << description;
  EXPECT_NE(description.find(path), std::string::npos) << description;
  // The live listener is untouched.
  auto client = connectUnix(path);
  EXPECT_GE(client.get(), 0);
}

TEST(ListenUnix, DoesNotDeleteAFileThatIsNotASocket) {
  TempDir dir;
  std::string path = dir.path("precious.txt");
  { std::ofstream(path) << "keep me"; }
  auto error = kj::runCatchingExceptions([&]() { listenUnix(path, 0600); });
  EXPECT_TRUE(error != nullptr);
  std::ifstream in(path);
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "keep me");
}

// The socket is bound and listening under a staged name, then renamed into place: once the call
// returns only the path is there, and a connect to it is never refused for coming between bind
// and listen.
TEST(ListenUnix, LeavesOnlyTheListeningSocketAtItsPath) {
  TempDir dir;
  std::string path = dir.path("s.sock");
  auto fd = listenUnix(path, 0600);
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path(""))) {
    names.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"s.sock"});
  auto client = connectUnix(path);
  EXPECT_GE(client.get(), 0);
}

TEST(ListenUnix, APathWithNoRoomForTheStagedNameIsBoundDirectly) {
  TempDir dir;
  std::string base = dir.path("");
  sockaddr_un probe{};
  // The longest path sun_path takes: the staged name (".new<pid>" more) cannot fit.
  std::string path = base + std::string(sizeof(probe.sun_path) - 1 - base.size(), 'p');
  auto fd = listenUnix(path, 0600);
  auto client = connectUnix(path);
  EXPECT_GE(client.get(), 0);
}

TEST(ListenUnix, PathTooLongIsAClearError) {
  std::string path = "/tmp/" + std::string(200, 'x');
  auto error = kj::runCatchingExceptions([&]() { listenUnix(path, 0600); });
  EXPECT_NE(descriptionOf(kj::mv(error)).find("must be 1 to"), std::string::npos);
}

TEST(ConnectUnix, MissingSocketSaysWhatToCheck) {
  auto error = kj::runCatchingExceptions([&]() { connectUnix("/tmp/sidecar-no-such.sock"); });
  std::string description = descriptionOf(kj::mv(error));
  EXPECT_NE(description.find("/tmp/sidecar-no-such.sock"), std::string::npos) << description;
  EXPECT_NE(description.find("is sidecard running"), std::string::npos) << description;
}

TEST(ListenTcp, PortZeroPicksAPortAndBusyPortIsAnError) {
  auto fd = listenTcp(HostPort{"127.0.0.1", 0});
  uint16_t port = localPort(fd.get());
  EXPECT_NE(port, 0);
  auto error = kj::runCatchingExceptions([&]() { listenTcp(HostPort{"127.0.0.1", port}); });
  EXPECT_NE(descriptionOf(kj::mv(error)).find("cannot bind"), std::string::npos);
}

// ---- Acceptor

TEST(Acceptor, AcceptsUnixAndTcpConnections) {
  Watchdog watchdog("acceptor");
  TempDir dir;
  ReactorLoop loop;
  Acceptor unixAcceptor(loop.reactor(), listenUnix(dir.path("a.sock"), 0600));
  auto tcpListen = listenTcp(HostPort{"127.0.0.1", 0});
  uint16_t port = localPort(tcpListen.get());
  Acceptor tcpAcceptor(loop.reactor(), kj::mv(tcpListen));

  auto unixAccepted = unixAcceptor.accept();
  auto tcpAccepted = tcpAcceptor.accept();
  auto unixClient = connectUnix(dir.path("a.sock"));
  auto tcpClient = connectTcp(HostPort{"127.0.0.1", port});
  auto u = unixAccepted.wait(loop.waitScope());
  auto t = tcpAccepted.wait(loop.waitScope());
  EXPECT_GE(u.get(), 0);
  EXPECT_GE(t.get(), 0);
  EXPECT_TRUE(fcntl(u.get(), F_GETFL) & O_NONBLOCK);
  EXPECT_TRUE(fcntl(t.get(), F_GETFD) & FD_CLOEXEC);
}

TEST(Acceptor, DestroyedWithAcceptInFlight) {
  Watchdog watchdog("acceptor destruction");
  ReactorLoop loop;
  int baseline = openFdCount();
  {
    auto listenFd = listenTcp(HostPort{"127.0.0.1", 0});
    Acceptor acceptor(loop.reactor(), kj::mv(listenFd));
    auto accepted = acceptor.accept();
    EXPECT_FALSE(accepted.poll(loop.waitScope()));
  }
  EXPECT_EQ(openFdCount(), baseline);
}

TEST(Acceptor, DroppedAcceptPromiseThenNewAccept) {
  Watchdog watchdog("acceptor re-accept");
  ReactorLoop loop;
  auto listenFd = listenTcp(HostPort{"127.0.0.1", 0});
  uint16_t port = localPort(listenFd.get());
  Acceptor acceptor(loop.reactor(), kj::mv(listenFd));
  {
    auto dropped = acceptor.accept();
    EXPECT_FALSE(dropped.poll(loop.waitScope()));
  }
  auto accepted = acceptor.accept();
  auto client = connectTcp(HostPort{"127.0.0.1", port});
  auto fd = accepted.wait(loop.waitScope());
  EXPECT_GE(fd.get(), 0);
}

// 200 clients on other threads connect to one reactor, each sending a message and reading the
// echo; the reactor serves them all concurrently.
void runManyClients(bool useUnix) {
  Watchdog watchdog("many connections", std::chrono::seconds(60));
  constexpr int kClients = 200;
  constexpr int kThreads = 4;
  TempDir dir;
  std::string path = dir.path("many.sock");
  ReactorLoop loop;
  kj::AutoCloseFd listenFd = useUnix ? listenUnix(path, 0600) : listenTcp(HostPort{"127.0.0.1", 0});
  uint16_t port = useUnix ? 0 : localPort(listenFd.get());
  Acceptor acceptor(loop.reactor(), kj::mv(listenFd));

  struct ErrorHandler : kj::TaskSet::ErrorHandler {
    void taskFailed(kj::Exception&& e) override {
      ADD_FAILURE() << "connection task failed: " << e.getDescription().cStr();
    }
  } errors;
  kj::TaskSet connections(errors);
  int served = 0;
  auto allServed = kj::newPromiseAndFulfiller<void>();
  auto* allServedFulfiller = allServed.fulfiller.get();

  kj::Function<kj::Promise<void>()> acceptLoop = [&]() -> kj::Promise<void> {
    return acceptor.accept().then([&](kj::AutoCloseFd fd) {
      auto stream = kj::heap<UringStream>(loop.reactor(), kj::mv(fd));
      auto buffer = kj::heapArray<kj::byte>(64);
      auto& s = *stream;
      auto bytes = buffer.begin();
      connections.add(s.read(bytes, 16)
                          .then([&s, bytes]() { return s.write(bytes, 16); })
                          .then([&]() {
                            if (++served == kClients) allServedFulfiller->fulfill();
                          })
                          .attach(kj::mv(stream), kj::mv(buffer)));
      return acceptLoop();
    });
  };
  auto accepting = acceptLoop().eagerlyEvaluate([](kj::Exception&& e) {
    ADD_FAILURE() << "accept loop failed: " << e.getDescription().cStr();
  });

  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t]() {
      // Open all of this thread's connections first, so they are concurrent on the server.
      std::vector<kj::AutoCloseFd> fds;
      for (int i = 0; i < kClients / kThreads; ++i) {
        kj::AutoCloseFd fd = useUnix ? connectUnix(path) : connectTcp(HostPort{"127.0.0.1", port});
        // connect*() leaves the fd non-blocking; these clients block.
        fcntl(fd.get(), F_SETFL, fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
        fds.push_back(kj::mv(fd));
      }
      for (size_t i = 0; i < fds.size(); ++i) {
        std::string text = "t" + std::to_string(t) + "-c" + std::to_string(i) + "-xxxxxxxxxxxx";
        const char* message = text.c_str();  // the first 16 bytes are sent
        if (::send(fds[i].get(), message, 16, MSG_NOSIGNAL) != 16) continue;
        char echo[16];
        size_t got = 0;
        while (got < 16) {
          ssize_t n = ::recv(fds[i].get(), echo + got, 16 - got, 0);
          if (n <= 0) break;
          got += static_cast<size_t>(n);
        }
        if (got == 16 && memcmp(echo, message, 16) == 0) ok.fetch_add(1);
      }
    });
  }
  allServed.promise.wait(loop.waitScope());
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kClients);
  EXPECT_EQ(served, kClients);
}

TEST(Acceptor, ManyConcurrentTcpConnections) { runManyClients(false); }
TEST(Acceptor, ManyConcurrentUnixConnections) { runManyClients(true); }

}  // namespace
}  // namespace sidecar::reactor
