#pragma once
// The element types Sidecar carries, by wire value (schema/sidecar.capnp's Dtype order), shared
// by the daemon's transfer::Dtype and the public sidecar::Dtype so sizes and names are defined
// once.

#include <cstdint>

namespace sidecar::base {

inline constexpr uint8_t kDtypeCount = 10;

// Element size in bytes by wire value; 0 for an unknown value.
constexpr uint32_t dtypeBytesByValue(uint8_t value) {
  constexpr uint8_t kBytes[kDtypeCount] = {1, 1, 1, 2, 4, 8, 2, 2, 4, 8};
  return value < kDtypeCount ? kBytes[value] : 0;
}

// Name (as torch spells it) by wire value; "unknown" for an unknown value.
constexpr const char* dtypeNameByValue(uint8_t value) {
  constexpr const char* kNames[kDtypeCount] = {"bool",    "uint8",   "int8",     "int16",
                                               "int32",   "int64",   "float16",  "bfloat16",
                                               "float32", "float64"};
  return value < kDtypeCount ? kNames[value] : "unknown";
}

}  // namespace sidecar::base
