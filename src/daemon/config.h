// sidecard's configuration: defaults < TOML file < environment < command-line flags.
//
// The loader is a pure function of (argv, environment, file contents): it never exits, prints
// or logs, so main() decides what to do with help text and errors, and tests drive it with a fake
// environment. docs/CONFIG.md is the operator-facing reference; docs/sidecar.example.toml lists
// every key with its default.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "daemon/rank_directory.h"

namespace sidecar::daemon {

struct Config {
  std::string configPath;  // the TOML file that was read; "" when none
  std::string socketPath = "/run/sidecar/sidecar.sock";
  // Unix socket for local clients (created with mode 0660). Validated: non-empty, at most 107
  // bytes (sockaddr_un::sun_path less its terminating NUL).
  std::string tcpListen = "0.0.0.0:7650";
  // host:port for peers and remote ctl; host is an IPv4 address, a name, or "[ipv6]". The loader
  // normalizes "off" to "", so after loading `tcpListen.empty()` means "no TCP listener".
  std::string nodeId;  // never empty after loading: defaults to gethostname()
  uint32_t cores = 1;  // reactor threads, one per core; 1..1024
  std::vector<int> cpuList;
  // CPUs to pin reactor threads to, distinct, each < CPU_SETSIZE; reactor i runs on cpuList[i].
  // Empty: the first `cores` CPUs of the process affinity mask (see resolveReactorCpus()).
  // When cpus are given but cores is set nowhere, cores becomes cpuList.size(); when both are
  // given, cpuList.size() >= cores is required and the first `cores` entries are used.
  uint32_t spinUs = 50;
  // Busy-poll this long after the last event before sleeping in io_uring (0 = never spin);
  // 0..1000000.
  uint32_t ringEntries = 256;  // io_uring SQ entries per core: a power of two, 8..32768
  std::string logLevel = "info";
  // trace|debug|info|warn|error|critical|off; normalized to lower case ("warning" -> "warn",
  // "err" -> "error").
  std::string logFormat = "text";  // only "text" for now; the key exists so "json" can follow
  uint64_t arenaBytes = 0;  // 0 = default sized for the machine (decided by the arena module)
  std::string arenaPages = "auto";  // auto|hugetlb-1g|hugetlb-2m|thp|plain
  bool arenaLock = false;           // mlock the arena
  bool arenaPopulate = false;       // pre-fault every page of the arena at start
  // Transfers.
  uint32_t sendTimeoutMs = 30'000;     // a send waits this long for arena space, then fails
  uint64_t objectBytesMax = 1 << 20;   // largest small object (rides in a control message)
  uint32_t transferTtlMs = 600'000;    // data for ranks that never register is released after this
  int32_t worldSize = 0;               // ranks must be below this; 0 = no limit
  // Peers (other nodes' daemons): see rank_directory.h. After loading, peers.localRanks holds
  // local_ranks plus rank, and peers.advertise defaults to listen.tcp when that names a host.
  PeerSettings peers;
  std::set<int32_t> localRanks;  // as configured ([peers] local_ranks)
  int32_t nodeRank = -1;         // [peers] rank; -1 = unset
};

// "Stop and exit with this code": --help and --version (code 0, text for stdout) or an error
// (code 2, one line for stderr, starting "sidecard: ").
struct ExitNow {
  int code = 0;
  std::string text;  // ends with '\n'
};

using LoadResult = std::variant<Config, ExitNow>;

inline constexpr int kExitUsage = 2;  // bad flag, env var or config file

using GetEnv = std::function<const char*(const char*)>;

LoadResult loadConfig(int argc, const char* const* argv, const GetEnv& getenv = ::getenv,
                      std::string_view version = {});
// Parses argv (argv[0] is skipped), the SIDECAR_* environment and the TOML file named by
// --config or SIDECAR_CONFIG, and validates the result. Any problem yields ExitNow{2, line} with
// ONE line naming where (file:line and [table] key, env var, or flag), the offending value, and
// what is accepted. An empty environment variable counts as unset. `version` is what --version
// prints; empty means the build's SIDECAR_VERSION.

// ---- Value parsers, shared by the loader and usable on their own. They throw
// std::invalid_argument whose what() says what is wrong and what is accepted (no location).

uint64_t parseSize(std::string_view text);
// A byte count with an optional binary unit: "4096", "4096B", "2K", "512MiB", "1G", "64GiB",
// "1T"; units are case-insensitive, K/M/G/T mean KiB/MiB/GiB/TiB, and a space may separate number
// and unit. "auto" is 0. Decimal units ("GB") and fractions are rejected, not guessed at.

std::vector<int> parseCpuList(std::string_view text);
// "0-3,6" -> {0,1,2,3,6}, in the given order. Entries are distinct and < CPU_SETSIZE; "" is {}.

std::vector<int> resolveReactorCpus(const Config& config);
// The CPUs reactors 0..cores-1 run on: the first `cores` of cpuList, or of the process affinity
// mask when cpuList is empty. Throws std::runtime_error naming the CPUs when the affinity mask
// does not contain them or holds fewer than `cores` CPUs. Call it at startup, not in the loader:
// the loader's result must not depend on the machine it is tested on.

std::string describeConfig(const Config& config);
// One line with every effective setting, for the startup log.

}  // namespace sidecar::daemon
