#pragma once
// The daemon's side of a session's lane (docs/LANES.md): reads LaneRequest records from the
// request ring on the session's core, runs them through the same TransferBackend calls as
// Session.send / recv / markDone, and writes a LaneCompletion per request. Lives inside its
// SessionService: destroying it (the session ended) cancels what is still pending.
//
// The client is not trusted: a record that does not parse, or a ring whose format is broken, or a
// client that leaves no room for its completions, closes the lane with a logged reason; the
// session's calls keep working and no other client is affected.

#include <kj/async.h>
#include <capnp/serialize.h>
#include <kj/io.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "lane/lane_credits.h"
#include "lane/lane_endpoint.h"
#include "rpc/transfer_backend.h"
#include "shm/lane_ring.h"
#include "sidecar.capnp.h"

namespace sidecar::rpc {

// Objects larger than this are not answered over the lane (`useCall`): a completion must fit the
// room the client reserved for it (docs/LANES.md, "Credits").
constexpr uint32_t kLaneObjectMaxBytes = 16 * 1024;
// A failure's text in a completion is cut to this many bytes (under laneCompletionBytes).
constexpr size_t kLaneFailureMaxBytes = 512;

// Where a connection's sessions put their lanes: its core's reactor, and the core's count of open
// lanes (shown by `sidecarctl status`).
struct LaneHost {
  reactor::Reactor* reactor = nullptr;  // null: no lanes here
  std::atomic<uint32_t>* open = nullptr;
};

class LaneService final : private kj::TaskSet::ErrorHandler {
 public:
  // The fds the client gets: the memory, the daemon's doorbell, the client's doorbell.
  struct ClientFds {
    kj::AutoCloseFd memory, requestBell, completionBell;
  };

  // Creates the memory and both doorbells on the calling thread's reactor.
  static kj::Own<LaneService> open(LaneHost host, TransferBackend& backend, SessionId session,
                                   transfer::Rank rank, ClientFds& clientFds);

  LaneService(LaneHost host, TransferBackend& backend, SessionId session, transfer::Rank rank,
              shm::LaneMemory memory, kj::AutoCloseFd requestBell, kj::AutoCloseFd completionBell);
  ~LaneService();

  bool broken() const { return endpoint_.broken(); }

 private:
  // What a request's work keeps alive: the copied record and its reader.
  using Keep = std::pair<std::shared_ptr<std::vector<uint64_t>>,
                         std::shared_ptr<capnp::FlatArrayMessageReader>>;

  void onRecord(const std::vector<uint64_t>& words, uint64_t size);
  // A send or markDone (a recv goes through TransferBackend::recvInto).
  kj::Promise<void> dispatch(proto::LaneRequest::Reader request, std::shared_ptr<const Keep> keep);
  // The answer of request `seq`: failed when `failure`, else a recv's `reply`, else an allocate's
  // `allocated`, else done.
  void complete(uint64_t seq, kj::Maybe<RecvReply&> reply, const kj::Exception* failure,
                const shm::Allocation* allocated = nullptr);
  // An allocate: answered `allocated` once TransferBackend::allocate has the space (it may wait
  // up to the request's timeout, or until the lane goes).
  void startAllocate(uint64_t seq, uint64_t reserve, proto::LaneRequest::Reader request);
  // A recv: answered through TransferBackend::recvInto, withdrawn by a later `cancel`.
  void startRecv(uint64_t seq, uint64_t reserve, proto::LaneRequest::Reader request);
  // A `cancel` request: the recv with that seq, if it still waits, leaves the table and is
  // answered [cancelled].
  void cancelRecv(uint64_t seq);
  void close(const std::string& why);
  void taskFailed(kj::Exception&& exception) override;

  std::atomic<uint32_t>* open_;
  TransferBackend& backend_;
  SessionId session_;
  transfer::Rank rank_;
  shm::LaneMemory memory_;
  lane::LaneEndpoint endpoint_;
  lane::LaneCredits credits_;  // the client's, mirrored
  // Recvs still in tasks_, by seq. `answered`: its completion is written (the entry goes on a
  // later turn), so a cancel must not answer it again.
  struct PendingRecv {
    kj::Own<kj::Canceler> canceler;
    uint64_t reserve = 0;
    bool answered = false;
  };
  std::unordered_map<uint64_t, PendingRecv> recvs_;  // before tasks_: destroyed after it
  // Where complete() builds each answer, framed in place and pushed from there: a tensor's answer
  // fits its first segment (an object's bytes may take a second one, then it is flattened as
  // usual). Zeroed before each use (~0.5 KiB), which is cheaper than the builder and the flat
  // copy it replaces (two heap blocks and a copy per answer, on the latency path).
  static constexpr size_t kCompletionWords = 64;
  kj::Array<capnp::word> completionBuffer_ = kj::heapArray<capnp::word>(kCompletionWords + 1);
  kj::TaskSet tasks_;
};

}  // namespace sidecar::rpc
