// The CUDA copy engine (see copy_engine.h for the contract).
//
// Per GPU: `streamsPerDevice` non-blocking streams; copies are dealt to them in turn, and the
// pieces of one copy stay on one stream (so they land in order). Each piece is followed by a
// cudaEvent (timing off) that poll() queries; the oldest pending piece of each stream is the
// only one queried, as a stream completes in order.
//
// Sleeping: arm() launches one host function per stream with pending pieces (unless one is
// already queued behind the stream's newest piece); it writes the eventfd that the reactor's
// ring watches. Host functions run on a CUDA thread and only write(2), as they must not call CUDA.

#include <cuda_runtime.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <vector>

#include "cuda/copy_engine.h"
#include "reactor/eventfd_source.h"

namespace sidecar::cuda {

namespace {

std::string cudaText(const char* what, cudaError_t rc) {
  return std::string(what) + ": " + cudaGetErrorName(rc) + " (" + cudaGetErrorString(rc) + ")";
}

struct Job {
  uint64_t session = 0;
  CopyCallbacks callbacks;
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
  uint64_t enqueued = 0;    // pieces ever queued
  uint64_t armedUpTo = 0;   // a host function is queued behind this many pieces
};

struct Device {
  int index = 0;
  DeviceUuid uuid{};
  std::vector<size_t> streams;  // indices into Engine::streams_
  size_t next = 0;
};

struct OpenedMemory {
  int device = 0;
  void* base = nullptr;
};

struct SessionState {
  std::map<IpcHandleBytes, OpenedMemory> memory;
  std::map<IpcHandleBytes, cudaEvent_t> events;
  uint64_t piecesQueued = 0;
  bool dropped = false;
  std::function<void()> whenIdle;
};

class CudaCopyEngine final : public CopyEngine, private reactor::EventSource {
 public:
  CudaCopyEngine(reactor::Reactor& reactor, void* arenaBase, uint64_t arenaBytes,
                 CopyEngineOptions options)
      : reactor_(reactor), arena_(static_cast<std::byte*>(arenaBase)), arenaBytes_(arenaBytes),
        options_(options) {
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
    reactor_.addSource(*this);
    available_ = true;
  }

  ~CudaCopyEngine() override {
    if (available_) reactor_.removeSource(*this);
    for (auto& stream : streams_) {
      if (stream.stream != nullptr) {
        cudaStreamSynchronize(stream.stream);  // shutdown only: host functions must not outlive us
        for (auto& piece : stream.pending) cudaEventDestroy(piece.event);
        cudaStreamDestroy(stream.stream);
      }
    }
    for (auto& [id, session] : sessions_) closeHandles(session);
    for (cudaEvent_t event : freeEvents_) cudaEventDestroy(event);
    if (registered_) cudaHostUnregister(arena_);
  }

  bool available() const override { return available_; }
  const std::string& unavailableReason() const override { return reason_; }
  int deviceCount() const override { return static_cast<int>(devices_.size()); }
  CopyEngineStats stats() const override { return stats_; }

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
    SessionState& session = sessions_[sessionId];
    cudaError_t rc = cudaSetDevice(device->index);
    if (rc != cudaSuccess) return callbacks.onDone(cudaText("cudaSetDevice", rc));

    void* base = nullptr;
    auto found = session.memory.find(source.memHandle);
    if (found != session.memory.end()) {
      base = found->second.base;
    } else {
      cudaIpcMemHandle_t handle;
      memcpy(&handle, source.memHandle.data(), sizeof handle);
      rc = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
      if (rc != cudaSuccess) {
        return callbacks.onDone(cudaText("cannot open the producer's memory handle "
                                         "(cudaIpcOpenMemHandle; is it from cudaMalloc, and is "
                                         "the producer still alive?)", rc));
      }
      session.memory.emplace(source.memHandle, OpenedMemory{device->index, base});
      ++stats_.handlesOpen;
    }

    Stream& stream = streams_[device->streams[device->next++ % device->streams.size()]];
    if (source.eventHandle) {
      cudaEvent_t event = nullptr;
      auto e = session.events.find(*source.eventHandle);
      if (e != session.events.end()) {
        event = e->second;
      } else {
        cudaIpcEventHandle_t handle;
        memcpy(&handle, source.eventHandle->data(), sizeof handle);
        rc = cudaIpcOpenEventHandle(&event, handle);
        if (rc != cudaSuccess) {
          return callbacks.onDone(cudaText("cannot open the producer's event (cudaIpcOpenEventHandle)", rc));
        }
        session.events.emplace(*source.eventHandle, event);
      }
      // Orders the copy after the producer's kernels without anyone waiting on the host.
      rc = cudaStreamWaitEvent(stream.stream, event, 0);
      if (rc != cudaSuccess) return callbacks.onDone(cudaText("cudaStreamWaitEvent", rc));
    }

