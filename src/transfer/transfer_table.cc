// The transfer table: see transfer_table.h for the semantics.
//
// Layout
// - items_: unordered_map from data id to Item (nodes are stable, so Item* and the key's address
//   stay valid until the entry is erased). An Item is one generation of one id: its sender group
//   and destinations (one flat vector), the known chunk count, a vector of chunk slots sorted by
//   chunk id, and an intrusive list of the recvs waiting for chunks that have not arrived.
// - A chunk slot exists from the chunk's arrival on. While held it owns the boxed payload (boxed so
//   the pointers handed to receivers stay put when the vector grows); once every destination group
//   is done (or expired) the payload is released and the slot stays, small, to answer late recvs,
//   markDones and replicas.
// - Waiters are caller-owned and linked intrusively: on their item (queued), or on the table's
//   ready list (about to complete), and always on their rank's list (for rankGone). Every state
//   change that may complete waiters moves them to the ready list; drain() then takes them one at a
//   time and decides each against the state at that moment, so a completion callback may re-enter
//   the table freely (even cancel or destroy another waiter of the same batch).
#include "transfer/transfer_table.h"

#include <algorithm>
#include <map>
#include <limits>
#include <memory>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "base/check.h"

namespace sidecar::transfer {
namespace {

constexpr uint8_t kIdle = 0;
constexpr uint8_t kQueued = 1;
constexpr uint8_t kReady = 2;

constexpr uint8_t kDecide = 0;
constexpr uint8_t kRankGone = 1;
constexpr uint8_t kShutdown = 2;
constexpr uint8_t kPeerLost = 3;  // above kShutdown: failWaiters() wins over a later reason

// A set of small indices (positions in a group, or destination group indices): the first 64 inline.
class IndexSet {
 public:
  bool test(size_t i) const {
    if (i < 64) return (low_ >> i) & 1;
    size_t word = (i - 64) / 64;
    return word < high_.size() && ((high_[word] >> ((i - 64) % 64)) & 1);
  }
  void set(size_t i) {
    if (i < 64) {
      low_ |= uint64_t{1} << i;
      return;
    }
    size_t word = (i - 64) / 64;
    if (word >= high_.size()) high_.resize(word + 1, 0);
    high_[word] |= uint64_t{1} << ((i - 64) % 64);
  }
  size_t count() const {
    size_t n = static_cast<size_t>(__builtin_popcountll(low_));
    for (uint64_t w : high_) n += static_cast<size_t>(__builtin_popcountll(w));
    return n;
  }
  bool empty() const { return count() == 0; }

 private:
  uint64_t low_ = 0;
  std::vector<uint64_t> high_;
};

std::string groupText(std::span<const Rank> group) {
  std::string out = "[";
  for (size_t i = 0; i < group.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(group[i]);
  }
  out += ']';
  return out;
}

std::string groupsText(const std::vector<Group>& groups) {
  std::string out = "[";
  for (size_t i = 0; i < groups.size(); ++i) {
    if (i) out += ',';
    out += groupText(groups[i]);
  }
  out += ']';
  return out;
}

std::string shapeText(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(shape[i]);
  }
  out += ']';
  return out;
}

// 'id' for messages: long ids are cut, control characters shown as '?'.
std::string idText(const std::string& id) {
  constexpr size_t kMax = 96;
  std::string out = "'";
  for (size_t i = 0; i < id.size() && i < kMax; ++i) {
    unsigned char c = static_cast<unsigned char>(id[i]);
    out += (c < 0x20 || c == 0x7f) ? '?' : id[i];
  }
  if (id.size() > kMax) out += "...";
  out += '\'';
  return out;
}

std::string chunkText(uint32_t chunkId, const std::string& id) {
  return "chunk " + std::to_string(chunkId) + " of id " + idText(id);
}

Error err(Errc code, std::string message) { return Error{code, std::move(message)}; }

// Position of `rank` in a sorted group, or -1.
int positionIn(std::span<const Rank> group, Rank rank) {
  auto it = std::lower_bound(group.begin(), group.end(), rank);
  if (it == group.end() || *it != rank) return -1;
  return static_cast<int>(it - group.begin());
}

// The sender group and destination groups of an item, in one vector:
// [senderSize, sender ranks..., destCount, size0, ranks0..., size1, ranks1..., ...].
class Topology {
 public:
  bool known() const { return !flat_.empty(); }
  void assign(std::span<const Rank> sender, const std::vector<Group>& dests) {
    size_t total = 2 + sender.size() + dests.size();
    for (const Group& g : dests) total += g.size();
    flat_.clear();
    flat_.reserve(total);
    flat_.push_back(static_cast<Rank>(sender.size()));
    flat_.insert(flat_.end(), sender.begin(), sender.end());
    flat_.push_back(static_cast<Rank>(dests.size()));
    for (const Group& g : dests) {
      flat_.push_back(static_cast<Rank>(g.size()));
      flat_.insert(flat_.end(), g.begin(), g.end());
    }
  }
  void setSender(std::span<const Rank> sender) {
    std::vector<Group> dests = destinations();
    assign(sender, dests);
  }
  void clear() { flat_.clear(); }
  std::span<const Rank> sender() const {
    if (flat_.empty()) return {};
    return {flat_.data() + 1, static_cast<size_t>(flat_[0])};
  }
  size_t destCount() const {
    if (flat_.empty()) return 0;
    return static_cast<size_t>(flat_[1 + flat_[0]]);
  }
  // Calls f(index, group) for each destination group until f returns false.
  template <typename F>
  void forEachDest(F&& f) const {
    if (flat_.empty()) return;
    size_t pos = 1 + static_cast<size_t>(flat_[0]);
    size_t count = static_cast<size_t>(flat_[pos++]);
    for (size_t i = 0; i < count; ++i) {
      size_t n = static_cast<size_t>(flat_[pos++]);
      if (!f(i, std::span<const Rank>(flat_.data() + pos, n))) return;
      pos += n;
    }
  }
  std::span<const Rank> dest(size_t index) const {
    std::span<const Rank> out;
    forEachDest([&](size_t i, std::span<const Rank> g) {
      if (i != index) return true;
      out = g;
      return false;
    });
    return out;
  }
  int destIndexOf(Rank rank) const {
    int found = -1;
    forEachDest([&](size_t i, std::span<const Rank> g) {
      if (positionIn(g, rank) < 0) return true;
      found = static_cast<int>(i);
      return false;
    });
    return found;
  }
  // Same destinations as `dests`, in any order (groups are disjoint, so the match is unique).
  bool sameDestinations(const std::vector<Group>& dests) const {
    if (dests.size() != destCount()) return false;
    for (const Group& want : dests) {
      bool match = false;
      forEachDest([&](size_t, std::span<const Rank> g) {
        match = std::equal(g.begin(), g.end(), want.begin(), want.end());
        return !match;
      });
      if (!match) return false;
    }
    return true;
  }
  std::vector<Group> destinations() const {
    std::vector<Group> out;
    forEachDest([&](size_t, std::span<const Rank> g) {
      out.emplace_back(g.begin(), g.end());
      return true;
    });
    return out;
  }
  std::string destinationsText() const { return groupsText(destinations()); }

