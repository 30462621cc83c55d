#include "sidecar/client.h"

#include <capnp/rpc-twoparty.h>
#include <kj/debug.h>

#include <cstdlib>

#include "client/errors.h"
#include "client/thread_loop.h"
#include "reactor/kj_event_port.h"
#include "reactor/socket.h"
#include "reactor/uring_stream.h"
#include "sidecar.capnp.h"
#include "sidecar_build_config.h"

namespace sidecar {

uint32_t protocolVersion() { return proto::PROTOCOL_VERSION; }
const char* libraryVersion() { return SIDECAR_VERSION; }

struct Client::Impl {
  explicit Impl(kj::AutoCloseFd fd, bool unix)
      : loop(threadLoop.get()),
        stream(kj::heap<reactor::UringStream>(loop.reactor(), kj::mv(fd))),
        rpc(unix ? kj::heap<capnp::TwoPartyClient>(
                       static_cast<kj::AsyncCapabilityStream&>(*stream), 4)
                 : kj::heap<capnp::TwoPartyClient>(static_cast<kj::AsyncIoStream&>(*stream))),
        sidecar(rpc->bootstrap().castAs<proto::Sidecar>()) {}

  ~Impl() {
    // Tear the RPC system down before the stream it uses, inside the loop that owns both.
    sidecar = nullptr;
    rpc = nullptr;
    stream = nullptr;
  }

  client::ThreadLoop threadLoop;  // first: destroyed last
  reactor::ReactorLoop& loop;
  kj::Own<reactor::UringStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  proto::Sidecar::Client sidecar;
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;
Client::~Client() = default;

std::string Client::defaultSocketPath() {
  const char* env = std::getenv("SIDECAR_SOCKET");
  return env != nullptr && *env != '\0' ? env : "/run/sidecar/sidecar.sock";
}

namespace {
Client checkVersion(Client client) {
  NodeStatus status = client.status();
  if (status.protocolVersion != protocolVersion()) {
    throw Error(ErrorCode::kProtocolMismatch,
                "sidecard speaks protocol " + std::to_string(status.protocolVersion) +
                    " but this library speaks " + std::to_string(protocolVersion()) +
                    "; use a client of the daemon's version (" + status.version + ")");
  }
  return client;
}
}  // namespace

Client Client::connectUnix(const std::string& socketPath) {
  kj::AutoCloseFd fd;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { fd = reactor::connectUnix(socketPath); })) {
    throw Error(ErrorCode::kUnavailable, e->getDescription().cStr());
  }
  return checkVersion(Client(std::make_unique<Impl>(kj::mv(fd), true)));
}

Client Client::connectTcp(const std::string& hostPort) {
  kj::AutoCloseFd fd;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions(
                     [&]() { fd = reactor::connectTcp(reactor::parseHostPort(hostPort)); })) {
    throw Error(ErrorCode::kUnavailable, e->getDescription().cStr());
  }
  return checkVersion(Client(std::make_unique<Impl>(kj::mv(fd), false)));
}

std::string Client::ping(std::string_view payload) {
  std::string echo;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto request = impl_->sidecar.pingRequest();
    request.setPayload(kj::arrayPtr(reinterpret_cast<const kj::byte*>(payload.data()),
                                    payload.size()));
    auto response = request.send().wait(impl_->loop.waitScope());
    auto data = response.getPayload();
    echo.assign(reinterpret_cast<const char*>(data.begin()), data.size());
  })) {
    throw client::translate(*e, "ping");
  }
  return echo;
}

NodeStatus Client::status() {
  NodeStatus out;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto response = impl_->sidecar.infoRequest().send().wait(impl_->loop.waitScope());
    auto info = response.getInfo();
    out.protocolVersion = info.getProtocolVersion();
    out.version = info.getVersion().cStr();
    out.nodeId = info.getNodeId().cStr();
    out.incarnation = info.getIncarnation();
    out.startedAtUnixMs = info.getStartedAtUnixMs();
    out.uptimeMs = info.getUptimeMs();
    out.pid = info.getPid();
    out.socketPath = info.getSocketPath().cStr();
    out.tcpAddress = info.getTcpAddress().cStr();
    for (auto core : info.getCores()) {
      out.cores.push_back(CoreStatus{core.getIndex(), core.getCpu(), core.getConnections(),
                                     core.getCompletions(), core.getSleeps(), core.getLanes()});
    }
    if (info.hasArena()) {
      auto a = info.getArena();
      ArenaStatus arena;
      arena.sizeBytes = a.getSizeBytes();
      arena.pageKind = a.getPageKind().cStr();
      arena.pageKindReason = a.getPageKindReason().cStr();
      arena.locked = a.getLocked();
      arena.slabBytes = a.getSlabBytes();
      arena.slabsTotal = a.getSlabsTotal();
      arena.slabsFree = a.getSlabsFree();
      arena.usedBytes = a.getUsedBytes();
      for (auto h : a.getHints()) {
        arena.hints.push_back(HintStatus{h.getHintBytes(), h.getSlabs(), h.getUnitsUsed(),
                                         h.getUnitsFree(), h.getLargestFreeRunUnits(),
                                         h.getFragmentation(), h.getAllocationWaits(),
                                         h.getAllocationFailures()});
      }
      out.arena = std::move(arena);
    }
    out.cudaAvailable = info.getCudaAvailable();
    out.ucxAvailable = info.getUcxAvailable();
    auto address = info.getUcxWorkerAddress();
    out.ucxWorkerAddress.assign(reinterpret_cast<const char*>(address.begin()), address.size());
  })) {
    throw client::translate(*e, "status");
  }
  return out;
}

TransferStatus Client::transfers() {
  TransferStatus out;
  client::call("transfers", [&]() {
    auto response = impl_->sidecar.transfersRequest().send().wait(impl_->loop.waitScope());
    auto s = response.getSummary();
    for (auto id : s.getDataIds()) out.dataIds.emplace_back(id.cStr());
    out.items = s.getItems();
    out.chunks = s.getChunks();
    out.bytesHeld = s.getBytesHeld();
    out.waiters = s.getWaiters();
    out.duplicatesDropped = s.getDuplicatesDropped();
    out.expiredHolds = s.getExpiredHolds();
    out.chunksCompleted = s.getChunksCompleted();
    for (auto r : s.getRanks()) {
      RankStatus rank;
      rank.rank = r.getRank();
      for (int32_t g : r.getGroup()) rank.group.push_back(g);
      rank.bytesAllocated = r.getBytesAllocated();
      rank.bytesHeld = r.getBytesHeld();
      out.ranks.push_back(std::move(rank));
    }
    for (auto p : s.getPeers()) {
      out.peers.push_back(PeerLinkStatus{p.getOutgoing(), p.getNodeId().cStr(),
                                         p.getAddress().cStr(), p.getIncarnation(), p.getUp(),
                                         p.getBodies().cStr(), p.getChunks(), p.getBytes(),
                                         p.getDirectChunks()});
    }
  });
  return out;
}

std::string Client::inspect(const std::string& dataId) {
  std::string out;
  client::call("inspect", [&]() {
    auto request = impl_->sidecar.inspectRequest();
    request.setDataId(dataId);
    out = request.send().wait(impl_->loop.waitScope()).getDescription().cStr();
  });
  return out;
}

}  // namespace sidecar
