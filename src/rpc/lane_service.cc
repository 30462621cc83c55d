#include "rpc/lane_service.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include "base/clock.h"
#include "base/framed_builder.h"
#include "base/hop_trace.h"
#include "base/utf8.h"
#include "rpc/session_service.h"

namespace sidecar::rpc {

namespace {

kj::AutoCloseFd newEventFd() {
  int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) throw transferError("internal", std::string("eventfd for a lane: ") + std::strerror(errno));
  return kj::AutoCloseFd(fd);
}

kj::AutoCloseFd dupFd(int fd) {
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw transferError("internal", std::string("dup for a lane: ") + std::strerror(errno));
  return kj::AutoCloseFd(copy);
}

}  // namespace

kj::Own<LaneService> LaneService::open(LaneHost host, TransferBackend& backend, SessionId session,
                                       transfer::Rank rank, ClientFds& clientFds) {
  auto memory = shm::LaneMemory::create();
  if (!memory.ok()) throw transferError("internal", "cannot make a lane: " + memory.error().message);
  auto requestBell = newEventFd();
  auto completionBell = newEventFd();
  clientFds.memory = dupFd(memory.value().fd());
  clientFds.requestBell = dupFd(requestBell.get());
  clientFds.completionBell = dupFd(completionBell.get());
  return kj::heap<LaneService>(host, backend, session, rank, std::move(memory).value(),
                               kj::mv(requestBell), kj::mv(completionBell));
}

LaneService::LaneService(LaneHost host, TransferBackend& backend, SessionId session,
                         transfer::Rank rank, shm::LaneMemory memory, kj::AutoCloseFd requestBell,
                         kj::AutoCloseFd completionBell)
    : open_(host.open),
      backend_(backend),
      session_(session),
      rank_(rank),
      memory_(std::move(memory)),
      endpoint_(*host.reactor, memory_.requests(), kj::mv(requestBell), memory_.completions(),
                kj::mv(completionBell),
                [this](const std::vector<uint64_t>& words, uint64_t size) { onRecord(words, size); },
                [this](const std::string& why) { close("its request ring is corrupt: " + why); }),
      credits_(memory_.ringBytes(), kLaneObjectMaxBytes, proto::LANE_COMPLETION_BYTES),
      tasks_(*this) {
  if (open_ != nullptr) open_->fetch_add(1, std::memory_order_relaxed);
}

LaneService::~LaneService() {
  if (open_ != nullptr) open_->fetch_sub(1, std::memory_order_relaxed);
}

void LaneService::close(const std::string& why) {
  endpoint_.shutDown();
  spdlog::warn("rank {}: lane closed, {}; its calls go on working", rank_, why);
}

void LaneService::taskFailed(kj::Exception&& exception) {
  // Every task ends in complete(); only a bug gets here.
  spdlog::error("rank {}: lane task failed: {}", rank_, exception.getDescription().cStr());
}