 private:
  std::vector<Rank> flat_;
};

struct ChunkSlot {
  uint32_t id = 0;
  std::unique_ptr<Payload> payload;  // while held
  IndexSet sent;                     // positions in the sender group that delivered it
  IndexSet done;                     // destination groups that marked it done
  IndexSet expired;                  // destination groups whose hold expired
  uint64_t arrivedMs = 0;
  bool held() const { return payload != nullptr; }
};

// What a finished generation of an id still expects from its sending group: replicas (and
// closeStreams) that members had not delivered when it finished. One client's requests arrive in
// order, so a member's first message that is not owed proves it is done with the old generation.
struct Owed {
  Group senderGroup;
  uint32_t numChunks = 0;
  std::vector<std::pair<uint32_t, IndexSet>> delivered;  // chunk id -> positions that delivered
  std::vector<Rank> closers;                             // ranks that called closeStream
  IndexSet finished;                                     // positions past the old generation
  uint64_t untilMs = 0;

  bool owesChunk(Rank rank, uint32_t chunkId) const {
    int pos = positionIn(senderGroup, rank);
    if (pos < 0 || finished.test(static_cast<size_t>(pos))) return false;
    auto it = std::lower_bound(delivered.begin(), delivered.end(), chunkId,
                               [](const auto& entry, uint32_t id) { return entry.first < id; });
    if (it == delivered.end() || it->first != chunkId) return false;
    return !it->second.test(static_cast<size_t>(pos));
  }
  void markDelivered(Rank rank, uint32_t chunkId) {
    int pos = positionIn(senderGroup, rank);
    auto it = std::lower_bound(delivered.begin(), delivered.end(), chunkId,
                               [](const auto& entry, uint32_t id) { return entry.first < id; });
    if (pos >= 0 && it != delivered.end() && it->first == chunkId) {
      it->second.set(static_cast<size_t>(pos));
    }
  }
  bool owesClose(Rank rank, uint32_t n) const {
    int pos = positionIn(senderGroup, rank);
    if (pos < 0 || finished.test(static_cast<size_t>(pos))) return false;
    if (closers.empty() || n != numChunks) return false;
    return std::find(closers.begin(), closers.end(), rank) == closers.end();
  }
  void markFinished(Rank rank) {
    int pos = positionIn(senderGroup, rank);
    if (pos >= 0) finished.set(static_cast<size_t>(pos));
  }
};

struct WaitList {
  RecvWaiter* head = nullptr;
  RecvWaiter* tail = nullptr;
  size_t size = 0;
};

uint64_t tensorBytes(const Payload& payload) {
  if (auto* tensor = std::get_if<TensorChunk>(&payload)) return tensor->allocation.sizeBytes;
  return 0;
}

}  // namespace

RecvWaiter::~RecvWaiter() {
  SIDECAR_CHECK(state_ == kIdle,
                "a RecvWaiter was destroyed while the transfer table still holds it (rank %d, "
                "chunk %u): cancel() it first",
                rank_, chunkId_);
}

struct TransferTable::Impl {
  struct Item {
    const std::string* key = nullptr;  // the map's key
    Topology topo;                     // empty until the first send or closeStream
    bool numChunksKnown = false;
    uint32_t numChunks = 0;
    std::vector<ChunkSlot> chunks;  // sorted by id
    size_t heldChunks = 0;
    size_t finishedChunks = 0;       // slots whose every hold is gone
    std::vector<Rank> closers;
    WaitList waiters;                // queued recvs of chunks not here yet
    size_t waiterRefs = 0;           // queued here + on the ready list pointing here
    bool tombstone = false;
    uint64_t tombstoneUntilMs = 0;
    uint64_t lastActivityMs = 0;
    Item* prev = nullptr;  // in liveList or tombstoneList (by `tombstone`)
    Item* next = nullptr;
    std::unique_ptr<Owed> owed;

    ChunkSlot* find(uint32_t chunkId) {
      auto it = std::lower_bound(chunks.begin(), chunks.end(), chunkId,
                                 [](const ChunkSlot& s, uint32_t id) { return s.id < id; });
      return it != chunks.end() && it->id == chunkId ? &*it : nullptr;
    }
    const ChunkSlot* find(uint32_t chunkId) const { return const_cast<Item*>(this)->find(chunkId); }
    bool fullyDone() const { return numChunksKnown && finishedChunks == numChunks; }
    bool owesChunk(Rank rank, uint32_t chunkId, uint64_t now) const {
      return owed && now < owed->untilMs && owed->owesChunk(rank, chunkId);
    }
    bool owesClose(Rank rank, uint32_t n, uint64_t now) const {
      return owed && now < owed->untilMs && owed->owesClose(rank, n);
    }
    void noteNewMessage(Rank rank) {
      if (owed) owed->markFinished(rank);
    }
  };

  Hooks& hooks;
  TransferLimits limits;
  std::unordered_map<std::string, Item> items;
  // What expire() visits, so that a pass costs the live ids and the tombstones that end, not
  // every tombstone of the last tombstoneMs (at tens of thousands of small transfers a second
  // that is millions of entries, walked once a second on the owner core, which serves every
  // transfer meanwhile). Intrusive lists (no allocation; an
  // unordered_map's nodes do not move): every item is in one of them. Tombstones in the order they
  // began, which is the order they end (each lasts tombstoneMs; the clock only goes forward).
  struct ItemList {
    Item* head = nullptr;
    Item* tail = nullptr;
    size_t size = 0;
    void pushBack(Item* item) {
      item->prev = tail;
      item->next = nullptr;
      (tail != nullptr ? tail->next : head) = item;
      tail = item;
      ++size;
    }
    void remove(Item* item) {
      (item->prev != nullptr ? item->prev->next : head) = item->next;
      (item->next != nullptr ? item->next->prev : tail) = item->prev;
      item->prev = item->next = nullptr;
      --size;
    }
  };
  ItemList liveList;
  ItemList tombstoneList;
  std::unordered_set<Rank> registered;
  std::unordered_map<Rank, WaitList> rankWaiters;
  WaitList ready;
  bool draining = false;
  bool shuttingDown = false;
  std::string peerLostWhy;  // the reason failWaiters() gives, for the waiters it wakes

  // Counters behind stats().
  uint64_t liveItems = 0;
  uint64_t heldChunks = 0;
  uint64_t bytesHeld = 0;
  uint64_t waiterCount = 0;
  uint64_t duplicatesDropped = 0;
  uint64_t expiredHolds = 0;
  uint64_t chunksCompleted = 0;

  Impl(Hooks& h, TransferLimits l) : hooks(h), limits(l) {}

