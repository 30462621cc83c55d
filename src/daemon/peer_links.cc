#include "daemon/peer_links.h"

#include <capnp/rpc-twoparty.h>
#include <capnp/serialize.h>
#include <spdlog/spdlog.h>

#include <kj/debug.h>

#include <cstring>

#include "base/clock.h"
#include "base/hop_trace.h"
#include "daemon/peer_messages.h"
#include "reactor/connector.h"
#include "reactor/uring_stream.h"
#include "rpc/peer_service.h"
#include "rpc/session_service.h"
#include "rpc/transfer_backend.h"

namespace sidecar::daemon {

using rpc::transferError;

struct PeerLinks::Link : public kj::Refcounted, private kj::TaskSet::ErrorHandler {
  Link(std::string address, uint32_t serial)
      : address(std::move(address)),
        serial(serial),
        sends(kj::heap<kj::TaskSet>(static_cast<kj::TaskSet::ErrorHandler&>(*this))) {}
  ~Link() noexcept(false) {
    canceler.cancel("peer link closed");
  }

  // The daemon is stopping, and what this link uses goes before the link may: a delivery in
  // flight holds its link until its session ends, after UCX's worker and the PeerLinks. Every
  // UCX send and the endpoint go now, in the order UCX needs (sends, endpoint, then the messages
  // they read), and so do the link's loops and its Cap'n Proto connection.
  void dropTransport() {
    canceler.cancel("the daemon is stopping");
    sends = nullptr;
    endpoint = nullptr;
    outgoing.clear();
    heartbeat = nullptr;
    watch = nullptr;
    ready = nullptr;
    peer = nullptr;
    client = nullptr;
    stream = nullptr;
  }

  std::string address;
  std::string nodeName() const {
    return remote.nodeId.empty() ? address : "'" + remote.nodeId + "' (" + address + ")";
  }

  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> client;
  proto::Peer::Client peer = nullptr;
  rpc::PeerIdentity remote;
  uint32_t serial;  // this side's id for the link: acks for it carry it in their tag
  // Deliveries sent as UCX messages: their encoded messages until UCX is done with them, the
  // sends themselves, and the fulfillers their acks complete. Declared before `endpoint`, whose
  // destruction (first) force-closes it, so UCX never reads a message after it is freed.
  std::map<uint32_t, kj::Array<capnp::word>> outgoing;
  kj::Own<kj::TaskSet> sends;  // null once dropTransport() ran
  std::map<uint32_t, kj::Own<kj::PromiseFulfiller<void>>> awaitingAcks;
  kj::Own<BodyEndpoint> endpoint;
  kj::Canceler canceler;  // every call on the link is wrapped: lose() fails them all
  kj::Maybe<kj::ForkedPromise<void>> ready;
  kj::Promise<void> heartbeat = nullptr;
  kj::Promise<void> watch = nullptr;
  bool up = false;
  bool dead = false;
  uint32_t nextSeq = 1;
  uint64_t chunks = 0;  // delivered (answered) over this link
  uint64_t bytes = 0;
  // Direct sends: seq blocks by their first seq -> the session they were handed to; each
  // session's current and previous block; acks that came before the send naming them.
  std::map<uint32_t, uint64_t> directBlocks;
  std::map<uint64_t, std::pair<uint32_t, uint32_t>> sessionBlocks;
  uint32_t nextDirectBlock = kDirectSeqFirst;
  std::map<uint32_t, std::string> earlyAcks;
  uint64_t directChunks = 0;

 private:
  void taskFailed(kj::Exception&& e) override {
    spdlog::debug("peer link to {}: a message send failed: {}", address, e.getDescription().cStr());
  }
};

namespace {

// "[kind] message" of a peer's answer (possibly behind "remote exception: "), or none.
bool splitKind(const std::string& description, std::string& kind, std::string& message) {
  std::string d = description;
  const std::string remote = "remote exception: ";
  if (d.rfind(remote, 0) == 0) d = d.substr(remote.size());
  if (d.size() < 3 || d[0] != '[') return false;
  auto close = d.find("] ");
  if (close == std::string::npos) return false;
  kind = d.substr(1, close - 1);
  message = d.substr(close + 2);
  return true;
}

kj::Promise<void> deadline(kj::Timer& timer, uint32_t timeoutMs, std::string what) {
  return timer.afterDelay(timeoutMs * kj::MILLISECONDS).then([what = std::move(what), timeoutMs]() {
    kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, kj::str(what.c_str(), " took longer than ",
                                                               timeoutMs, " ms (peers.timeout_ms)")));
  });
}

}  // namespace

