#pragma once
// libsidecar's transfer API: an executor registers as a rank on its node's sidecard and sends,
// receives and releases tensors and small objects. The same concepts as Cornserve's
// `cornserve.sidecar.api` (the Python package of this project mirrors it).
//
//   sidecar::RankConfig config{.rank = 0, .group = {0}, .sendHint = {Dtype::kBFloat16, {4096}}};
//   auto sidecar = sidecar::Sidecar::connect(config);
//   sidecar.send("id-1", tensorRef, {{2}}).wait();          // to rank 2
//   ...                                                     // on rank 2:
//   sidecar::Received r = sidecar.recv("id-1");             // a view into the node's arena
//   sidecar.markDone("id-1");                               // r's memory is released
//
// Threading: like sidecar::Client, a Sidecar belongs to the thread that created it.
// Errors: every failure throws sidecar::Error with a code (see error.h).

#include <sidecar/client.h>
#include <sidecar/error.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace sidecar {

enum class Dtype : uint8_t {
  kBool, kUint8, kInt8, kInt16, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64,
};
// Size of one element in bytes.
uint32_t dtypeBytes(Dtype dtype);
const char* dtypeName(Dtype dtype);

// The unit of allocation: one row of prod(rowShape) elements, e.g. {kBFloat16, {4096}} for a
// hidden state of 4096 (the reference's shape (-1, 4096) without its -1).
struct MemoryHint {
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> rowShape;
};

struct RankConfig {
  int32_t rank = 0;
  std::vector<int32_t> group;  // sorted, contains rank; empty means {rank}
  MemoryHint sendHint;
  MemoryHint recvHint;         // empty rowShape: the send hint
  // GPU sends of a group (every member sends its full replica): on, each member copies only its
  // slice, into one shared allocation, in parallel (all members of the group must send every
  // chunk, and should set this alike); off, one replica is kept (see docs/PROTOCOL.md).
  bool concurrentCopy = false;
  std::string socketPath = Client::defaultSocketPath();
  // How long every wait of this connection (a send's handle, recv, allocateTensor, markDone...)
  // polls for its answer before it sleeps, in microseconds; 0: sleep at once. Polling keeps the
  // answer's wake-up of this thread off the critical path (25-35 us on a CPU gone idle) at the
  // cost of at most this much CPU per wait; between polls the thread yields its CPU to others.
  // A wait on a CPU that a daemon reactor is pinned to never polls (it would take that CPU from
  // the daemon that must answer).
  // Unset: $SIDECAR_WAIT_SPIN_US when set, else 50. At most 10000 (connect: kInvalidArgument).
  std::optional<uint32_t> waitSpinUs;
};

// Destinations: a list of groups, each the sorted ranks of one receiving executor.
using Groups = std::vector<std::vector<int32_t>>;

// A CPU tensor to send; read (copied into the arena) during send().
struct TensorRef {
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements; empty: contiguous (row-major)
  const void* data = nullptr;
};

// A tensor in GPU memory (issue 6). Sending one hands the daemon a CUDA IPC handle of its
// allocation (which must come from cudaMalloc, e.g. PyTorch's caching allocator) and an event
// recorded on `stream`: the daemon copies the bytes off the GPU on its own streams after the work
// queued on `stream` so far, and the caller never synchronizes. Keep the memory unchanged until
// the send's handle is waited on. Receiving into one copies from the arena on `stream`.
struct DeviceTensorRef {
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements; empty or contiguous (others: kInvalidArgument)
  void* data = nullptr;          // device pointer
  int32_t device = 0;            // CUDA device index in this process
  void* stream = nullptr;        // cudaStream_t; nullptr: the legacy default stream
};

// A small object: bytes with a tag saying what they are (the Python layer: str, bytes, int,
// float, bool, dict). Rides in the control message.
struct Object {
  uint32_t typeTag = 0;
  std::string bytes;
};

struct TensorView {
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // in the node's arena; valid until this rank's group marks it done
  uint64_t sizeBytes = 0;
};

struct Received {
  enum class Kind { kTensor, kObject, kEndOfStream };
  Kind kind = Kind::kEndOfStream;
  TensorView tensor;
  Object object;
};

// A writable tensor inside the arena: fill it, then send it without any copy.
class ArenaTensor {
 public:
  ArenaTensor() = default;
  void* data() const { return data_; }
  uint64_t sizeBytes() const { return sizeBytes_; }
  Dtype dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }

 private:
  friend class Sidecar;
  Dtype dtype_ = Dtype::kUint8;
  std::vector<int64_t> shape_;
  void* data_ = nullptr;
  uint64_t sizeBytes_ = 0;
  uint64_t offset_ = 0;
};

