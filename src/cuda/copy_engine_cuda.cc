// The CUDA copy engine (see copy_engine.h for the contract).
//
// A copy goes through two stages:
//  1. Waiting for the producer: the producer's interprocess event is queried from poll(). The
//     copy streams never wait on a producer's event (cudaStreamWaitEvent): a producer that dies
//     before its event fires would block a copy stream, and every copy queued behind it, forever.
//     To sleep while a producer's kernel runs, arm() hands the producers' events to a watcher
//     thread that queries them every ~20 us and writes the eventfd when one fired (GPU-side waits,
//     cudaStreamWaitEvent + a host function, were tried: a stream waiting on the event of a
//     producer that died never completes, and the daemon then hangs at exit). If the producer
//     dies, its copy fails when its session ends.
//  2. Copying: per GPU `streamsPerDevice` non-blocking copy streams; copies are dealt to them in
//     turn, the pieces of one copy stay on one stream (so they land in order). Each piece is
//     followed by an event (timing off) that poll() queries; only the oldest pending piece of
//     each stream is queried, as a stream completes in order. arm() launches one host function
//     per copy stream with unnotified pieces.
// Host functions run on a CUDA thread and only write the eventfd (they must not call CUDA).
//
// IPC handles are opened once per daemon (opening one twice fails with cudaErrorAlreadyMapped)
// and reference-counted by the sessions that used them; a session's handles are released when it
// ends and nothing of it is queued. Releasing them (cudaIpcCloseMemHandle, cudaEventDestroy of a
// producer's event) is done by a cleanup thread, never by the reactor: these calls may wait on the
// driver (e.g. for a producer that has just died; suspected during the H100 runs, not
// established: that hang turned out to be a GPU-side wait, see above), and shutdown waits for the
// thread at most 5 s.

#include <cuda_runtime.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <thread>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <vector>

#include "cuda/copy_engine.h"
#include "reactor/eventfd_source.h"

namespace sidecar::cuda {

namespace {

std::string cudaText(const char* what, cudaError_t rc) {
  return std::string(what) + ": " + cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) + ")";
}

// What host functions signal. Outlives the engine when a wait stream was abandoned (its host
// function may still run one day), hence heap-allocated and detached under a mutex.
struct Notifier {
  std::mutex mutex;
  reactor::EventFdSource* source = nullptr;
};

void CUDART_CB notify(void* raw) {
  auto* notifier = static_cast<Notifier*>(raw);
  std::lock_guard<std::mutex> lock(notifier->mutex);
  if (notifier->source != nullptr) notifier->source->signal();
}

// Runs blocking CUDA cleanup off the reactor thread, in order.
class Cleaner {
 public:
  Cleaner() : thread_([this] { run(); }) {}

  void post(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_.push_back(std::move(task));
    wake_.notify_one();
  }

  // Waits up to `limit` for the queue to drain and the thread to end; a thread stuck in the driver
  // is left behind (detached) rather than hanging the daemon's shutdown.
  // Returns false when the thread was left behind: then this object must be leaked.
  bool stop(std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mutex_);
    stopping_ = true;
    wake_.notify_one();
    if (idle_.wait_for(lock, limit, [this] { return finished_; })) {
      lock.unlock();
      thread_.join();
      return true;
    }
    spdlog::warn("GPU cleanup is stuck in the CUDA driver; leaving it behind");
    lock.unlock();
    thread_.detach();
    return false;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) break;
      auto task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
    finished_ = true;
    idle_.notify_all();
  }

  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  bool finished_ = false;
  std::thread thread_;  // last: starts after the rest exists
};

// Queries producers' events while the reactor sleeps (see the top of this file).
class Watcher {
 public:
  explicit Watcher(Notifier* notifier) : notifier_(notifier), thread_([this] { run(); }) {}
  ~Watcher() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      wake_.notify_one();
    }
    thread_.join();
  }

  // Reactor thread: watch these until one fires or clear() (the events stay valid until then).
  void watch(std::vector<cudaEvent_t> events) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_ = std::move(events);
    wake_.notify_one();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.clear();
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !events_.empty(); });
      if (stopping_) return;
      bool fired = false;
      for (cudaEvent_t event : events_) fired |= cudaEventQuery(event) != cudaErrorNotReady;
      if (fired) {
        events_.clear();
        notify(notifier_);
        continue;
      }
      wake_.wait_for(lock, std::chrono::microseconds(20), [this] { return stopping_; });
    }
  }

  Notifier* notifier_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<cudaEvent_t> events_;
  bool stopping_ = false;
  std::thread thread_;  // last
};

