#include "owner_thread.h"

#include <sys/mman.h>

#include <utility>

namespace sidecar::python {

OwnerThread::OwnerThread(const RankConfig& config) {
  thread_ = std::thread([this, config] { run(config); });
  std::unique_lock<std::mutex> lock(connectMutex_);
  connected_.wait(lock, [this] { return connectDone_; });
  if (connectError_) {
    lock.unlock();
    thread_.join();
    joined_ = true;
    throw *connectError_;
  }
}

OwnerThread::~OwnerThread() {
  stop();
  if (placeholder_ != nullptr) ::munmap(placeholder_, arenaBytes_);
}

bool OwnerThread::post(Command command) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_ || sidecar_ == nullptr) return false;
  queue_.push_back(std::move(command));
  sidecar_->wake();
  return true;
}

void OwnerThread::stop() {
  std::lock_guard<std::mutex> stopLock(stopMutex_);
  if (joined_) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    if (sidecar_ != nullptr) sidecar_->wake();
  }
  thread_.join();
  joined_ = true;
}

uint64_t OwnerThread::addPending(std::function<void()> abandon) {
  uint64_t key = nextPending_++;
  pending_.emplace(key, std::move(abandon));
  return key;
}

void OwnerThread::removePending(uint64_t key) { pending_.erase(key); }

void OwnerThread::run(const RankConfig& config) {
  std::optional<Sidecar> sidecar;
  try {
    sidecar.emplace(Sidecar::connect(config));
  } catch (const Error& e) {
    connectError_.emplace(e);
  } catch (const std::exception& e) {
    connectError_.emplace(ErrorCode::kInternal, e.what());
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (sidecar) {
      sidecar_ = &*sidecar;
      arenaBase_ = const_cast<void*>(sidecar->arenaBase());
      arenaBytes_ = sidecar->arenaBytes();
    }
  }
  {
    std::lock_guard<std::mutex> lock(connectMutex_);
    connectDone_ = true;
  }
  connected_.notify_all();
  if (!sidecar) return;

  for (;;) {
    std::deque<Command> batch;
    bool stopping;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      batch.swap(queue_);
      stopping = stopping_;
    }
    for (auto& command : batch) command(*sidecar);
    batch.clear();  // before sleeping: commands hold Python references (callbacks, keep-alives)
    if (stopping) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (queue_.empty()) break;  // post() refuses new commands once stopping_ is set
      continue;
    }
    try {
      sidecar->waitForWake();
    } catch (const std::exception&) {
      // The event loop itself failed (not a call: those fail through their callbacks). Nothing
      // more can run: refuse new commands, run the queued ones (they fail) and end.
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
  }

  {
    std::lock_guard<std::mutex> lock(mutex_);
    sidecar_ = nullptr;
  }
  sidecar.reset();  // unregisters and unmaps; callbacks of pending calls are dropped
  if (arenaBase_ != nullptr && arenaBytes_ > 0) {
    // Views that Python still holds point here. MAP_FIXED_NOREPLACE: never over a mapping that
    // something else made in the meantime (then the views fault, as they would without this).
    void* p = ::mmap(arenaBase_, arenaBytes_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == arenaBase_) {
      placeholder_ = p;
    } else if (p != MAP_FAILED) {
      ::munmap(p, arenaBytes_);  // an old kernel took the address as a hint
    }
  }
  auto abandoned = std::move(pending_);
  pending_.clear();
  for (auto& [key, abandon] : abandoned) abandon();
}

}  // namespace sidecar::python
