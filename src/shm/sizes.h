// Byte sizes as people write them ("64GiB", "512MiB", "1G", "4096") and as we print them.
//
// All unit suffixes are binary (powers of 1024), as the kernel's huge page sizes are: "1G", "1GB"
// and "1GiB" are all 2^30 bytes. Parsing never accepts a fraction, a sign or an overflow.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "shm/result.h"

namespace sidecar::shm {

inline constexpr uint64_t kKiB = uint64_t{1} << 10;
inline constexpr uint64_t kMiB = uint64_t{1} << 20;
inline constexpr uint64_t kGiB = uint64_t{1} << 30;
inline constexpr uint64_t kTiB = uint64_t{1} << 40;

// "64GiB", "64 GiB", "512m", "1G", "4096", "4096B" -> bytes. Suffixes (case-insensitive):
// B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB. Errors (BadSize) quote the input and say what is
// accepted.
Result<uint64_t> parseSizeBytes(std::string_view text);

// 1536 -> "1.5 KiB", 8192 -> "8 KiB", 100 -> "100 B". Exact multiples print without a fraction;
// others with one decimal (rounded down so "1023.9 KiB" never reads as "1 MiB").
std::string formatBytes(uint64_t bytes);

// Total physical memory of this machine in bytes (sysconf), 0 if unknown.
uint64_t physicalMemoryBytes() noexcept;

// The arena size to use when none is configured: min(1/4 of physical memory, 64 GiB), rounded
// down to a multiple of `alignBytes` (the huge page or slab size), and at least `alignBytes`.
uint64_t defaultArenaSizeBytes(uint64_t alignBytes = 2 * kMiB) noexcept;

// Round `bytes` up / down to a multiple of `alignBytes` (> 0). roundUp saturates at the largest
// multiple representable.
constexpr uint64_t roundDownBytes(uint64_t bytes, uint64_t alignBytes) noexcept {
  return bytes - bytes % alignBytes;
}
constexpr uint64_t roundUpBytes(uint64_t bytes, uint64_t alignBytes) noexcept {
  uint64_t down = roundDownBytes(bytes, alignBytes);
  if (down == bytes) return bytes;
  return down + alignBytes < down ? down : down + alignBytes;
}

}  // namespace sidecar::shm
