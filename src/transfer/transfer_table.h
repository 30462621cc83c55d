#pragma once
// The node's transfer state: which (data id, chunk) items exist, who may read them, who still
// holds them, and who waits for them. A pure data structure owned by one core (no locks, no
// reactor, no RPC): the RPC layer translates calls into these methods and results back.
//
// Vocabulary (see ../shared/DESIGN.md): a *rank* is an endpoint; a *group* is the sorted ranks of
// one tensor-parallel executor. A sender group's every member sends its full replica of each
// chunk; the table keeps the first and drops the others (dedup). Each destination group holds
// every chunk until one of its members marks it done; a chunk's memory is released when every
// destination group is done (or its hold expired). recv is idempotent for any member of a
// destination group until that group marked the chunk done.
//
// Memory: the table never allocates arena memory; it owns the Allocation of each stored tensor
// chunk and hands it back through Hooks::release exactly once (when the last hold goes, when a
// duplicate replica arrives, or when the table is destroyed).
//
// Semantics in detail (decisions the first draft left open are marked *):
// - Items are keyed by data id; an item has ONE sender group and ONE list of destination groups,
//   fixed by its first send or closeStream. * A later send/closeStream of the same live id with a
//   different sender group or different destinations (compared as a set of groups) is
//   kInvalidArgument. A rank may appear in at most one destination group. A sender's own rank (or
//   group) may be a destination: a sender and a receiver in the same executor is supported.
// - numChunks 0 = unknown (stream) until a send with numChunks > 0 or closeStream fixes it; a later
//   different value is kNumChunksMismatch, as is fixing it below a chunk id already stored.
//   chunkId >= the known numChunks is kChunkOutOfRange for send; for recv it is EndOfStream.
//   closeStream may come before any chunk, may be repeated (by any member of the sending group)
//   with the same value, and * closeStream(0) is an empty stream (every recv: EndOfStream).
// - Dedup: the first replica of a chunk is kept; another member's replica is dropped (released,
//   counted in duplicatesDropped, reported Ok); the same rank sending a chunk it already sent while
//   the id is live is kAlreadySent (* also when that chunk was already consumed but other chunks of
//   the id are still live: re-sending an id is only possible once it is fully done).
// - Fully done: every destination group marked every chunk done (or its hold expired) and
//   numChunks is known. The id then becomes a *tombstone* for tombstoneMs: not listed by dataIds(),
//   not counted in stats().items. It remembers which group members delivered which chunk (and who
//   called closeStream): a late replica (same sender group) or closeStream (same numChunks) from a
//   member that had not yet delivered it is dropped, while a send from a member that already delivered that chunk, or from another group,
//   starts a NEW item under the same id (re-sending). * The new item inherits the "still owed"
//   replicas, so a lagging member's old replicas (which arrive before its new ones: one client's
//   requests are ordered) are still dropped instead of being mixed into the new data.
// - * recv and markDone on a tombstone answer as the finished item would: kAlreadyDone (or kExpired)
//   for a member of a destination group, EndOfStream past the end, kNotReceiver for other ranks.
//   So a receiver of a RE-SENT id must ask after the new send arrived, or retry on kAlreadyDone
//   (within tombstoneMs of the old item's end); an id that was never seen, or whose tombstone
//   expired, queues the recv as usual.
// - A recv for an unknown id queues (even before the sender registered). When the destinations
//   become known, queued recvs of ranks that are not receivers complete with kNotReceiver.
// - Time-to-live: a hold of a destination group none of whose members is registered expires ttlMs
//   after the chunk arrived (checked by expire()), counted in expiredHolds; the chunk is released
//   when no hold remains. recv/markDone of an expired hold: kExpired. chunksCompleted counts only
//   chunks released because every destination group marked them done. * expire() also forgets a
//   live item that holds no chunk and has no waiter when nothing happened to it for ttlMs (an
//   unclosed stream whose chunks were all consumed, a closeStream whose chunks never came).
// - * stats().items counts live ids (not tombstones), including ids only waited for; chunks and
//   bytesHeld count stored (held) chunks; waiters counts queued recvs.
// - * A tensor chunk's allocation is handed to Hooks::release even when its sizeBytes is 0.
// - Waiter callbacks may re-enter the table (recv, markDone, send, cancel, ...): completions are
//   collected first and each is decided against the table's state at the moment it runs. Hooks
//   (release, nowMs) must not call back into the table.
// - Costs: send of a chunk of a live id makes one heap allocation (the payload's box, so views stay
//   put), a new id about five; a recv hit, a queued recv and markDone make none. Only expire(),
//   describe(), dataIds() and checkInvariants() walk all items.

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "shm/slab_allocator.h"

