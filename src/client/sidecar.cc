#include "sidecar/sidecar.h"

#include <capnp/rpc-twoparty.h>
#include <kj/debug.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>

#include "base/dtype_table.h"
#include "client/direct_sends.h"
#include "client/errors.h"
#include "client/lane_client.h"
#include "client/spin_wait.h"
#include "client/thread_loop.h"
#include "cuda/device_export.h"
#include "reactor/socket.h"
#include "shm/arena.h"
#include "reactor/uring_stream.h"
#include "sidecar.capnp.h"

namespace sidecar {

uint32_t dtypeBytes(Dtype dtype) { return base::dtypeBytesByValue(static_cast<uint8_t>(dtype)); }

const char* dtypeName(Dtype dtype) { return base::dtypeNameByValue(static_cast<uint8_t>(dtype)); }

namespace {

// The wire enum has the same order as ours (schema/sidecar.capnp).
proto::Dtype toProto(Dtype dtype) { return static_cast<proto::Dtype>(static_cast<uint16_t>(dtype)); }

Dtype fromProto(proto::Dtype dtype) {
  auto value = static_cast<uint16_t>(dtype);
  if (value > static_cast<uint16_t>(Dtype::kFloat64)) {
    throw Error(ErrorCode::kProtocolMismatch, "the daemon sent an unknown dtype " + std::to_string(value));
  }
  return static_cast<Dtype>(value);
}

Error invalid(const std::string& message) { return Error(ErrorCode::kInvalidArgument, message); }

// Bytes of a tensor of `shape`; throws for a negative dimension or an overflow.
uint64_t tensorBytes(Dtype dtype, const std::vector<int64_t>& shape) {
  uint64_t bytes = dtypeBytes(dtype);
  if (bytes == 0) throw invalid("unknown dtype " + std::to_string(static_cast<int>(dtype)));
  for (int64_t dim : shape) {
    if (dim < 0) throw invalid("tensor dimensions must be >= 0, got " + std::to_string(dim));
    if (dim != 0 && bytes > UINT64_MAX / static_cast<uint64_t>(dim)) throw invalid("tensor too large");
    bytes *= static_cast<uint64_t>(dim);
  }
  return bytes;
}

void setDestinations(capnp::List<proto::Destination>::Builder out, const Groups& groups) {
  for (size_t i = 0; i < groups.size(); ++i) {
    auto ranks = out[static_cast<unsigned>(i)].initRanks(static_cast<unsigned>(groups[i].size()));
    for (size_t r = 0; r < groups[i].size(); ++r) ranks.set(static_cast<unsigned>(r), groups[i][r]);
  }
}

// The fields every send starts with, as a call or as a lane request.
template <typename Builder>
void setSendHeader(Builder request, uint32_t numChunks, const Groups& destinations) {
  request.setNumChunks(numChunks);
  setDestinations(request.initDestinations(static_cast<unsigned>(destinations.size())), destinations);
}

void setHint(proto::MemoryHint::Builder out, const MemoryHint& hint) {
  out.setDtype(toProto(hint.dtype));
  auto shape = out.initRowShape(static_cast<unsigned>(hint.rowShape.size()));
  for (size_t i = 0; i < hint.rowShape.size(); ++i) shape.set(static_cast<unsigned>(i), hint.rowShape[i]);
}

// Copies a strided tensor into contiguous memory, innermost dimension first.
void copyStrided(kj::byte* out, const kj::byte* in, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& strides, size_t elementBytes, size_t dim) {
  if (dim + 1 == shape.size()) {
    if (strides[dim] == 1) {
      memcpy(out, in, static_cast<size_t>(shape[dim]) * elementBytes);
      return;
    }
    for (int64_t i = 0; i < shape[dim]; ++i) {
      memcpy(out + static_cast<size_t>(i) * elementBytes,
             in + static_cast<ptrdiff_t>(i * strides[dim]) * static_cast<ptrdiff_t>(elementBytes),
             elementBytes);
    }
    return;
  }
  size_t innerBytes = elementBytes;
  for (size_t d = dim + 1; d < shape.size(); ++d) innerBytes *= static_cast<size_t>(shape[d]);
  for (int64_t i = 0; i < shape[dim]; ++i) {
    copyStrided(out + static_cast<size_t>(i) * innerBytes,
                in + static_cast<ptrdiff_t>(i * strides[dim]) * static_cast<ptrdiff_t>(elementBytes),
                shape, strides, elementBytes, dim + 1);
  }
}

bool isContiguous(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  if (strides.empty()) return true;
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

// Copies the `sizeBytes` of `tensor` to `out`, contiguous (row-major), whatever its strides.
void copyContiguous(kj::byte* out, const TensorRef& tensor, uint64_t sizeBytes) {
  if (sizeBytes == 0) return;
  if (isContiguous(tensor.shape, tensor.strides)) {
    memcpy(out, tensor.data, sizeBytes);
  } else {
    copyStrided(out, static_cast<const kj::byte*>(tensor.data), tensor.shape, tensor.strides,
                dtypeBytes(tensor.dtype), 0);
  }
}

// Fills the shape list of a schema tensor (Tensor, InlineTensor, DeviceTensor).
template <typename TensorBuilder>
void writeShape(TensorBuilder t, const std::vector<int64_t>& shape) {
  auto out = t.initShape(static_cast<unsigned>(shape.size()));
  for (size_t i = 0; i < shape.size(); ++i) out.set(static_cast<unsigned>(i), shape[i]);
}

}  // namespace

struct Sidecar::Impl final : private kj::TaskSet::ErrorHandler {
  Impl(const RankConfig& config, kj::AutoCloseFd fd)
      : loop(threadLoop.get()),
        stream(makeStream(loop, kj::mv(fd))),
        rpc(kj::heap<capnp::TwoPartyClient>(static_cast<kj::AsyncCapabilityStream&>(*stream), 4)),
        bootstrap(rpc->bootstrap().castAs<proto::Sidecar>()),
        rank(config.rank),
        background(*this) {}