PeerLinks::PeerLinks(reactor::Reactor& reactor, kj::Timer& timer, PeerLinkOptions options,
                     BodyTransport* bodies)
    : reactor_(reactor), timer_(timer), options_(std::move(options)), bodies_(bodies) {
  if (bodies_ != nullptr && options_.self.ucxMessageMaxBytes > 0) {
    ackBuffer_ = kj::heapArray<capnp::word>(kPeerAckMaxBytes / sizeof(capnp::word));
    takesAcks_ = true;
    acks_ = ackLoop().eagerlyEvaluate([](kj::Exception&& e) {
      spdlog::error("peer acks stopped (small deliveries will fail with their links): {}",
                    e.getDescription().cStr());
    });
  }
}

PeerLinks::~PeerLinks() {
  acks_ = nullptr;  // cancels the posted receive before the worker goes
  for (auto& [address, link] : links_) link->dropTransport();
  for (auto& link : graveyard_) link->dropTransport();
  links_.clear();
  graveyard_.clear();
}

kj::Exception PeerLinks::peerError(const Link& link, kj::Exception&& e) const {
  std::string description = e.getDescription().cStr();
  std::string kind, message;
  if (splitKind(description, kind, message)) {
    // The peer's own verdict (arena-full, invalid-argument, ...), or our link's loss.
    if (kind == "peer-lost" || kind == "peer-unreachable" || message.find("node ") == 0) {
      return transferError(kind.c_str(), message);
    }
    return transferError(kind.c_str(), "node " + link.nodeName() + ": " + message);
  }
  if (!link.up) {
    return transferError("peer-unreachable", "cannot open a link to node " + link.nodeName() +
                                                 ": " + description +
                                                 " (is its sidecard running, and [peers] right?)");
  }
  return transferError("peer-lost", "link to node " + link.nodeName() + " lost: " + description);
}

kj::Promise<kj::Own<PeerLinks::Link>> PeerLinks::link(const std::string& address) {
  auto it = links_.find(address);
  if (it == links_.end()) {
    uint32_t serial = nextSerial_++;
    if (serial == 0) serial = nextSerial_++;
    auto fresh = kj::refcounted<Link>(address, serial);
    Link& l = *fresh;
    it = links_.emplace(address, kj::mv(fresh)).first;
    // A link that fails to open ends. That handler stays outside what the link's canceler wraps:
    // lose() cancels it, and cancelling the chain that is running destroyed it (a daemon that
    // sent to a node whose daemon was down aborted with "pure virtual method called").
    l.ready = l.canceler.wrap(open(l))
                  .catch_([this, &l](kj::Exception&& e) -> kj::Promise<void> {
                    spdlog::warn("peer link to {} failed to open: {}", l.address,
                                 e.getDescription().cStr());
                    kj::Exception mapped = peerError(l, kj::mv(e));
                    lose(l, mapped.getDescription().cStr());
                    return kj::mv(mapped);
                  })
                  .fork();
  }
  Link& l = *it->second;
  auto ref = kj::addRef(l);
  KJ_IF_MAYBE(ready, l.ready) {
    return ready->addBranch().then(
        [ref = kj::mv(ref)]() mutable { return kj::mv(ref); },
        [this, ref = kj::addRef(l)](kj::Exception&& e) -> kj::Own<Link> {
          throw peerError(*ref, kj::mv(e));
        });
  }
  KJ_UNREACHABLE;
}