namespace sidecar::transfer {

using Rank = int32_t;
using Group = std::vector<Rank>;  // sorted, distinct, non-empty

enum class Dtype : uint8_t {
  kBool, kUint8, kInt8, kInt16, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64,
};
// Element size in bytes; 0 for an out-of-range value.
uint32_t dtypeBytes(Dtype dtype);
const char* dtypeName(Dtype dtype);
// Added: parses "bfloat16", "bf16", "torch.bfloat16", "float32", "f32", "float", ... (the
// names dtypeName returns, short forms and torch's); nullopt when unknown.
std::optional<Dtype> parseDtype(std::string_view name);
// prod(shape) * dtypeBytes(dtype), or nullopt for an unknown dtype, a negative dimension or a
// count that overflows 64 bits (a header from a peer is checked with it before any allocation).
std::optional<uint64_t> tensorBytes(Dtype dtype, const std::vector<int64_t>& shape);

struct TensorChunk {
  Dtype dtype = Dtype::kUint8;
  std::vector<int64_t> shape;     // any rank (0-d allowed), every dim >= 0
  uint64_t sizeBytes = 0;         // == prod(shape) * dtypeBytes(dtype)
  shm::Allocation allocation;     // where it lives in the arena; allocation.sizeBytes >= sizeBytes
};

struct ObjectChunk {
  uint32_t typeTag = 0;           // meaning is the client's (the Python layer: str, bytes, int, ...)
  std::string bytes;
};

using Payload = std::variant<TensorChunk, ObjectChunk>;

enum class Errc {
  kInvalidArgument,    // malformed request: negative rank, bad group, dtype/shape/size mismatch, ...
  kChunkOutOfRange,    // chunkId >= numChunks of the item
  kNumChunksMismatch,  // a chunk or closeStream disagrees with the item's known numChunks
  kAlreadySent,        // this rank already sent this chunk and it is still live
  kAlreadyDone,        // this receiver's group already marked this chunk done
  kNotReceiver,        // the rank is not in any destination group of the item
  kNotAvailable,       // markDone of a chunk that has not arrived
  kTooLarge,           // an object over the configured limit
  kExpired,            // the hold or the item expired (time-to-live) before the call
  kCancelled,          // a waiter was cancelled (its rank went away, or the table shut down)
  kTimeout,            // a recv deadline passed
  kPeerLost,           // the node the data was coming from died or was cut off (failWaiters)
};
const char* errcName(Errc code);

struct Error {
  Errc code;
  std::string message;  // names the id, chunk, ranks and what to do
};

template <typename T>
using Result = std::variant<T, Error>;
struct Ok {};

// What recv produces: the chunk (a view: the table keeps owning the memory until markDone) or the
// end of the stream (chunkId >= numChunks).
struct EndOfStream {};
using RecvValue = std::variant<const TensorChunk*, const ObjectChunk*, EndOfStream>;

struct TransferLimits {
  uint64_t objectBytesMax = 1 << 20;  // objects ride in control messages
  uint64_t ttlMs = 600'000;           // a hold of a group with no registered member expires after this
  uint64_t tombstoneMs = 60'000;      // how long completed items remember who sent them (dedup)
  int32_t worldSize = 0;              // ranks must be < worldSize when > 0
};

struct TransferStats {
  uint64_t items = 0;           // live data ids
  uint64_t chunks = 0;          // live chunks
  uint64_t bytesHeld = 0;       // sum of live tensor chunks' allocation sizes
  uint64_t waiters = 0;         // pending recvs
  uint64_t duplicatesDropped = 0;
  uint64_t expiredHolds = 0;    // holds released by time-to-live
  uint64_t chunksCompleted = 0; // released because every destination group was done
};

// A pending recv. Owned by the caller; must stay alive until complete() ran or cancel() returned.
// Destroying a waiter that is still queued is a bug and aborts. A waiter can be reused (recv again)
// once complete() started, including from inside complete(). Copying a waiter copies nothing of
// its queue state (the copy is not queued).
class RecvWaiter {
 public:
  RecvWaiter() = default;
  RecvWaiter(const RecvWaiter&) noexcept {}
  RecvWaiter& operator=(const RecvWaiter&) noexcept { return *this; }
  virtual ~RecvWaiter();
  // Called exactly once per recv. The RecvValue's pointers stay valid until the receiver's group
  // marks the chunk done (or the chunk expires); callers copy what they need before returning to
  // the loop.
  virtual void complete(Result<RecvValue> result) = 0;
  // Added: true while the table holds this waiter (between recv and complete/cancel).
  bool queued() const noexcept { return state_ != 0; }

