#pragma once
// Errors the Sidecar client library reports. Every failure reaches the caller as a sidecar::Error
// with a code to branch on and a message a person can act on.

#include <stdexcept>
#include <string>

namespace sidecar {

enum class ErrorCode {
  kUnavailable,       // could not reach the daemon (not running, wrong socket path or address)
  kDisconnected,      // the connection to the daemon broke during a call
  kInvalidArgument,   // the daemon refused the request's arguments
  kProtocolMismatch,  // the daemon speaks another protocol version
  kInternal,          // anything else; the message says what
};

const char* toString(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace sidecar
