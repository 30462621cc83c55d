#pragma once
// A NodeState for tests: fills NodeInfo with fixed, recognisable values and counts the calls.

#include <kj/async.h>

#include <atomic>
#include <type_traits>
#include <utility>

#include "rpc/node_state.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc::testing {

// NodeState::fillInfo returns void or (newer) kj::Promise<void>; the fake follows either.
using FillInfoResult =
    decltype(std::declval<NodeState&>().fillInfo(std::declval<proto::NodeInfo::Builder>()));

template <typename T>
T filled() {
  if constexpr (std::is_void_v<T>) {
    return;
  } else {
    return kj::READY_NOW;
  }
}

class FakeNode final : public NodeState {
 public:
  FillInfoResult fillInfo(proto::NodeInfo::Builder info) override {
    calls.fetch_add(1);
    info.setProtocolVersion(protocolVersion);
    info.setVersion("9.9.9-test");
    info.setNodeId("fake-node");
    info.setIncarnation(0xC0FFEE);
    info.setPid(4242);
    info.setSocketPath("/tmp/fake.sock");
    info.setUcxAvailable(true);
    auto cores = info.initCores(2);
    for (uint32_t i = 0; i < 2; ++i) {
      cores[i].setIndex(i);
      cores[i].setCpu(static_cast<int32_t>(i) + 10);
      cores[i].setCompletions(100 + i);
    }
    return filled<FillInfoResult>();
  }

  uint32_t protocolVersion = proto::PROTOCOL_VERSION;
  std::atomic<int> calls{0};
};

}  // namespace sidecar::rpc::testing