  // ---- intrusive lists --------------------------------------------------------------------
  static void pushBack(WaitList& list, RecvWaiter* w) {
    w->prev_ = list.tail;
    w->next_ = nullptr;
    (list.tail ? list.tail->next_ : list.head) = w;
    list.tail = w;
    ++list.size;
  }
  static void unlink(WaitList& list, RecvWaiter* w) {
    (w->prev_ ? w->prev_->next_ : list.head) = w->next_;
    (w->next_ ? w->next_->prev_ : list.tail) = w->prev_;
    w->prev_ = w->next_ = nullptr;
    --list.size;
  }
  static void rankPushBack(WaitList& list, RecvWaiter* w) {
    w->rankPrev_ = list.tail;
    w->rankNext_ = nullptr;
    (list.tail ? list.tail->rankNext_ : list.head) = w;
    list.tail = w;
    ++list.size;
  }
  static void rankUnlink(WaitList& list, RecvWaiter* w) {
    (w->rankPrev_ ? w->rankPrev_->rankNext_ : list.head) = w->rankNext_;
    (w->rankNext_ ? w->rankNext_->rankPrev_ : list.tail) = w->rankPrev_;
    w->rankPrev_ = w->rankNext_ = nullptr;
    --list.size;
  }
  static Item* itemOf(const RecvWaiter* w) { return static_cast<Item*>(w->item_); }