  // The registration answer carries the arena's fd: no read-ahead until it has arrived (see
  // UringStream::setReadAhead).
  static kj::Own<reactor::UringStream> makeStream(reactor::ReactorLoop& loop, kj::AutoCloseFd fd) {
    auto stream = kj::heap<reactor::UringStream>(loop.reactor(), kj::mv(fd));
    stream->setReadAhead(false);
    return stream;
  }

  ~Impl() {
    direct.reset();  // its route requests are calls on the session
    watchDisconnect = nullptr;
    lane = nullptr;
    session = nullptr;
    bootstrap = nullptr;
    rpc = nullptr;
    stream = nullptr;
    arena.reset();  // unmaps
  }

  void taskFailed(kj::Exception&& exception) override {
    // An unwaited send failed: keep the error for the next call on its data id.
    failedSends.emplace_back(client::translate(exception, "send"));
  }

  void throwDeferred() {
    if (failedSends.empty()) return;
    Error error = failedSends.front();
    failedSends.erase(failedSends.begin());
    throw Error(error.code(), std::string(error.what()) + " (from an earlier send whose handle was dropped)");
  }

  kj::WaitScope& ws() { return loop.waitScope(); }

  // Every wait for an answer from the daemon (see client/spin_wait.h).
  template <typename T>
  T wait(kj::Promise<T>&& promise) {
    // Writes the loop buffered in the turns before the answer (e.g. a Finish) leave now, not at
    // the next call (UringStream coalesces writes until the reactor polls or sleeps).
    KJ_DEFER(loop.reactor().flush());
    return client::spinThenWait(kj::mv(promise), ws(), spinUsHere());
  }

  // How long a wait polls before it sleeps on this CPU: waitSpinUs, or 0 on a CPU a daemon
  // reactor is pinned to (there the answer comes from a thread that needs this very CPU, and
  // polling only delays it: docs/PERFORMANCE.md).
  uint32_t spinUsHere() const {
    int cpu = sched_getcpu();
    bool shared = cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &daemonCpus);
    return shared ? 0 : waitSpinUs;
  }

  client::ThreadLoop threadLoop;  // first: destroyed last
  reactor::ReactorLoop& loop;
  kj::Own<reactor::UringStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  proto::Sidecar::Client bootstrap;
  proto::Session::Client session = nullptr;
  int32_t rank;
  uint32_t waitSpinUs = 0;
  cpu_set_t daemonCpus{};  // the CPUs the daemon's reactors are pinned to (from info at connect)
  std::optional<shm::ArenaView> arena;
  void* arenaBase = nullptr;
  uint64_t arenaBytes = 0;
  // Tensors up to this size go inline in the send call (one round trip instead of allocate +
  // send); 0: the daemon does not take them (an older sidecard).
  uint64_t inlineTensorMaxBytes = 0;
  kj::TaskSet background;
  std::vector<Error> failedSends;
  // The session's lane (null: the daemon has none, or SIDECAR_LANE=0), and what fails its
  // pending requests when the connection breaks.
  kj::Own<client::LaneClient> lane;
  bool laneAllocates = false;  // the lane takes allocate requests too (openLane said so)
  kj::Promise<void> watchDisconnect = nullptr;
  // Small tensors for another node go there from this process (null: SIDECAR_DIRECT_SENDS=0).
  std::unique_ptr<client::DirectSends> direct;

  // waitForWake()/wake(): `woken` is set by wake(); `wakeFulfiller` exists while the owner sleeps.
  mutable std::mutex wakeMutex;
  bool woken = false;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> wakeFulfiller;
  std::unique_ptr<cuda::DeviceExporter> devices;  // created on the first GPU call

