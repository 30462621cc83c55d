#include "client/lane_client.h"

#include <kj/debug.h>

#include "base/clock.h"
#include "base/hop_trace.h"
#include "base/spin_pacer.h"

namespace sidecar::client {

LaneAnswer::LaneAnswer(std::vector<uint64_t> words, uint64_t size)
    : words_(std::move(words)),
      reader_(kj::arrayPtr(reinterpret_cast<const capnp::word*>(words_.data()), size / sizeof(capnp::word)),
              capnp::ReaderOptions{words_.size() * 4 + 64, 16}) {}

LaneClient::LaneClient(reactor::Reactor& reactor, shm::LaneMemory memory, kj::AutoCloseFd requestBell,
                       kj::AutoCloseFd completionBell, uint32_t objectMaxBytes)
    : memory_(std::move(memory)),
      objectMaxBytes_(objectMaxBytes),
      endpoint_(reactor, memory_.completions(), kj::mv(completionBell), memory_.requests(),
                kj::mv(requestBell),
                [this](const std::vector<uint64_t>& words, uint64_t size) { onCompletion(words, size); },
                [this](const std::string& why) {
                  failAll(KJ_EXCEPTION(FAILED, kj::str("[internal] the daemon's completion ring is "
                                                       "corrupt: ", why.c_str())));
                }),
      credits_(memory_.ringBytes(), objectMaxBytes, proto::LANE_COMPLETION_BYTES) {}

LaneClient::~LaneClient() {
  *self_ = nullptr;
  failAll(KJ_EXCEPTION(DISCONNECTED, "the Sidecar was closed"));
}

kj::Maybe<kj::Promise<kj::Own<LaneAnswer>>> LaneClient::request(capnp::MallocMessageBuilder& message,
                                                                 bool recv, uint64_t* seqOut) {
  if (closed_ || endpoint_.broken()) return nullptr;
  uint64_t reserve = credits_.reservation(recv);
  if (!credits_.take(reserve)) return nullptr;
  uint64_t seq = nextSeq_;
  message.getRoot<proto::LaneRequest>().setSeq(seq);
  auto flat = capnp::messageToFlatArray(message);
  if (!endpoint_.push(flat.begin(), flat.size() * sizeof(capnp::word))) {
    credits_.give(reserve);
    return nullptr;
  }
  ++nextSeq_;
  if (seqOut != nullptr) *seqOut = seq;
  auto paf = kj::newPromiseAndFulfiller<kj::Own<LaneAnswer>>();
  pending_.emplace(seq, Pending{kj::mv(paf.fulfiller), reserve});
  return kj::mv(paf.promise);
}

void LaneClient::cancel(uint64_t recvSeq) {
  if (pending_.find(recvSeq) == pending_.end()) return;  // answered already (or the lane closed)
  capnp::MallocMessageBuilder message(16);
  message.initRoot<proto::LaneRequest>().setCancel(recvSeq);
  // Its own answer (`done`) only returns its credits: nobody waits for it.
  (void)request(message, false);
}

void LaneClient::onCompletion(const std::vector<uint64_t>& words, uint64_t size) {
  hop::mark(hop::Point::kLaneAnswerSeen);
  kj::Own<LaneAnswer> answer;
  uint64_t seq = 0;
  kj::Maybe<kj::Exception> failure;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    answer = kj::heap<LaneAnswer>(words, size);  // checks the segment table: may throw
    auto completion = answer->get();
    seq = completion.getSeq();
    if (completion.isFailed()) {
      auto text = completion.getFailed();
      failure = kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                              kj::heapString(text.begin(), text.size()));
    }
  })) {
    failAll(KJ_EXCEPTION(FAILED, kj::str("[internal] an unreadable lane completion: ", e->getDescription())));
    return;
  }
  auto it = pending_.find(seq);
  if (it == pending_.end()) {
    failAll(KJ_EXCEPTION(FAILED, kj::str("[internal] a lane completion for request ", seq,
                                         ", which is not pending")));
    return;
  }
  Pending pending = kj::mv(it->second);
  pending_.erase(it);
  credits_.give(pending.reservedBytes);
  if (seq == claimedSeq_ && !answer->get().isUseCall()) {
    // awaitAnswer takes it (a failure too). The promise, which its caller drops unread, gets a
    // null answer: a fulfiller destroyed unfulfilled would reject it with an exception, and KJ
    // records a stack trace for each (microseconds, on the latency path).
    claimedAnswer_ = kj::mv(answer);
    pending.fulfiller->fulfill(kj::Own<LaneAnswer>());
    return;
  }
  KJ_IF_MAYBE(f, failure) {
    pending.fulfiller->reject(kj::mv(*f));
  } else {
    pending.fulfiller->fulfill(kj::mv(answer));
  }
}

kj::Maybe<kj::Own<LaneAnswer>> LaneClient::awaitAnswer(uint64_t seq, uint32_t spinUs) {
  if (closed_ || pending_.find(seq) == pending_.end()) return nullptr;
  claimedSeq_ = seq;
  KJ_DEFER(claimedSeq_ = 0);
  uint64_t endNs = monotonicNs() + uint64_t{spinUs} * 1000;
  SpinPacer pacer;
  for (;;) {
    if (endpoint_.recordsWaiting()) {
      endpoint_.poll();  // every record waiting, each as the reactor would take it
      if (claimedAnswer_.get() != nullptr) return kj::mv(claimedAnswer_);
      // failAll rejected the promise, or a "use a call" answer went to it (it makes the call).
      if (closed_ || pending_.find(seq) == pending_.end()) return nullptr;
      continue;
    }
    uint64_t t = monotonicNs();
    if (t >= endNs) return nullptr;
    pacer.pause(t, monotonicNs);
  }
}

void LaneClient::failAll(const kj::Exception& exception) {
  closed_ = true;
  endpoint_.shutDown();
  auto pending = std::move(pending_);
  pending_.clear();
  credits_.reset();
  for (auto& [seq, p] : pending) p.fulfiller->reject(kj::cp(exception));
}

}  // namespace sidecar::client
