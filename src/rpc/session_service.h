#pragma once
// The Session capability of one registered rank: translates schema/sidecar.capnp's Session calls
// into TransferBackend calls. Lives on the core that serves the client's connection; when the
// client drops it (or the connection breaks) the destructor unregisters the rank.

#include "rpc/device_send_backend.h"
#include "rpc/lane_service.h"
#include "rpc/transfer_backend.h"
#include "sidecar.capnp.h"

#include <memory>
#include <string>

namespace sidecar::rpc {

// The largest tensor a client may send inline (InlineTensor), announced at registration. Inline
// costs three extra copies of the bytes (into the message, through the socket, into the arena)
// and saves one round trip (the allocate call, 20-50 us on the VMs we measured): at ~5-10 GB/s
// per copy, 32 KiB copied three times stays below one round trip.
constexpr uint64_t kInlineTensorMaxBytes = 32 * 1024;

class SessionService final : public proto::Session::Server {
 public:
  SessionService(TransferBackend& backend, SessionId session, transfer::Rank rank,
                 DeviceSendBackend* devices = nullptr, transfer::Group group = {},
                 bool concurrentCopy = false, LaneHost lanes = {})
      : backend_(backend),
        session_(session),
        rank_(rank),
        devices_(devices),
        group_(group.empty() ? transfer::Group{rank} : std::move(group)),
        concurrentCopy_(concurrentCopy),
        lanes_(lanes) {}
  ~SessionService();

 protected:
  kj::Promise<void> allocate(AllocateContext context) override;
  kj::Promise<void> release(ReleaseContext context) override;
  kj::Promise<void> send(SendContext context) override;
  kj::Promise<void> closeStream(CloseStreamContext context) override;
  kj::Promise<void> recv(RecvContext context) override;
  kj::Promise<void> markDone(MarkDoneContext context) override;
  kj::Promise<void> sendDevice(SendDeviceContext context) override;
  kj::Promise<void> openLane(OpenLaneContext context) override;
  kj::Promise<void> directRoute(DirectRouteContext context) override;

 private:
  TransferBackend& backend_;
  SessionId session_;
  transfer::Rank rank_;
  DeviceSendBackend* devices_;
  transfer::Group group_;  // as registered
  bool concurrentCopy_;
  LaneHost lanes_;             // the session's core (no reactor: no lanes; embeddings, tests)
  kj::Own<LaneService> lane_;  // declared last: destroyed first, cancelling its pending work
};

// A send's payload, for Session.send and the lane: `request` has the header fields; `keep` holds
// the message `payload` is read from until the send no longer needs it (an inline tensor's bytes
// are copied after its allocation, which may wait for space).
kj::Promise<void> sendPayload(TransferBackend& backend, SessionId session, SendRequest request,
                              proto::Payload::Reader payload, std::shared_ptr<const void> keep);
// An InlineTensor: allocates like Session.allocate, copies the bytes in, then sends.
kj::Promise<void> sendInline(TransferBackend& backend, SessionId session, SendRequest request,
                             proto::InlineTensor::Reader tensor, std::shared_ptr<const void> keep);

std::string text(capnp::Text::Reader t);
void writeRecvResult(proto::RecvResult::Builder result, const RecvReply& reply);

// Carries one fd of its own (a lane's memory or doorbell) to the client.
class FdHandleService final : public proto::FdHandle::Server {
 public:
  explicit FdHandleService(kj::AutoCloseFd fd) : fd_(kj::mv(fd)) {}
  kj::Maybe<int> getFd() override { return fd_.get(); }

 private:
  kj::AutoCloseFd fd_;
};

// Carries the arena's memfd to the client (Capability::Client::getFd()).
class ArenaHandleService final : public proto::ArenaHandle::Server {
 public:
  explicit ArenaHandleService(int fd) : fd_(fd) {}
  kj::Maybe<int> getFd() override { return fd_; }

 private:
  int fd_;  // owned by the arena, which outlives every connection
};

// Conversions shared with the Sidecar service.
transfer::Dtype fromProto(proto::Dtype dtype);
proto::Dtype toProto(transfer::Dtype dtype);
std::vector<transfer::Group> readDestinations(capnp::List<proto::Destination>::Reader list);
void writeDestinations(capnp::List<proto::Destination>::Builder list,
                       const std::vector<transfer::Group>& groups);  // list has groups.size()

}  // namespace sidecar::rpc
