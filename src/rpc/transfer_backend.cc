#include "rpc/transfer_backend.h"

namespace sidecar::rpc {

kj::Promise<void> TransferBackend::sendLanding(SessionId session, SendRequest request,
                                               Landing landing) {
  auto* tensor = std::get_if<TensorDescriptor>(&request.payload);
  uint64_t bytes = tensor != nullptr ? tensor->sizeBytes : 0;
  uint64_t offset = tensor != nullptr ? tensor->offset : 0;
  bool ownsAllocation = tensor != nullptr;
  return landing.landed(bytes).then(
      [this, session, request = std::move(request)]() mutable {
        return send(session, std::move(request));
      },
      [this, session, offset, ownsAllocation,
       finished = std::move(landing.finished)](kj::Exception&& e) -> kj::Promise<void> {
        if (!ownsAllocation) return kj::mv(e);
        // The copy failed: the allocation never reached the table. Give it back once nothing
        // writes into it (a session that ended meanwhile freed it already: ignore that).
        auto failure = kj::cp(e);
        return finished()
            .then([this, session, offset]() { return release(session, offset); })
            .then([e = kj::mv(e)]() mutable -> kj::Promise<void> { return kj::mv(e); },
                  [failure = kj::mv(failure)](kj::Exception&&) mutable -> kj::Promise<void> {
                    return kj::mv(failure);
                  });
      });
}

kj::Promise<void> TransferBackend::recvInto(SessionId session, std::string dataId, uint32_t chunkId,
                                            uint32_t timeoutMs, RecvAnswer answer) {
  auto owned = kj::heap<RecvAnswer>(kj::mv(answer));
  RecvAnswer& call = *owned;
  return recv(session, std::move(dataId), chunkId, timeoutMs)
      .then([&call](RecvReply reply) { call(reply, nullptr); },
            [&call](kj::Exception&& e) { call(nullptr, &e); })
      .attach(kj::mv(owned));
}

kj::Promise<DirectRoute> TransferBackend::directRoute(SessionId, std::vector<transfer::Group>, bool) {
  DirectRoute none;
  none.none = "this daemon forwards every chunk itself";
  none.retryMs = 60'000;
  return none;
}

}  // namespace sidecar::rpc