  cuda::DeviceExporter& deviceExporter() {
    if (!devices) devices = cuda::DeviceExporter::create();
    return *devices;
  }
};

namespace {

// A send as a lane request when the lane takes it, else as a call. `fill` writes the payload
// (it may run twice: a lane without room falls back to the call). ImplT is Sidecar::Impl.
// `direct`: the tensor's contiguous bytes, when it may go to another node directly.
template <typename ImplT, typename Fill>
kj::Promise<void> sendPromise(ImplT& impl, const std::string& dataId, uint32_t chunkId,
                              uint32_t numChunks, const Groups& destinations, Fill&& fill,
                              const client::DirectSends::Tensor* direct = nullptr) {
  std::optional<client::DirectSends::Sent> sent;
  if (direct != nullptr && impl.direct) {
    sent = impl.direct->trySend(destinations, dataId, chunkId, numChunks, *direct);
  }
  if (impl.lane.get() != nullptr) {
    // Sized for the usual request (a tensor's descriptor, a few destinations: ~30 words); an
    // inline body or a long id takes a second segment. A larger first segment is zeroed for
    // nothing on every send (8 KiB was ~75 ns more per request).
    capnp::MallocMessageBuilder message(64);
    auto request = message.initRoot<proto::LaneRequest>();
    request.setDataId(dataId);
    request.setChunkId(chunkId);
    auto send = request.initSend();
    setSendHeader(send, numChunks, destinations);
    fill(send.initPayload());
    if (sent) {
      send.setDirectLink(sent->link);
      send.setDirectSeq(sent->seq);
    }
    KJ_IF_MAYBE(answer, impl.lane->request(message, false)) {
      return answer->ignoreResult();
    }
  }
  auto request = impl.session.sendRequest();
  request.setDataId(dataId);
  request.setChunkId(chunkId);
  setSendHeader<proto::Session::SendParams::Builder>(request, numChunks, destinations);
  fill(request.initPayload());
  if (sent) {
    request.setDirectLink(sent->link);
    request.setDirectSeq(sent->seq);
  }
  return request.send().ignoreResult();
}

// What recv returns, from the daemon's answer (a call's or the lane's).
template <typename ImplT>
Received toReceived(ImplT& impl, proto::RecvResult::Reader result) {
  Received out;
  switch (result.which()) {
    case proto::RecvResult::TENSOR: {
      auto t = result.getTensor();
      out.kind = Received::Kind::kTensor;
      out.tensor.dtype = fromProto(t.getDtype());
      for (int64_t dim : t.getShape()) out.tensor.shape.push_back(dim);
      out.tensor.sizeBytes = t.getSizeBytes();
      if (t.getOffset() > impl.arenaBytes || out.tensor.sizeBytes > impl.arenaBytes - t.getOffset()) {
        throw Error(ErrorCode::kInternal, "the daemon pointed outside the arena");
      }
      out.tensor.data = static_cast<const kj::byte*>(impl.arenaBase) + t.getOffset();
      break;
    }
    case proto::RecvResult::OBJECT: {
      auto o = result.getObject();
      out.kind = Received::Kind::kObject;
      out.object.typeTag = o.getTypeTag();
      auto bytes = o.getBytes();
      out.object.bytes.assign(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
      break;
    }
    default:
      out.kind = Received::Kind::kEndOfStream;
  }
  return out;
}

template <typename ImplT>
kj::Promise<Received> recvCall(ImplT& impl, const std::string& dataId, uint32_t chunkId,
                               uint32_t timeoutMs) {
  auto request = impl.session.recvRequest();
  request.setDataId(dataId);
  request.setChunkId(chunkId);
  request.setTimeoutMs(timeoutMs);
  return request.send().then([&impl](capnp::Response<proto::Session::RecvResults> response) {
    return toReceived(impl, response.getResult());
  });
}

// What a lane recv's answer means: the data, a failure (thrown as the daemon's "[kind] message",
// as a rejected lane promise would), or nothing: "ask by call" (the answer did not fit the lane).
template <typename ImplT>
std::optional<Received> fromLaneAnswer(ImplT& impl, client::LaneAnswer& answer) {
  auto completion = answer.get();
  if (completion.isReceived()) return toReceived(impl, completion.getReceived());
  if (completion.isUseCall()) return std::nullopt;
  if (completion.isFailed()) {
    auto text = completion.getFailed();
    kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                          kj::heapString(text.begin(), text.size())));
  }
  throw Error(ErrorCode::kProtocolMismatch, "the daemon answered a lane recv with neither data nor an error");
}

// recv on the lane when it takes it (again as a call when the answer does not fit the lane).
// `laneSeq` gets the lane request's seq (0: it went as a call).
template <typename ImplT>
kj::Promise<Received> recvPromise(ImplT& impl, const std::string& dataId, uint32_t chunkId,
                                  uint32_t timeoutMs, uint64_t* laneSeq = nullptr) {
  if (impl.lane.get() != nullptr) {
    capnp::MallocMessageBuilder message(128);
    auto request = message.initRoot<proto::LaneRequest>();
    request.setDataId(dataId);
    request.setChunkId(chunkId);
    request.initRecv().setTimeoutMs(timeoutMs);
    uint64_t seq = 0;
    KJ_IF_MAYBE(answer, impl.lane->request(message, true, &seq)) {
      if (laneSeq != nullptr) *laneSeq = seq;
      // Dropped before its answer came (its handle went unwaited), the recv is withdrawn from
      // the daemon instead of holding its waiter and lane credits until its timeout.
      auto lane = impl.lane->self();
      return answer->then([&impl, dataId, chunkId, timeoutMs](kj::Own<client::LaneAnswer> a) -> kj::Promise<Received> {
        // (Null only when RecvHandle::wait took the answer past KJ; it then drops this unread.)
        KJ_REQUIRE(a.get() != nullptr, "a lane recv's answer was taken twice (a bug)");
        if (auto received = fromLaneAnswer(impl, *a)) return kj::mv(*received);
        return recvCall(impl, dataId, chunkId, timeoutMs);
      }).attach(kj::defer([lane, seq]() {
        if (*lane != nullptr) (*lane)->cancel(seq);
      }));
    }
  }
  return recvCall(impl, dataId, chunkId, timeoutMs);
}

Error deviceError(const cuda::DeviceError& e, const char* where) {
  if (e.unavailable()) {
    return Error(ErrorCode::kGpuUnavailable, std::string(where) + ": " + e.what() +
                                                 "; no usable GPU in this process: send host "
                                                 "tensors instead");
  }
  return Error(ErrorCode::kInvalidArgument, std::string(where) + ": " + e.what());
}

}  // namespace

