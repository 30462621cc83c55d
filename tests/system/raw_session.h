#pragma once
// A client that speaks Cap'n Proto to sidecard itself (no libsidecar), registered as one rank,
// for the tests that send what libsidecar never would. It has its own KJ event loop: libsidecar
// (one loop per thread) runs on another thread, or after this is gone.

#include <capnp/rpc-twoparty.h>

#include <string>

#include "reactor/kj_event_port.h"
#include "reactor/socket.h"
#include "reactor/uring_stream.h"
#include "sidecar.capnp.h"

namespace sidecar::systest {

class RawSession {
 public:
  RawSession(const std::string& socket, int32_t rank)
      : stream_(kj::heap<reactor::UringStream>(loop_.reactor(), reactor::connectUnix(socket))),
        rpc_(static_cast<kj::AsyncCapabilityStream&>(*stream_), 4),
        main_(rpc_.bootstrap().castAs<proto::Sidecar>()) {
    stream_->setReadAhead(false);  // fds follow
    auto reg = main_.registerRequest();
    auto r = reg.initRegistration();
    r.setRank(rank);
    r.initGroup(1).set(0, rank);
    r.initSendHint().setDtype(proto::Dtype::UINT8);
    r.getSendHint().initRowShape(1).set(0, 64);
    r.initRecvHint().setDtype(proto::Dtype::UINT8);
    r.getRecvHint().initRowShape(1).set(0, 64);
    auto registered = reg.send().wait(ws());
    session_ = registered.getSession();
  }

  kj::WaitScope& ws() { return loop_.waitScope(); }
  proto::Session::Client& session() { return session_; }
  proto::Sidecar::Client& main() { return main_; }

 protected:
  reactor::ReactorLoop loop_;
  kj::Own<reactor::UringStream> stream_;
  capnp::TwoPartyClient rpc_;
  proto::Sidecar::Client main_;
  proto::Session::Client session_ = nullptr;
};

}  // namespace sidecar::systest
