#pragma once
// Errors the Sidecar client library reports. Every failure reaches the caller as a sidecar::Error
// with a code to branch on and a message a person can act on.

#include <stdexcept>
#include <string>

namespace sidecar {

enum class ErrorCode {
  kUnavailable,        // could not reach the daemon (not running, wrong socket path or address)
  kDisconnected,       // the connection to the daemon broke during a call
  kInvalidArgument,    // the daemon refused the request's arguments
  kProtocolMismatch,   // the daemon speaks another protocol version
  kInternal,           // anything else; the message says what
  kChunkOutOfRange,    // chunk id >= the data id's number of chunks
  kNumChunksMismatch,  // a chunk or closeStream disagrees with the known number of chunks
  kAlreadySent,        // this rank already sent this chunk
  kAlreadyDone,        // this receiver's group already marked the chunk done
  kNotReceiver,        // this rank is not a destination of the data id
  kNotAvailable,       // markDone of a chunk that has not arrived
  kTooLarge,           // an object over the daemon's limit, or a tensor over the arena
  kExpired,            // the data's time-to-live passed
  kCancelled,          // the request was cancelled (e.g. the rank unregistered)
  kTimeout,            // a recv deadline passed
  kArenaFull,          // no space in the arena within the send timeout
  kAlreadyRegistered,  // another live client holds this rank
  kNotRegistered,      // the session's rank is no longer registered
  kPeerUnreachable,    // the daemon of a destination's node could not be reached
  kPeerLost,           // the daemon of another node died or was cut off during the transfer
  kGpuUnavailable,     // a GPU tensor, but no CUDA or no GPU here or at the daemon (send host tensors)
  kGpuCopyFailed,      // the daemon could not copy the GPU tensor (the message says why)
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