kj::Promise<void> PeerLinks::open(Link& l) {
  reactor::HostPort hostPort;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { hostPort = reactor::parseHostPort(l.address); })) {
    return kj::mv(*e);  // link() ends the link
  }
  auto connected = reactor::connectTcpAsync(reactor_, hostPort)
                       .exclusiveJoin(deadline(timer_, options_.timeoutMs, "connecting")
                                          .then([]() -> kj::AutoCloseFd { KJ_UNREACHABLE; }));
  return connected
      .then([this, &l](kj::AutoCloseFd fd) {
        l.stream = kj::heap<reactor::UringStream>(reactor_, kj::mv(fd));
        l.client = kj::heap<capnp::TwoPartyClient>(*l.stream);
        auto sidecar = l.client->bootstrap().castAs<proto::Sidecar>();
        auto request = sidecar.peerRequest();
        rpc::PeerIdentity self = options_.self;
        self.linkId = l.serial;
        rpc::writeHello(self, request.initHello());
        auto answer = request.send().then([](auto response) { return kj::mv(response); });
        return answer.exclusiveJoin(deadline(timer_, options_.timeoutMs, "the peer handshake")
                                        .then([]() -> capnp::Response<proto::Sidecar::PeerResults> {
                                          KJ_UNREACHABLE;
                                        }));
      })
      .then([this, &l](capnp::Response<proto::Sidecar::PeerResults> response) {
        l.remote = rpc::readHello(response.getHello());
        l.peer = response.getPeer();
        if (bodies_ != nullptr && !l.remote.ucxAddress.empty()) {
          l.endpoint = bodies_->connect(l.remote.ucxAddress);
        }
        l.up = true;
        spdlog::info("peer link to node {} up: incarnation {:016x}, bodies {}", l.nodeName(),
                     l.remote.incarnation, l.endpoint ? bodies_->describe() : "inline");
        l.heartbeat = heartbeatLoop(l).eagerlyEvaluate(nullptr);
        l.watch = l.client->onDisconnect()
                      .then([this, &l]() { lose(l, "the connection closed"); },
                            [this, &l](kj::Exception&& e) { lose(l, e.getDescription().cStr()); })
                      .eagerlyEvaluate(nullptr);
      });
}

kj::Promise<void> PeerLinks::heartbeatLoop(Link& l) {
  uint32_t periodMs = std::max<uint32_t>(options_.timeoutMs / 3, 50);
  return timer_.afterDelay(periodMs * kj::MILLISECONDS)
      .then([this, &l]() {
        return l.peer.heartbeatRequest().send().ignoreResult().exclusiveJoin(
            deadline(timer_, options_.timeoutMs, "a heartbeat answer"));
      })
      .then([this, &l]() { return heartbeatLoop(l); },
            [this, &l](kj::Exception&& e) { lose(l, e.getDescription().cStr()); });
}

void PeerLinks::lose(Link& l, const std::string& why) {
  if (l.dead) return;
  l.dead = true;
  if (l.up) spdlog::warn("peer link to node {} lost: {}", l.nodeName(), why);
  auto it = links_.find(l.address);
  if (it != links_.end() && it->second.get() == &l) {
    graveyard_.push_back(kj::mv(it->second));
    links_.erase(it);
  }
  std::string message = l.up ? "[peer-lost] link to node " + l.nodeName() + " lost: " + why
                             : "[peer-unreachable] cannot open a link to node " + l.nodeName() +
                                   ": " + why;
  l.canceler.cancel(KJ_EXCEPTION(FAILED, message.c_str()));
  // Destroy on a later turn: lose() may run inside the link's own callbacks.
  if (!burialPending_) {
    burialPending_ = true;
    burial_ = kj::evalLater([this]() {
                auto dead = kj::mv(graveyard_);
                graveyard_.clear();
                dead.clear();
                burialPending_ = false;
              }).eagerlyEvaluate(nullptr);
  }
}

kj::Promise<void> PeerLinks::deliver(const std::string& address, OutgoingChunk chunk) {
  // A link that is up is used in this turn: waiting for link()'s promise costs event-loop turns
  // (forked branch, continuation) on the latency path of every small delivery.
  auto it = links_.find(address);
  if (it != links_.end() && it->second->up && !it->second->dead) {
    Link& l = *it->second;
    return kj::evalNow([&]() { return deliverOn(address, kj::addRef(l), kj::mv(chunk)); });
  }
  return link(address).then([this, address, chunk = kj::mv(chunk)](kj::Own<Link> l) mutable {
    return deliverOn(address, kj::mv(l), kj::mv(chunk));
  });
}