struct Job {
  uint64_t session = 0;
  CopyCallbacks callbacks;
  int device = 0;
  const std::byte* src = nullptr;
  uint64_t sizeBytes = 0;
  uint64_t arenaOffset = 0;
  cudaEvent_t producerEvent = nullptr;  // null: ready
  uint32_t piecesLeft = 0;
  std::string error;
};

struct Piece {
  cudaEvent_t event = nullptr;
  std::shared_ptr<Job> job;
  uint64_t arenaOffset = 0;
  uint64_t sizeBytes = 0;
};

struct Stream {
  int device = 0;
  cudaStream_t stream = nullptr;
  std::deque<Piece> pending;
  uint64_t enqueued = 0;   // pieces ever queued
  uint64_t armedUpTo = 0;  // a host function is queued behind this many pieces
};

struct Device {
  int index = 0;
  DeviceUuid uuid{};
  std::vector<size_t> streams;  // indices into streams_
  size_t next = 0;
};

template <typename Handle>
struct Opened {
  int device = 0;
  Handle handle{};
  std::set<uint64_t> sessions;
};

struct SessionState {
  std::set<IpcHandleBytes> memory, events;
  uint64_t jobsQueued = 0;  // waiting or copying
  bool dropped = false;
  std::function<void()> whenIdle;
};

