#include "rpc/session_service.h"

#include <algorithm>
#include <cstring>
#include <string>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

namespace sidecar::rpc {

namespace {

void writeTensor(proto::Tensor::Builder out, const TensorDescriptor& tensor) {
  out.setDtype(toProto(tensor.dtype));
  auto shape = out.initShape(static_cast<unsigned>(tensor.shape.size()));
  for (size_t i = 0; i < tensor.shape.size(); ++i) shape.set(static_cast<unsigned>(i), tensor.shape[i]);
  out.setOffset(tensor.offset);
  out.setSizeBytes(tensor.sizeBytes);
}

}  // namespace

std::string text(capnp::Text::Reader t) { return std::string(t.cStr(), t.size()); }

kj::Exception transferError(const char* kind, const std::string& message) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                       kj::str("[", kind, "] ", message.c_str()));
}

kj::Exception transferError(const transfer::Error& error) {
  return transferError(transfer::errcName(error.code), error.message);
}

transfer::Dtype fromProto(proto::Dtype dtype) {
  using D = transfer::Dtype;
  switch (dtype) {
    case proto::Dtype::BOOL: return D::kBool;
    case proto::Dtype::UINT8: return D::kUint8;
    case proto::Dtype::INT8: return D::kInt8;
    case proto::Dtype::INT16: return D::kInt16;
    case proto::Dtype::INT32: return D::kInt32;
    case proto::Dtype::INT64: return D::kInt64;
    case proto::Dtype::FLOAT16: return D::kFloat16;
    case proto::Dtype::BFLOAT16: return D::kBFloat16;
    case proto::Dtype::FLOAT32: return D::kFloat32;
    case proto::Dtype::FLOAT64: return D::kFloat64;
  }
  throw transferError("invalid-argument",
                      "unknown dtype " + std::to_string(static_cast<int>(dtype)) +
                          "; the client is newer than this daemon");
}

proto::Dtype toProto(transfer::Dtype dtype) {
  using D = transfer::Dtype;
  switch (dtype) {
    case D::kBool: return proto::Dtype::BOOL;
    case D::kUint8: return proto::Dtype::UINT8;
    case D::kInt8: return proto::Dtype::INT8;
    case D::kInt16: return proto::Dtype::INT16;
    case D::kInt32: return proto::Dtype::INT32;
    case D::kInt64: return proto::Dtype::INT64;
    case D::kFloat16: return proto::Dtype::FLOAT16;
    case D::kBFloat16: return proto::Dtype::BFLOAT16;
    case D::kFloat32: return proto::Dtype::FLOAT32;
    case D::kFloat64: return proto::Dtype::FLOAT64;
  }
  return proto::Dtype::UINT8;
}

std::vector<transfer::Group> readDestinations(capnp::List<proto::Destination>::Reader list) {
  std::vector<transfer::Group> out;
  out.reserve(list.size());
  for (auto destination : list) {
    transfer::Group group;
    for (int32_t rank : destination.getRanks()) group.push_back(rank);
    out.push_back(std::move(group));
  }
  return out;
}

void writeDestinations(capnp::List<proto::Destination>::Builder list,
                       const std::vector<transfer::Group>& groups) {
  for (size_t d = 0; d < groups.size(); ++d) {
    auto ranks = list[static_cast<unsigned>(d)].initRanks(static_cast<unsigned>(groups[d].size()));
    for (size_t i = 0; i < groups[d].size(); ++i) ranks.set(static_cast<unsigned>(i), groups[d][i]);
  }
}

SessionService::~SessionService() {
  if (devices_ != nullptr) {
    TransferBackend* backend = &backend_;
    SessionId session = session_;
    devices_->endSession(session, [backend, session]() { backend->unregister(session); });
  } else {
    backend_.unregister(session_);
  }
}

kj::Promise<void> SessionService::allocate(AllocateContext context) {
  // A waiting call must end when its client goes away (or gives up), so that the session it holds
  // is released and the rank unregistered at once, not when space or data finally comes.
  context.allowCancellation();
  auto params = context.getParams();
  return backend_.allocate(session_, params.getSizeBytes(), params.getTimeoutMs())
      .then([context](shm::Allocation allocation) mutable {
        auto results = context.getResults();
        results.setOffset(allocation.offset);
        results.setSizeBytes(allocation.sizeBytes);
      });
}

