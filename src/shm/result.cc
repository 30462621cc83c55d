#include "shm/result.h"

namespace sidecar::shm {

const char* errcName(ShmErrc code) noexcept {
  switch (code) {
    case ShmErrc::ArenaFull: return "arena-full";
    case ShmErrc::TooLarge: return "too-large";
    case ShmErrc::ZeroSize: return "zero-size";
    case ShmErrc::ZeroHint: return "zero-hint";
    case ShmErrc::BadSize: return "bad-size";
    case ShmErrc::PageKindUnavailable: return "page-kind-unavailable";
    case ShmErrc::MapFailed: return "map-failed";
    case ShmErrc::MlockFailed: return "mlock-failed";
    case ShmErrc::InvalidFree: return "invalid-free";
    case ShmErrc::Cancelled: return "cancelled";
    case ShmErrc::BrokenInvariant: return "broken-invariant";
  }
  return "unknown";
}

namespace detail {

ShmError* newError(ShmError&& error) { return new ShmError(std::move(error)); }
ShmError* copyError(const ShmError& error) { return new ShmError(error); }
void deleteError(ShmError* error) noexcept { delete error; }
const ShmError kNoError{ShmErrc::ArenaFull, {}};

}  // namespace detail

void checkFailed(const char* file, int line, const char* expr, const std::string& why) {
  std::fprintf(stderr, "%s:%d: shm invariant broken: %s: %s\n", file, line, expr, why.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace sidecar::shm