  // ---- validation ---------------------------------------------------------------------------
  std::optional<Error> checkRank(Rank rank, const char* role) const {
    if (rank < 0) {
      return err(Errc::kInvalidArgument,
                 std::string(role) + " rank " + std::to_string(rank) + " is negative; ranks are >= 0");
    }
    if (limits.worldSize > 0 && rank >= limits.worldSize) {
      return err(Errc::kInvalidArgument, std::string(role) + " rank " + std::to_string(rank) +
                                             " is outside the world (world size " +
                                             std::to_string(limits.worldSize) + ", ranks 0.." +
                                             std::to_string(limits.worldSize - 1) + ")");
    }
    return std::nullopt;
  }
  std::optional<Error> checkGroup(const Group& group, const char* what) const {
    if (group.empty()) {
      return err(Errc::kInvalidArgument, std::string(what) + " is empty; a group holds at least one rank");
    }
    for (size_t i = 0; i < group.size(); ++i) {
      if (auto e = checkRank(group[i], what)) {
        e->message += " (in " + std::string(what) + " " + groupText(group) + ")";
        return e;
      }
      if (i > 0 && group[i] == group[i - 1]) {
        return err(Errc::kInvalidArgument, std::string(what) + " " + groupText(group) +
                                               " lists rank " + std::to_string(group[i]) + " twice");
      }
      if (i > 0 && group[i] < group[i - 1]) {
        return err(Errc::kInvalidArgument, std::string(what) + " " + groupText(group) +
                                               " is not sorted ascending");
      }
    }
    return std::nullopt;
  }
  std::optional<Error> checkDataId(const std::string& dataId) const {
    if (dataId.empty()) return err(Errc::kInvalidArgument, "the data id is empty; give every transfer an id");
    return std::nullopt;
  }
  std::optional<Error> checkDestinations(const std::vector<Group>& dests, const std::string& dataId) const {
    if (dests.empty()) {
      return err(Errc::kInvalidArgument, "no destinations for id " + idText(dataId) +
                                             "; give at least one receiving group");
    }
    for (const Group& g : dests) {
      if (auto e = checkGroup(g, "destination group")) return e;
    }
    // A rank belongs to one executor: it may not appear in two destination groups.
    for (size_t i = 0; i < dests.size(); ++i) {
      for (size_t j = i + 1; j < dests.size(); ++j) {
        for (Rank r : dests[i]) {
          if (positionIn(dests[j], r) >= 0) {
            return err(Errc::kInvalidArgument,
                       "rank " + std::to_string(r) + " is in two destination groups, " +
                           groupText(dests[i]) + " and " + groupText(dests[j]) + ", of id " +
                           idText(dataId) + "; list each receiving executor once");
          }
        }
      }
    }
    return std::nullopt;
  }
  std::optional<Error> checkPayload(const Payload& payload, const std::string& dataId,
                                    uint32_t chunkId) const {
    if (auto* object = std::get_if<ObjectChunk>(&payload)) {
      if (object->bytes.size() > limits.objectBytesMax) {
        return err(Errc::kTooLarge, "object " + chunkText(chunkId, dataId) + " is " +
                                        std::to_string(object->bytes.size()) + " bytes, over the " +
                                        std::to_string(limits.objectBytesMax) +
                                        "-byte limit for objects; send it as a tensor");
      }
      return std::nullopt;
    }
    const auto& tensor = std::get<TensorChunk>(payload);
    auto where = [&] { return "tensor " + chunkText(chunkId, dataId); };  // only for errors
    uint32_t elem = dtypeBytes(tensor.dtype);
    if (elem == 0) {
      return err(Errc::kInvalidArgument,
                 where() + " has an unknown dtype (" + std::to_string(static_cast<int>(tensor.dtype)) + ")");
    }
    uint64_t count = 1;
    for (int64_t dim : tensor.shape) {
      if (dim < 0) {
        return err(Errc::kInvalidArgument, where() + " has a negative dimension in shape " +
                                               shapeText(tensor.shape));
      }
      if (__builtin_mul_overflow(count, static_cast<uint64_t>(dim), &count)) {
        return err(Errc::kInvalidArgument, where() + " has shape " + shapeText(tensor.shape) +
                                               ", too many elements to count");
      }
    }
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(count, uint64_t{elem}, &bytes)) {
      return err(Errc::kInvalidArgument, where() + " has shape " + shapeText(tensor.shape) +
                                             ", too many bytes to count");
    }
    if (bytes != tensor.sizeBytes) {
      return err(Errc::kInvalidArgument,
                 where() + " says " + std::to_string(tensor.sizeBytes) + " bytes, but shape " +
                     shapeText(tensor.shape) + " of " + dtypeName(tensor.dtype) + " is " +
                     std::to_string(bytes) + " bytes");
    }
    if (tensor.allocation.sizeBytes < tensor.sizeBytes) {
      return err(Errc::kInvalidArgument,
                 where() + " is " + std::to_string(tensor.sizeBytes) + " bytes but its allocation at offset " +
                     std::to_string(tensor.allocation.offset) + " holds only " +
                     std::to_string(tensor.allocation.sizeBytes));
    }
    return std::nullopt;
  }

  // ---- item life ----------------------------------------------------------------------------
  Item& createItem(const std::string& dataId, uint64_t now) {
    auto [it, inserted] = items.try_emplace(dataId);
    SIDECAR_CHECK(inserted, "item created twice");
    it->second.key = &it->first;
    it->second.lastActivityMs = now;
    ++liveItems;
    liveList.pushBack(&it->second);
    return it->second;
  }
  void eraseItem(Item& item) {
    SIDECAR_CHECK(item.waiterRefs == 0 && item.heldChunks == 0, "erasing an item in use");
    if (!item.tombstone) --liveItems;
    (item.tombstone ? tombstoneList : liveList).remove(&item);
    auto it = items.find(*item.key);
    SIDECAR_CHECK(it != items.end() && &it->second == &item, "erasing an unknown item");
    items.erase(it);
  }
  // Forgets an item that only existed for waiters that are gone.
  void maybeErase(Item& item) {
    if (!item.tombstone && !item.topo.known() && item.chunks.empty() && item.waiterRefs == 0) {
      eraseItem(item);
    }
  }
  // Starts a new generation on a tombstone (the owed replicas carry over).
  void revive(Item& item, uint64_t now) {
    SIDECAR_CHECK(item.tombstone && item.waiters.size == 0, "reviving a live item");
    item.topo.clear();
    item.numChunksKnown = false;
    item.numChunks = 0;
    item.chunks.clear();
    item.heldChunks = 0;
    item.finishedChunks = 0;
    item.closers.clear();
    item.tombstone = false;
    item.lastActivityMs = now;
    ++liveItems;
    tombstoneList.remove(&item);
    liveList.pushBack(&item);
  }
  void becomeTombstone(Item& item, uint64_t now) {
    SIDECAR_CHECK(item.fullyDone() && item.heldChunks == 0 && item.waiters.size == 0,
                  "tombstone of an unfinished item");
    item.tombstone = true;
    item.tombstoneUntilMs = now + std::min<uint64_t>(limits.tombstoneMs, UINT64_MAX - now);
    --liveItems;
    liveList.remove(&item);
    tombstoneList.pushBack(&item);
    // Remember what the sending group still owes (only a group of several can owe anything).
    item.owed.reset();
    std::span<const Rank> sender = item.topo.sender();
    if (sender.size() > 1) {
      auto owed = std::make_unique<Owed>();
      owed->senderGroup.assign(sender.begin(), sender.end());
      owed->numChunks = item.numChunks;
      owed->closers = item.closers;
      owed->untilMs = item.tombstoneUntilMs;
      bool any = false;
      for (const ChunkSlot& slot : item.chunks) {
        if (slot.sent.count() < sender.size()) {
          owed->delivered.emplace_back(slot.id, slot.sent);
          any = true;
        }
      }
      if (!item.closers.empty()) {
        for (Rank r : sender) {
          if (std::find(item.closers.begin(), item.closers.end(), r) == item.closers.end()) any = true;
        }
      }
      if (any) item.owed = std::move(owed);
    }
  }
  void releasePayload(Payload& payload) {
    if (auto* tensor = std::get_if<TensorChunk>(&payload)) hooks.release(tensor->allocation);
  }
  // Drops the slot's payload once no destination group holds it any more.
  void maybeFinishSlot(Item& item, ChunkSlot& slot, uint64_t now) {
    size_t groups = item.topo.destCount();
    size_t gone = slot.done.count() + slot.expired.count();
    if (!slot.held() || gone < groups) return;
    uint64_t bytes = tensorBytes(*slot.payload);
    std::unique_ptr<Payload> payload = std::move(slot.payload);
    --item.heldChunks;
    ++item.finishedChunks;
    --heldChunks;
    bytesHeld -= bytes;
    if (slot.expired.empty()) ++chunksCompleted;
    releasePayload(*payload);
    if (item.fullyDone()) becomeTombstone(item, now);
  }

  // ---- waiters ------------------------------------------------------------------------------
  void moveToReady(RecvWaiter* w, uint8_t reason) {
    if (w->state_ == kQueued) {
      unlink(itemOf(w)->waiters, w);
      pushBack(ready, w);
      w->state_ = kReady;
    }
    w->reason_ = std::max(w->reason_, reason);
  }
  // Moves the item's waiters that `pick` selects to the ready list.
  template <typename Pick>
  void wake(Item& item, Pick&& pick) {
    for (RecvWaiter* w = item.waiters.head; w != nullptr;) {
      RecvWaiter* next = w->next_;
      if (pick(w)) moveToReady(w, kDecide);
      w = next;
    }
  }
  void queue(Item& item, Rank rank, uint32_t chunkId, RecvWaiter& w) {
    w.item_ = &item;
    w.rank_ = rank;
    w.chunkId_ = chunkId;
    w.reason_ = kDecide;
    w.state_ = kQueued;
    pushBack(item.waiters, &w);
    rankPushBack(rankWaiters[rank], &w);
    ++item.waiterRefs;
    ++waiterCount;
  }
  // Takes a waiter off every list; returns its item.
  Item* detach(RecvWaiter* w) {
    Item* item = itemOf(w);
    if (w->state_ == kQueued) {
      unlink(item->waiters, w);
    } else {
      unlink(ready, w);
    }
    auto it = rankWaiters.find(w->rank_);
    SIDECAR_CHECK(it != rankWaiters.end(), "waiter without a rank list");
    rankUnlink(it->second, w);  // the (empty) list stays: no allocation per queued recv
    w->state_ = kIdle;
    w->item_ = nullptr;
    --item->waiterRefs;
    --waiterCount;
    return item;
  }

  // What a recv of (rank, chunk) gets now, or nullopt to wait.
  std::optional<Result<RecvValue>> decide(Item& item, Rank rank, uint32_t chunkId) {
    if (!item.topo.known()) return std::nullopt;
    const std::string& id = *item.key;
    int group = item.topo.destIndexOf(rank);
    if (group < 0) {
      return err(Errc::kNotReceiver, "rank " + std::to_string(rank) + " is not a receiver of id " +
                                         idText(id) + " (destinations " + item.topo.destinationsText() +
                                         "); recv from a rank of a destination group");
    }
    if (item.numChunksKnown && chunkId >= item.numChunks) return RecvValue{EndOfStream{}};
    ChunkSlot* slot = item.find(chunkId);
    if (slot == nullptr) {
      SIDECAR_CHECK(!item.tombstone, "a finished item lacks a chunk");
      return std::nullopt;
    }
    if (slot->done.test(static_cast<size_t>(group))) return alreadyDone(item, *slot, group);
    if (slot->expired.test(static_cast<size_t>(group))) return expiredError(item, *slot, group);
    SIDECAR_CHECK(slot->held(), "a chunk with a live hold has no payload");
    if (auto* tensor = std::get_if<TensorChunk>(slot->payload.get())) return RecvValue{static_cast<const TensorChunk*>(tensor)};
    return RecvValue{static_cast<const ObjectChunk*>(&std::get<ObjectChunk>(*slot->payload))};
  }
  Error alreadyDone(const Item& item, const ChunkSlot& slot, int group) const {
    std::string message = chunkText(slot.id, *item.key) + " was already marked done by group " +
                          groupText(item.topo.dest(static_cast<size_t>(group)));
    if (item.tombstone) {
      message += " (the whole id is done; if it is being sent again, ask after the new send arrived)";
    }
    return err(Errc::kAlreadyDone, std::move(message));
  }
  Error expiredError(const Item& item, const ChunkSlot& slot, int group) const {
    return err(Errc::kExpired, "the hold of group " + groupText(item.topo.dest(static_cast<size_t>(group))) +
                                   " on " + chunkText(slot.id, *item.key) +
                                   " expired: none of its ranks was registered within " +
                                   std::to_string(limits.ttlMs) + " ms of the chunk's arrival");
  }

  // Completes the ready waiters one at a time; callbacks may re-enter (the outermost call drains).
  void drain() {
    if (draining) return;
    draining = true;
    while (RecvWaiter* w = ready.head) {
      Item* item = itemOf(w);
      std::optional<Result<RecvValue>> result;
      if (w->reason_ == kDecide && !shuttingDown) {
        result = decide(*item, w->rank_, w->chunkId_);
        if (!result) {  // still not there: back on its item
          unlink(ready, w);
          pushBack(item->waiters, w);
          w->state_ = kQueued;
          continue;
        }
      } else {
        std::string what = "recv of " + chunkText(w->chunkId_, *item->key) + " by rank " +
                           std::to_string(w->rank_) + " was cancelled: ";
        if (w->reason_ == kPeerLost && !shuttingDown) {
          std::string message = "recv of " + chunkText(w->chunkId_, *item->key) + " by rank " +
                                std::to_string(w->rank_) + " failed: " + peerLostWhy;
          detach(w);
          maybeErase(*item);
          w->complete(err(Errc::kPeerLost, std::move(message)));
          continue;
        }
        what += (w->reason_ == kRankGone) ? "rank " + std::to_string(w->rank_) + " disconnected"
                                          : std::string("the transfer table is shutting down");
        result = err(Errc::kCancelled, std::move(what));
      }
      detach(w);
      maybeErase(*item);
      w->complete(std::move(*result));
    }
    draining = false;
  }

  // ---- operations ---------------------------------------------------------------------------
  Result<Ok> send(Rank sender, const Group& senderGroup, const std::string& dataId, uint32_t chunkId,
                  uint32_t numChunks, const std::vector<Group>& destinations, Payload& payload) {
    if (auto e = checkRank(sender, "sender")) return *e;
    if (auto e = checkGroup(senderGroup, "sender group")) return *e;
    if (positionIn(senderGroup, sender) < 0) {
      return err(Errc::kInvalidArgument, "rank " + std::to_string(sender) +
                                             " is not a member of its sender group " +
                                             groupText(senderGroup));
    }
    if (auto e = checkDataId(dataId)) return *e;
    if (numChunks > 0 && chunkId >= numChunks) {
      return err(Errc::kChunkOutOfRange, chunkText(chunkId, dataId) + " is out of range: the send says " +
                                             std::to_string(numChunks) + " chunks (ids 0.." +
                                             std::to_string(numChunks - 1) + ")");
    }
    if (auto e = checkDestinations(destinations, dataId)) return *e;
    if (auto e = checkPayload(payload, dataId, chunkId)) return *e;

    uint64_t now = hooks.nowMs();
    auto found = items.find(dataId);
    Item* item = found == items.end() ? nullptr : &found->second;
    if (item != nullptr && item->owesChunk(sender, chunkId, now) &&
        item->owed->senderGroup == senderGroup) {
      // A lagging member's replica of the previous generation: drop it.
      item->owed->markDelivered(sender, chunkId);
      return dropReplica(payload);
    }
    bool reviving = item != nullptr && item->tombstone;
    if (item != nullptr && !reviving && item->topo.known()) {
      if (auto e = checkAgainstItem(*item, sender, senderGroup, chunkId, numChunks, destinations)) {
        return *e;
      }
      if (ChunkSlot* slot = item->find(chunkId)) {
        size_t pos = static_cast<size_t>(positionIn(senderGroup, sender));
        if (slot->sent.test(pos)) {
          if (slot->held()) {
            return err(Errc::kAlreadySent,
                       "rank " + std::to_string(sender) + " already sent " + chunkText(chunkId, dataId) +
                           " and it is still held; send an id again only after every receiver marked "
                           "all its chunks done");
          }
          return err(Errc::kAlreadySent,
                     "rank " + std::to_string(sender) + " already sent " + chunkText(chunkId, dataId) +
                         "; other chunks of the id are still in flight, so the id cannot be sent "
                         "again yet");
        }
        // Another member's replica of a chunk the group already delivered.
        slot->sent.set(pos);
        item->noteNewMessage(sender);
        return dropReplica(payload);
      }
    }

    // Accepted: from here on nothing fails.
    if (item == nullptr) item = &createItem(dataId, now);
    if (reviving) revive(*item, now);
    item->noteNewMessage(sender);
    bool wakeAll = false;
    if (!item->topo.known()) {
      item->topo.assign(senderGroup, destinations);
      wakeAll = true;
    } else if (item->topo.sender().empty()) {
      item->topo.setSender(senderGroup);
    }
    bool newlyKnown = false;
    if (numChunks > 0 && !item->numChunksKnown) {
      item->numChunksKnown = true;
      item->numChunks = numChunks;
      newlyKnown = true;
      item->chunks.reserve(std::min<uint32_t>(numChunks, 64));  // one allocation for most ids
    }
    auto at = std::lower_bound(item->chunks.begin(), item->chunks.end(), chunkId,
                               [](const ChunkSlot& s, uint32_t id) { return s.id < id; });
    ChunkSlot& slot = *item->chunks.emplace(at);
    slot.id = chunkId;
    slot.arrivedMs = now;
    slot.sent.set(static_cast<size_t>(positionIn(senderGroup, sender)));
    uint64_t bytes = tensorBytes(payload);
    slot.payload = std::make_unique<Payload>(std::move(payload));
    ++item->heldChunks;
    ++heldChunks;
    bytesHeld += bytes;
    item->lastActivityMs = now;

    uint32_t n = item->numChunks;
    wake(*item, [&](RecvWaiter* w) {
      return wakeAll || w->chunkId_ == chunkId || (newlyKnown && w->chunkId_ >= n);
    });
    drain();
    return Ok{};
  }

  Result<Ok> dropReplica(Payload& payload) {
    ++duplicatesDropped;
    releasePayload(payload);
    return Ok{};
  }

  // Checks a send against the live item it joins (nothing changes).
  std::optional<Error> checkAgainstItem(const Item& item, Rank sender, const Group& senderGroup,
                                        uint32_t chunkId, uint32_t numChunks,
                                        const std::vector<Group>& destinations) const {
    const std::string& id = *item.key;
    std::span<const Rank> known = item.topo.sender();
    if (!known.empty() && !std::equal(known.begin(), known.end(), senderGroup.begin(), senderGroup.end())) {
      return err(Errc::kInvalidArgument,
                 "id " + idText(id) + " is being sent by group " + groupText(known) + "; rank " +
                     std::to_string(sender) + " sends it as group " + groupText(senderGroup) +
                     " (use a fresh id)");
    }
    if (!item.topo.sameDestinations(destinations)) {
      return err(Errc::kInvalidArgument, "id " + idText(id) + " goes to " + item.topo.destinationsText() +
                                             " but this send of chunk " + std::to_string(chunkId) +
                                             " names " + groupsText(destinations) +
                                             "; every chunk of an id goes to the same destinations");
    }
    if (item.numChunksKnown) {
      if (numChunks > 0 && numChunks != item.numChunks) {
        return err(Errc::kNumChunksMismatch,
                   "id " + idText(id) + " has " + std::to_string(item.numChunks) +
                       " chunks (fixed by an earlier send or closeStream) but this send of chunk " +
                       std::to_string(chunkId) + " says " + std::to_string(numChunks));
      }
      if (chunkId >= item.numChunks) {
        return err(Errc::kChunkOutOfRange,
                   chunkText(chunkId, id) + " is out of range: the id has " +
                       std::to_string(item.numChunks) + " chunks" +
                       (item.numChunks ? " (ids 0.." + std::to_string(item.numChunks - 1) + ")" : ""));
      }
    } else if (numChunks > 0 && !item.chunks.empty() && item.chunks.back().id >= numChunks) {
      return err(Errc::kNumChunksMismatch,
                 "this send says id " + idText(id) + " has " + std::to_string(numChunks) +
                     " chunks, but chunk " + std::to_string(item.chunks.back().id) + " was already sent");
    }
    return std::nullopt;
  }

  Result<Ok> closeStream(Rank sender, const std::string& dataId, uint32_t numChunks,
                         const std::vector<Group>& destinations) {
    if (auto e = checkRank(sender, "sender")) return *e;
    if (auto e = checkDataId(dataId)) return *e;
    if (auto e = checkDestinations(destinations, dataId)) return *e;

    uint64_t now = hooks.nowMs();
    auto found = items.find(dataId);
    Item* item = found == items.end() ? nullptr : &found->second;
    if (item != nullptr && item->owesClose(sender, numChunks, now)) {
      item->owed->closers.push_back(sender);  // a lagging member's close of the previous generation
      return Ok{};
    }
    bool reviving = item != nullptr && item->tombstone;
    if (item != nullptr && !reviving && item->topo.known()) {
      const std::string& id = *item->key;
      std::span<const Rank> group = item->topo.sender();
      if (!group.empty() && positionIn(group, sender) < 0) {
        return err(Errc::kInvalidArgument, "rank " + std::to_string(sender) + " cannot close id " +
                                               idText(id) + ": it is sent by group " + groupText(group));
      }
      if (!item->topo.sameDestinations(destinations)) {
        return err(Errc::kInvalidArgument, "closeStream of id " + idText(id) + " names destinations " +
                                               groupsText(destinations) + " but the id goes to " +
                                               item->topo.destinationsText());
      }
      if (item->numChunksKnown) {
        if (item->numChunks != numChunks) {
          return err(Errc::kNumChunksMismatch,
                     "closeStream says id " + idText(id) + " has " + std::to_string(numChunks) +
                         " chunks but it already has " + std::to_string(item->numChunks) +
                         " (fixed by an earlier send or closeStream)");
        }
        if (std::find(item->closers.begin(), item->closers.end(), sender) == item->closers.end()) {
          item->closers.push_back(sender);
        }
        item->noteNewMessage(sender);
        return Ok{};
      }
      if (!item->chunks.empty() && item->chunks.back().id >= numChunks) {
        return err(Errc::kNumChunksMismatch,
                   "closeStream says id " + idText(id) + " has " + std::to_string(numChunks) +
                       " chunks, but chunk " + std::to_string(item->chunks.back().id) + " was already sent");
      }
    }

    if (item == nullptr) item = &createItem(dataId, now);
    if (reviving) revive(*item, now);
    item->noteNewMessage(sender);
    bool wakeAll = false;
    if (!item->topo.known()) {
      item->topo.assign({}, destinations);
      wakeAll = true;
    }
    item->numChunksKnown = true;
    item->numChunks = numChunks;
    item->closers.push_back(sender);
    item->lastActivityMs = now;
    wake(*item, [&](RecvWaiter* w) { return wakeAll || w->chunkId_ >= numChunks; });
    // An empty stream, or one whose chunks were all consumed before it was closed. (Waiters still
    // queued wait for chunks below numChunks that are missing, so a finished item has none.)
    if (item->fullyDone()) becomeTombstone(*item, now);
    drain();
    return Ok{};
  }

  void recv(Rank receiver, const std::string& dataId, uint32_t chunkId, RecvWaiter& waiter) {
    SIDECAR_CHECK(waiter.state_ == kIdle, "recv with a waiter that is already queued (rank %d, chunk %u)",
                  waiter.rank_, waiter.chunkId_);
    if (shuttingDown) {
      waiter.complete(err(Errc::kCancelled, "recv of " + chunkText(chunkId, dataId) +
                                                " was cancelled: the transfer table is shutting down"));
      return;
    }
    std::optional<Error> bad = checkRank(receiver, "receiver");
    if (!bad) bad = checkDataId(dataId);
    if (bad) {
      waiter.complete(std::move(*bad));
      return;
    }
    auto found = items.find(dataId);
    Item* item = found == items.end() ? &createItem(dataId, hooks.nowMs()) : &found->second;
    std::optional<Result<RecvValue>> result = decide(*item, receiver, chunkId);
    if (result) {
      waiter.complete(std::move(*result));
      return;
    }
    queue(*item, receiver, chunkId, waiter);
  }

  bool cancel(RecvWaiter& waiter) {
    if (waiter.state_ == kIdle) return false;
    Item* item = detach(&waiter);
    maybeErase(*item);
    return true;
  }

  Result<Ok> markDone(Rank receiver, const std::string& dataId, uint32_t chunkId) {
    if (auto e = checkRank(receiver, "receiver")) return *e;
    if (auto e = checkDataId(dataId)) return *e;
    auto found = items.find(dataId);
    if (found == items.end() || !found->second.topo.known()) {
      return err(Errc::kNotAvailable, "nothing was sent under id " + idText(dataId) +
                                          " (yet): markDone a chunk after recv returned it");
    }
    Item& item = found->second;
    int group = item.topo.destIndexOf(receiver);
    if (group < 0) {
      return err(Errc::kNotReceiver, "rank " + std::to_string(receiver) + " is not a receiver of id " +
                                         idText(dataId) + " (destinations " + item.topo.destinationsText() +
                                         "), so it cannot mark it done");
    }
    if (item.numChunksKnown && chunkId >= item.numChunks) {
      return err(Errc::kChunkOutOfRange,
                 chunkText(chunkId, dataId) + " is out of range: the id has " +
                     std::to_string(item.numChunks) + " chunks");
    }
    ChunkSlot* slot = item.find(chunkId);
    if (slot == nullptr) {
      return err(Errc::kNotAvailable, chunkText(chunkId, dataId) +
                                          " has not arrived yet; markDone only after recv returned it");
    }
    if (slot->done.test(static_cast<size_t>(group))) return alreadyDone(item, *slot, group);
    if (slot->expired.test(static_cast<size_t>(group))) return expiredError(item, *slot, group);
    uint64_t now = hooks.nowMs();
    slot->done.set(static_cast<size_t>(group));
    item.lastActivityMs = now;
    maybeFinishSlot(item, *slot, now);
    return Ok{};
  }

  bool anyRegistered(std::span<const Rank> group) const {
    for (Rank r : group) {
      if (registered.count(r)) return true;
    }
    return false;
  }

  void expire() {
    uint64_t now = hooks.nowMs();
    // Tombstones whose time is up, oldest first; one that waiters still refer to stays for a
    // later pass.
    for (Item* t = tombstoneList.head; t != nullptr && t->tombstoneUntilMs <= now;) {
      Item* next = t->next;
      if (t->waiterRefs == 0) eraseItem(*t);
      t = next;
    }
    // Processing an item never erases another, but may erase it or make it a tombstone (moving
    // it to the other list): take its successor first.
    for (Item* visited = liveList.head; visited != nullptr;) {
      Item& item = *visited;
      visited = visited->next;
      if (item.owed && now >= item.owed->untilMs) item.owed.reset();
      if (item.heldChunks > 0) {
        // Groups without a registered member, computed once per item.
        std::vector<bool> orphan(item.topo.destCount());
        item.topo.forEachDest([&](size_t i, std::span<const Rank> g) {
          orphan[i] = !anyRegistered(g);
          return true;
        });
        for (size_t s = 0; s < item.chunks.size() && !item.tombstone; ++s) {
          ChunkSlot& slot = item.chunks[s];
          if (!slot.held() || now < slot.arrivedMs || now - slot.arrivedMs < limits.ttlMs) continue;
          for (size_t g = 0; g < orphan.size(); ++g) {
            if (orphan[g] && !slot.done.test(g) && !slot.expired.test(g)) {
              slot.expired.set(g);
              ++expiredHolds;
            }
          }
          maybeFinishSlot(item, slot, now);
        }
        continue;
      }
      if (item.waiterRefs == 0 && now >= item.lastActivityMs &&
          now - item.lastActivityMs >= limits.ttlMs) {
        eraseItem(item);  // nothing held, nobody waiting, idle: an abandoned stream
      }
    }
    drain();
  }

  void failWaiters(const std::string& dataId, const std::string& why) {
    auto it = items.find(dataId);
    if (it == items.end()) return;
    peerLostWhy = why;
    wake(it->second, [](RecvWaiter*) { return true; });
    for (RecvWaiter* w = ready.head; w != nullptr; w = w->next_) {
      if (itemOf(w) == &it->second) w->reason_ = std::max(w->reason_, kPeerLost);
    }
    drain();
  }

  void rankGone(Rank rank) {
    registered.erase(rank);
    auto it = rankWaiters.find(rank);
    if (it == rankWaiters.end()) return;
    for (RecvWaiter* w = it->second.head; w != nullptr; w = w->rankNext_) moveToReady(w, kRankGone);
    drain();
    it = rankWaiters.find(rank);
    if (it != rankWaiters.end() && it->second.size == 0) rankWaiters.erase(it);
  }

  void shutdown() {
    shuttingDown = true;
    for (auto& [id, item] : items) {
      for (RecvWaiter* w = item.waiters.head; w != nullptr;) {
        RecvWaiter* next = w->next_;
        moveToReady(w, kShutdown);
        w = next;
      }
    }
    for (RecvWaiter* w = ready.head; w != nullptr; w = w->next_) w->reason_ = kShutdown;
    drain();
    for (auto& [id, item] : items) {
      for (ChunkSlot& slot : item.chunks) {
        if (slot.held()) releasePayload(*slot.payload);
      }
    }
    items.clear();
  }

  // ---- inspection ---------------------------------------------------------------------------
  std::string describe(const Item& item) const {
    std::string out = "id " + idText(*item.key) + ": ";
    out += item.tombstone ? "done (tombstone)" : "live";
    out += ", chunks ";
    out += item.numChunksKnown ? std::to_string(item.numChunks) : std::string("unknown (stream)");
    if (item.topo.known()) {
      std::span<const Rank> sender = item.topo.sender();
      out += ", from " + (sender.empty() ? std::string("(not yet sent)") : groupText(sender));
      out += " to " + item.topo.destinationsText();
    } else {
      out += ", nothing sent yet";
    }
    out += ", " + std::to_string(item.waiterRefs) + " waiter(s)\n";
    for (const ChunkSlot& slot : item.chunks) {
      out += "  chunk " + std::to_string(slot.id) + ": ";
      if (slot.held()) {
        if (auto* t = std::get_if<TensorChunk>(slot.payload.get())) {
          out += std::string("tensor ") + dtypeName(t->dtype) + " " + shapeText(t->shape) + ", " +
                 std::to_string(t->sizeBytes) + " bytes at offset " + std::to_string(t->allocation.offset) +
                 " (" + std::to_string(t->allocation.sizeBytes) + " allocated)";
        } else {
          const auto& o = std::get<ObjectChunk>(*slot.payload);
          out += "object type " + std::to_string(o.typeTag) + ", " + std::to_string(o.bytes.size()) + " bytes";
        }
      } else {
        out += "released";
      }
      std::string held, done, expired;
      item.topo.forEachDest([&](size_t g, std::span<const Rank> group) {
        std::string& into = slot.done.test(g) ? done : slot.expired.test(g) ? expired : held;
        into += (into.empty() ? "" : " ") + groupText(group);
        return true;
      });
      if (!held.empty()) out += "; held by " + held;
      if (!done.empty()) out += "; done by " + done;
      if (!expired.empty()) out += "; expired for " + expired;
      out += '\n';
    }
    for (const RecvWaiter* w = item.waiters.head; w != nullptr; w = w->next_) {
      out += "  waiting: rank " + std::to_string(w->rank_) + " for chunk " + std::to_string(w->chunkId_) + '\n';
    }
    return out;
  }

  void checkInvariants() const {
    uint64_t live = 0, held = 0, bytes = 0, queued = 0;
    std::unordered_map<const Item*, size_t> refs;
    for (const auto& [id, item] : items) {
      SIDECAR_CHECK(item.key == &id, "item key pointer");
      if (!item.tombstone) ++live;
      size_t itemHeld = 0, finished = 0;
      for (size_t s = 0; s < item.chunks.size(); ++s) {
        const ChunkSlot& slot = item.chunks[s];
        SIDECAR_CHECK(s == 0 || item.chunks[s - 1].id < slot.id, "chunks not sorted");
        SIDECAR_CHECK(!item.numChunksKnown || slot.id < item.numChunks, "chunk past the end");
        SIDECAR_CHECK(!slot.sent.empty(), "chunk without a sender");
        size_t gone = slot.done.count() + slot.expired.count();
        SIDECAR_CHECK(gone <= item.topo.destCount(), "more holds gone than groups");
        if (slot.held()) {
          SIDECAR_CHECK(gone < item.topo.destCount(), "held chunk nobody holds");
          ++itemHeld;
          bytes += tensorBytes(*slot.payload);
        } else {
          SIDECAR_CHECK(gone == item.topo.destCount(), "released chunk still held");
          ++finished;
        }
      }
      SIDECAR_CHECK(itemHeld == item.heldChunks && finished == item.finishedChunks, "chunk counts");
      SIDECAR_CHECK(item.chunks.empty() || item.topo.known(), "chunks without destinations");
      held += itemHeld;
      if (item.tombstone) {
        SIDECAR_CHECK(item.fullyDone() && item.waiters.size == 0, "tombstone not finished");
      } else {
        SIDECAR_CHECK(!item.fullyDone(), "finished item is not a tombstone");
      }
      size_t n = 0;
      for (const RecvWaiter* w = item.waiters.head; w != nullptr; w = w->next_, ++n) {
        SIDECAR_CHECK(w->state_ == kQueued && itemOf(w) == &item, "queued waiter state");
        if (item.topo.known()) {
          SIDECAR_CHECK(item.topo.destIndexOf(w->rank_) >= 0, "queued waiter of a non-receiver");
          SIDECAR_CHECK(!item.numChunksKnown || w->chunkId_ < item.numChunks, "queued waiter past the end");
          SIDECAR_CHECK(item.find(w->chunkId_) == nullptr, "queued waiter of a chunk that is here");
        }
      }
      SIDECAR_CHECK(n == item.waiters.size, "item waiter list size");
      refs[&item] += n;
      queued += n;
    }
    size_t readyCount = 0;
    for (const RecvWaiter* w = ready.head; w != nullptr; w = w->next_, ++readyCount) {
      SIDECAR_CHECK(w->state_ == kReady, "ready waiter state");
      refs[itemOf(w)] += 1;
    }
    SIDECAR_CHECK(readyCount == ready.size, "ready list size");
    for (const auto& [id, item] : items) {
      auto it = refs.find(&item);
      SIDECAR_CHECK((it == refs.end() ? 0 : it->second) == item.waiterRefs, "waiter refs of %s", id.c_str());
    }
    size_t byRank = 0;
    for (const auto& [rank, list] : rankWaiters) {
      size_t n = 0;
      for (const RecvWaiter* w = list.head; w != nullptr; w = w->rankNext_, ++n) {
        SIDECAR_CHECK(w->rank_ == rank && w->state_ != kIdle, "rank list entry");
      }
      SIDECAR_CHECK(n == list.size, "rank list size");
      byRank += n;
    }
    SIDECAR_CHECK(byRank == queued + readyCount && waiterCount == byRank, "waiter count");
    SIDECAR_CHECK(live == liveItems && held == heldChunks && bytes == bytesHeld, "stats counters");
    SIDECAR_CHECK(liveList.size == live && tombstoneList.size == items.size() - live, "item lists");
    for (const ItemList* list : {&liveList, &tombstoneList}) {
      size_t n = 0;
      for (const Item* i = list->head; i != nullptr; i = i->next, ++n) {
        SIDECAR_CHECK(i->tombstone == (list == &tombstoneList), "item in the wrong list");
        SIDECAR_CHECK(i->next != nullptr ? i->next->prev == i : list->tail == i, "list links");
        SIDECAR_CHECK(list != &tombstoneList || i->next == nullptr ||
                          i->tombstoneUntilMs <= i->next->tombstoneUntilMs,
                      "tombstones out of order");
      }
      SIDECAR_CHECK(n == list->size, "list size");
    }
  }
};