kj::Promise<void> PeerLinks::deliverOn(const std::string& address, kj::Own<Link> l,
                                       OutgoingChunk chunk) {
  if (chunk.landed && chunk.isTensor &&
      (chunk.sizeBytes <= options_.inlineBytesMax || !l->endpoint)) {
    // Inline: the body rides in the message, so all of it must have landed first.
    auto whole = chunk.landed(chunk.sizeBytes);
    chunk.landed = nullptr;
    return whole.then([this, address, chunk = kj::mv(chunk)]() mutable {
      return deliver(address, kj::mv(chunk));
    });
  }
  if (chunk.directSeq != 0) {
    if (directOwned(*l, chunk)) {
      return awaitAck(kj::mv(l), chunk.directSeq, chunk.isTensor ? chunk.sizeBytes : 0, true);
    }
    // The client's route was stale (this link is not the one it named: the peer restarted or
    // the link was lost since) or the seq is not its own: what it sent, if anything, went to a
    // link the peer no longer has, which drops it. This daemon sends the chunk itself.
    spdlog::debug("direct send {} of '{}' chunk {} (link {}) not awaited on link {} to node {}: "
                  "forwarding it", chunk.directSeq, chunk.dataId, chunk.chunkId, chunk.directLink,
                  l->serial, l->nodeName());
  }
  bool small = !chunk.isTensor || chunk.sizeBytes <= options_.inlineBytesMax;
  if (small && takesMessages(*l)) {
    uint32_t seq = l->nextSeq;
    auto message = encodePeerDeliver(seq, chunk);
    if (message.size() * sizeof(capnp::word) <= l->remote.ucxMessageMaxBytes) {
      ++l->nextSeq;
      return deliverMessage(kj::mv(l), chunk, seq, kj::mv(message));
    }
  }
  auto request = l->peer.deliverRequest();
  auto c = request.initChunk();
  writeChunkHeader(chunk, c);
  kj::Promise<void> bodies = kj::NEVER_DONE;
  if (chunk.isTensor) {
    auto body = c.getPayload().getTensor().initBody();
    if (chunk.sizeBytes <= options_.inlineBytesMax || !l->endpoint) {
      if (chunk.sizeBytes > kInlineHardMaxBytes) {
        return transferError("too-large",
                             "a tensor of " + std::to_string(chunk.sizeBytes) +
                                 " bytes for node " + l->nodeName() +
                                 " needs the UCX body transport, which this link lacks");
      }
      body.setInline(kj::arrayPtr(static_cast<const kj::byte*>(chunk.body), chunk.sizeBytes));
    } else {
      uint64_t pieceBytes = std::max(options_.pieceBytes, (chunk.sizeBytes + 254) / 255);
      uint32_t pieces = static_cast<uint32_t>((chunk.sizeBytes + pieceBytes - 1) / pieceBytes);
      // Tags: the receiver's link id, a per-link sequence number, the piece index.
      uint64_t tag = (uint64_t{l->remote.linkId} << 40) | (uint64_t{l->nextSeq++ & 0xffffffffu} << 8);
      auto ucx = body.initUcx();
      ucx.setTag(tag);
      ucx.setPieces(pieces);
      ucx.setPieceBytes(pieceBytes);
      auto sends = kj::heapArrayBuilder<kj::Promise<void>>(pieces);
      for (uint32_t i = 0; i < pieces; ++i) {
        uint64_t offset = uint64_t{i} * pieceBytes;
        uint64_t bytes = std::min(pieceBytes, chunk.sizeBytes - offset);
        const void* piece = static_cast<const char*>(chunk.body) + offset;
        if (chunk.landed) {
          // Pipelined: this piece goes out once the GPU copy has landed it.
          BodyEndpoint* endpoint = l->endpoint.get();
          sends.add(chunk.landed(offset + bytes).then([endpoint, tag, i, piece, bytes]() {
            return endpoint->send(tag + i, piece, bytes);
          }));
        } else {
          sends.add(l->endpoint->send(tag + i, piece, bytes));
        }
      }
      // A body that fails fails the delivery; one that succeeds proves nothing until the peer
      // answers (it stores the chunk first), so success waits for the answer alone.
      bodies = kj::joinPromises(sends.finish()).then([]() -> kj::Promise<void> { return kj::NEVER_DONE; });
    }
  }
  uint64_t tensorBytes = chunk.isTensor ? chunk.sizeBytes : 0;
  Link& raw = *l;
  auto answered = request.send().ignoreResult().exclusiveJoin(kj::mv(bodies)).then([&raw, tensorBytes]() {
    ++raw.chunks;
    raw.bytes += tensorBytes;
  });
  return l->canceler.wrap(kj::mv(answered))
      .catch_([this, l = kj::mv(l)](kj::Exception&& e) -> kj::Promise<void> {
        return peerError(*l, kj::mv(e));
      })
      .attach(kj::addRef(raw));
}