kj::Promise<void> SessionService::release(ReleaseContext context) {
  return backend_.release(session_, context.getParams().getOffset());
}

kj::Promise<void> SessionService::send(SendContext context) {
  auto params = context.getParams();
  SendRequest request;
  request.dataId = text(params.getDataId());
  request.chunkId = params.getChunkId();
  request.numChunks = params.getNumChunks();
  request.destinations = readDestinations(params.getDestinations());
  request.directLink = params.getDirectLink();
  request.directSeq = params.getDirectSeq();
  return sendPayload(backend_, session_, std::move(request), params.getPayload(),
                     std::make_shared<SendContext>(context));
}

kj::Promise<void> sendPayload(TransferBackend& backend, SessionId session, SendRequest request,
                              proto::Payload::Reader payload, std::shared_ptr<const void> keep) {
  switch (payload.which()) {
    case proto::Payload::TENSOR: {
      auto t = payload.getTensor();
      TensorDescriptor tensor;
      tensor.dtype = fromProto(t.getDtype());
      for (int64_t dim : t.getShape()) tensor.shape.push_back(dim);
      tensor.offset = t.getOffset();
      tensor.sizeBytes = t.getSizeBytes();
      request.payload = std::move(tensor);
      break;
    }
    case proto::Payload::OBJECT: {
      auto o = payload.getObject();
      auto bytes = o.getBytes();
      request.payload = transfer::ObjectChunk{
          o.getTypeTag(), std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size())};
      break;
    }
    case proto::Payload::INLINE_TENSOR:
      return sendInline(backend, session, std::move(request), payload.getInlineTensor(), std::move(keep));
    default:
      return transferError("invalid-argument", "the payload is neither a tensor nor an object");
  }
  return backend.send(session, std::move(request));
}

kj::Promise<void> sendInline(TransferBackend& backend, SessionId session, SendRequest request,
                             proto::InlineTensor::Reader t, std::shared_ptr<const void> keep) {
  uint64_t sizeBytes = t.getBytes().size();
  if (sizeBytes > kInlineTensorMaxBytes) {
    return transferError("too-large",
                         "an inline tensor carries at most " +
                             std::to_string(kInlineTensorMaxBytes) + " bytes, this one " +
                             std::to_string(sizeBytes) + "; allocate larger tensors in the arena");
  }
  TensorDescriptor tensor;
  tensor.dtype = fromProto(t.getDtype());
  for (int64_t dim : t.getShape()) tensor.shape.push_back(dim);
  tensor.sizeBytes = sizeBytes;
  // The same allocation (and the same wait for space) as Session.allocate; send() then takes it
  // over, and frees it if the send fails (e.g. a shape that does not match the byte size).
  return backend.allocate(session, std::max<uint64_t>(sizeBytes, 1), 0)
      .then([backend = &backend, session, t, keep = std::move(keep), request = std::move(request),
             tensor = std::move(tensor)](shm::Allocation allocation) mutable {
        auto bytes = t.getBytes();  // `keep` holds the message they are in
        if (bytes.size() > 0) memcpy(backend->arenaBase() + allocation.offset, bytes.begin(), bytes.size());
        tensor.offset = allocation.offset;
        request.payload = std::move(tensor);
        return backend->send(session, std::move(request));
      });
}

kj::Promise<void> SessionService::closeStream(CloseStreamContext context) {
  auto params = context.getParams();
  return backend_.closeStream(session_, text(params.getDataId()), params.getNumChunks(),
                              readDestinations(params.getDestinations()));
}

kj::Promise<void> SessionService::recv(RecvContext context) {
  context.allowCancellation();  // see allocate()
  auto params = context.getParams();
  return backend_
      .recv(session_, text(params.getDataId()), params.getChunkId(), params.getTimeoutMs())
      .then([context](RecvReply reply) mutable { writeRecvResult(context.getResults().initResult(), reply); });
}

void writeRecvResult(proto::RecvResult::Builder result, const RecvReply& reply) {
  if (auto* tensor = std::get_if<TensorDescriptor>(&reply)) {
    writeTensor(result.initTensor(), *tensor);
  } else if (auto* object = std::get_if<transfer::ObjectChunk>(&reply)) {
    auto out = result.initObject();
    out.setTypeTag(object->typeTag);
    out.setBytes(kj::arrayPtr(reinterpret_cast<const kj::byte*>(object->bytes.data()),
                              object->bytes.size()));
  } else {
    result.setEndOfStream();
  }
}

