#include "rpc/sidecar_service.h"

#include <kj/debug.h>

namespace sidecar::rpc {

kj::Promise<void> SidecarService::ping(PingContext context) {
  auto payload = context.getParams().getPayload();
  KJ_REQUIRE(payload.size() <= kPingBytesMax, "ping payload too large; the limit is 64 KiB",
             payload.size());
  context.getResults().setPayload(payload);
  return kj::READY_NOW;
}

kj::Promise<void> SidecarService::info(InfoContext context) {
  return node_.fillInfo(context.getResults().initInfo());
}

}  // namespace sidecar::rpc
