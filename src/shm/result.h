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
#include <new>
#include <string>
#include <type_traits>
#include <utility>

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

// Failures keep their ShmError out of line (one heap object, made only on failure), so a
// Result is the value plus one pointer that is null on success: building and destroying a
// successful Result costs a store and a test, never a std::string. These helpers are out of
// line and cold; they are not part of the interface.
namespace detail {
[[gnu::cold, gnu::returns_nonnull]] ShmError* newError(ShmError&& error);
[[gnu::cold, gnu::returns_nonnull]] ShmError* copyError(const ShmError& error);
[[gnu::cold]] void deleteError(ShmError* error) noexcept;
// What error() gives on a successful Result: ArenaFull with an empty message (as before).
extern const ShmError kNoError;
}  // namespace detail

// A value or a ShmError. Cheap to return on the success path (the value and a null pointer).
// Copyable when T is; moving a failed Result copies its code and moves its message (the
// moved-from Result stays failed, with an empty message), as a std::variant would.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}
  Result(ShmError error) : error_(detail::newError(std::move(error))) {}

  Result(const Result& other)
    requires std::is_copy_constructible_v<T>
      : error_(other.error_ ? detail::copyError(*other.error_) : nullptr) {
    if (!error_) ::new (static_cast<void*>(&value_)) T(other.value_);
  }
  Result(Result&& other)
      : error_(other.error_ ? detail::newError(std::move(*other.error_)) : nullptr) {
    if (!error_) ::new (static_cast<void*>(&value_)) T(std::move(other.value_));
  }
  Result& operator=(const Result& other)
    requires std::is_copy_constructible_v<T>
  {
    if (this != &other) assign(other.error_ ? detail::copyError(*other.error_) : nullptr, other);
    return *this;
  }
  Result& operator=(Result&& other) {
    if (this != &other) {
      assign(other.error_ ? detail::newError(std::move(*other.error_)) : nullptr,
             std::move(other));
    }
    return *this;
  }
  ~Result() { destroy(); }

  bool ok() const noexcept { return error_ == nullptr; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return value_; }
  const T& value() const& { return value_; }
  T&& value() && { return std::move(value_); }
  T* operator->() { return &value_; }
  const T* operator->() const { return &value_; }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const ShmError& error() const { return error_ ? *error_ : detail::kNoError; }
  ShmErrc code() const { return error().code; }

 private:
  void destroy() noexcept {
    if (error_) [[unlikely]] {
      detail::deleteError(error_);
    } else if constexpr (!std::is_trivially_destructible_v<T>) {
      value_.~T();
    }
  }
  // `error` is already built from `other` (the only step that may throw), so *this is never
  // left destroyed.
  template <class R>
  void assign(ShmError* error, R&& other) {
    destroy();
    error_ = error;
    if (!error_) ::new (static_cast<void*>(&value_)) T(std::forward<R>(other).value_);
  }

  union {
    T value_;  // live iff error_ == nullptr
  };
  ShmError* error_ = nullptr;  // owned
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(ShmError error) : error_(detail::newError(std::move(error))) {}
  Result(const Result& other) : error_(other.error_ ? detail::copyError(*other.error_) : nullptr) {}
  Result(Result&& other)
      : error_(other.error_ ? detail::newError(std::move(*other.error_)) : nullptr) {}
  Result& operator=(const Result& other) {
    if (this != &other) reset(other.error_ ? detail::copyError(*other.error_) : nullptr);
    return *this;
  }
  Result& operator=(Result&& other) {
    if (this != &other) reset(other.error_ ? detail::newError(std::move(*other.error_)) : nullptr);
    return *this;
  }
  ~Result() {
    if (error_) [[unlikely]] detail::deleteError(error_);
  }

  bool ok() const noexcept { return error_ == nullptr; }
  explicit operator bool() const noexcept { return ok(); }
  const ShmError& error() const { return error_ ? *error_ : detail::kNoError; }
  ShmErrc code() const { return error().code; }

 private:
  void reset(ShmError* error) noexcept {
    if (error_) detail::deleteError(error_);
    error_ = error;
  }
  ShmError* error_ = nullptr;  // owned
};

[[noreturn]] void checkFailed(const char* file, int line, const char* expr, const std::string& why);

}  // namespace sidecar::shm

// Always-on invariant check (also in release builds): a failure is a bug, so crash loudly.
#define SIDECAR_SHM_CHECK(cond, why)                                          \
  do {                                                                        \
    if (__builtin_expect(!(cond), 0))                                         \
      ::sidecar::shm::checkFailed(__FILE__, __LINE__, #cond, (why));          \
  } while (0)