kj::Promise<void> PeerLinks::deliverMessage(kj::Own<Link> l, const OutgoingChunk& chunk,
                                            uint32_t seq, kj::Array<capnp::word> message) {
  Link& raw = *l;
  auto bytes = message.asBytes();
  raw.outgoing.emplace(seq, kj::mv(message));
  hop::mark(hop::Point::kMessageSending);
  // Awaited before it is sent (a lost link fails it through the link's canceler).
  auto acked = awaitAck(kj::addRef(raw), seq, chunk.isTensor ? chunk.sizeBytes : 0, false);
  // The send lives in the link (never dropped before UCX is done with the message); a failed
  // send fails the delivery at once instead of leaving it to the link's heartbeat.
  raw.sends->add(raw.endpoint->send(peerDeliverTag(raw.remote.linkId), bytes.begin(), bytes.size())
                    .then([&raw, seq]() { raw.outgoing.erase(seq); },
                          [this, &raw, seq](kj::Exception&& e) {
                            raw.outgoing.erase(seq);
                            // The endpoint is dead (the peer's worker went, or the network):
                            // every later message would fail too. A new link makes a new one.
                            lose(raw, std::string("its UCX endpoint failed: ") +
                                          e.getDescription().cStr());
                          }));
  hop::mark(hop::Point::kMessageSent);
  if (spdlog::should_log(spdlog::level::trace)) {  // (nodeName() builds a string)
    spdlog::trace("peer message {} of '{}' to node {} sent", seq, chunk.dataId, raw.nodeName());
  }
  return acked.attach(kj::mv(l));
}

kj::Promise<void> PeerLinks::awaitAck(kj::Own<Link> l, uint32_t seq, uint64_t tensorBytes,
                                      bool direct) {
  Link& raw = *l;
  auto counted = [&raw, tensorBytes, direct]() {
    ++raw.chunks;
    raw.bytes += tensorBytes;
    if (direct) ++raw.directChunks;
  };
  auto early = raw.earlyAcks.find(seq);
  if (early != raw.earlyAcks.end()) {
    // A direct send's ack that came before the client's send named it.
    std::string error = std::move(early->second);
    raw.earlyAcks.erase(early);
    if (error.empty()) {
      counted();
      return kj::READY_NOW;
    }
    return peerError(raw, KJ_EXCEPTION(FAILED, error.c_str()));
  }
  auto acked = kj::newPromiseAndFulfiller<void>();
  raw.awaitingAcks.emplace(seq, kj::mv(acked.fulfiller));
  // However the delivery ends, its ack is no longer awaited.
  struct Awaiting {
    Awaiting(kj::Own<Link> link, uint32_t seq) : link(kj::mv(link)), seq(seq) {}
    Awaiting(const Awaiting&) = delete;
    Awaiting& operator=(const Awaiting&) = delete;
    ~Awaiting() { link->awaitingAcks.erase(seq); }
    kj::Own<Link> link;
    uint32_t seq;
  };
  kj::Promise<void> waited = acked.promise.then(kj::mv(counted));
  if (direct) {
    uint32_t limitMs = options_.directAckTimeoutMs;
    waited = waited.exclusiveJoin(timer_.afterDelay(limitMs * kj::MILLISECONDS).then([&raw, seq, limitMs]() {
      spdlog::warn("direct send {} to node {}: no ack in {} ms; failing it (its executor's message "
                   "never arrived there)", seq, raw.nodeName(), limitMs);
      kj::throwFatalException(transferError(
          "timeout", "node " + raw.nodeName() + " acknowledged no direct send " + std::to_string(seq) +
                         " within " + std::to_string(limitMs) +
                         " ms: the executor's message never arrived there (a lost message, or a "
                         "client naming a seq it did not send); send it again"));
    }));
  }
  return raw.canceler.wrap(kj::mv(waited))
      .catch_([this, &raw](kj::Exception&& e) -> kj::Promise<void> { return peerError(raw, kj::mv(e)); })
      .attach(kj::heap<Awaiting>(kj::mv(l), seq));
}