TransferTable::TransferTable(Hooks& hooks, TransferLimits limits) : impl_(new Impl(hooks, limits)) {}

TransferTable::~TransferTable() {
  impl_->shutdown();
  delete impl_;
}

void TransferTable::rankRegistered(Rank rank) { impl_->registered.insert(rank); }

void TransferTable::rankGone(Rank rank) { impl_->rankGone(rank); }

void TransferTable::failWaiters(const std::string& dataId, const std::string& why) {
  impl_->failWaiters(dataId, why);
}

Result<Ok> TransferTable::send(Rank sender, const Group& senderGroup, const std::string& dataId,
                               uint32_t chunkId, uint32_t numChunks,
                               const std::vector<Group>& destinations, Payload payload) {
  return impl_->send(sender, senderGroup, dataId, chunkId, numChunks, destinations, payload);
}

Result<Ok> TransferTable::closeStream(Rank sender, const std::string& dataId, uint32_t numChunks,
                                      const std::vector<Group>& destinations) {
  return impl_->closeStream(sender, dataId, numChunks, destinations);
}

void TransferTable::recv(Rank receiver, const std::string& dataId, uint32_t chunkId, RecvWaiter& waiter) {
  impl_->recv(receiver, dataId, chunkId, waiter);
}

bool TransferTable::cancel(RecvWaiter& waiter) { return impl_->cancel(waiter); }