struct SendHandle::State {
  Sidecar::Impl* impl;
  kj::Promise<void> promise;
};

SendHandle::SendHandle() = default;
SendHandle::SendHandle(SendHandle&&) noexcept = default;
SendHandle& SendHandle::operator=(SendHandle&&) noexcept = default;
SendHandle::~SendHandle() {
  // Not waited: let it finish in the background; a failure surfaces on a later call.
  if (state_) state_->impl->background.add(kj::mv(state_->promise));
}

void SendHandle::wait() {
  if (!state_) return;
  auto state = std::move(state_);
  client::call("send", [&]() { state->impl->wait(kj::mv(state->promise)); });
}

struct RecvHandle::State {
  Sidecar::Impl* impl;
  kj::Promise<Received> promise;
  uint64_t laneSeq = 0;  // a recv on the lane: its request's seq (0: a call)
};

RecvHandle::RecvHandle() = default;
RecvHandle::RecvHandle(RecvHandle&&) noexcept = default;
RecvHandle& RecvHandle::operator=(RecvHandle&&) noexcept = default;
RecvHandle::~RecvHandle() = default;

Received RecvHandle::wait() {
  if (!state_) throw invalid("recv: this handle was already waited on");
  auto state = std::move(state_);
  Received out;
  client::call("recv", [&]() {
    Sidecar::Impl& impl = *state->impl;
    // The latency path: a lane recv's answer taken straight off the completion ring while this
    // thread spins, past KJ's turns (~1.5 us on the hosts we measure: docs/PERFORMANCE.md).
    uint32_t spinUs = state->laneSeq != 0 && impl.lane.get() != nullptr ? impl.spinUsHere() : 0;
    if (spinUs > 0) {
      impl.loop.reactor().flush();  // calls buffered before this one leave now
      KJ_IF_MAYBE(answer, impl.lane->awaitAnswer(state->laneSeq, spinUs)) {
        { auto taken = kj::mv(state->promise); }  // its answer was taken here: nothing to wait for
        auto received = fromLaneAnswer(impl, **answer);
        KJ_REQUIRE(received.has_value(), "awaitAnswer took a 'use a call' answer (a bug)");
        out = kj::mv(*received);
        return;
      }
    }
    out = impl.wait(kj::mv(state->promise));
  });
  return out;
}