kj::Promise<void> SessionService::openLane(OpenLaneContext context) {
  if (lanes_.reactor == nullptr) {
    return kj::Exception(kj::Exception::Type::UNIMPLEMENTED, __FILE__, __LINE__,
                         kj::str("this daemon serves no lanes here; use calls"));
  }
  if (lane_.get() != nullptr) {
    return transferError("invalid-argument", "this session already has its lane");
  }
  LaneService::ClientFds fds;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    lane_ = LaneService::open(lanes_, backend_, session_, rank_, fds);
  })) {
    spdlog::warn("rank {}: no lane, its requests stay calls: {}", rank_, e->getDescription().cStr());
    return kj::mv(*e);
  }
  auto results = context.getResults();
  results.setMemory(kj::heap<FdHandleService>(kj::mv(fds.memory)));
  results.setRequestBell(kj::heap<FdHandleService>(kj::mv(fds.requestBell)));
  results.setCompletionBell(kj::heap<FdHandleService>(kj::mv(fds.completionBell)));
  results.setObjectMaxBytes(kLaneObjectMaxBytes);
  results.setAllocates(true);
  return kj::READY_NOW;
}

kj::Promise<void> SessionService::directRoute(DirectRouteContext context) {
  auto params = context.getParams();
  return backend_.directRoute(session_, readDestinations(params.getDestinations()), params.getRenew())
      .then([context](DirectRoute route) mutable {
        auto out = context.getResults().initRoute();
        out.setRetryMs(route.retryMs);
        if (!route.none.empty()) {
          out.setNone(route.none);
          return;
        }
        auto ucx = out.initUcx();
        ucx.setWorkerAddress(kj::arrayPtr(reinterpret_cast<const kj::byte*>(route.workerAddress.data()),
                                          route.workerAddress.size()));
        ucx.setDeliverTag(route.deliverTag);
        ucx.setLinkSerial(route.linkSerial);
        ucx.setSeqBase(route.seqBase);
        ucx.setSeqCount(route.seqCount);
        ucx.setMessageMaxBytes(route.messageMaxBytes);
      });
}

kj::Promise<void> SessionService::markDone(MarkDoneContext context) {
  auto params = context.getParams();
  return backend_.markDone(session_, text(params.getDataId()), params.getChunkId());
}

}  // namespace sidecar::rpc

namespace sidecar::rpc {

namespace {

std::string bytesOf(capnp::Data::Reader data) {
  return std::string(reinterpret_cast<const char*>(data.begin()), data.size());
}

}  // namespace

kj::Promise<void> SessionService::sendDevice(SendDeviceContext context) {
  if (devices_ == nullptr) {
    return transferError("gpu-unavailable",
                         "this daemon takes no GPU tensors (no CUDA); send host tensors");
  }
  // A producer that goes away while its copy waits (e.g. for its own kernel) must end its session
  // at once, which fails the waiting copy; a call that cannot be cancelled would keep the session
  // alive and the copy waiting forever.
  context.allowCancellation();
  auto params = context.getParams();
  DeviceSendRequest request;
  request.senderRank = rank_;
  request.senderGroup = group_;
  request.concurrentCopy = concurrentCopy_;
  request.dataId = text(params.getDataId());
  request.chunkId = params.getChunkId();
  request.numChunks = params.getNumChunks();
  request.destinations = readDestinations(params.getDestinations());
  auto t = params.getTensor();
  auto& tensor = request.tensor;
  tensor.dtype = fromProto(t.getDtype());
  for (int64_t dim : t.getShape()) tensor.shape.push_back(dim);
  tensor.sizeBytes = t.getSizeBytes();
  tensor.memHandle = bytesOf(t.getMemHandle());
  tensor.offsetBytes = t.getOffsetBytes();
  tensor.allocationBytes = t.getAllocationBytes();
  tensor.deviceUuid = bytesOf(t.getDeviceUuid());
  tensor.eventHandle = bytesOf(t.getEventHandle());
  return devices_->sendDevice(session_, std::move(request));
}

}  // namespace sidecar::rpc
