#pragma once
// The one error type of src/net: a UCX call failed. Carries the ucs_status_t so callers can tell
// a dead peer (UCS_ERR_ENDPOINT_TIMEOUT, UCS_ERR_CONNECTION_RESET, ...) from a bad argument, and a
// message that says which call failed and what to do about it.

#include <ucs/type/status.h>

#include <stdexcept>
#include <string>

namespace sidecar::net {

class UcxError : public std::runtime_error {
 public:
  UcxError(ucs_status_t status, const std::string& what)
      : std::runtime_error(what + ": " + ucs_status_string(status)), status_(status) {}
  ucs_status_t status() const { return status_; }

 private:
  ucs_status_t status_;
};

// True for the statuses UCX reports when the peer died or the network between us broke; the lead's
// forwarding maps these to "peer lost" rather than to a local bug.
inline bool isPeerFailure(ucs_status_t status) {
  return status == UCS_ERR_ENDPOINT_TIMEOUT || status == UCS_ERR_CONNECTION_RESET ||
         status == UCS_ERR_UNREACHABLE || status == UCS_ERR_REJECTED ||
         status == UCS_ERR_IO_ERROR || status == UCS_ERR_TIMED_OUT;
}

}  // namespace sidecar::net
