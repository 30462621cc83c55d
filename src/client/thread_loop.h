#pragma once
// One KJ event loop per thread (KJ allows one), shared by every connection the client library
// opens on that thread: created with the first, destroyed with the last.

#include "reactor/kj_event_port.h"

namespace sidecar::client {

class ThreadLoop {
 public:
  ThreadLoop();
  ~ThreadLoop();
  ThreadLoop(const ThreadLoop&) = delete;
  ThreadLoop& operator=(const ThreadLoop&) = delete;

  reactor::ReactorLoop& get();
};

}  // namespace sidecar::client
