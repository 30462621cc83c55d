#include "client/errors.h"

#include <array>
#include <utility>

namespace sidecar {

const char* toString(ErrorCode code) {
  switch (code) {
    case ErrorCode::kUnavailable: return "unavailable";
    case ErrorCode::kDisconnected: return "disconnected";
    case ErrorCode::kInvalidArgument: return "invalid-argument";
    case ErrorCode::kProtocolMismatch: return "protocol-mismatch";
    case ErrorCode::kInternal: return "internal";
    case ErrorCode::kChunkOutOfRange: return "chunk-out-of-range";
    case ErrorCode::kNumChunksMismatch: return "num-chunks-mismatch";
    case ErrorCode::kAlreadySent: return "already-sent";
    case ErrorCode::kAlreadyDone: return "already-done";
    case ErrorCode::kNotReceiver: return "not-receiver";
    case ErrorCode::kNotAvailable: return "not-available";
    case ErrorCode::kTooLarge: return "too-large";
    case ErrorCode::kExpired: return "expired";
    case ErrorCode::kCancelled: return "cancelled";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kArenaFull: return "arena-full";
    case ErrorCode::kAlreadyRegistered: return "already-registered";
    case ErrorCode::kNotRegistered: return "not-registered";
    case ErrorCode::kPeerUnreachable: return "peer-unreachable";
    case ErrorCode::kPeerLost: return "peer-lost";
    case ErrorCode::kGpuUnavailable: return "gpu-unavailable";
    case ErrorCode::kGpuCopyFailed: return "gpu-copy-failed";
  }
  return "unknown";
}

namespace client {

Error translate(const kj::Exception& e, const std::string& where) {
  std::string description(e.getDescription().cStr());
  const std::string remote = "remote exception: ";
  if (description.rfind(remote, 0) == 0) description = description.substr(remote.size());
  switch (e.getType()) {
    case kj::Exception::Type::DISCONNECTED:
      return Error(ErrorCode::kDisconnected, where + ": connection to sidecard lost: " + description);
    case kj::Exception::Type::UNIMPLEMENTED:
      return Error(ErrorCode::kProtocolMismatch,
                   where + ": the daemon does not implement this call (older version?): " +
                       description);
    default:
      break;
  }
  // "[kind] message" from the daemon.
  if (description.size() > 2 && description[0] == '[') {
    auto close = description.find("] ");
    if (close != std::string::npos) {
      std::string kind = description.substr(1, close - 1);
      std::string message = description.substr(close + 2);
      for (int c = 0; c <= static_cast<int>(ErrorCode::kGpuCopyFailed); ++c) {
        auto code = static_cast<ErrorCode>(c);
        if (kind == toString(code)) return Error(code, where + ": " + message);
      }
    }
  }
  return Error(ErrorCode::kInternal, where + ": " + description);
}

}  // namespace client
}  // namespace sidecar