// The outcome of an asynchronous call; wait() returns when the daemon answered and throws its
// error. Destroying an unwaited handle lets the call finish in the background (its failure is
// then reported by the next call on that data id, never lost silently: see the daemon log).
class SendHandle {
 public:
  SendHandle();
  SendHandle(SendHandle&&) noexcept;
  SendHandle& operator=(SendHandle&&) noexcept;
  ~SendHandle();
  void wait();
  // Completion without waiting, for executors that multiplex many calls on the Sidecar's thread
  // (the Python package's owner thread): `onDone` runs later on that thread, inside any wait on
  // the Sidecar (a blocking call or Sidecar::waitForWake()), with nullptr or the error. Consumes
  // the handle. Never runs once the Sidecar is destroyed (pending callbacks are dropped).
  void onDone(std::function<void(const Error* error)> onDone);

 private:
  friend class Sidecar;
  struct State;
  std::unique_ptr<State> state_;
};

class RecvHandle {
 public:
  RecvHandle();
  RecvHandle(RecvHandle&&) noexcept;
  RecvHandle& operator=(RecvHandle&&) noexcept;
  ~RecvHandle();
  Received wait();
  // As SendHandle::onDone: exactly one of `received` and `error` is non-null.
  void onDone(std::function<void(Received* received, const Error* error)> onDone);

 private:
  friend class Sidecar;
  struct State;
  std::unique_ptr<State> state_;
};

class Sidecar {
 public:
  // Connects to the node's daemon, registers the rank and maps the arena. Throws Error
  // (kUnavailable, kAlreadyRegistered, kInvalidArgument).
  static Sidecar connect(const RankConfig& config);

  Sidecar(Sidecar&&) noexcept;
  Sidecar& operator=(Sidecar&&) noexcept;
  ~Sidecar();  // unregisters the rank

  int32_t rank() const;

  // Copies `tensor` into the arena (waiting for space when it is full, up to the daemon's send
  // timeout) and sends it. Returns once the bytes are copied; the handle tells when the daemon
  // has the chunk. numChunks 0: a stream whose length closeStream() fixes.
  // Small tensors (up to 32 KiB, when the daemon takes them) travel inside the send call and the
  // daemon copies them into the arena: one round trip instead of two. Then the wait for space
  // happens in the daemon, and a full arena shows as the handle's kArenaFull.
  SendHandle send(const std::string& dataId, const TensorRef& tensor, const Groups& destinations,
                  uint32_t chunkId = 0, uint32_t numChunks = 1);
  SendHandle send(const std::string& dataId, const Object& object, const Groups& destinations,
                  uint32_t chunkId = 0, uint32_t numChunks = 1);
  // Zero copy: a tensor allocated in the arena and filled by the caller.
  ArenaTensor allocateTensor(Dtype dtype, const std::vector<int64_t>& shape,
                             uint32_t timeoutMs = 0);
  SendHandle send(const std::string& dataId, ArenaTensor&& tensor, const Groups& destinations,
                  uint32_t chunkId = 0, uint32_t numChunks = 1);
  // A GPU tensor: see DeviceTensorRef. Returns at once (no copy, no synchronization here); the
  // handle tells when the daemon has copied and stored the chunk. Throws kGpuUnavailable when
  // libsidecar or the daemon has no CUDA.
  SendHandle send(const std::string& dataId, const DeviceTensorRef& tensor,
                  const Groups& destinations, uint32_t chunkId = 0, uint32_t numChunks = 1);
  // Receives a tensor chunk (as recv) and queues its copy from the arena into `destination` (at
  // least the chunk's bytes) on destination.stream. Returns the host view as well. The copy is
  // asynchronous: call markDone only after the stream has passed it (e.g. after
  // cudaStreamSynchronize). Throws kInvalidArgument for an object or a too small destination.
  Received recvToDevice(const std::string& dataId, const DeviceTensorRef& destination,
                        uint32_t chunkId = 0, uint32_t timeoutMs = 0);
  // Gives back an arena tensor that will not be sent.
  void release(ArenaTensor&& tensor);

  void closeStream(const std::string& dataId, uint32_t numChunks, const Groups& destinations);

  // Waits for the chunk (timeoutMs 0: no limit). Idempotent until markDone.
  Received recv(const std::string& dataId, uint32_t chunkId = 0, uint32_t timeoutMs = 0);
  RecvHandle recvAsync(const std::string& dataId, uint32_t chunkId = 0, uint32_t timeoutMs = 0);

  void markDone(const std::string& dataId, uint32_t chunkId = 0);

  // The arena as this process maps it (for tests and tools).
  const void* arenaBase() const;
  uint64_t arenaBytes() const;

  // An owner thread's sleep: runs the Sidecar's events (onDone callbacks included) until wake()
  // is called; returns at once when wake() was called since the last return. Not from inside an
  // onDone callback.
  void waitForWake();
  // The one method other threads may call (while the Sidecar lives): ends waitForWake().
  void wake() const;

 private:
  friend class SendHandle;
  friend class RecvHandle;
  struct Impl;
  SendHandle sendInline(const std::string& dataId, const TensorRef& tensor, uint64_t sizeBytes,
                        const Groups& destinations, uint32_t chunkId, uint32_t numChunks);
  explicit Sidecar(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sidecar
