#pragma once
// For tests that play a client or a peer over raw Cap'n Proto: what a failed call said.

#include <kj/exception.h>

#include <string>
#include <utility>

namespace sidecar::systest {

// The description of the exception `call` throws (e.g. "[too-large] ..."), or "(no error)".
template <typename Call>
std::string errorOf(Call&& call) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions(std::forward<Call>(call))) {
    return e->getDescription().cStr();
  }
  return "(no error)";
}

}  // namespace sidecar::systest
