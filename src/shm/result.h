// Errors of the shm module as values: a small typed code plus a message a person can act on.
//
// The arena and the slab allocator never throw on expected outcomes (memory full, a page kind the
// machine does not offer, a bad size string). They return `Result<T>`: either a value or a
// `ShmError{code, message}`. Callers branch on `code`; the message is for logs and RPC errors and
// always names the sizes involved. Broken invariants (bugs) are not errors: they abort loudly
// through SIDECAR_SHM_CHECK.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace sidecar::shm {

enum class ShmErrc : unsigned char {
  ArenaFull,            // no free run fits now (backpressure: retry, wait or fail the send)
  TooLarge,             // the request can never fit: larger than the whole arena
  ZeroSize,             // a request for 0 bytes
  ZeroHint,             // a memory hint (unit size) of 0 bytes
  BadSize,              // a size string or size option that cannot be used
  PageKindUnavailable,  // an explicitly requested page kind cannot be had on this machine
  MapFailed,            // memfd_create / ftruncate / mmap failed
  MlockFailed,          // mlock failed (usually RLIMIT_MEMLOCK)
  InvalidFree,          // a free of something that is not a live allocation
  Cancelled,            // reserved for callers that fail waiters on shutdown
  BrokenInvariant,      // checkInvariants() found inconsistent metadata (a bug)
};

// Stable lower-case name of a code, for logs and RPC error kinds ("arena-full").
const char* errcName(ShmErrc code) noexcept;

struct ShmError {
  ShmErrc code;
  std::string message;
};

// A value or a ShmError. Cheap to return on the success path (a variant tag and the value).
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  Result(ShmError error) : v_(std::in_place_index<1>, std::move(error)) {}

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return *std::get_if<0>(&v_); }
  const T& value() const& { return *std::get_if<0>(&v_); }
  T&& value() && { return std::move(*std::get_if<0>(&v_)); }
  T* operator->() { return std::get_if<0>(&v_); }
  const T* operator->() const { return std::get_if<0>(&v_); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const ShmError& error() const { return *std::get_if<1>(&v_); }
  ShmErrc code() const { return error().code; }

 private:
  std::variant<T, ShmError> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(ShmError error) : error_(std::move(error)), ok_(false) {}
  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const ShmError& error() const { return error_; }
  ShmErrc code() const { return error_.code; }

 private:
  ShmError error_{ShmErrc::ArenaFull, {}};
  bool ok_ = true;
};

[[noreturn]] void checkFailed(const char* file, int line, const char* expr, const std::string& why);

}  // namespace sidecar::shm

// Always-on invariant check (also in release builds): a failure is a bug, so crash loudly.
#define SIDECAR_SHM_CHECK(cond, why)                                          \
  do {                                                                        \
    if (__builtin_expect(!(cond), 0))                                         \
      ::sidecar::shm::checkFailed(__FILE__, __LINE__, #cond, (why));          \
  } while (0)
