#pragma once
// Concurrent copy of a sender group (issue 6, item 3): gathers the members' device sends of one
// chunk on the owner core and copies each member's slice (daemon/group_slices.h) into ONE shared
// arena allocation; the chunk is stored once, when every slice landed.
//
//   first member's send   -> allocate the whole tensor (under that member's session)
//   each member's send    -> copy its slice as soon as it arrived and the space exists
//   all slices landed     -> store the chunk as that first member's send; every other member's
//                            send is then recorded as a replica the table drops (as today for
//                            full replicas), so the table's per-member bookkeeping is unchanged
//   every member's send() resolves when the chunk is stored (or fails with the gather's error)
//
// Failures never leak the shared allocation: a member that does not send within gatherTimeoutMs
// of the first ([timeout]), a failed slice copy, a mismatched replica header ([invalid-argument])
// or a member's session ending ([cancelled]) fails every member's send; the allocation is released
// once the copies already writing into it have finished. A session whose allocation is the shared
// one is unregistered (which frees its allocations) only after those copies finished too.
//
// Everything runs on the owner core's thread (core 0), which also answers the hooks.

#include <kj/async.h>
#include <kj/timer.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "daemon/group_slices.h"
#include "rpc/device_send_backend.h"

namespace sidecar::daemon {

// One member's device send of a chunk, with its rank as registered.
struct GroupMemberSend {
  rpc::SessionId session = 0;
  transfer::Rank rank = 0;
  transfer::Group group;  // sorted, contains rank
  rpc::DeviceSendRequest request;  // tensor.sizeBytes already checked against dtype and shape
};

class GroupCopies {
 public:
  // What a gather does to the world. DeviceSends implements it over NodeTransfers and the copy
  // engine; the unit tests with fakes. Called, and answered, on the owner core.
  class Hooks {
   public:
    virtual kj::Promise<shm::Allocation> allocate(rpc::SessionId session, uint64_t sizeBytes) = 0;
    // Copies bytes [slice.offsetBytes, + slice.sizeBytes) of the member's replica to the arena at
    // `arenaOffset`.
    virtual kj::Promise<void> copySlice(const GroupMemberSend& member, GroupSlice slice,
                                        uint64_t arenaOffset) = 0;
    // Stores the chunk (the whole tensor, at `arenaOffset`: an allocation of member.session) as
    // that member's send; resolves as TransferBackend::send.
    virtual kj::Promise<void> store(const GroupMemberSend& member, uint64_t arenaOffset) = 0;
    // Records that `member` delivered its replica too (after store: the table drops it as a
    // duplicate).
    virtual kj::Promise<void> storeReplica(const GroupMemberSend& member) = 0;
    virtual kj::Promise<void> release(rpc::SessionId session, uint64_t arenaOffset) = 0;

   protected:
    ~Hooks() = default;
  };

  GroupCopies(Hooks& hooks, kj::Timer& timer, uint32_t gatherTimeoutMs);
  ~GroupCopies();

  // One member's send; resolves when the chunk is stored. A second send of the same chunk by the
  // same member while its group still gathers is [already-sent]. A group of one is allowed (it
  // then copies the whole tensor, as without concurrent copy).
  kj::Promise<void> add(GroupMemberSend send);

  // The session ended: its gathers fail, and `unregister` runs once no copy writes into an
  // allocation of this session any more (at once when none does).
  void sessionEnded(rpc::SessionId session, std::function<void()> unregister);

  // For tests and logs.
  size_t gathering() const { return live_.size(); }
  size_t draining() const { return draining_.size(); }
  uint64_t stored() const { return stored_; }
  uint64_t failed() const { return failed_; }

 private:
  struct Member {
    std::unique_ptr<GroupMemberSend> send;  // null until it arrived
    bool copying = false;
    bool landed = false;
    kj::Own<kj::PromiseFulfiller<void>> fulfiller;
  };
  enum class Space { kNone, kPending, kReady, kRefused };
  struct Gather {
    uint64_t id = 0;
    std::tuple<transfer::Group, std::string, uint32_t> key;  // group, dataId, chunkId
    std::vector<Member> members;  // by position in the group
    uint32_t arrived = 0;
    uint32_t landed = 0;
    size_t first = 0;  // position of the member whose session holds the space
    Space space = Space::kNone;
    uint64_t offset = 0;
    bool spaceSessionEnded = false;  // its unregister frees the space: never release it here
    uint32_t copiesInFlight = 0;
    bool failed = false;
    bool storing = false;
    kj::Promise<void> timeout = nullptr;
  };
  using GatherPtr = std::shared_ptr<Gather>;
  class ErrorHandler : public kj::TaskSet::ErrorHandler {
   public:
    void taskFailed(kj::Exception&& exception) override;
  };

  void fail(const GatherPtr& g, kj::Exception error);
  void startCopy(const GatherPtr& g, size_t position);
  void advance(const GatherPtr& g);
  void store(const GatherPtr& g);
  void retire(const GatherPtr& g);  // destroys it on a later turn (its own promises may be running)
  bool busyWith(rpc::SessionId session) const;
  void runUnregisters();
  std::string describe(const Gather& g) const;

  Hooks& hooks_;
  kj::Timer& timer_;
  uint32_t gatherTimeoutMs_;
  ErrorHandler errorHandler_;
  kj::TaskSet tasks_;
  uint64_t nextId_ = 1;
  std::map<std::tuple<transfer::Group, std::string, uint32_t>, GatherPtr> live_;
  std::map<uint64_t, GatherPtr> draining_;  // failed, with copies or an allocation still out
  std::vector<std::pair<rpc::SessionId, std::function<void()>>> unregisters_;
  uint64_t stored_ = 0;
  uint64_t failed_ = 0;
};

}  // namespace sidecar::daemon