 private:
  friend class TransferTable;
  // Intrusive links (no allocation per recv): one list per item (or the table's ready list) and
  // one per rank. Opaque to callers.
  RecvWaiter* prev_ = nullptr;
  RecvWaiter* next_ = nullptr;
  RecvWaiter* rankPrev_ = nullptr;
  RecvWaiter* rankNext_ = nullptr;
  void* item_ = nullptr;
  Rank rank_ = 0;
  uint32_t chunkId_ = 0;
  uint8_t state_ = 0;   // 0 idle, 1 queued on its item, 2 on the ready list
  uint8_t reason_ = 0;  // on the ready list: 0 decide again, 1 rank gone, 2 shutdown
};

class TransferTable {
 public:
  struct Hooks {
    virtual ~Hooks() = default;
    virtual void release(const shm::Allocation& allocation) = 0;  // give memory back
    virtual uint64_t nowMs() = 0;                                  // monotonic
  };

  TransferTable(Hooks& hooks, TransferLimits limits = {});
  ~TransferTable();  // cancels waiters (kCancelled), releases every allocation
  TransferTable(const TransferTable&) = delete;
  TransferTable& operator=(const TransferTable&) = delete;

  // Registration state, used for time-to-live decisions.
  void rankRegistered(Rank rank);
  // The rank's client went away: its waiters complete with kCancelled ("rank 7 disconnected").
  // Holds of its group stay (another member or a restarted executor may still read).
  void rankGone(Rank rank);

  // Stores one chunk sent by `sender` (member of `senderGroup`) for `destinations`.
  // numChunks: 0 = unknown yet (stream). On success the table owns the payload's allocation; on
  // error the caller keeps it. A replica from another member of a group that already delivered
  // this chunk is dropped (its allocation released) and reported as Ok.
  Result<Ok> send(Rank sender, const Group& senderGroup, const std::string& dataId,
                  uint32_t chunkId, uint32_t numChunks, const std::vector<Group>& destinations,
                  Payload payload);

  // Fixes the number of chunks of a stream; may come before any chunk. Pending recvs of chunks
  // >= numChunks complete with EndOfStream. Repeating it with the same numChunks is Ok. Once the
  // id's sender group is known, `sender` must be a member (kInvalidArgument).
  Result<Ok> closeStream(Rank sender, const std::string& dataId, uint32_t numChunks,
                         const std::vector<Group>& destinations);

  // Completes `waiter` now if the chunk is there (or is past the end), else queues it.
  // Errors: kAlreadyDone when the receiver's group marked it done, kNotReceiver when the item's
  // destinations do not include the receiver (also for a queued recv once the destinations become
  // known), kExpired when the group's hold expired, kInvalidArgument for a bad rank or empty id,
  // kCancelled (rankGone, destruction). Queuing a waiter that is already queued aborts.
  void recv(Rank receiver, const std::string& dataId, uint32_t chunkId, RecvWaiter& waiter);
  // Removes a queued waiter without completing it. Returns false when it was not queued.
  bool cancel(RecvWaiter& waiter);

  // Completes every queued recv of `dataId` with kPeerLost and the message "<recv of ...>: why"
  // (its data was coming from a node that is gone). Stored chunks and holds are untouched; a
  // later recv queues again. No-op for an unknown id.
  void failWaiters(const std::string& dataId, const std::string& why);

  // Releases the receiver's group's hold on the chunk. Errors: kNotAvailable (id or chunk not
  // arrived), kNotReceiver, kChunkOutOfRange, kAlreadyDone (second markDone by the group),
  // kExpired (the group's hold expired).
  Result<Ok> markDone(Rank receiver, const std::string& dataId, uint32_t chunkId);

  // Expires holds and tombstones older than the limits. Call periodically (e.g. every second).
  void expire();

  TransferStats stats() const;

  // For `sidecarctl inspect`: a readable summary of one data id (chunks, sizes, holds, waiters),
  // or nullopt when unknown.
  std::optional<std::string> describe(const std::string& dataId) const;
  std::vector<std::string> dataIds() const;
  // True when no chunk of `dataId` is still to come: every chunk of a known count has arrived, or
  // the id is unknown or a tombstone. (A node forgets a link's ids once this holds: a recv
  // waiting on them no longer depends on that link.)
  bool allChunksArrived(const std::string& dataId) const;
  // Arena bytes of tensor chunks each destination rank's group still holds (not marked done,
  // not expired). Walks every item: for status reports, not the data path.
  std::map<Rank, uint64_t> heldBytesByRank() const;  // live ids (not tombstones), sorted

  // Added: walks every item and aborts (SIDECAR_CHECK) on a broken internal invariant (counters
  // that disagree with the contents, a waiter queued on a chunk that is there, ...). O(all state):
  // for tests and debugging.
  void checkInvariants() const;

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace sidecar::transfer
