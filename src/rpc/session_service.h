#pragma once
// The Session capability of one registered rank: translates schema/sidecar.capnp's Session calls
// into TransferBackend calls. Lives on the core that serves the client's connection; when the
// client drops it (or the connection breaks) the destructor unregisters the rank.

#include "rpc/device_send_backend.h"
#include "rpc/transfer_backend.h"
#include "sidecar.capnp.h"

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
                 bool concurrentCopy = false)
      : backend_(backend),
        session_(session),
        rank_(rank),
        devices_(devices),
        group_(group.empty() ? transfer::Group{rank} : std::move(group)),
        concurrentCopy_(concurrentCopy) {}
  ~SessionService();

 protected:
  kj::Promise<void> allocate(AllocateContext context) override;
  kj::Promise<void> release(ReleaseContext context) override;
  kj::Promise<void> send(SendContext context) override;
  kj::Promise<void> closeStream(CloseStreamContext context) override;
  kj::Promise<void> recv(RecvContext context) override;
  kj::Promise<void> markDone(MarkDoneContext context) override;
  kj::Promise<void> sendDevice(SendDeviceContext context) override;

 private:
  // send() of an InlineTensor: allocates like allocate(), copies the bytes in, then sends.
  kj::Promise<void> sendInline(SendContext context, SendRequest request);

  TransferBackend& backend_;
  SessionId session_;
  transfer::Rank rank_;
  DeviceSendBackend* devices_;
  transfer::Group group_;  // as registered
  bool concurrentCopy_;
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