Sidecar::Sidecar(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Sidecar::Sidecar(Sidecar&&) noexcept = default;
Sidecar& Sidecar::operator=(Sidecar&&) noexcept = default;
Sidecar::~Sidecar() = default;

int32_t Sidecar::rank() const { return impl_->rank; }
const void* Sidecar::arenaBase() const { return impl_->arenaBase; }
uint64_t Sidecar::arenaBytes() const { return impl_->arenaBytes; }

namespace {

// RankConfig::waitSpinUs, or $SIDECAR_WAIT_SPIN_US, or the default; checked.
uint32_t resolveWaitSpinUs(const std::optional<uint32_t>& configured) {
  constexpr uint32_t kDefaultWaitSpinUs = 50;
  if (configured) {
    if (*configured > client::kWaitSpinUsMax) {
      throw invalid("waitSpinUs " + std::to_string(*configured) + " is over the limit of " +
                    std::to_string(client::kWaitSpinUsMax) + " us; use 0 to sleep at once");
    }
    return *configured;
  }
  const char* env = std::getenv("SIDECAR_WAIT_SPIN_US");
  if (env == nullptr || *env == '\0') return kDefaultWaitSpinUs;
  char* end = nullptr;
  errno = 0;
  unsigned long value = std::strtoul(env, &end, 10);
  if (*end != '\0' || errno != 0 || env[0] == '-' || value > client::kWaitSpinUsMax) {
    throw invalid(std::string("SIDECAR_WAIT_SPIN_US='") + env + "' is not a number of "
                  "microseconds from 0 to " + std::to_string(client::kWaitSpinUsMax) +
                  "; fix or unset it");
  }
  return static_cast<uint32_t>(value);
}

// $SIDECAR_LANE=0 keeps every request a call (for comparisons and diagnosis).
bool lanesWanted() {
  const char* env = std::getenv("SIDECAR_LANE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  throw invalid(std::string("SIDECAR_LANE='") + env + "' must be 0 (calls only) or 1 (the default)");
}

// Takes the fd a capability carries (a dup: the capability keeps its own).
template <typename ImplT, typename Handle>
kj::AutoCloseFd takeFd(ImplT& impl, Handle handle, const char* what) {
  KJ_IF_MAYBE(fd, impl.wait(handle.getFd())) {
    int copy = fcntl(*fd, F_DUPFD_CLOEXEC, 0);
    if (copy >= 0) return kj::AutoCloseFd(copy);
    throw Error(ErrorCode::kInternal, std::string("cannot keep the lane's ") + what + ": " + strerror(errno));
  }
  throw Error(ErrorCode::kInternal, std::string("the daemon did not pass the lane's ") + what);
}

// The session's lane, when the daemon serves one. Without one (an older daemon answers
// `unimplemented`; a daemon out of fds or memory fails the call and logs why) every request is a
// call, which means the same: a lane is never worth failing a connect for. A lost connection
// still fails the connect.
template <typename ImplT>
void openLane(ImplT& impl) {
  using Response = capnp::Response<proto::Session::OpenLaneResults>;
  auto call = impl.session.openLaneRequest().send().then(
      [](Response r) -> kj::Maybe<Response> { return kj::mv(r); },
      [](kj::Exception&& e) -> kj::Maybe<Response> {
        if (e.getType() == kj::Exception::Type::DISCONNECTED) kj::throwFatalException(kj::mv(e));
        return nullptr;
      });
  KJ_IF_MAYBE(response, impl.wait(kj::mv(call))) {
    auto memoryFd = takeFd(impl, response->getMemory(), "memory");
    auto requestBell = takeFd(impl, response->getRequestBell(), "request doorbell");
    auto completionBell = takeFd(impl, response->getCompletionBell(), "completion doorbell");
    auto memory = shm::LaneMemory::map(memoryFd.get());
    if (!memory.ok()) return;  // a layout this client does not know: calls only
    impl.lane = kj::heap<client::LaneClient>(impl.loop.reactor(), std::move(memory).value(),
                                             kj::mv(requestBell), kj::mv(completionBell),
                                             response->getObjectMaxBytes());
    impl.laneAllocates = response->getAllocates();
    auto* lane = impl.lane.get();
    impl.watchDisconnect = impl.rpc->onDisconnect().then([lane]() {
      lane->failAll(KJ_EXCEPTION(DISCONNECTED, "the daemon closed the connection"));
    }, [lane](kj::Exception&& e) { lane->failAll(e); }).eagerlyEvaluate(nullptr);
  }
}

}  // namespace

Sidecar Sidecar::connect(const RankConfig& config) {
  uint32_t waitSpinUs = resolveWaitSpinUs(config.waitSpinUs);
  kj::AutoCloseFd fd;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { fd = reactor::connectUnix(config.socketPath); })) {
    throw Error(ErrorCode::kUnavailable, e->getDescription().cStr());
  }
  auto impl = std::make_unique<Impl>(config, kj::mv(fd));
  impl->waitSpinUs = waitSpinUs;
  client::call("register", [&]() {
    auto request = impl->bootstrap.registerRequest();
    auto r = request.initRegistration();
    r.setRank(config.rank);
    std::vector<int32_t> group = config.group.empty() ? std::vector<int32_t>{config.rank} : config.group;
    auto g = r.initGroup(static_cast<unsigned>(group.size()));
    for (size_t i = 0; i < group.size(); ++i) g.set(static_cast<unsigned>(i), group[i]);
    setHint(r.initSendHint(), config.sendHint);
    setHint(r.initRecvHint(), config.recvHint.rowShape.empty() ? config.sendHint : config.recvHint);
    r.setConcurrentCopy(config.concurrentCopy);
    auto response = impl->wait(request.send());
    impl->session = response.getSession();
    impl->arenaBytes = response.getArenaBytes();
    impl->inlineTensorMaxBytes = response.getInlineTensorMaxBytes();
    auto arenaFd = impl->wait(response.getArena().getFd());
    KJ_IF_MAYBE(raw, arenaFd) {
      // 2 MiB aligned, so a THP-backed arena maps with huge pages here too.
      auto view = shm::ArenaView::map(*raw, impl->arenaBytes);
      if (!view.ok()) {
        throw Error(ErrorCode::kInternal, "cannot map the node's arena: " + view.error().message);
      }
      impl->arena.emplace(std::move(view).value());
      impl->arenaBase = impl->arena->base();
      if (lanesWanted()) openLane(*impl);
      if (client::directSendsWanted()) {
        impl->direct = std::make_unique<client::DirectSends>(impl->session, config.rank, []() {
          std::string why;
          return client::DirectWire::create(why);
        });
      }
      impl->stream->setReadAhead(true);  // no more fds will come
    } else {
      throw Error(ErrorCode::kInternal, "the daemon did not pass the arena's file descriptor");
    }
    if (impl->waitSpinUs > 0) {
      auto info = impl->wait(impl->bootstrap.infoRequest().send());
      for (auto core : info.getInfo().getCores()) {
        int cpu = core.getCpu();
        if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &impl->daemonCpus);
      }
    }
  });
  return Sidecar(std::move(impl));
}