    auto job = std::make_shared<Job>();
    job->session = sessionId;
    job->callbacks = std::move(callbacks);
    ++stats_.copies;
    const auto* src = static_cast<const std::byte*>(base) + source.offsetBytes;
    uint64_t done = 0;
    do {
      uint64_t n = std::min(options_.pieceBytes, sizeBytes - done);
      Piece piece;
      piece.job = job;
      piece.arenaOffset = arenaOffset + done;
      piece.sizeBytes = n;
      piece.event = takeEvent();
      if (n > 0) {
        rc = cudaMemcpyAsync(arena_ + arenaOffset + done, src + done, n, cudaMemcpyDeviceToHost,
                             stream.stream);
      }
      if (rc == cudaSuccess) rc = cudaEventRecord(piece.event, stream.stream);
      if (rc != cudaSuccess) {
        job->error = cudaText("cudaMemcpyAsync device to arena", rc);
        freeEvents_.push_back(piece.event);
        break;
      }
      ++job->piecesLeft;
      ++session.piecesQueued;
      ++stream.enqueued;
      stream.pending.push_back(std::move(piece));
      done += n;
    } while (done < sizeBytes);
    if (job->piecesLeft == 0) job->callbacks.onDone(job->error);
  }

  void dropSession(uint64_t sessionId, std::function<void()> whenIdle) override {
    ended_.insert(sessionId);  // ids are never reused; a copy arriving later must fail
    auto it = sessions_.find(sessionId);
    if (it == sessions_.end()) return whenIdle();
    it->second.dropped = true;
    it->second.whenIdle = std::move(whenIdle);
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

  void closeHandles(SessionState& session) {
    for (auto& [bytes, opened] : session.memory) {
      cudaSetDevice(opened.device);
      cudaIpcCloseMemHandle(opened.base);
      --stats_.handlesOpen;
    }
    for (auto& [bytes, event] : session.events) cudaEventDestroy(event);
    session.memory.clear();
    session.events.clear();
  }

  void finishIfIdle(uint64_t sessionId) {
    auto it = sessions_.find(sessionId);
    if (it == sessions_.end() || !it->second.dropped || it->second.piecesQueued > 0) return;
    closeHandles(it->second);
    auto whenIdle = std::move(it->second.whenIdle);
    sessions_.erase(it);
    if (whenIdle) whenIdle();
  }

  // EventSource -------------------------------------------------------------------------------
  bool poll() override {
    bool any = false;
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
        if (--job.piecesLeft == 0) job.callbacks.onDone(job.error);
        auto session = sessions_.find(job.session);
        if (session != sessions_.end()) {
          --session->second.piecesQueued;
          finishIfIdle(job.session);
        }
      }
    }
    return any;
  }

  bool arm() override {
    if (poll()) return false;
    for (auto& stream : streams_) {
      if (stream.pending.empty() || stream.armedUpTo == stream.enqueued) continue;
      cudaSetDevice(stream.device);
      if (cudaLaunchHostFunc(stream.stream, &CudaCopyEngine::notify, this) != cudaSuccess) {
        return false;  // cannot sleep safely: keep polling
      }
      stream.armedUpTo = stream.enqueued;
      ++stats_.hostFunctionsArmed;
    }
    return true;
  }

  void disarm() override {}

  static void CUDART_CB notify(void* self) { static_cast<CudaCopyEngine*>(self)->wake_->signal(); }

  reactor::Reactor& reactor_;
  std::byte* arena_;
  uint64_t arenaBytes_;
  CopyEngineOptions options_;
  bool available_ = false;
  bool registered_ = false;
  std::string reason_;
  std::vector<Device> devices_;
  std::vector<Stream> streams_;
  std::vector<cudaEvent_t> freeEvents_;
  std::map<uint64_t, SessionState> sessions_;
  std::set<uint64_t> ended_;
  std::unique_ptr<reactor::EventFdSource> wake_;
  CopyEngineStats stats_;
};

}  // namespace

std::unique_ptr<CopyEngine> CopyEngine::create(reactor::Reactor& reactor, void* arenaBase,
                                               uint64_t arenaBytes, CopyEngineOptions options) {
  return std::make_unique<CudaCopyEngine>(reactor, arenaBase, arenaBytes, options);
}

}  // namespace sidecar::cuda
