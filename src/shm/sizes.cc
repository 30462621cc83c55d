#include "shm/sizes.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>

namespace sidecar::shm {
namespace {

ShmError badSize(std::string_view text, const char* why) {
  return {ShmErrc::BadSize, "bad size '" + std::string(text) + "': " + why +
                                "; expected a whole number with an optional binary unit "
                                "(B, KiB, MiB, GiB, TiB or K, M, G, T), e.g. '64GiB' or '4096'"};
}

bool equalsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

}  // namespace

Result<uint64_t> parseSizeBytes(std::string_view text) {
  std::string_view s = text;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  if (s.empty()) return badSize(text, "it is empty");
  size_t digits = 0;
  uint64_t number = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) {
    uint64_t d = static_cast<uint64_t>(s[digits] - '0');
    if (number > (UINT64_MAX - d) / 10) return badSize(text, "it does not fit in 64 bits");
    number = number * 10 + d;
    ++digits;
  }
  if (digits == 0) return badSize(text, "it does not start with a digit");
  std::string_view unit = s.substr(digits);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) {
    unit.remove_prefix(1);
  }
  if (!unit.empty() && unit.front() == '.') return badSize(text, "fractions are not accepted");
  struct Suffix {
    const char* names[3];
    uint64_t multiplier;
  };
  static constexpr Suffix kSuffixes[] = {
      {{"b", "b", "b"}, 1},
      {{"k", "kb", "kib"}, kKiB},
      {{"m", "mb", "mib"}, kMiB},
      {{"g", "gb", "gib"}, kGiB},
      {{"t", "tb", "tib"}, kTiB},
  };
  uint64_t multiplier = 0;
  if (unit.empty()) {
    multiplier = 1;
  } else {
    for (const Suffix& suffix : kSuffixes) {
      for (const char* name : suffix.names) {
        if (equalsIgnoreCase(unit, name)) multiplier = suffix.multiplier;
      }
    }
    if (multiplier == 0) return badSize(text, "unknown unit");
  }
  if (number > UINT64_MAX / multiplier) return badSize(text, "it does not fit in 64 bits");
  return number * multiplier;
}

std::string formatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  uint64_t scale = 1;
  while (unit < 6 && bytes / scale >= 1024) {
    scale *= 1024;
    ++unit;
  }
  char buf[48];
  uint64_t whole = bytes / scale;
  uint64_t tenths = (bytes % scale) * 10 / scale;
  if (bytes % scale == 0 || unit == 0) {
    std::snprintf(buf, sizeof buf, "%llu %s", static_cast<unsigned long long>(whole), kUnits[unit]);
  } else {
    std::snprintf(buf, sizeof buf, "%llu.%llu %s", static_cast<unsigned long long>(whole),
                  static_cast<unsigned long long>(tenths), kUnits[unit]);
  }
  return buf;
}

uint64_t physicalMemoryBytes() noexcept {
  long pages = ::sysconf(_SC_PHYS_PAGES);
  long pageSize = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || pageSize <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(pageSize);
}

uint64_t defaultArenaSizeBytes(uint64_t alignBytes) noexcept {
  if (alignBytes == 0) alignBytes = 1;
  uint64_t ram = physicalMemoryBytes();
  uint64_t size = std::min<uint64_t>(ram / 4, 64 * kGiB);
  size = roundDownBytes(size, alignBytes);
  return std::max(size, alignBytes);
}

}  // namespace sidecar::shm
