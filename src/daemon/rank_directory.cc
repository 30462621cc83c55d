#include "daemon/rank_directory.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <charconv>

namespace sidecar::daemon {
namespace {

constexpr std::string_view kMapAccepted =
    "use entries like \"0-3=10.77.0.1:7650\" or \"4=host:7650\" separated by commas";
constexpr std::string_view kSetAccepted = "use ranks like \"0-3,6\" or \"0,1,2\"";

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> split(std::string_view text, std::string_view separators) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || separators.find(text[i]) != std::string_view::npos) {
      std::string_view part = trim(text.substr(start, i - start));
      if (!part.empty()) out.push_back(part);
      start = i + 1;
    }
  }
  return out;
}

int32_t parseRank(std::string_view s, std::string_view accepted) {
  int64_t v = -1;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 0 || v > INT32_MAX) {
    throw std::invalid_argument(fmt::format("\"{}\" is not a rank (an integer >= 0); {}", s, accepted));
  }
  return static_cast<int32_t>(v);
}

std::pair<int32_t, int32_t> parseRange(std::string_view s, std::string_view accepted) {
  size_t dash = s.find('-');
  if (dash == std::string_view::npos) {
    int32_t r = parseRank(trim(s), accepted);
    return {r, r};
  }
  int32_t first = parseRank(trim(s.substr(0, dash)), accepted);
  int32_t last = parseRank(trim(s.substr(dash + 1)), accepted);
  if (last < first) {
    throw std::invalid_argument(fmt::format("the range \"{}\" ends before it starts; {}", s, accepted));
  }
  return {first, last};
}

void validatePort(std::string_view address, std::string_view accepted) {
  size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0) {
    throw std::invalid_argument(fmt::format("\"{}\" is not host:port; {}", address, accepted));
  }
  std::string_view port = address.substr(colon + 1);
  uint32_t p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (ec != std::errc() || end != port.data() + port.size() || p == 0 || p > 65535) {
    throw std::invalid_argument(
        fmt::format("\"{}\" needs a port from 1 to 65535 after the last ':'; {}", address, accepted));
  }
}

}  // namespace

std::vector<RankRange> parseRankMap(std::string_view text) {
  std::vector<RankRange> out;
  for (std::string_view entry : split(text, ",;")) {
    size_t eq = entry.find('=');
    if (eq == std::string_view::npos) {
      throw std::invalid_argument(fmt::format("\"{}\" has no '='; {}", entry, kMapAccepted));
    }
    auto [first, last] = parseRange(trim(entry.substr(0, eq)), kMapAccepted);
    std::string address(trim(entry.substr(eq + 1)));
    validatePort(address, kMapAccepted);
    for (const RankRange& r : out) {
      if (first <= r.last && r.first <= last) {
        throw std::invalid_argument(fmt::format(
            "ranks {}-{} are mapped twice ({} and {}); each rank lives on one node", std::max(first, r.first),
            std::min(last, r.last), r.address, address));
      }
    }
    out.push_back(RankRange{first, last, address});
  }
  return out;
}

std::set<int32_t> parseRankSet(std::string_view text) {
  std::set<int32_t> out;
  for (std::string_view entry : split(text, ",; ")) {
    auto [first, last] = parseRange(entry, kSetAccepted);
    if (static_cast<int64_t>(last) - first > 1'000'000) {
      throw std::invalid_argument(fmt::format("the range \"{}\" is too long (over a million ranks)", entry));
    }
    for (int64_t r = first; r <= last; ++r) out.insert(static_cast<int32_t>(r));
  }
  return out;
}

void validateDnsTemplate(std::string_view text) {
  constexpr std::string_view kAccepted =
      "use e.g. \"sidecar-{rank}.sidecar.default.svc.cluster.local:7650\"";
  if (text.find("{rank}") == std::string_view::npos) {
    throw std::invalid_argument(fmt::format("the template has no {{rank}}; {}", kAccepted));
  }
  validatePort(text, kAccepted);
}

RankDirectory::RankDirectory(PeerSettings settings) : settings_(std::move(settings)) {}

bool RankDirectory::distributed() const {
  return !settings_.ranks.empty() || !settings_.dnsTemplate.empty() || !settings_.localRanks.empty();
}

std::optional<std::string> RankDirectory::mapped(int32_t rank) const {
  for (const RankRange& r : settings_.ranks) {
    if (rank >= r.first && rank <= r.last) return r.address;
  }
  if (!settings_.dnsTemplate.empty()) {
    std::string out = settings_.dnsTemplate;
    for (size_t at = out.find("{rank}"); at != std::string::npos; at = out.find("{rank}", at)) {
      out.replace(at, 6, std::to_string(rank));
    }
    return out;
  }
  return std::nullopt;
}

std::optional<std::string> RankDirectory::remoteAddress(int32_t rank) const {
  if (!settings_.localRanks.empty()) {
    if (settings_.localRanks.count(rank) != 0) return std::nullopt;
    auto address = mapped(rank);
    if (!address) {
      throw std::invalid_argument(fmt::format(
          "rank {} is not one of this node's local_ranks and no address is configured for it; add "
          "it to [peers] ranks or set dns_template",
          rank));
    }
    return address;
  }
  auto address = mapped(rank);
  if (!address || *address == settings_.advertise) return std::nullopt;
  return address;
}

}  // namespace sidecar::daemon
