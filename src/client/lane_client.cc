#include "client/lane_client.h"

#include <kj/debug.h>

namespace sidecar::client {

namespace {

uint64_t framedBytes(uint64_t bytes) { return shm::LaneRing::kFrameBytes + ((bytes + 7) & ~uint64_t{7}); }

}  // namespace

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
                }) {
  // Completions are pushed in any order, each framed; between the records waiting to be read
  // there is at most one wrap's padding, shorter than the largest record. So reservations that
  // add up to the ring less one largest record always leave room for every push.
  uint64_t largest = framedBytes(objectMaxBytes_ + proto::LANE_COMPLETION_BYTES);
  uint64_t capacity = memory_.ringBytes();
  completionCapacityBytes_ = capacity > 2 * largest ? capacity - largest : 0;
}

LaneClient::~LaneClient() {
  failAll(KJ_EXCEPTION(DISCONNECTED, "the Sidecar was closed"));
}

kj::Maybe<kj::Promise<kj::Own<LaneAnswer>>> LaneClient::request(capnp::MallocMessageBuilder& message,
                                                                 bool recv) {
  if (closed_ || endpoint_.broken()) return nullptr;
  uint64_t reserve = framedBytes(recv ? objectMaxBytes_ + proto::LANE_COMPLETION_BYTES : proto::LANE_COMPLETION_BYTES);
  if (reservedBytes_ + reserve > completionCapacityBytes_) return nullptr;
  uint64_t seq = nextSeq_;
  message.getRoot<proto::LaneRequest>().setSeq(seq);
  auto flat = capnp::messageToFlatArray(message);
  if (!endpoint_.push(flat.begin(), flat.size() * sizeof(capnp::word))) return nullptr;
  ++nextSeq_;
  reservedBytes_ += reserve;
  auto paf = kj::newPromiseAndFulfiller<kj::Own<LaneAnswer>>();
  pending_.emplace(seq, Pending{kj::mv(paf.fulfiller), reserve});
  return kj::mv(paf.promise);
}

void LaneClient::onCompletion(const std::vector<uint64_t>& words, uint64_t size) {
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
  reservedBytes_ -= pending.reservedBytes;
  KJ_IF_MAYBE(f, failure) {
    pending.fulfiller->reject(kj::mv(*f));
  } else {
    pending.fulfiller->fulfill(kj::mv(answer));
  }
}

void LaneClient::failAll(const kj::Exception& exception) {
  closed_ = true;
  endpoint_.shutDown();
  auto pending = std::move(pending_);
  pending_.clear();
  reservedBytes_ = 0;
  for (auto& [seq, p] : pending) p.fulfiller->reject(kj::cp(exception));
}

}  // namespace sidecar::client