bool PeerLinks::takesMessages(const Link& l) const {
  return l.endpoint && takesAcks_ && l.remote.ucxMessageMaxBytes > 0;
}

bool PeerLinks::directOwned(const Link& l, const OutgoingChunk& chunk) const {
  if (chunk.directLink != l.serial || chunk.directSeq < kDirectSeqFirst || !l.up || l.dead) return false;
  auto block = l.directBlocks.find(chunk.directSeq & ~(kDirectSeqBlock - 1));
  if (block == l.directBlocks.end() || block->second != chunk.directSession) return false;
  // A seq named twice (a client bug) is forwarded the second time rather than awaited twice.
  return l.awaitingAcks.find(chunk.directSeq) == l.awaitingAcks.end();
}

kj::Promise<rpc::DirectRoute> PeerLinks::directRoute(const std::string& address, uint64_t session,
                                                     bool renew) {
  auto it = links_.find(address);
  if (it != links_.end() && it->second->up && !it->second->dead) {
    return directRouteOn(*it->second, session, renew);
  }
  return link(address).then(
      [this, session, renew](kj::Own<Link> l) { return directRouteOn(*l, session, renew); },
      [address](kj::Exception&& e) {
        rpc::DirectRoute none;
        none.none = "no link to node " + address + ": " + e.getDescription().cStr();
        none.retryMs = 1'000;
        return none;
      });
}

rpc::DirectRoute PeerLinks::directRouteOn(Link& l, uint64_t session, bool renew) {
  rpc::DirectRoute route;
  if (l.dead) {
    route.none = "the link to node " + l.nodeName() + " was lost";
    route.retryMs = 1'000;
    return route;
  }
  if (!takesMessages(l)) {
    route.none = "node " + l.nodeName() + " takes no UCX messages from this daemon";
    route.retryMs = 60'000;
    return route;
  }
  auto blocks = l.sessionBlocks.find(session);
  if (blocks == l.sessionBlocks.end() || blocks->second.first == 0 || renew) {
    // Worked on values: the entries below may belong to this very session.
    std::pair<uint32_t, uint32_t> mine{0, 0};  // (current, previous) block; 0: none
    if (blocks != l.sessionBlocks.end()) mine = blocks->second;
    // The block before the previous one is no longer this session's.
    if (mine.second != 0) l.directBlocks.erase(mine.second);
    uint32_t base = l.nextDirectBlock;
    // The seq space past kDirectSeqFirst wraps after 32768 blocks; a block handed out again is
    // taken from whoever had it (they had 2^31 sends since).
    l.nextDirectBlock = base + kDirectSeqBlock < kDirectSeqFirst ? kDirectSeqFirst : base + kDirectSeqBlock;
    auto taken = l.directBlocks.find(base);
    if (taken != l.directBlocks.end()) {
      auto owner = l.sessionBlocks.find(taken->second);
      if (owner != l.sessionBlocks.end()) {
        if (owner->second.first == base) owner->second.first = 0;
        if (owner->second.second == base) owner->second.second = 0;
      }
    }
    if (mine.first == base) mine.first = 0;
    l.directBlocks[base] = session;
    blocks = l.sessionBlocks.insert_or_assign(session, std::make_pair(base, mine.first)).first;
  }
  route.workerAddress = l.remote.ucxAddress;
  route.deliverTag = peerDeliverTag(l.remote.linkId);
  route.linkSerial = l.serial;
  route.seqBase = blocks->second.first;
  route.seqCount = kDirectSeqBlock;
  route.messageMaxBytes = l.remote.ucxMessageMaxBytes;
  // Asked again now and then: a route is only as good as its link, and a stale one costs a
  // message the peer drops plus this daemon's own send (see deliverOn).
  route.retryMs = 1'000;
  return route;
}

void PeerLinks::forgetSession(uint64_t session) {
  for (auto& [address, l] : links_) {
    auto blocks = l->sessionBlocks.find(session);
    if (blocks == l->sessionBlocks.end()) continue;
    if (blocks->second.first != 0) l->directBlocks.erase(blocks->second.first);
    if (blocks->second.second != 0) l->directBlocks.erase(blocks->second.second);
    l->sessionBlocks.erase(blocks);
  }
}