class CudaCopyEngine final : public CopyEngine, private reactor::EventSource {
 public:
  CudaCopyEngine(reactor::Reactor& reactor, void* arenaBase, uint64_t arenaBytes,
                 CopyEngineOptions options)
      : reactor_(reactor), arena_(static_cast<std::byte*>(arenaBase)), arenaBytes_(arenaBytes),
        options_(options), notifier_(new Notifier) {
    if (options_.streamsPerDevice == 0) options_.streamsPerDevice = 1;
    if (options_.pieceBytes == 0) options_.pieceBytes = 16ull << 20;
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || count == 0) {
      reason_ = rc != cudaSuccess ? cudaText("no usable GPU (cudaGetDeviceCount)", rc)
                                  : "no GPU on this machine";
      return;
    }
    for (int d = 0; d < count; ++d) {
      Device device;
      device.index = d;
      cudaDeviceProp props{};
      if ((rc = cudaGetDeviceProperties(&props, d)) != cudaSuccess) {
        reason_ = cudaText("cudaGetDeviceProperties", rc);
        return;
      }
      memcpy(device.uuid.data(), &props.uuid, device.uuid.size());
      cudaSetDevice(d);
      for (uint32_t s = 0; s < options_.streamsPerDevice; ++s) {
        Stream stream;
        stream.device = d;
        if ((rc = cudaStreamCreateWithFlags(&stream.stream, cudaStreamNonBlocking)) != cudaSuccess) {
          reason_ = cudaText("cudaStreamCreateWithFlags", rc);
          return;
        }
        device.streams.push_back(streams_.size());
        streams_.push_back(std::move(stream));
      }
      devices_.push_back(device);
    }
    // Once for the daemon's life: pinning the arena makes the copies DMA at full PCIe speed.
    // Portable: every device's context sees it. Costs time proportional to the arena, at start.
    cudaSetDevice(0);
    rc = cudaHostRegister(arena_, arenaBytes_, cudaHostRegisterPortable);
    if (rc != cudaSuccess) {
      reason_ = cudaText("cannot register the arena with CUDA (cudaHostRegister)", rc);
      return;
    }
    registered_ = true;
    wake_ = std::make_unique<reactor::EventFdSource>(reactor_, []() {});
    notifier_->source = wake_.get();
    reactor_.addSource(*this);
    available_ = true;
  }

  ~CudaCopyEngine() override {
    if (available_) reactor_.removeSource(*this);
    // Copy streams never wait on producers, so this ends (shutdown only).
    for (auto& stream : streams_) {
      if (stream.stream != nullptr) {
        cudaStreamSynchronize(stream.stream);
        for (auto& piece : stream.pending) cudaEventDestroy(piece.event);
        cudaStreamDestroy(stream.stream);
      }
    }
    watcher_.reset();
    for (auto& [bytes, opened] : memory_) closeMemory(opened.device, opened.handle);
    for (auto& [bytes, opened] : events_) closeEvent(opened.handle);
    memory_.clear();
    events_.clear();
    if (cleaner_->stop(std::chrono::seconds(5))) delete cleaner_;
    for (cudaEvent_t event : freeEvents_) cudaEventDestroy(event);
    if (registered_) cudaHostUnregister(arena_);
    {
      std::lock_guard<std::mutex> lock(notifier_->mutex);
      notifier_->source = nullptr;
    }
    // A host function behind an abandoned wait stream may still run: the notifier stays.
    delete notifier_;  // the watcher is gone and no host function is pending any more
  }

  bool available() const override { return available_; }
  const std::string& unavailableReason() const override { return reason_; }
  int deviceCount() const override { return static_cast<int>(devices_.size()); }
  CopyEngineStats stats() const override {
    CopyEngineStats out = stats_;
    out.handlesOpen = memory_.size();
    return out;
  }

  void copyToArena(uint64_t sessionId, const DeviceSource& source, uint64_t sizeBytes,
                   uint64_t arenaOffset, CopyCallbacks callbacks) override {
    if (!available_) return callbacks.onDone(reason_);
    if (arenaOffset > arenaBytes_ || sizeBytes > arenaBytes_ - arenaOffset) {
      return callbacks.onDone("the arena region is out of range (daemon bug)");
    }
    if (source.allocationBytes != 0 && (source.offsetBytes > source.allocationBytes ||
                                        sizeBytes > source.allocationBytes - source.offsetBytes)) {
      return callbacks.onDone("the tensor (offset " + std::to_string(source.offsetBytes) + ", " +
                              std::to_string(sizeBytes) + " bytes) reaches past its allocation of " +
                              std::to_string(source.allocationBytes) + " bytes");
    }
    Device* device = nullptr;
    for (auto& d : devices_) {
      if (d.uuid == source.deviceUuid) device = &d;
    }
    if (device == nullptr) {
      return callbacks.onDone("the tensor's GPU is not visible to sidecard (check "
                              "CUDA_VISIBLE_DEVICES of the daemon: it must see every GPU its "
                              "executors use)");
    }
    if (ended_.count(sessionId) != 0) return callbacks.onDone("the session has ended");
    cudaError_t rc = cudaSetDevice(device->index);
    if (rc != cudaSuccess) return callbacks.onDone(cudaText("cudaSetDevice", rc));
    SessionState& session = sessions_[sessionId];

    void* base = nullptr;
    auto found = memory_.find(source.memHandle);
    if (found != memory_.end()) {
      base = found->second.handle;
      found->second.sessions.insert(sessionId);
    } else {
      cudaIpcMemHandle_t handle;
      memcpy(&handle, source.memHandle.data(), sizeof handle);
      rc = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
      if (rc != cudaSuccess) {
        return callbacks.onDone(cudaText(
            rc == cudaErrorAlreadyMapped
                ? "the producer's allocation shares a driver block with another one already "
                  "open here (cudaIpcOpenMemHandle); allocate device tensors of at least 2 MiB "
                  "with cudaMalloc, as PyTorch's caching allocator does"
                : "cannot open the producer's memory handle (cudaIpcOpenMemHandle; is it from "
                  "cudaMalloc, and is the producer still alive?)",
            rc));
      }
      memory_.emplace(source.memHandle, Opened<void*>{device->index, base, {sessionId}});
    }
    session.memory.insert(source.memHandle);

    auto job = std::make_shared<Job>();
    job->session = sessionId;
    job->callbacks = std::move(callbacks);
    job->device = device->index;
    job->src = static_cast<const std::byte*>(base) + source.offsetBytes;
    job->sizeBytes = sizeBytes;
    job->arenaOffset = arenaOffset;
    if (source.eventHandle) {
      auto e = events_.find(*source.eventHandle);
      if (e != events_.end()) {
        job->producerEvent = e->second.handle;
        e->second.sessions.insert(sessionId);
      } else {
        cudaIpcEventHandle_t handle;
        memcpy(&handle, source.eventHandle->data(), sizeof handle);
        rc = cudaIpcOpenEventHandle(&job->producerEvent, handle);
        if (rc != cudaSuccess) {
          return job->callbacks.onDone(
              cudaText("cannot open the producer's event (cudaIpcOpenEventHandle)", rc));
        }
        events_.emplace(*source.eventHandle,
                        Opened<cudaEvent_t>{device->index, job->producerEvent, {sessionId}});
      }
      session.events.insert(*source.eventHandle);
    }
    ++session.jobsQueued;
    ++stats_.copies;
    // The producer's event was recorded before its send left: usually done already.
    if (job->producerEvent != nullptr && cudaEventQuery(job->producerEvent) == cudaErrorNotReady) {
      waiting_.push_back(std::move(job));
      return;
    }
    startCopy(job);
  }

  void dropSession(uint64_t sessionId, std::function<void()> whenIdle) override {
    ended_.insert(sessionId);  // ids are never reused; a copy arriving later must fail
    auto it = sessions_.find(sessionId);
    if (it == sessions_.end()) return whenIdle();
    it->second.dropped = true;
    it->second.whenIdle = std::move(whenIdle);
    watcher_->clear();  // it may hold this session's events, which are about to be destroyed
    // Copies still waiting for this producer will never be needed (and, if it died, its event
    // may never fire): fail them now. Copies already on a copy stream finish.
    for (auto job = waiting_.begin(); job != waiting_.end();) {
      if ((*job)->session != sessionId) {
        ++job;
        continue;
      }
      ++stats_.copiesDropped;
      spdlog::info("session {} ended while its copy waited for the producer's event: the copy "
                   "is dropped", sessionId);
      auto failed = *job;
      job = waiting_.erase(job);
      failed->callbacks.onDone("the producer's session ended before its event fired "
                               "(the producer exited or disconnected mid-send)");
      --it->second.jobsQueued;
    }
    finishIfIdle(sessionId);
  }

 private:
  cudaEvent_t takeEvent() {
    if (!freeEvents_.empty()) {
      cudaEvent_t event = freeEvents_.back();
      freeEvents_.pop_back();
      return event;
    }
    cudaEvent_t event = nullptr;
    cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
    return event;
  }

  // Queues the pieces of a job whose producer is done.
  void startCopy(const std::shared_ptr<Job>& job) {
    Device& device = devices_[static_cast<size_t>(job->device)];
    Stream& stream = streams_[device.streams[device.next++ % device.streams.size()]];
    cudaSetDevice(job->device);
    cudaError_t rc = cudaSuccess;
    uint64_t done = 0;
    do {
      uint64_t n = std::min(options_.pieceBytes, job->sizeBytes - done);
      Piece piece;
      piece.job = job;
      piece.arenaOffset = job->arenaOffset + done;
      piece.sizeBytes = n;
      piece.event = takeEvent();
      if (n > 0) {
        rc = cudaMemcpyAsync(arena_ + piece.arenaOffset, job->src + done, n,
                             cudaMemcpyDeviceToHost, stream.stream);
      }
      if (rc == cudaSuccess) rc = cudaEventRecord(piece.event, stream.stream);
      if (rc != cudaSuccess) {
        job->error = cudaText("cudaMemcpyAsync device to arena", rc);
        freeEvents_.push_back(piece.event);
        break;
      }
      ++job->piecesLeft;
      ++stream.enqueued;
      stream.pending.push_back(std::move(piece));
      done += n;
    } while (done < job->sizeBytes);
    if (job->piecesLeft == 0) finishJob(*job);
  }

  void finishJob(Job& job) {
    job.callbacks.onDone(job.error);
    auto session = sessions_.find(job.session);
    if (session != sessions_.end()) {
      --session->second.jobsQueued;
      finishIfIdle(job.session);
    }
  }

  void closeMemory(int device, void* base) {
    cleaner_->post([device, base] {
      cudaSetDevice(device);
      cudaError_t rc = cudaIpcCloseMemHandle(base);
      if (rc != cudaSuccess) spdlog::warn("{}", cudaText("cudaIpcCloseMemHandle", rc));
    });
  }

  void closeEvent(cudaEvent_t event) {
    cleaner_->post([event] { cudaEventDestroy(event); });
  }

  void finishIfIdle(uint64_t sessionId) {
    auto it = sessions_.find(sessionId);
    if (it == sessions_.end() || !it->second.dropped || it->second.jobsQueued > 0) return;
    for (const auto& key : it->second.memory) {
      auto opened = memory_.find(key);
      if (opened == memory_.end()) continue;
      opened->second.sessions.erase(sessionId);
      if (opened->second.sessions.empty()) {
        closeMemory(opened->second.device, opened->second.handle);
        memory_.erase(opened);
      }
    }
    for (const auto& key : it->second.events) {
      auto opened = events_.find(key);
      if (opened == events_.end()) continue;
      opened->second.sessions.erase(sessionId);
      if (opened->second.sessions.empty()) {
        closeEvent(opened->second.handle);
        events_.erase(opened);
      }
    }
    auto whenIdle = std::move(it->second.whenIdle);
    sessions_.erase(it);
    if (whenIdle) whenIdle();
  }

  // EventSource -------------------------------------------------------------------------------
  bool poll() override {
    bool any = false;
    for (auto job = waiting_.begin(); job != waiting_.end();) {
      cudaError_t rc = cudaEventQuery((*job)->producerEvent);
      if (rc == cudaErrorNotReady) {
        ++job;
        continue;
      }
      any = true;
      auto ready = *job;
      job = waiting_.erase(job);
      if (rc != cudaSuccess) {
        ready->error = cudaText("the producer's event failed", rc);
        finishJob(*ready);
      } else {
        startCopy(ready);
      }
    }
    for (auto& stream : streams_) {
      while (!stream.pending.empty()) {
        Piece& piece = stream.pending.front();
        cudaError_t rc = cudaEventQuery(piece.event);
        if (rc == cudaErrorNotReady) break;
        any = true;
        Piece done = std::move(piece);
        stream.pending.pop_front();
        freeEvents_.push_back(done.event);
        Job& job = *done.job;
        if (rc != cudaSuccess && job.error.empty()) job.error = cudaText("copy to the arena failed", rc);
        ++stats_.pieces;
        stats_.bytes += done.sizeBytes;
        if (job.error.empty() && job.callbacks.onPiece) job.callbacks.onPiece(done.arenaOffset, done.sizeBytes);
        if (--job.piecesLeft == 0) finishJob(job);
      }
    }
    return any;
  }

  bool arm() override {
    if (poll()) return false;
    if (!waiting_.empty()) {
      std::vector<cudaEvent_t> events;
      for (auto& job : waiting_) events.push_back(job->producerEvent);
      watcher_->watch(std::move(events));
      ++stats_.hostFunctionsArmed;
    }
    for (auto& stream : streams_) {
      if (stream.pending.empty() || stream.armedUpTo == stream.enqueued) continue;
      cudaSetDevice(stream.device);
      if (cudaLaunchHostFunc(stream.stream, notify, notifier_) != cudaSuccess) return false;
      stream.armedUpTo = stream.enqueued;
      ++stats_.hostFunctionsArmed;
    }
    return true;
  }

  void disarm() override { watcher_->clear(); }

  reactor::Reactor& reactor_;
  std::byte* arena_;
  uint64_t arenaBytes_;
  CopyEngineOptions options_;
  Notifier* notifier_;
  bool available_ = false;
  bool registered_ = false;
  std::string reason_;
  std::vector<Device> devices_;
  std::vector<Stream> streams_;
  std::vector<cudaEvent_t> freeEvents_;
  std::list<std::shared_ptr<Job>> waiting_;  // producer's event not yet done
  std::map<IpcHandleBytes, Opened<void*>> memory_;
  std::map<IpcHandleBytes, Opened<cudaEvent_t>> events_;
  std::map<uint64_t, SessionState> sessions_;
  std::set<uint64_t> ended_;
  std::unique_ptr<reactor::EventFdSource> wake_;
  CopyEngineStats stats_;
  std::unique_ptr<Watcher> watcher_ = std::make_unique<Watcher>(notifier_);
  Cleaner* cleaner_ = new Cleaner;  // leaked if it gets stuck (see Cleaner::stop)
};

}  // namespace

std::unique_ptr<CopyEngine> CopyEngine::create(reactor::Reactor& reactor, void* arenaBase,
                                               uint64_t arenaBytes, CopyEngineOptions options) {
  return std::make_unique<CudaCopyEngine>(reactor, arenaBase, arenaBytes, options);
}

}  // namespace sidecar::cuda