void LaneService::onRecord(const std::vector<uint64_t>& words, uint64_t size) {
  // The record is the endpoint's buffer until the next one. Every request is read from it in
  // place and parsed before this returns, except a send of an inline tensor: its bytes must
  // outlive the record (its allocation may wait for space), so it reads from a copy it keeps.
  auto segment = [size](const std::vector<uint64_t>& from) {
    return kj::arrayPtr(reinterpret_cast<const capnp::word*>(from.data()), size / sizeof(capnp::word));
  };
  capnp::ReaderOptions options{words.size() * 4 + 64, 16};
  std::optional<capnp::FlatArrayMessageReader> inPlace;
  kj::Maybe<uint64_t> seq;
  kj::Maybe<proto::LaneRequest::Reader> request;
  // The reader checks the segment table as it is made: garbage throws there already.
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto root = inPlace.emplace(segment(words), options).getRoot<proto::LaneRequest>();
    seq = root.getSeq();
    request = root;
  })) {
    // Not even the sequence number could be read: nothing can be answered.
    close(std::string("a record that is not a LaneRequest: ") + e->getDescription().cStr());
    return;
  }
  // The client's credits, kept here too: a request beyond them would make this daemon hold work
  // (a waiting recv) or owe an answer it has no room for.
  uint64_t reserve = credits_.reservation(KJ_ASSERT_NONNULL(request).isRecv());
  if (!credits_.take(reserve)) {
    close("it has more requests in flight than its completion ring can answer (it ignores its "
          "credits)");
    return;
  }
  // A hop trace times the steps without a clock read when off (base/hop_trace.h).
  hop::mark(hop::Point::kLaneTaken);
  spdlog::trace("lane: request {} taken", KJ_ASSERT_NONNULL(seq));
  uint64_t number = KJ_ASSERT_NONNULL(seq);
  auto& req = KJ_ASSERT_NONNULL(request);
  if (req.isRecv()) {
    startRecv(number, reserve, req);
    return;
  }
  if (req.isAllocate()) {
    startAllocate(number, reserve, req);
    return;
  }
  if (req.isCancel()) {
    cancelRecv(req.getCancel());
    credits_.give(reserve);
    complete(number, nullptr, nullptr);
    return;
  }
  bool inlineTensor = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    inlineTensor = req.isSend() && req.getSend().getPayload().isInlineTensor();
  })) {
    (void)e;  // a malformed send: dispatch meets the same error and answers it
  }
  std::shared_ptr<const Keep> keep;
  if (inlineTensor) {
    auto owned = std::make_shared<std::vector<uint64_t>>(words);
    auto reader = std::make_shared<capnp::FlatArrayMessageReader>(segment(*owned), options);
    req = reader->getRoot<proto::LaneRequest>();
    keep = std::make_shared<Keep>(owned, reader);
  }
  auto work = kj::evalNow([&]() { return dispatch(req, std::move(keep)); });
  tasks_.add(work.then(
      [this, number, reserve]() {
        credits_.give(reserve);
        complete(number, nullptr, nullptr);
      },
      [this, number, reserve](kj::Exception&& e) {
        credits_.give(reserve);
        complete(number, nullptr, &e);
      }));
}

void LaneService::startRecv(uint64_t seq, uint64_t reserve, proto::LaneRequest::Reader request) {
  std::string dataId;
  uint32_t chunkId = 0, timeoutMs = 0;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    dataId = text(request.getDataId());
    chunkId = request.getChunkId();
    timeoutMs = request.getRecv().getTimeoutMs();
  })) {
    credits_.give(reserve);
    complete(seq, nullptr, e);
    return;
  }
  if (recvs_.count(seq) != 0) {
    close("it reused the seq of a recv still waiting (" + std::to_string(seq) + ")");
    return;
  }
  PendingRecv& pending = recvs_[seq];
  pending.canceler = kj::heap<kj::Canceler>();
  pending.reserve = reserve;
  // Answered from inside the store of the chunk it waits for (TransferBackend::recvInto).
  auto answered = backend_.recvInto(
      session_, std::move(dataId), chunkId, timeoutMs,
      [this, seq, reserve](kj::Maybe<RecvReply&> reply, const kj::Exception* failure) {
        auto it = recvs_.find(seq);
        if (it != recvs_.end()) it->second.answered = true;  // a cancel now changes nothing
        credits_.give(reserve);
        complete(seq, reply, failure);
      });
  // The entry goes once the recv's promise is done (not from inside its answer, which runs
  // within it).
  tasks_.add(pending.canceler->wrap(kj::mv(answered))
                 .then([this, seq]() { recvs_.erase(seq); },
                       [this, seq](kj::Exception&&) { recvs_.erase(seq); }));
}

void LaneService::startAllocate(uint64_t seq, uint64_t reserve, proto::LaneRequest::Reader request) {
  // A group's fields live in the request's own data section: reading them cannot fail (a short
  // section reads as zeros, which allocates one byte as the call does).
  auto allocate = request.getAllocate();
  uint64_t sizeBytes = allocate.getSizeBytes();
  uint32_t timeoutMs = allocate.getTimeoutMs();
  // The same allocation, and the same wait for space, as Session.allocate. A lane that goes
  // while it waits takes the wait with it (tasks_); one that broke meanwhile cannot be answered,
  // so the space goes back at once instead of staying with the session until it ends.
  tasks_.add(backend_.allocate(session_, std::max<uint64_t>(sizeBytes, 1), timeoutMs)
                 .then(
                     [this, seq, reserve](shm::Allocation allocation) -> kj::Promise<void> {
                       credits_.give(reserve);
                       if (endpoint_.broken()) return backend_.release(session_, allocation.offset);
                       complete(seq, nullptr, nullptr, &allocation);
                       return kj::READY_NOW;
                     },
                     [this, seq, reserve](kj::Exception&& e) {
                       credits_.give(reserve);
                       complete(seq, nullptr, &e);
                     }));
}

