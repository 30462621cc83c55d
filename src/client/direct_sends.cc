#include "client/direct_sends.h"

#include <kj/debug.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "base/hop_trace.h"
#include "base/packed_deliver.h"

namespace sidecar::client {
namespace {

// After a failed route request or a failed endpoint (e.g. this process cannot reach that node's
// network), the daemon sends for this long before the route is tried again.
constexpr auto kRetryAfterFailure = std::chrono::seconds(5);
// An endpoint that keeps failing (this host cannot reach that node at all) is tried again after
// twice as long each time, up to this: UCX logs each failed connect on the executor's stderr.
constexpr auto kRetryAfterFailureMax = std::chrono::seconds(320);

void writeGroups(capnp::List<proto::Destination>::Builder out, const DirectSends::Groups& groups) {
  for (size_t i = 0; i < groups.size(); ++i) {
    auto ranks = out[static_cast<unsigned>(i)].initRanks(static_cast<unsigned>(groups[i].size()));
    for (size_t r = 0; r < groups[i].size(); ++r) ranks.set(static_cast<unsigned>(r), groups[i][r]);
  }
}

}  // namespace

bool directSendsWanted() {
  const char* v = std::getenv("SIDECAR_DIRECT_SENDS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

DirectSends::DirectSends(proto::Session::Client session, int32_t rank, MakeWire makeWire)
    : session_(kj::mv(session)), rank_(rank), makeWire_(std::move(makeWire)), asks_(*this) {}

void DirectSends::taskFailed(kj::Exception&& e) {
  // ask() handles its own failures; nothing else runs here.
  (void)e;
}

void DirectSends::ask(const Groups& destinations, Route& route, bool renew) {
  if (route.asking || unsupported_) return;
  route.asking = true;
  auto request = session_.directRouteRequest();
  writeGroups(request.initDestinations(static_cast<unsigned>(destinations.size())), destinations);
  request.setRenew(renew);
  Route* r = &route;  // entries of routes_ are never erased while this lives
  asks_.add(request.send().then(
      [r](capnp::Response<proto::Session::DirectRouteResults> response) {
        r->asking = false;
        auto answer = response.getRoute();
        r->askAfter = std::chrono::steady_clock::now() + std::chrono::milliseconds(answer.getRetryMs());
        if (!answer.isUcx()) {
          r->ready = false;
          return;
        }
        auto ucx = answer.getUcx();
        auto address = ucx.getWorkerAddress();
        std::string workerAddress(reinterpret_cast<const char*>(address.begin()), address.size());
        // The same link and block: keep counting where this process is; anything else starts
        // the new block.
        bool same = r->ready && r->link == ucx.getLinkSerial() && r->seqBase == ucx.getSeqBase() &&
                    r->workerAddress == workerAddress;
        r->workerAddress = std::move(workerAddress);
        r->deliverTag = ucx.getDeliverTag();
        r->link = ucx.getLinkSerial();
        r->messageMaxBytes = ucx.getMessageMaxBytes();
        if (!same) {
          r->seqBase = ucx.getSeqBase();
          r->nextSeq = ucx.getSeqBase();
          uint64_t end = uint64_t{ucx.getSeqBase()} + ucx.getSeqCount();
          r->seqEnd = end > 0xffffffffu ? 0xffffffffu : static_cast<uint32_t>(end);
        }
        r->ready = r->link != 0 && r->nextSeq != 0 && r->nextSeq < r->seqEnd;
      },
      [this, r](kj::Exception&& e) {
        r->asking = false;
        r->ready = false;
        r->askAfter = std::chrono::steady_clock::now() + kRetryAfterFailure;
        if (e.getType() == kj::Exception::Type::UNIMPLEMENTED) unsupported_ = true;
      }));
}

std::optional<DirectSends::Sent> DirectSends::trySend(const Groups& destinations,
                                                      const std::string& dataId, uint32_t chunkId,
                                                      uint32_t numChunks, const Tensor& tensor) {
  if ((wireMade_ && wire_ == nullptr) || unsupported_ || tensor.sizeBytes > kTensorMaxBytes ||
      destinations.empty()) {
    return std::nullopt;
  }
  Route& route = routes_[destinations];
  auto now = std::chrono::steady_clock::now();
  if (now >= route.askAfter) ask(destinations, route, false);
  if (!route.ready) return std::nullopt;
  if (!wireMade_) {
    wireMade_ = true;
    wire_ = makeWire_();
    if (wire_ == nullptr) return std::nullopt;
  }
  if (route.nextSeq >= route.seqEnd) {
    // This block is used up: a new one is on its way.
    route.ready = false;
    route.asking = false;
    ask(destinations, route, true);
    return std::nullopt;
  }
  uint32_t seq = route.nextSeq;
  // A packed deliver (base/packed_deliver.h), written in the buffer kept across sends.
  base::PackedDeliverFields fields;
  fields.seq = seq;
  fields.chunkId = chunkId;
  fields.numChunks = numChunks;
  fields.senderRank = rank_;
  fields.dataId = dataId;
  fields.dtype = static_cast<uint16_t>(tensor.dtype);
  fields.shape = tensor.shape;
  fields.senderGroup = std::span<const int32_t>(&rank_, 1);
  fields.destinations = destinations;
  fields.sizeBytes = tensor.sizeBytes;
  size_t bytes = base::packedDeliverBytes(fields);
  if (bytes == 0 || bytes > route.messageMaxBytes) return std::nullopt;
  if (buffer_.asBytes().size() < bytes) buffer_ = kj::heapArray<capnp::word>(bytes / sizeof(capnp::word));
  auto* message = reinterpret_cast<std::byte*>(buffer_.begin());
  base::writePackedDeliver(message, fields, tensor.bytes);
  std::string error;
  hop::mark(hop::Point::kDirectSending);
  DirectWire::Sent result = wire_->send(route.workerAddress, route.deliverTag, message, bytes, error);
  hop::mark(hop::Point::kDirectSent);
  switch (result) {
    case DirectWire::Sent::kYes:
      route.endpointFailures = 0;
      ++route.nextSeq;
      ++sent_;
      return Sent{route.link, seq};
    case DirectWire::Sent::kBusy:
      return std::nullopt;
    case DirectWire::Sent::kLost:
      // It worked before: the next send makes a new endpoint (to the route's address, or to a
      // new one once the route is asked again).
      wire_->forget(route.workerAddress);
      return std::nullopt;
    case DirectWire::Sent::kFailed:
      // E.g. this process cannot reach that node's network: the daemon sends for a while.
      wire_->forget(route.workerAddress);
      route.ready = false;
      route.askAfter = now + std::min<std::chrono::steady_clock::duration>(
                                 kRetryAfterFailure * (1 << std::min(route.endpointFailures, 6u)),
                                 kRetryAfterFailureMax);
      ++route.endpointFailures;
      return std::nullopt;
  }
  return std::nullopt;
}

}  // namespace sidecar::client