ArenaTensor Sidecar::allocateTensor(Dtype dtype, const std::vector<int64_t>& shape,
                                    uint32_t timeoutMs) {
  impl_->throwDeferred();
  ArenaTensor out;
  out.dtype_ = dtype;
  out.shape_ = shape;
  out.sizeBytes_ = tensorBytes(dtype, shape);
  client::call("allocate", [&]() {
    uint64_t offset = 0, sizeBytes = 0;
    bool allocated = false;
    // Through the lane where the daemon takes it there: no system call when the daemon polls.
    if (impl_->lane.get() != nullptr && impl_->laneAllocates) {
      capnp::MallocMessageBuilder message(32);
      auto allocate = message.initRoot<proto::LaneRequest>().initAllocate();
      allocate.setSizeBytes(std::max<uint64_t>(out.sizeBytes_, 1));
      allocate.setTimeoutMs(timeoutMs);
      KJ_IF_MAYBE(answer, impl_->lane->request(message, false)) {
        kj::Own<client::LaneAnswer> completion = impl_->wait(kj::mv(*answer));
        auto result = completion->get();
        if (!result.isAllocated()) {
          throw Error(ErrorCode::kInternal, "the daemon answered a lane allocate with something else");
        }
        offset = result.getAllocated().getOffset();
        sizeBytes = result.getAllocated().getSizeBytes();
        allocated = true;
      }
    }
    if (!allocated) {
      auto request = impl_->session.allocateRequest();
      request.setSizeBytes(std::max<uint64_t>(out.sizeBytes_, 1));
      request.setTimeoutMs(timeoutMs);
      auto response = impl_->wait(request.send());
      offset = response.getOffset();
      sizeBytes = response.getSizeBytes();
    }
    if (offset + sizeBytes > impl_->arenaBytes || offset + sizeBytes < offset) {
      throw Error(ErrorCode::kInternal, "the daemon allocated outside the arena");
    }
    out.offset_ = offset;
    out.data_ = static_cast<kj::byte*>(impl_->arenaBase) + out.offset_;
  });
  return out;
}

void Sidecar::release(ArenaTensor&& tensor) {
  client::call("release", [&]() {
    auto request = impl_->session.releaseRequest();
    request.setOffset(tensor.offset_);
    impl_->wait(request.send());
  });
  tensor.data_ = nullptr;
}

SendHandle Sidecar::send(const std::string& dataId, const TensorRef& tensor,
                         const Groups& destinations, uint32_t chunkId, uint32_t numChunks) {
  uint64_t bytes = tensorBytes(tensor.dtype, tensor.shape);
  if (!tensor.strides.empty() && tensor.strides.size() != tensor.shape.size()) {
    throw invalid("tensor strides must be empty or one per dimension");
  }
  if (bytes > 0 && tensor.data == nullptr) throw invalid("tensor data is null");
  if (bytes <= impl_->inlineTensorMaxBytes) {
    return sendInline(dataId, tensor, bytes, destinations, chunkId, numChunks);
  }
  ArenaTensor arena = allocateTensor(tensor.dtype, tensor.shape);
  copyContiguous(static_cast<kj::byte*>(arena.data_), tensor, bytes);
  return send(dataId, std::move(arena), destinations, chunkId, numChunks);
}

SendHandle Sidecar::sendInline(const std::string& dataId, const TensorRef& tensor,
                               uint64_t sizeBytes, const Groups& destinations, uint32_t chunkId,
                               uint32_t numChunks) {
  impl_->throwDeferred();
  SendHandle handle;
  client::call("send", [&]() {
    client::DirectSends::Tensor direct{toProto(tensor.dtype), tensor.shape, tensor.data, sizeBytes};
    bool contiguous = isContiguous(tensor.shape, tensor.strides);
    auto promise = sendPromise(*impl_, dataId, chunkId, numChunks, destinations,
                               [&](proto::Payload::Builder payload) {
                                 auto t = payload.initInlineTensor();
                                 t.setDtype(toProto(tensor.dtype));
                                 writeShape(t, tensor.shape);
                                 copyContiguous(t.initBytes(static_cast<unsigned>(sizeBytes)).begin(),
                                                tensor, sizeBytes);
                               },
                               contiguous ? &direct : nullptr);
    handle.state_ = std::make_unique<SendHandle::State>(SendHandle::State{impl_.get(), kj::mv(promise)});
  });
  return handle;
}

