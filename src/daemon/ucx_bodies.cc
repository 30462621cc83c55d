#include "daemon/ucx_bodies.h"

#include <cstdlib>

#include "rpc/transfer_backend.h"

namespace sidecar::daemon {
namespace {

class UcxBodyEndpoint final : public BodyEndpoint {
 public:
  explicit UcxBodyEndpoint(std::unique_ptr<net::UcxEndpoint> endpoint)
      : endpoint_(std::move(endpoint)) {}
  kj::Promise<void> send(uint64_t tag, const void* buffer, uint64_t sizeBytes) override {
    return endpoint_->tagSend(tag, buffer, sizeBytes);
  }

 private:
  std::unique_ptr<net::UcxEndpoint> endpoint_;  // destroyed: force-closed, pending sends reject
};

}  // namespace

UcxBodies::UcxBodies(net::UcxContext& context, reactor::Reactor& reactor)
    : worker_(context, reactor) {}

UcxBodies::~UcxBodies() = default;

std::string UcxBodies::address() const {
  const auto& bytes = worker_.address();
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

kj::Own<BodyEndpoint> UcxBodies::connect(const std::string& remoteAddress) {
  auto endpoint = worker_.connect(kj::arrayPtr(reinterpret_cast<const uint8_t*>(remoteAddress.data()),
                                               remoteAddress.size()));
  return kj::heap<UcxBodyEndpoint>(std::move(endpoint));
}

kj::Promise<void> UcxBodies::receive(uint64_t tag, void* buffer, uint64_t sizeBytes) {
  return worker_.tagRecv(tag, buffer, sizeBytes).then([sizeBytes](size_t received) {
    if (received != sizeBytes) {
      throw rpc::transferError("invalid-argument",
                               "a peer's body piece has " + std::to_string(received) +
                                   " bytes where its descriptor said " + std::to_string(sizeBytes));
    }
  });
}

kj::Promise<BodyMessage> UcxBodies::receiveAny(uint64_t tag, uint64_t tagMask, void* buffer,
                                               uint64_t maxBytes,
                                               std::function<void(const BodyMessage&)> onArrival) {
  net::TagArrival arrival;
  if (onArrival) {
    arrival = [onArrival = std::move(onArrival)](const net::TagCompletion& done) {
      onArrival(BodyMessage{done.sizeBytes, done.senderTag});
    };
  }
  return worker_.tagRecvMasked(tag, tagMask, buffer, maxBytes, kj::mv(arrival)).then([](net::TagCompletion done) {
    return BodyMessage{done.sizeBytes, done.senderTag};
  });
}

std::string UcxBodies::describe() const {
  const char* tls = std::getenv("UCX_TLS");
  return std::string("ucx (UCX_TLS=") + (tls != nullptr && *tls != '\0' ? tls : "auto") + ")";
}

}  // namespace sidecar::daemon