kj::Promise<void> PeerLinks::ackLoop() {
  return bodies_->receiveAny(kPeerAckKind, kPeerMessageKindMask, ackBuffer_.begin(),
                             ackBuffer_.size() * sizeof(capnp::word))
      .then(
          [this](BodyMessage message) -> kj::Promise<void> {
            takeAck(message.tag, ackBuffer_.asPtr().slice(0, message.sizeBytes / sizeof(capnp::word)));
            return kj::READY_NOW;
          },
          [this](kj::Exception&& e) -> kj::Promise<void> {
            // E.g. an ack larger than any we send: UCX dropped it. The delivery it answered, if
            // any, fails with its link (heartbeats); keep taking the others, after a pause, so
            // that a receive failing at once every time cannot spin this core.
            spdlog::warn("a peer's ack could not be received: {}", e.getDescription().cStr());
            return timer_.afterDelay(10 * kj::MILLISECONDS);
          })
      .then([this]() { return ackLoop(); });
}

void PeerLinks::takeAck(uint64_t tag, kj::ArrayPtr<const capnp::word> words) {
  uint32_t serial = peerMessageLinkId(tag);
  Link* l = nullptr;
  for (auto& [address, link] : links_) {
    if (link->serial == serial) l = link.get();
  }
  if (l == nullptr) {
    spdlog::debug("an ack for peer link {}, which is gone: dropped", serial);
    return;
  }
  uint32_t seq = 0;
  std::string error;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::FlatArrayMessageReader reader(words);
    auto root = reader.getRoot<proto::PeerMessage>();
    KJ_REQUIRE(root.isAck(), "not an ack");
    seq = root.getAck().getSeq();
    error = root.getAck().getError();
  })) {
    lose(*l, std::string("it sent an ack that is not a PeerMessage ack (") +
                 e->getDescription().cStr() + ")");
    return;
  }
  auto it = l->awaitingAcks.find(seq);
  if (it == l->awaitingAcks.end() && seq >= kDirectSeqFirst) {
    // A direct send's ack, ahead of the client's send that names it (or of a client that died).
    if (l->earlyAcks.size() >= kEarlyAcksMax) l->earlyAcks.erase(l->earlyAcks.begin());
    l->earlyAcks.insert_or_assign(seq, std::move(error));
    return;
  }
  if (it == l->awaitingAcks.end()) {
    spdlog::debug("peer link to node {}: an ack for delivery {}, not awaited: dropped",
                  l->nodeName(), seq);
    return;
  }
  if (error.empty()) {
    it->second->fulfill();
  } else {
    it->second->reject(KJ_EXCEPTION(FAILED, error.c_str()));
  }
  l->awaitingAcks.erase(it);
}

std::vector<rpc::PeerLinkSummary> PeerLinks::summary() const {
  std::vector<rpc::PeerLinkSummary> out;
  for (auto& [address, l] : links_) {
    std::string bodies = l->endpoint ? bodies_->describe() : "inline";
    if (takesMessages(*l)) bodies += kSmallAsMessages;
    out.push_back(rpc::PeerLinkSummary{true, l->remote.nodeId, address, l->remote.incarnation, l->up,
                                       bodies, l->chunks, l->bytes, l->directChunks});
  }
  return out;
}

kj::Promise<void> PeerLinks::closeStream(const std::string& address, std::string dataId,
                                         uint32_t numChunks, transfer::Rank senderRank,
                                         std::vector<transfer::Group> destinations) {
  return link(address).then([this, dataId = kj::mv(dataId), numChunks, senderRank,
                             destinations = kj::mv(destinations)](kj::Own<Link> l) mutable {
    auto request = l->peer.closeStreamRequest();
    request.setDataId(dataId);
    request.setNumChunks(numChunks);
    request.setSenderRank(senderRank);
    rpc::writeDestinations(request.initDestinations(static_cast<unsigned>(destinations.size())),
                           destinations);
    auto answered = request.send().ignoreResult();
    return l->canceler.wrap(kj::mv(answered))
        .catch_([this, l = kj::mv(l)](kj::Exception&& e) -> kj::Promise<void> {
          return peerError(*l, kj::mv(e));
        });
  });
}

}  // namespace sidecar::daemon