SendHandle Sidecar::send(const std::string& dataId, ArenaTensor&& tensor,
                         const Groups& destinations, uint32_t chunkId, uint32_t numChunks) {
  if (tensor.data_ == nullptr) throw invalid("send: the arena tensor was already sent or released");
  impl_->throwDeferred();
  SendHandle handle;
  client::call("send", [&]() {
    client::DirectSends::Tensor direct{toProto(tensor.dtype_), tensor.shape_, tensor.data_,
                                       tensor.sizeBytes_};
    auto promise = sendPromise(*impl_, dataId, chunkId, numChunks, destinations,
                               [&](proto::Payload::Builder payload) {
                                 auto t = payload.initTensor();
                                 t.setDtype(toProto(tensor.dtype_));
                                 writeShape(t, tensor.shape_);
                                 t.setOffset(tensor.offset_);
                                 t.setSizeBytes(tensor.sizeBytes_);
                               },
                               &direct);
    handle.state_ = std::make_unique<SendHandle::State>(SendHandle::State{impl_.get(), kj::mv(promise)});
  });
  tensor.data_ = nullptr;
  return handle;
}

SendHandle Sidecar::send(const std::string& dataId, const Object& object,
                         const Groups& destinations, uint32_t chunkId, uint32_t numChunks) {
  impl_->throwDeferred();
  SendHandle handle;
  client::call("send", [&]() {
    auto promise = sendPromise(*impl_, dataId, chunkId, numChunks, destinations,
                               [&](proto::Payload::Builder payload) {
                                 auto o = payload.initObject();
                                 o.setTypeTag(object.typeTag);
                                 o.setBytes(kj::arrayPtr(reinterpret_cast<const kj::byte*>(object.bytes.data()),
                                                         object.bytes.size()));
                               });
    handle.state_ = std::make_unique<SendHandle::State>(SendHandle::State{impl_.get(), kj::mv(promise)});
  });
  return handle;
}

SendHandle Sidecar::send(const std::string& dataId, const DeviceTensorRef& tensor,
                         const Groups& destinations, uint32_t chunkId, uint32_t numChunks) {
  uint64_t bytes = tensorBytes(tensor.dtype, tensor.shape);
  if (!tensor.strides.empty() && tensor.strides.size() != tensor.shape.size()) {
    throw invalid("tensor strides must be empty or one per dimension");
  }
  if (!isContiguous(tensor.shape, tensor.strides)) {
    throw invalid("a GPU tensor must be contiguous (make it so on the GPU first, e.g. "
                  ".contiguous() in PyTorch)");
  }
  if (tensor.data == nullptr) throw invalid("the GPU tensor's data is null");
  impl_->throwDeferred();
  cuda::ExportedTensor exported;
  try {
    exported = impl_->deviceExporter().exportTensor(tensor.data, bytes, tensor.device, tensor.stream);
  } catch (const cuda::DeviceError& e) {
    throw deviceError(e, "send");
  }
  if (exported.stage) {
    // A small allocation (see cuda::ExportedTensor::stage): copied here, then sent zero copy.
    ArenaTensor arena = allocateTensor(tensor.dtype, tensor.shape);
    try {
      impl_->deviceExporter().stageToArena(arena.data_, tensor.data, bytes, tensor.device,
                                           tensor.stream, impl_->arenaBase, impl_->arenaBytes);
    } catch (const cuda::DeviceError& e) {
      release(std::move(arena));
      throw deviceError(e, "send");
    }
    return send(dataId, std::move(arena), destinations, chunkId, numChunks);
  }
  SendHandle handle;
  client::call("send", [&]() {
    auto request = impl_->session.sendDeviceRequest();
    request.setDataId(dataId);
    request.setChunkId(chunkId);
    request.setNumChunks(numChunks);
    setDestinations(request.initDestinations(static_cast<unsigned>(destinations.size())), destinations);
    auto t = request.initTensor();
    t.setDtype(toProto(tensor.dtype));
    writeShape(t, tensor.shape);
    t.setSizeBytes(bytes);
    t.setMemHandle(kj::arrayPtr(exported.memHandle.data(), exported.memHandle.size()));
    t.setOffsetBytes(exported.offsetBytes);
    t.setAllocationBytes(exported.allocationBytes);
    t.setDeviceUuid(kj::arrayPtr(exported.deviceUuid.data(), exported.deviceUuid.size()));
    t.setEventHandle(kj::arrayPtr(exported.eventHandle.data(), exported.eventHandle.size()));
    handle.state_ = std::make_unique<SendHandle::State>(
        SendHandle::State{impl_.get(), request.send().ignoreResult()});
  });
  return handle;
}