void LaneService::cancelRecv(uint64_t seq) {
  auto it = recvs_.find(seq);
  if (it == recvs_.end() || it->second.answered) return;  // answered, or no recv of ours
  PendingRecv pending = std::move(it->second);
  recvs_.erase(it);
  // Destroys the waiting recv (it leaves the table) before this returns.
  pending.canceler->cancel("the client dropped the recv");
  credits_.give(pending.reserve);
  auto cancelled = transferError("cancelled", "the recv was dropped by its client before its data came");
  complete(seq, nullptr, &cancelled);
}

kj::Promise<void> LaneService::dispatch(proto::LaneRequest::Reader request,
                                        std::shared_ptr<const Keep> keep) {
  std::string dataId = text(request.getDataId());
  uint32_t chunkId = request.getChunkId();
  switch (request.which()) {
    case proto::LaneRequest::SEND: {
      auto send = request.getSend();
      SendRequest header;
      header.dataId = std::move(dataId);
      header.chunkId = chunkId;
      header.numChunks = send.getNumChunks();
      header.destinations = readDestinations(send.getDestinations());
      header.directLink = send.getDirectLink();
      header.directSeq = send.getDirectSeq();
      return sendPayload(backend_, session_, std::move(header), send.getPayload(), std::move(keep));
    }
    case proto::LaneRequest::RECV:
    case proto::LaneRequest::CANCEL:
    case proto::LaneRequest::ALLOCATE:
      break;  // onRecord answers them
    case proto::LaneRequest::MARK_DONE:
      return backend_.markDone(session_, dataId, chunkId);
  }
  return transferError("invalid-argument",
                       "a lane request that is none of send, recv, markDone, cancel, allocate (a "
                       "newer client?)");
}

void LaneService::complete(uint64_t seq, kj::Maybe<RecvReply&> maybeReply, const kj::Exception* failure,
                           const shm::Allocation* allocated) {
  if (endpoint_.broken()) return;
  const RecvReply* reply = nullptr;
  KJ_IF_MAYBE(r, maybeReply) { reply = r; }
  std::memset(completionBuffer_.begin(), 0, completionBuffer_.asBytes().size());
  base::FramedBuilder message(completionBuffer_.asPtr());
  auto completion = message.initRoot<proto::LaneCompletion>();
  completion.setSeq(seq);
  if (failure != nullptr) {
    // Cut on a character boundary: the text is UTF-8 (a data id may not be ASCII), and Python
    // decodes it strictly.
    auto text = utf8Prefix(failure->getDescription().cStr(), kLaneFailureMaxBytes);
    completion.setFailed(kj::heapString(text.data(), text.size()));
  } else if (allocated != nullptr) {
    auto answer = completion.initAllocated();
    answer.setOffset(allocated->offset);
    answer.setSizeBytes(allocated->sizeBytes);
  } else if (reply == nullptr) {
    completion.setDone();
  } else if (auto* object = std::get_if<transfer::ObjectChunk>(reply);
             object != nullptr && object->bytes.size() > kLaneObjectMaxBytes) {
    completion.setUseCall();
  } else {
    writeRecvResult(completion.initReceived(), *reply);
  }
  kj::Array<capnp::word> spilled;  // when the answer took more than the first segment
  kj::ArrayPtr<const capnp::word> flat = message.framedInPlace();
  if (flat.size() == 0) {
    spilled = message.finish();
    flat = spilled;
  }
  if (reply != nullptr &&
      flat.size() * sizeof(capnp::word) > kLaneObjectMaxBytes + proto::LANE_COMPLETION_BYTES) {
    // Over what the client reserved (e.g. a tensor of thousands of dimensions): it asks again by call.
    capnp::MallocMessageBuilder small(16);
    auto useCall = small.initRoot<proto::LaneCompletion>();
    useCall.setSeq(seq);
    useCall.setUseCall();
    spilled = capnp::messageToFlatArray(small);
    flat = spilled;
  }
  spdlog::trace("lane: completion {} pushed", seq);
  hop::mark(hop::Point::kLaneCompletion);
  bool pushed = endpoint_.push(flat.begin(), flat.size() * sizeof(capnp::word));
  hop::mark(hop::Point::kLanePushed);
  if (!pushed && !endpoint_.broken()) {
    close("its completion ring is full (the client reserves room for every request it makes: a "
          "client bug)");
  }
}

}  // namespace sidecar::rpc
