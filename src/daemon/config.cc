#include "daemon/config.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <toml++/toml.h>

#include "daemon/rank_directory.h"

#if __has_include("sidecar_build_config.h")
#include "sidecar_build_config.h"
#endif
#ifndef SIDECAR_VERSION
#define SIDECAR_VERSION "0.0.0-unknown"
#endif

namespace sidecar::daemon {
namespace {

constexpr std::string_view kProgram = "sidecard";
constexpr uint32_t kCoresMax = 1024;
constexpr uint32_t kSpinUsMax = 1'000'000;
constexpr uint32_t kRingEntriesMin = 8;
constexpr uint32_t kRingEntriesMax = 32768;
constexpr size_t kSocketPathMax = sizeof(sockaddr_un::sun_path) - 1;  // 107 on Linux
constexpr size_t kNodeIdMax = 255;

// Thrown by the value parsers: what is wrong and what is accepted, without a location.
using ValueError = std::invalid_argument;

// Thrown inside the loader with the complete one-line message; caught by loadConfig().
struct LoadError {
  std::string line;
};

[[noreturn]] void fail(std::string_view where, std::string_view problem) {
  throw LoadError{fmt::format("{}: config error: {}: {}", kProgram, where, problem)};
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// Double-quoted, with quotes, backslashes and control bytes escaped, so an error line stays one
// line whatever the user typed.
std::string quote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  return out + "\"";
}

template <typename T>
bool parseInt(std::string_view s, T& out) {
  if (s.empty()) return false;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && end == s.data() + s.size();
}

uint32_t parseU32(std::string_view text, uint32_t lo, uint32_t hi, std::string_view accepted) {
  int64_t v = 0;
  if (!parseInt(text, v) || v < lo || v > hi) throw ValueError(std::string(accepted));
  return static_cast<uint32_t>(v);
}

std::string formatCpuList(const std::vector<int>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += j > i + 1 ? fmt::format("{}-{}", cpus[i], cpus[j]) : std::to_string(cpus[i]);
    if (j == i + 1) out += fmt::format(",{}", cpus[j]);
    i = j + 1;
  }
  return out;
}

std::string formatSize(uint64_t bytes) {
  if (bytes == 0) return "auto";
  static constexpr std::array<std::pair<int, const char*>, 4> kUnits{
      {{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}}};
  for (auto [shift, name] : kUnits) {
    if (bytes % (uint64_t{1} << shift) == 0) return fmt::format("{}{}", bytes >> shift, name);
  }
  return std::to_string(bytes);
}

// ---- The settings table: one row per key, naming it in all three layers.

enum Key : size_t {
  kNodeId, kLogLevel, kLogFormat,
  kSocket, kTcp,
  kCores, kCpus, kSpinUs, kRingEntries,
  kArenaSize, kArenaPages, kArenaLock, kArenaPopulate,
  kSendTimeoutMs, kObjectBytesMax, kTtlMs, kWorldSize,
  kPeerRanks, kPeerDnsTemplate, kLocalRanks, kNodeRank, kAdvertise, kPeerTimeoutMs,
  kPeerUcxMessages, kPeerAckDelayUs, kPeerDirectSends,
  kKeyCount
};

// How a TOML value becomes the text the env/flag parser takes.
enum class Kind { kString, kInteger, kBool, kSize, kCpus };

struct Setting {
  std::string_view table;  // "" for top-level keys
  std::string_view key;
  std::string_view env;
  std::string_view flag;   // without the leading "--"
  Kind kind;
  std::string_view accepted;  // the message for a value of the wrong TOML type
  std::string_view help;
  std::string_view typeName;  // shown in --help
  void (*apply)(Config&, std::string_view);  // throws ValueError
};

constexpr std::string_view kLogLevels = "trace, debug, info, warn, error, critical, off";
constexpr std::string_view kPageKinds = "auto, hugetlb-1g, hugetlb-2m, thp, plain";
constexpr std::string_view kCoresAccepted = "must be an integer from 1 to 1024";
constexpr std::string_view kSpinAccepted = "must be an integer from 0 to 1000000 (microseconds)";
constexpr std::string_view kRingAccepted = "must be a power of two from 8 to 32768";
constexpr std::string_view kSizeAccepted = "not a size; use e.g. 1GiB, 512MiB or a byte count";
constexpr std::string_view kTcpAccepted =
    "must be host:port with a port from 0 to 65535 (0: any free port) (e.g. 0.0.0.0:7650 or [::]:7650), or \"off\"";
constexpr std::string_view kBoolAccepted = "must be true or false (also 1/0, yes/no, on/off)";
constexpr std::string_view kCpusAccepted =
    "must be a list of CPU numbers like [0, 1, 2] or a string like \"0-3,6\"";

void applyNodeId(Config& c, std::string_view v) {
  bool printable = std::all_of(v.begin(), v.end(), [](unsigned char ch) {
    return ch > 0x20 && ch < 0x7f;
  });
  if (v.empty() || v.size() > kNodeIdMax || !printable) {
    throw ValueError("must be 1 to 255 printable ASCII characters without spaces");
  }
  c.nodeId = v;
}

void applyLogLevel(Config& c, std::string_view v) {
  std::string l = lower(v);
  if (l == "warning") l = "warn";
  if (l == "err") l = "error";
  static constexpr std::array<std::string_view, 7> kKnown{"trace", "debug", "info", "warn",
                                                         "error", "critical", "off"};
  if (std::find(kKnown.begin(), kKnown.end(), l) == kKnown.end()) {
    throw ValueError(fmt::format("unknown log level; use one of {}", kLogLevels));
  }
  c.logLevel = l;
}

void applyLogFormat(Config& c, std::string_view v) {
  if (lower(v) != "text") throw ValueError("must be \"text\" (the only log format so far)");
  c.logFormat = "text";
}

void applySocket(Config& c, std::string_view v) {
  if (v.empty() || v.size() > kSocketPathMax) {
    throw ValueError(fmt::format(
        "must be a non-empty path of at most {} bytes (the limit of a unix socket address); "
        "this one has {}",
        kSocketPathMax, v.size()));
  }
  c.socketPath = v;
}

void applyTcp(Config& c, std::string_view v) {
  if (v.empty() || lower(v) == "off") {
    c.tcpListen.clear();
    return;
  }
  size_t colon = v.rfind(':');
  if (colon == std::string_view::npos) throw ValueError(std::string(kTcpAccepted));
  std::string_view host = v.substr(0, colon);
  uint32_t port = 0;
  if (!parseInt(v.substr(colon + 1), port) || port > 65535) {
    throw ValueError(std::string(kTcpAccepted));
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    std::string addr(host.substr(1, host.size() - 2));
    in6_addr a6{};
    if (inet_pton(AF_INET6, addr.c_str(), &a6) != 1) {
      throw ValueError(fmt::format("{} is not an IPv6 address; {}", quote(addr), kTcpAccepted));
    }
  } else {
    if (host.empty()) {
      throw ValueError(fmt::format("the host is missing; {}", kTcpAccepted));
    }
    if (host.find(':') != std::string_view::npos) {
      throw ValueError(fmt::format("IPv6 addresses need brackets, e.g. [::1]:7650; {}",
                                   kTcpAccepted));
    }
    bool nameChars = std::all_of(host.begin(), host.end(), [](unsigned char ch) {
      return std::isalnum(ch) || ch == '.' || ch == '-' || ch == '_';
    });
    bool dotted = std::all_of(host.begin(), host.end(),
                              [](unsigned char ch) { return std::isdigit(ch) || ch == '.'; });
    in_addr a4{};
    if (!nameChars || (dotted && inet_pton(AF_INET, std::string(host).c_str(), &a4) != 1)) {
      throw ValueError(fmt::format("{} is not an IPv4 address or host name; {}", quote(host),
                                   kTcpAccepted));
    }
  }
  c.tcpListen = v;
}

void applyCores(Config& c, std::string_view v) {
  c.cores = parseU32(v, 1, kCoresMax, kCoresAccepted);
}

void applyCpus(Config& c, std::string_view v) { c.cpuList = parseCpuList(v); }

void applySpinUs(Config& c, std::string_view v) {
  c.spinUs = parseU32(v, 0, kSpinUsMax, kSpinAccepted);
}

constexpr std::string_view kTimeoutAccepted = "must be an integer from 1 to 3600000 (milliseconds)";
constexpr std::string_view kObjectAccepted = "must be a size from 1 KiB to 64 MiB, e.g. 1MiB";
constexpr std::string_view kWorldAccepted = "must be an integer from 0 (no limit) to 1000000000";

void applySendTimeoutMs(Config& c, std::string_view v) {
  c.sendTimeoutMs = parseU32(v, 1, 3'600'000, kTimeoutAccepted);
}

void applyObjectBytesMax(Config& c, std::string_view v) {
  uint64_t bytes = 0;
  try {
    bytes = parseSize(v);
  } catch (const std::invalid_argument&) {
    throw ValueError(std::string(kObjectAccepted));
  }
  if (bytes < 1024 || bytes > (64u << 20)) throw ValueError(std::string(kObjectAccepted));
  c.objectBytesMax = bytes;
}

void applyTtlMs(Config& c, std::string_view v) {
  c.transferTtlMs = parseU32(v, 1, 2'000'000'000, "must be an integer from 1 to 2000000000 (milliseconds)");
}

void applyWorldSize(Config& c, std::string_view v) {
  c.worldSize = static_cast<int32_t>(parseU32(v, 0, 1'000'000'000, kWorldAccepted));
}

void applyPeerRanks(Config& c, std::string_view v) { c.peers.ranks = parseRankMap(v); }

void applyPeerDnsTemplate(Config& c, std::string_view v) {
  if (!v.empty()) validateDnsTemplate(v);
  c.peers.dnsTemplate = v;
}

void applyLocalRanks(Config& c, std::string_view v) { c.localRanks = parseRankSet(v); }

void applyNodeRank(Config& c, std::string_view v) {
  c.nodeRank = static_cast<int32_t>(parseU32(v, 0, INT32_MAX, "must be a rank (an integer >= 0)"));
}

void applyAdvertise(Config& c, std::string_view v) {
  if (!v.empty()) parseRankMap("0=" + std::string(v));  // the same host:port rules as the map
  c.peers.advertise = v;
}

void applyPeerTimeoutMs(Config& c, std::string_view v) {
  c.peers.timeoutMs = parseU32(v, 100, 600'000, "must be an integer from 100 to 600000 (milliseconds)");
}

void applyRingEntries(Config& c, std::string_view v) {
  uint32_t n = parseU32(v, kRingEntriesMin, kRingEntriesMax, kRingAccepted);
  if ((n & (n - 1)) != 0) throw ValueError(std::string(kRingAccepted));
  c.ringEntries = n;
}

void applyArenaSize(Config& c, std::string_view v) { c.arenaBytes = parseSize(v); }

void applyArenaPages(Config& c, std::string_view v) {
  std::string l = lower(v);
  static constexpr std::array<std::string_view, 5> kKnown{"auto", "hugetlb-1g", "hugetlb-2m",
                                                         "thp", "plain"};
  if (std::find(kKnown.begin(), kKnown.end(), l) == kKnown.end()) {
    throw ValueError(fmt::format("unknown page kind; use one of {}", kPageKinds));
  }
  c.arenaPages = l;
}

bool parseBool(std::string_view v) {
  std::string l = lower(v);
  if (l == "true" || l == "1" || l == "yes" || l == "on") return true;
  if (l == "false" || l == "0" || l == "no" || l == "off") return false;
  throw ValueError(std::string(kBoolAccepted));
}

void applyArenaLock(Config& c, std::string_view v) { c.arenaLock = parseBool(v); }

void applyArenaPopulate(Config& c, std::string_view v) { c.arenaPopulate = parseBool(v); }

void applyPeerUcxMessages(Config& c, std::string_view v) { c.peers.ucxMessages = parseBool(v); }

void applyPeerDirectSends(Config& c, std::string_view v) { c.peers.directSends = parseBool(v); }

constexpr const char* kAckDelayAccepted = "must be an integer from 0 to 10000 (microseconds)";
void applyPeerAckDelayUs(Config& c, std::string_view v) {
  c.peers.ackDelayUs = parseU32(v, 0, 10'000, kAckDelayAccepted);
}

// Indexed by Key.
const std::array<Setting, kKeyCount> kSettings{{
    {"", "node_id", "SIDECAR_NODE_ID", "node-id", Kind::kString,
     "must be a string", "This node's name among peers (default: the host name)", "NAME", applyNodeId},
    {"", "log_level", "SIDECAR_LOG_LEVEL", "log-level", Kind::kString,
     "must be a string: trace, debug, info, warn, error, critical or off",
     "trace|debug|info|warn|error|critical|off", "LEVEL", applyLogLevel},
    {"", "log_format", "SIDECAR_LOG_FORMAT", "log-format", Kind::kString,
     "must be the string \"text\"", "Log line format: text", "FORMAT", applyLogFormat},
    {"listen", "socket", "SIDECAR_SOCKET", "socket", Kind::kString,
     "must be a string (a path)", "Unix socket for local clients", "PATH", applySocket},
    {"listen", "tcp", "SIDECAR_TCP", "tcp", Kind::kString, kTcpAccepted,
     "host:port for peers and remote ctl; \"off\" disables", "HOST:PORT", applyTcp},
    {"reactor", "cores", "SIDECAR_CORES", "cores", Kind::kInteger, kCoresAccepted,
     "Reactor threads, one per core (1..1024)", "N", applyCores},
    {"reactor", "cpus", "SIDECAR_CPUS", "cpus", Kind::kCpus, kCpusAccepted,
     "CPUs to pin reactors to, e.g. 0-3,6 (default: the affinity mask)", "LIST", applyCpus},
    {"reactor", "spin_us", "SIDECAR_SPIN_US", "spin-us", Kind::kInteger, kSpinAccepted,
     "Busy-poll this long before sleeping; 0 = never spin", "US", applySpinUs},
    {"reactor", "ring_entries", "SIDECAR_RING_ENTRIES", "ring-entries", Kind::kInteger,
     kRingAccepted, "io_uring SQ entries per core (power of two, 8..32768)", "N", applyRingEntries},
    {"arena", "size", "SIDECAR_ARENA_SIZE", "arena-size", Kind::kSize, kSizeAccepted,
     "Arena size, e.g. 64GiB; 0 or auto = sized for the machine", "SIZE", applyArenaSize},
    {"arena", "pages", "SIDECAR_ARENA_PAGES", "arena-pages", Kind::kString,
     "must be a string: auto, hugetlb-1g, hugetlb-2m, thp or plain",
     "auto|hugetlb-1g|hugetlb-2m|thp|plain", "KIND", applyArenaPages},
    {"arena", "lock", "SIDECAR_ARENA_LOCK", "arena-lock", Kind::kBool, "must be true or false",
     "mlock the arena (--no-arena-lock to override the file or env)", "BOOL", applyArenaLock},
    {"arena", "populate", "SIDECAR_ARENA_POPULATE", "arena-populate", Kind::kBool,
     "must be true or false",
     "Fault in every arena page at start, so the first transfers pay no page faults "
     "(--no-arena-populate to override the file or env)",
     "BOOL", applyArenaPopulate},
    {"transfer", "send_timeout_ms", "SIDECAR_SEND_TIMEOUT_MS", "send-timeout-ms", Kind::kInteger,
     kTimeoutAccepted, "How long a send waits for arena space before failing", "MS",
     applySendTimeoutMs},
    {"transfer", "object_bytes_max", "SIDECAR_OBJECT_BYTES_MAX", "object-bytes-max", Kind::kSize,
     kObjectAccepted, "Largest small object carried in a control message", "SIZE",
     applyObjectBytesMax},
    {"transfer", "ttl_ms", "SIDECAR_TTL_MS", "ttl-ms", Kind::kInteger,
     "must be an integer from 1 to 2000000000 (milliseconds)",
     "Data for ranks that never register is released after this", "MS", applyTtlMs},
    {"transfer", "world_size", "SIDECAR_WORLD_SIZE", "world-size", Kind::kInteger, kWorldAccepted,
     "Ranks must be below this (0: no limit)", "N", applyWorldSize},
    {"peers", "ranks", "SIDECAR_PEERS", "peers", Kind::kString,
     "must be a string like \"0-3=10.77.0.1:7650,4-7=10.77.0.2:7650\"",
     "Where ranks live: rank ranges to their node's host:port", "MAP", applyPeerRanks},
    {"peers", "dns_template", "SIDECAR_PEER_DNS_TEMPLATE", "peer-dns-template", Kind::kString,
     "must be a string with {rank} and a port, e.g. \"sidecar-{rank}.svc:7650\"",
     "host:port of a rank's node, for ranks the map does not name", "TEMPLATE",
     applyPeerDnsTemplate},
    {"peers", "local_ranks", "SIDECAR_LOCAL_PEER_RANKS", "local-ranks", Kind::kString,
     "must be a string like \"0-3\" or \"0,1,2,3\"",
     "Exactly these ranks are served by this node (all others are remote)", "RANKS",
     applyLocalRanks},
    {"peers", "rank", "SIDECAR_RANK", "rank", Kind::kInteger, "must be an integer >= 0",
     "A rank served by this node (the reference's SIDECAR_RANK), added to local_ranks", "RANK",
     applyNodeRank},
    {"peers", "advertise", "SIDECAR_ADVERTISE", "advertise", Kind::kString,
     "must be a string host:port",
     "This node's host:port as its peers reach it (default: listen.tcp when it names a host)",
     "HOST:PORT", applyAdvertise},
    {"peers", "timeout_ms", "SIDECAR_PEER_TIMEOUT_MS", "peer-timeout-ms", Kind::kInteger,
     "must be an integer from 100 to 600000 (milliseconds)",
     "A peer daemon silent this long is dead: work that depends on it fails", "MS",
     applyPeerTimeoutMs},
    {"peers", "ucx_messages", "SIDECAR_PEER_UCX_MESSAGES", "peer-ucx-messages", Kind::kBool,
     "must be true or false",
     "Small deliveries to peers as single UCX messages (--no-peer-ucx-messages: as calls)",
     "BOOL", applyPeerUcxMessages},
    {"peers", "ack_delay_us", "SIDECAR_PEER_ACK_DELAY_US", "peer-ack-delay-us", Kind::kInteger,
     kAckDelayAccepted,
     "Acks of small deliveries wait this long, so they do not delay answers (0: at once)", "US",
     applyPeerAckDelayUs},
    {"peers", "direct_sends", "SIDECAR_PEER_DIRECT_SENDS", "peer-direct-sends", Kind::kBool,
     "must be true or false",
     "Executors send small deliveries to peers over UCX themselves (--no-peer-direct-sends: "
     "through this daemon)",
     "BOOL", applyPeerDirectSends},
}};

constexpr std::array<std::string_view, 5> kTables{"listen", "reactor", "arena", "transfer", "peers"};

std::string knownKeys(std::string_view table) {
  std::string out;
  for (const Setting& s : kSettings) {
    if (s.table != table) continue;
    if (!out.empty()) out += ", ";
    out += s.key;
  }
  if (table.empty()) {
    for (std::string_view t : kTables) out += fmt::format(", [{}]", t);
  }
  return out;
}

const Setting* findSetting(std::string_view table, std::string_view key) {
  for (const Setting& s : kSettings) {
    if (s.table == table && s.key == key) return &s;
  }
  return nullptr;
}

// Where each effective value came from, for messages that relate two keys.
struct Origins {
  std::array<std::string, kKeyCount> where;
  bool set(Key k) const { return !where[k].empty(); }
};

// ---- The TOML layer.

// The value as the user wrote it, near enough: strings double-quoted (toml++ prints literal
// 'strings'), arrays inline, tables elided; capped so an error stays one readable line.
std::string renderToml(const toml::node& node) {
  std::string s;
  if (node.is_table()) {
    s = "{...}";
  } else if (node.is_string()) {
    s = quote(*node.value<std::string>());
  } else if (const toml::array* arr = node.as_array()) {
    s = "[";
    for (const toml::node& e : *arr) s += (s.size() > 1 ? ", " : "") + renderToml(e);
    s += "]";
  } else {
    std::ostringstream os;
    node.visit([&](const auto& n) { os << n; });
    s = os.str();
  }
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

std::string tomlWhere(const std::string& path, const toml::key& key, const toml::node& node,
                      std::string_view table, bool withValue) {
  auto line = node.source().begin.line ? node.source().begin.line : key.source().begin.line;
  std::string where = fmt::format("{}:{}: ", path, line);
  if (!table.empty()) where += fmt::format("[{}] ", table);
  where += key.str();
  if (withValue) where += " = " + renderToml(node);
  return where;
}

// The TOML value as the text the shared parser takes, or nullopt for a value of the wrong type.
std::optional<std::string> tomlText(const Setting& s, const toml::node& node) {
  switch (s.kind) {
    case Kind::kString:
      if (auto v = node.value<std::string>(); v && node.is_string()) return *v;
      return std::nullopt;
    case Kind::kInteger:
      if (node.is_integer()) return std::to_string(*node.value<int64_t>());
      return std::nullopt;
    case Kind::kBool:
      if (node.is_boolean()) return *node.value<bool>() ? "true" : "false";
      return std::nullopt;
    case Kind::kSize:
      if (node.is_string()) return *node.value<std::string>();
      if (node.is_integer()) {
        int64_t n = *node.value<int64_t>();
        if (n < 0) return std::nullopt;
        return std::to_string(n);
      }
      return std::nullopt;
    case Kind::kCpus: {
      if (node.is_string()) return *node.value<std::string>();
      const toml::array* arr = node.as_array();
      if (!arr) return std::nullopt;
      std::string joined;
      for (const toml::node& e : *arr) {
        if (!e.is_integer()) return std::nullopt;
        if (!joined.empty()) joined += ',';
        joined += std::to_string(*e.value<int64_t>());
      }
      return joined;
    }
  }
  return std::nullopt;
}

void applyTomlSetting(Config& c, Origins& origins, const std::string& path, const Setting& s,
                      const toml::key& key, const toml::node& node) {
  std::string where = tomlWhere(path, key, node, s.table, /*withValue=*/true);
  std::optional<std::string> text = tomlText(s, node);
  if (!text) fail(where, s.accepted);
  try {
    s.apply(c, *text);
  } catch (const ValueError& e) {
    fail(where, e.what());
  }
  origins.where[&s - kSettings.data()] = tomlWhere(path, key, node, s.table, false);
}

void applyFile(Config& c, Origins& origins, const std::string& path, std::string_view from) {
  std::string source = fmt::format("{}={}", from, quote(path));
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(source, "is a directory, not a TOML file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(source, fmt::format("cannot read the config file: {}", strerror(errno)));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) fail(source, fmt::format("cannot read the config file: {}", strerror(errno)));

  toml::table root;
  try {
    root = toml::parse(content.str(), path);
  } catch (const toml::parse_error& e) {
    std::string what(e.description());
    std::replace(what.begin(), what.end(), '\n', ' ');
    throw LoadError{fmt::format("{}: config error: {}:{}:{}: TOML syntax error: {}", kProgram,
                                path, e.source().begin.line, e.source().begin.column, what)};
  }
  c.configPath = path;

  for (auto&& [key, node] : root) {
    std::string_view name = key.str();
    if (const Setting* s = findSetting("", name)) {
      applyTomlSetting(c, origins, path, *s, key, node);
      continue;
    }
    if (std::find(kTables.begin(), kTables.end(), name) == kTables.end()) {
      fail(fmt::format("{}:{}", path, key.source().begin.line),
           fmt::format("unknown key '{}'; known top-level keys: {}", name, knownKeys("")));
    }
    const toml::table* table = node.as_table();
    if (!table) {
      fail(tomlWhere(path, key, node, "", true),
           fmt::format("'{}' must be a table: write [{}] on a line of its own, then its keys",
                       name, name));
    }
    for (auto&& [subkey, subnode] : *table) {
      const Setting* s = findSetting(name, subkey.str());
      if (!s) {
        fail(fmt::format("{}:{}", path, subkey.source().begin.line),
             fmt::format("unknown key '{}' in [{}]; known keys: {}", subkey.str(), name,
                         knownKeys(name)));
      }
      applyTomlSetting(c, origins, path, *s, subkey, subnode);
    }
  }
}

// ---- The environment and flag layers.

void applyText(Config& c, Origins& origins, Key k, std::string where, std::string origin,
               std::string_view text) {
  try {
    kSettings[k].apply(c, text);
  } catch (const ValueError& e) {
    fail(where, e.what());
  }
  origins.where[k] = std::move(origin);
}

std::string hostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

void finish(Config& c, const Origins& origins) {
  if (c.nodeId.empty()) c.nodeId = hostName();
  c.peers.localRanks = c.localRanks;
  if (c.nodeRank >= 0) c.peers.localRanks.insert(c.nodeRank);
  if (c.peers.advertise.empty() && !c.tcpListen.empty()) {
    std::string_view host = std::string_view(c.tcpListen).substr(0, c.tcpListen.rfind(':'));
    if (host != "0.0.0.0" && host != "[::]" && !host.empty()) c.peers.advertise = c.tcpListen;
  }
  if (!c.peers.ranks.empty() && c.peers.localRanks.empty() && c.peers.advertise.empty()) {
    fail(origins.where[kPeerRanks],
         "the rank map needs to know which entry is this node: set [peers] advertise (this "
         "node's host:port as written in the map), local_ranks, or listen.tcp with a host");
  }
  if ((!c.peers.ranks.empty() || !c.peers.dnsTemplate.empty()) && c.tcpListen.empty()) {
    fail(origins.set(kPeerRanks) ? origins.where[kPeerRanks] : origins.where[kPeerDnsTemplate],
         "peers reach this node over TCP, but listen.tcp is off; give it a host:port");
  }
  if (!c.cpuList.empty()) {
    if (!origins.set(kCores)) {
      c.cores = static_cast<uint32_t>(c.cpuList.size());
    } else if (c.cpuList.size() < c.cores) {
      fail(origins.where[kCores],
           fmt::format("cores = {} but cpus ({}, from {}) lists only {} CPU{}; list at least one "
                       "CPU per core, or leave cores unset to use one core per listed CPU",
                       c.cores, formatCpuList(c.cpuList), origins.where[kCpus],
                       c.cpuList.size(), c.cpuList.size() == 1 ? "" : "s"));
    }
  }
}

std::string oneLine(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace

uint64_t parseSize(std::string_view text) {
  std::string_view s = trim(text);
  if (lower(s) == "auto") return 0;
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  uint64_t n = 0;
  if (digits == 0 || !parseInt(s.substr(0, digits), n)) {
    throw ValueError(std::string(kSizeAccepted));
  }
  std::string unit = lower(trim(s.substr(digits)));
  int shift = -1;
  if (unit.empty() || unit == "b") shift = 0;
  else if (unit == "k" || unit == "kib") shift = 10;
  else if (unit == "m" || unit == "mib") shift = 20;
  else if (unit == "g" || unit == "gib") shift = 30;
  else if (unit == "t" || unit == "tib") shift = 40;
  if (shift < 0) throw ValueError(std::string(kSizeAccepted));
  if (shift > 0 && n > (std::numeric_limits<uint64_t>::max() >> shift)) {
    throw ValueError("size does not fit in 64 bits");
  }
  return n << shift;
}

std::vector<int> parseCpuList(std::string_view text) {
  std::vector<int> cpus;
  std::string_view rest = trim(text);
  if (rest.empty()) return cpus;
  auto bad = [](std::string_view item, std::string_view why) {
    return ValueError(fmt::format("{} {}; use CPU numbers and ranges like \"0-3,6\"",
                                  quote(item), why));
  };
  std::vector<bool> seen(CPU_SETSIZE, false);
  while (true) {
    size_t comma = rest.find(',');
    std::string_view item = trim(rest.substr(0, comma));
    size_t dash = item.find('-');
    int lo = 0;
    int hi = 0;
    bool ok = dash == std::string_view::npos
                  ? parseInt(item, lo) && (hi = lo, true)
                  : parseInt(trim(item.substr(0, dash)), lo) &&
                        parseInt(trim(item.substr(dash + 1)), hi);
    if (!ok || lo < 0) throw bad(item, "is not a CPU number or range");
    if (hi < lo) throw bad(item, "is a reversed range");
    if (hi >= CPU_SETSIZE) throw bad(item, fmt::format("names a CPU above {}", CPU_SETSIZE - 1));
    for (int cpu = lo; cpu <= hi; ++cpu) {
      if (seen[cpu]) throw bad(item, fmt::format("repeats CPU {}", cpu));
      seen[cpu] = true;
      cpus.push_back(cpu);
    }
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return cpus;
}

std::vector<int> resolveReactorCpus(const Config& config) {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof mask, &mask) != 0) {
    throw std::runtime_error(fmt::format("sched_getaffinity: {}", strerror(errno)));
  }
  std::vector<int> allowed;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &mask)) allowed.push_back(cpu);
  }
  if (config.cpuList.empty()) {
    if (allowed.size() < config.cores) {
      throw std::runtime_error(fmt::format(
          "cores = {} but this process may run only on {} CPU{} ({}); lower cores or widen the "
          "affinity mask (taskset, systemd CPUAffinity=)",
          config.cores, allowed.size(), allowed.size() == 1 ? "" : "s", formatCpuList(allowed)));
    }
    return {allowed.begin(), allowed.begin() + config.cores};
  }
  std::vector<int> chosen(config.cpuList.begin(),
                          config.cpuList.begin() +
                              std::min<size_t>(config.cores, config.cpuList.size()));
  for (int cpu : chosen) {
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &mask)) {
      throw std::runtime_error(fmt::format(
          "cpus lists CPU {}, which is not in this process's affinity mask ({}); list CPUs from "
          "the mask or leave cpus unset",
          cpu, formatCpuList(allowed)));
    }
  }
  return chosen;
}

namespace {
std::string describeRankMap(const std::vector<RankRange>& ranks) {
  std::string out;
  for (const RankRange& r : ranks) {
    if (!out.empty()) out += ',';
    out += r.first == r.last ? fmt::format("{}={}", r.first, r.address)
                             : fmt::format("{}-{}={}", r.first, r.last, r.address);
  }
  return out;
}
}  // namespace

std::string describeConfig(const Config& c) {
  return fmt::format(
      "config: file={} node_id={} socket={} tcp={} cores={} cpus={} spin_us={} ring_entries={} "
      "log_level={} log_format={} arena_size={} arena_pages={} arena_lock={} arena_populate={} peers={} "
      "dns_template={} local_ranks={} advertise={} peer_timeout_ms={} peer_ucx_messages={} "
      "peer_ack_delay_us={} peer_direct_sends={}",
      c.configPath.empty() ? "(none)" : c.configPath, c.nodeId, c.socketPath,
      c.tcpListen.empty() ? "off" : c.tcpListen, c.cores,
      c.cpuList.empty() ? "auto" : formatCpuList(c.cpuList), c.spinUs, c.ringEntries, c.logLevel,
      c.logFormat, formatSize(c.arenaBytes), c.arenaPages, c.arenaLock, c.arenaPopulate,
      c.peers.ranks.empty() ? "(none)" : describeRankMap(c.peers.ranks),
      c.peers.dnsTemplate.empty() ? "(none)" : c.peers.dnsTemplate,
      c.peers.localRanks.empty()
          ? std::string("(all)")
          : formatCpuList(std::vector<int>(c.peers.localRanks.begin(), c.peers.localRanks.end())),
      c.peers.advertise.empty() ? "(none)" : c.peers.advertise, c.peers.timeoutMs,
      c.peers.ucxMessages, c.peers.ackDelayUs, c.peers.directSends);
}

LoadResult loadConfig(int argc, const char* const* argv, const GetEnv& getenv,
                      std::string_view version) {
  static const char* const kNoArgs[] = {"sidecard", nullptr};
  if (argc <= 0 || argv == nullptr) {
    argc = 1;
    argv = kNoArgs;
  }

  CLI::App app{"sidecard: the Sidecar transfer daemon (one per node).", std::string(kProgram)};
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.set_version_flag("--version",
                       fmt::format("{} {}", kProgram, version.empty() ? SIDECAR_VERSION : version),
                       "Print the version and exit");
  app.get_formatter()->column_width(30);

  std::string configFlag;
  CLI::Option* configOpt =
      app.add_option("-c,--config", configFlag, "TOML config file [env SIDECAR_CONFIG]")
                ->type_name("PATH");
  const Config defaults;
  const std::array<std::string, kKeyCount> shownDefaults{
      "(host name)", defaults.logLevel, defaults.logFormat, defaults.socketPath,
      defaults.tcpListen, std::to_string(defaults.cores), "(affinity mask)",
      std::to_string(defaults.spinUs), std::to_string(defaults.ringEntries), "auto",
      defaults.arenaPages, "false", std::to_string(defaults.sendTimeoutMs), "1MiB",
      std::to_string(defaults.transferTtlMs), std::to_string(defaults.worldSize), "(none)",
      "(none)", "(none)", "(none)", "(listen.tcp)", std::to_string(defaults.peers.timeoutMs),
      "true", std::to_string(defaults.peers.ackDelayUs), "true"};

  std::array<std::string, kKeyCount> flagText;
  std::array<CLI::Option*, kKeyCount> flagOpt{};
  std::array<bool, kKeyCount> flagBool{};
  for (size_t k = 0; k < kKeyCount; ++k) {
    const Setting& s = kSettings[k];
    std::string help = fmt::format("{} [{}{}{}, env {}]", s.help, s.table.empty() ? "" : s.table,
                                   s.table.empty() ? "" : ".", s.key, s.env);
    if (s.kind == Kind::kBool) {
      flagOpt[k] = app.add_flag(fmt::format("--{},!--no-{}", s.flag, s.flag), flagBool[k], help);
    } else {
      flagOpt[k] = app.add_option(fmt::format("--{}", s.flag), flagText[k], help)
                       ->default_str(shownDefaults[k])
                       ->type_name(std::string(s.typeName));
    }
  }
  app.footer(
      "Precedence: flags > SIDECAR_* environment variables > TOML file > defaults.\n"
      "Environment variables that are set but empty count as unset. See docs/CONFIG.md.");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::ostringstream out;
    std::ostringstream err;
    int code = app.exit(e, out, err);
    if (code == 0) return ExitNow{0, out.str()};
    return ExitNow{kExitUsage, fmt::format("{}: usage error: {}; see {} --help\n", kProgram,
                                           oneLine(e.what()), kProgram)};
  }

  Config config;
  Origins origins;
  try {
    const char* envConfig = getenv("SIDECAR_CONFIG");
    if (configOpt->count() > 0) {
      if (!configFlag.empty()) applyFile(config, origins, configFlag, "--config");
    } else if (envConfig != nullptr && *envConfig != '\0') {
      applyFile(config, origins, envConfig, "SIDECAR_CONFIG");
    }
    for (size_t k = 0; k < kKeyCount; ++k) {
      std::string env(kSettings[k].env);
      const char* value = getenv(env.c_str());
      if (value == nullptr || *value == '\0') continue;
      applyText(config, origins, static_cast<Key>(k), fmt::format("{}={}", env, quote(value)),
                env, value);
    }
    for (size_t k = 0; k < kKeyCount; ++k) {
      if (flagOpt[k]->count() == 0) continue;
      std::string flag = fmt::format("--{}", kSettings[k].flag);
      if (kSettings[k].kind == Kind::kBool) {
        applyText(config, origins, static_cast<Key>(k), flag, flag, flagBool[k] ? "true" : "false");
      } else {
        applyText(config, origins, static_cast<Key>(k),
                  fmt::format("{}={}", flag, quote(flagText[k])), flag, flagText[k]);
      }
    }
    finish(config, origins);
  } catch (const LoadError& e) {
    return ExitNow{kExitUsage, e.line + "\n"};
  }
  return config;
}

}  // namespace sidecar::daemon