Received Sidecar::recvToDevice(const std::string& dataId, const DeviceTensorRef& destination,
                               uint32_t chunkId, uint32_t timeoutMs) {
  uint64_t capacity = tensorBytes(destination.dtype, destination.shape);
  if (destination.data == nullptr) throw invalid("recvToDevice: the destination's data is null");
  if (!isContiguous(destination.shape, destination.strides)) {
    throw invalid("recvToDevice: the destination must be contiguous");
  }
  Received received = recv(dataId, chunkId, timeoutMs);
  if (received.kind != Received::Kind::kTensor) {
    throw invalid("recvToDevice: chunk " + std::to_string(chunkId) + " of '" + dataId +
                  "' is not a tensor; use recv()");
  }
  if (received.tensor.sizeBytes > capacity) {
    throw invalid("recvToDevice: the chunk has " + std::to_string(received.tensor.sizeBytes) +
                  " bytes, the destination only " + std::to_string(capacity));
  }
  try {
    impl_->deviceExporter().copyToDevice(destination.data, received.tensor.data,
                                         received.tensor.sizeBytes, destination.device,
                                         destination.stream, impl_->arenaBase, impl_->arenaBytes);
  } catch (const cuda::DeviceError& e) {
    throw deviceError(e, "recvToDevice");
  }
  return received;
}

void Sidecar::closeStream(const std::string& dataId, uint32_t numChunks, const Groups& destinations) {
  impl_->throwDeferred();
  client::call("closeStream", [&]() {
    auto request = impl_->session.closeStreamRequest();
    request.setDataId(dataId);
    request.setNumChunks(numChunks);
    setDestinations(request.initDestinations(static_cast<unsigned>(destinations.size())), destinations);
    impl_->wait(request.send());
  });
}

RecvHandle Sidecar::recvAsync(const std::string& dataId, uint32_t chunkId, uint32_t timeoutMs) {
  RecvHandle handle;
  client::call("recv", [&]() {
    handle.state_ = std::make_unique<RecvHandle::State>(
        RecvHandle::State{impl_.get(), nullptr, 0});
    handle.state_->promise = recvPromise(*impl_, dataId, chunkId, timeoutMs, &handle.state_->laneSeq);
  });
  return handle;
}

Received Sidecar::recv(const std::string& dataId, uint32_t chunkId, uint32_t timeoutMs) {
  return recvAsync(dataId, chunkId, timeoutMs).wait();
}

void Sidecar::markDone(const std::string& dataId, uint32_t chunkId) {
  client::call("markDone", [&]() {
    if (impl_->lane.get() != nullptr) {
      capnp::MallocMessageBuilder message(128);
      auto request = message.initRoot<proto::LaneRequest>();
      request.setDataId(dataId);
      request.setChunkId(chunkId);
      request.setMarkDone();
      KJ_IF_MAYBE(answer, impl_->lane->request(message, false)) {
        impl_->wait(kj::mv(*answer));
        return;
      }
    }
    auto request = impl_->session.markDoneRequest();
    request.setDataId(dataId);
    request.setChunkId(chunkId);
    impl_->wait(request.send());
  });
}

// Completion callbacks and the owner thread's sleep (for the Python package).

void SendHandle::onDone(std::function<void(const Error* error)> onDone) {
  if (!state_) throw invalid("send: this handle was already waited on");
  auto state = std::move(state_);
  state->impl->background.add(state->promise.then(
      [onDone]() { onDone(nullptr); },
      [onDone](kj::Exception&& e) {
        Error error = client::translate(e, "send");
        onDone(&error);
      }));
}

void RecvHandle::onDone(std::function<void(Received* received, const Error* error)> onDone) {
  if (!state_) throw invalid("recv: this handle was already waited on");
  auto state = std::move(state_);
  state->impl->background.add(state->promise.then(
      [onDone](Received received) { onDone(&received, nullptr); },
      [onDone](kj::Exception&& e) {
        Error error = client::translate(e, "recv");
        onDone(nullptr, &error);
      }));
}

void Sidecar::waitForWake() {
  kj::Promise<void> woken = nullptr;
  {
    std::lock_guard<std::mutex> lock(impl_->wakeMutex);
    if (impl_->woken) {
      impl_->woken = false;
      return;
    }
    auto pair = kj::newPromiseAndCrossThreadFulfiller<void>();
    impl_->wakeFulfiller = kj::mv(pair.fulfiller);
    woken = kj::mv(pair.promise);
  }
  client::call("waitForWake", [&]() {
    KJ_DEFER(impl_->loop.reactor().flush());  // see Impl::wait
    woken.wait(impl_->ws());
  });
  std::lock_guard<std::mutex> lock(impl_->wakeMutex);
  // A wake() after the fulfilment and before here needs no second return: the caller looks at
  // its work after this returns.
  impl_->woken = false;
  impl_->wakeFulfiller = nullptr;
}

void Sidecar::wake() const {
  std::lock_guard<std::mutex> lock(impl_->wakeMutex);
  impl_->woken = true;
  if (impl_->wakeFulfiller.get() != nullptr && impl_->wakeFulfiller->isWaiting()) {
    impl_->wakeFulfiller->fulfill();
  }
}

}  // namespace sidecar
