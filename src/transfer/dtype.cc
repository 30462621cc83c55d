// Element sizes and names of the tensor dtypes the transfer table accepts.
#include <array>
#include <string>

#include "base/dtype_table.h"
#include "transfer/transfer_table.h"

namespace sidecar::transfer {

uint32_t dtypeBytes(Dtype dtype) { return base::dtypeBytesByValue(static_cast<uint8_t>(dtype)); }

const char* dtypeName(Dtype dtype) { return base::dtypeNameByValue(static_cast<uint8_t>(dtype)); }

std::optional<Dtype> parseDtype(std::string_view name) {
  if (name.starts_with("torch.")) name.remove_prefix(6);
  struct Alias {
    std::string_view name;
    Dtype dtype;
  };
  static constexpr std::array<Alias, 30> kAliases{{
      {"bool", Dtype::kBool},         {"uint8", Dtype::kUint8},      {"u8", Dtype::kUint8},
      {"int8", Dtype::kInt8},         {"i8", Dtype::kInt8},          {"int16", Dtype::kInt16},
      {"i16", Dtype::kInt16},         {"short", Dtype::kInt16},      {"int32", Dtype::kInt32},
      {"i32", Dtype::kInt32},         {"int", Dtype::kInt32},        {"int64", Dtype::kInt64},
      {"i64", Dtype::kInt64},         {"long", Dtype::kInt64},       {"float16", Dtype::kFloat16},
      {"f16", Dtype::kFloat16},       {"fp16", Dtype::kFloat16},     {"half", Dtype::kFloat16},
      {"bfloat16", Dtype::kBFloat16}, {"bf16", Dtype::kBFloat16},    {"float32", Dtype::kFloat32},
      {"f32", Dtype::kFloat32},       {"fp32", Dtype::kFloat32},     {"float", Dtype::kFloat32},
      {"float64", Dtype::kFloat64},   {"f64", Dtype::kFloat64},      {"fp64", Dtype::kFloat64},
      {"double", Dtype::kFloat64},    {"uint8_t", Dtype::kUint8},    {"boolean", Dtype::kBool},
  }};
  for (const Alias& alias : kAliases) {
    if (alias.name == name) return alias.dtype;
  }
  return std::nullopt;
}

std::optional<uint64_t> tensorBytes(Dtype dtype, const std::vector<int64_t>& shape) {
  uint64_t bytes = dtypeBytes(dtype);
  if (bytes == 0) return std::nullopt;
  for (int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) return std::nullopt;
  }
  return bytes;
}

const char* errcName(Errc code) {
  switch (code) {
    case Errc::kInvalidArgument: return "invalid-argument";
    case Errc::kChunkOutOfRange: return "chunk-out-of-range";
    case Errc::kNumChunksMismatch: return "num-chunks-mismatch";
    case Errc::kAlreadySent: return "already-sent";
    case Errc::kAlreadyDone: return "already-done";
    case Errc::kNotReceiver: return "not-receiver";
    case Errc::kNotAvailable: return "not-available";
    case Errc::kTooLarge: return "too-large";
    case Errc::kExpired: return "expired";
    case Errc::kCancelled: return "cancelled";
    case Errc::kTimeout: return "timeout";
    case Errc::kPeerLost: return "peer-lost";
  }
  return "unknown";
}

}  // namespace sidecar::transfer
