#pragma once
// The one callback shape of the ring: every SQE's user_data is a pointer to a Completion owned by
// the code that submitted it. The owner keeps the object alive until complete() has been called,
// even when it no longer cares about the result (see Reactor::cancel): the kernel may still write
// into buffers tied to the operation until its CQE arrives.

#include <cstdint>

namespace sidecar::reactor {

class Completion {
 public:
  // `result` is the CQE's res: a byte count or other non-negative value, or -errno.
  // `cqeFlags` is the CQE's flags (IORING_CQE_F_MORE for multishot operations, ...).
  virtual void complete(int32_t result, uint32_t cqeFlags) = 0;

 protected:
  ~Completion() = default;
};

}  // namespace sidecar::reactor