Result<Ok> TransferTable::markDone(Rank receiver, const std::string& dataId, uint32_t chunkId) {
  return impl_->markDone(receiver, dataId, chunkId);
}

void TransferTable::expire() { impl_->expire(); }

TransferStats TransferTable::stats() const {
  TransferStats s;
  s.items = impl_->liveItems;
  s.chunks = impl_->heldChunks;
  s.bytesHeld = impl_->bytesHeld;
  s.waiters = impl_->waiterCount;
  s.duplicatesDropped = impl_->duplicatesDropped;
  s.expiredHolds = impl_->expiredHolds;
  s.chunksCompleted = impl_->chunksCompleted;
  return s;
}

std::optional<std::string> TransferTable::describe(const std::string& dataId) const {
  auto it = impl_->items.find(dataId);
  if (it == impl_->items.end()) return std::nullopt;
  return impl_->describe(it->second);
}

std::map<Rank, uint64_t> TransferTable::heldBytesByRank() const {
  std::map<Rank, uint64_t> out;
  for (const auto& [id, item] : impl_->items) {
    if (item.tombstone) continue;
    for (const ChunkSlot& slot : item.chunks) {
      if (!slot.held()) continue;
      const auto* tensor = std::get_if<TensorChunk>(slot.payload.get());
      if (tensor == nullptr) continue;
      item.topo.forEachDest([&](size_t index, auto group) {
        if (!slot.done.test(index) && !slot.expired.test(index)) {
          for (Rank rank : group) out[rank] += tensor->allocation.sizeBytes;
        }
        return true;
      });
    }
  }
  return out;
}

std::vector<std::string> TransferTable::dataIds() const {
  std::vector<std::string> out;
  for (const auto& [id, item] : impl_->items) {
    if (!item.tombstone) out.push_back(id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool TransferTable::allChunksArrived(const std::string& dataId) const {
  auto it = impl_->items.find(dataId);
  if (it == impl_->items.end()) return true;
  const Impl::Item& item = it->second;
  return item.tombstone || (item.numChunksKnown && item.chunks.size() >= item.numChunks);
}

void TransferTable::checkInvariants() const { impl_->checkInvariants(); }

}  // namespace sidecar::transfer
