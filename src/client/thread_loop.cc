#include "client/thread_loop.h"

namespace sidecar::client {

namespace {
struct Shared {
  // A client sleeps at once when it waits (no spin): executors are busy with their own work.
  // The loop lives and dies on this thread, so its ring can defer task work (see ReactorOptions).
  reactor::ReactorLoop loop{reactor::ReactorOptions{.ringEntries = 64, .deferTaskrun = true}, 0};
  unsigned users = 0;
};
thread_local Shared* current = nullptr;
}  // namespace

ThreadLoop::ThreadLoop() {
  if (current == nullptr) current = new Shared;
  current->users++;
}

ThreadLoop::~ThreadLoop() {
  if (--current->users == 0) {
    delete current;
    current = nullptr;
  }
}

reactor::ReactorLoop& ThreadLoop::get() { return current->loop; }

}  // namespace sidecar::client
