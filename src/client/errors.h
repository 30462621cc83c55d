#pragma once
// Turns the daemon's failures (kj exceptions whose description starts with "[kind] ") into the
// public sidecar::Error with its code.

#include <kj/exception.h>
#include <sidecar/error.h>

#include <string>

namespace sidecar::client {

Error translate(const kj::Exception& e, const std::string& where);

// Runs `body`, turning any kj exception into sidecar::Error (a sidecar::Error passes through).
template <typename Body>
void call(const std::string& where, Body&& body) {
  try {
    body();
  } catch (const Error&) {
    throw;
  } catch (const kj::Exception& e) {
    throw translate(e, where);
  }
}

}  // namespace sidecar::client
