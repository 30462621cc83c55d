// Tests of sidecard's configuration loader and logging setup. The environment is a fake map and
// config files are private temp files, so nothing here depends on the machine's environment;
// only resolveReactorCpus() reads the real affinity mask, and its tests adapt to it.
#include "daemon/config.h"
#include "daemon/rank_directory.h"
#include "daemon/logging.h"

#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#ifndef SIDECAR_SOURCE_ROOT
#error "build with -DSIDECAR_SOURCE_ROOT=\"/path/to/checkout\" (tests/daemon/meson.build does)"
#endif

namespace sidecar::daemon {
namespace {

using Env = std::map<std::string, std::string>;

// A TOML file under the temp directory, removed when the test ends.
class TempToml {
 public:
  explicit TempToml(const std::string& content) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "sidecar-config-XXXXXX").string();
    int fd = mkstemp(tmpl.data());
    if (fd < 0) throw std::runtime_error("mkstemp failed");
    close(fd);
    path_ = tmpl;
    std::ofstream(path_) << content;
  }
  ~TempToml() { std::filesystem::remove(path_); }
  TempToml(const TempToml&) = delete;
  TempToml& operator=(const TempToml&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

LoadResult load(std::vector<std::string> args, const Env& env = {},
                std::string_view version = {}) {
  args.insert(args.begin(), "sidecard");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  argv.push_back(nullptr);
  GetEnv getenv = [&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  return loadConfig(static_cast<int>(args.size()), argv.data(), getenv, version);
}

// The Config, or a test failure that shows the loader's message.
Config ok(const LoadResult& r) {
  if (const auto* exit = std::get_if<ExitNow>(&r)) {
    ADD_FAILURE() << "expected a Config, got exit " << exit->code << ": " << exit->text;
    return {};
  }
  return std::get<Config>(r);
}

// The error line (without its '\n'), after checking the contract: exit code 2, exactly one line,
// starting with the program name.
std::string error(const LoadResult& r) {
  const auto* exit = std::get_if<ExitNow>(&r);
  if (exit == nullptr) {
    ADD_FAILURE() << "expected an error, got a Config: " << describeConfig(std::get<Config>(r));
    return {};
  }
  EXPECT_EQ(exit->code, kExitUsage);
  EXPECT_EQ(exit->text.find("sidecard: "), 0u) << exit->text;
  EXPECT_FALSE(exit->text.empty());
  if (exit->text.empty()) return {};
  EXPECT_EQ(exit->text.back(), '\n');
  std::string line = exit->text.substr(0, exit->text.size() - 1);
  EXPECT_EQ(line.find('\n'), std::string::npos) << "not one line: " << exit->text;
  return line;
}

// Whether `text` starts with `shape`, where each '9' in `shape` stands for one digit. (Not
// std::regex: GCC 12 warns inside <regex> in the sanitizer build.)
bool startsWithShape(std::string_view text, std::string_view shape) {
  if (text.size() < shape.size()) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    bool ok = shape[i] == '9' ? std::isdigit(static_cast<unsigned char>(text[i])) != 0
                              : text[i] == shape[i];
    if (!ok) return false;
  }
  return true;
}

// `text` past a run of one or more digits at `pos`, or npos if there is none.
size_t skipDigits(std::string_view text, size_t pos) {
  size_t end = pos;
  while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
  return end > pos ? end : std::string_view::npos;
}

std::string hostName() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

void expectDefaults(const Config& c) {
  Config d;
  EXPECT_EQ(c.socketPath, d.socketPath);
  EXPECT_EQ(c.tcpListen, d.tcpListen);
  EXPECT_EQ(c.cores, d.cores);
  EXPECT_EQ(c.cpuList, d.cpuList);
  EXPECT_EQ(c.spinUs, d.spinUs);
  EXPECT_EQ(c.ringEntries, d.ringEntries);
  EXPECT_EQ(c.logLevel, d.logLevel);
  EXPECT_EQ(c.logFormat, d.logFormat);
  EXPECT_EQ(c.arenaBytes, d.arenaBytes);
  EXPECT_EQ(c.arenaPages, d.arenaPages);
  EXPECT_EQ(c.arenaLock, d.arenaLock);
  EXPECT_EQ(c.arenaPopulate, d.arenaPopulate);
  EXPECT_EQ(c.sendTimeoutMs, d.sendTimeoutMs);
  EXPECT_EQ(c.objectBytesMax, d.objectBytesMax);
  EXPECT_EQ(c.transferTtlMs, d.transferTtlMs);
  EXPECT_EQ(c.worldSize, d.worldSize);
  EXPECT_EQ(c.peers.timeoutMs, d.peers.timeoutMs);
  EXPECT_EQ(c.peers.ucxMessages, d.peers.ucxMessages);
  EXPECT_TRUE(d.peers.ucxMessages);
  EXPECT_EQ(c.peers.ackDelayUs, d.peers.ackDelayUs);
  EXPECT_EQ(c.peers.directSends, d.peers.directSends);
  EXPECT_TRUE(d.peers.directSends);
}

constexpr const char* kFullFile = R"(node_id = "file-node"
log_level = "debug"
log_format = "text"

[listen]
socket = "/tmp/file.sock"
tcp = "10.0.0.1:7000"

[reactor]
cores = 2
cpus = [4, 5, 6]
spin_us = 10
ring_entries = 1024

[arena]
size = "2GiB"
pages = "hugetlb-2m"
lock = true
)";

// ---- Layers and precedence.

TEST(ConfigLoad, DefaultsWithNoFileEnvOrFlags) {
  Config c = ok(load({}));
  expectDefaults(c);
  EXPECT_EQ(c.configPath, "");
  EXPECT_EQ(c.nodeId, hostName());
  EXPECT_EQ(c.socketPath, "/run/sidecar/sidecar.sock");
  EXPECT_EQ(c.tcpListen, "0.0.0.0:7650");
  EXPECT_EQ(c.cores, 1u);
  EXPECT_EQ(c.spinUs, 50u);
  EXPECT_EQ(c.ringEntries, 256u);
}

TEST(ConfigLoad, FileOnlySetsEveryKey) {
  TempToml file(kFullFile);
  Config c = ok(load({"--config", file.path()}));
  EXPECT_EQ(c.configPath, file.path());
  EXPECT_EQ(c.nodeId, "file-node");
  EXPECT_EQ(c.logLevel, "debug");
  EXPECT_EQ(c.socketPath, "/tmp/file.sock");
  EXPECT_EQ(c.tcpListen, "10.0.0.1:7000");
  EXPECT_EQ(c.cores, 2u);
  EXPECT_EQ(c.cpuList, (std::vector<int>{4, 5, 6}));
  EXPECT_EQ(c.spinUs, 10u);
  EXPECT_EQ(c.ringEntries, 1024u);
  EXPECT_EQ(c.arenaBytes, 2ull << 30);
  EXPECT_EQ(c.arenaPages, "hugetlb-2m");
  EXPECT_TRUE(c.arenaLock);
}

TEST(ConfigLoad, FileFromSidecarConfigEnv) {
  TempToml file("[reactor]\ncores = 3\n");
  Config c = ok(load({}, {{"SIDECAR_CONFIG", file.path()}}));
  EXPECT_EQ(c.configPath, file.path());
  EXPECT_EQ(c.cores, 3u);
}

TEST(ConfigLoad, ConfigFlagBeatsSidecarConfigEnv) {
  TempToml fromEnv("[reactor]\ncores = 3\n");
  TempToml fromFlag("[reactor]\ncores = 4\n");
  Config c = ok(load({"-c", fromFlag.path()}, {{"SIDECAR_CONFIG", fromEnv.path()}}));
  EXPECT_EQ(c.configPath, fromFlag.path());
  EXPECT_EQ(c.cores, 4u);
}

TEST(ConfigLoad, EmptyConfigFlagReadsNoFile) {
  Config c = ok(load({"--config", ""}, {{"SIDECAR_CONFIG", "/nonexistent/sidecar.toml"}}));
  EXPECT_EQ(c.configPath, "");
}

TEST(ConfigLoad, EnvOverridesFile) {
  TempToml file(kFullFile);
  Env env{{"SIDECAR_CONFIG", file.path()},
          {"SIDECAR_NODE_ID", "env-node"},
          {"SIDECAR_LOG_LEVEL", "warn"},
          {"SIDECAR_LOG_FORMAT", "text"},
          {"SIDECAR_SOCKET", "/tmp/env.sock"},
          {"SIDECAR_TCP", "off"},
          {"SIDECAR_CORES", "1"},
          {"SIDECAR_CPUS", "0-1"},
          {"SIDECAR_SPIN_US", "0"},
          {"SIDECAR_RING_ENTRIES", "64"},
          {"SIDECAR_ARENA_SIZE", "512MiB"},
          {"SIDECAR_ARENA_PAGES", "thp"},
          {"SIDECAR_ARENA_LOCK", "no"}};
  Config c = ok(load({}, env));
  EXPECT_EQ(c.nodeId, "env-node");
  EXPECT_EQ(c.logLevel, "warn");
  EXPECT_EQ(c.socketPath, "/tmp/env.sock");
  EXPECT_EQ(c.tcpListen, "");
  EXPECT_EQ(c.cores, 1u);
  EXPECT_EQ(c.cpuList, (std::vector<int>{0, 1}));
  EXPECT_EQ(c.spinUs, 0u);
  EXPECT_EQ(c.ringEntries, 64u);
  EXPECT_EQ(c.arenaBytes, 512ull << 20);
  EXPECT_EQ(c.arenaPages, "thp");
  EXPECT_FALSE(c.arenaLock);
}

TEST(ConfigLoad, FlagsOverrideEnvAndFile) {
  TempToml file(kFullFile);
  Env env{{"SIDECAR_NODE_ID", "env-node"}, {"SIDECAR_CORES", "1"},
          {"SIDECAR_TCP", "1.2.3.4:1"},    {"SIDECAR_ARENA_LOCK", "true"},
          {"SIDECAR_ARENA_SIZE", "1G"},    {"SIDECAR_SPIN_US", "7"}};
  Config c = ok(load({"--config", file.path(), "--node-id", "flag-node", "--cores=3",
                      "--tcp", "[::1]:9000", "--no-arena-lock", "--arena-size", "4096",
                      "--cpus", "0-2", "--spin-us", "1000000", "--ring-entries", "8",
                      "--log-level", "ERROR", "--arena-pages", "plain", "--socket", "s.sock",
                      "--log-format", "text"},
                     env));
  EXPECT_EQ(c.nodeId, "flag-node");
  EXPECT_EQ(c.cores, 3u);
  EXPECT_EQ(c.cpuList, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(c.tcpListen, "[::1]:9000");
  EXPECT_FALSE(c.arenaLock);
  EXPECT_EQ(c.arenaBytes, 4096u);
  EXPECT_EQ(c.spinUs, 1000000u);
  EXPECT_EQ(c.ringEntries, 8u);
  EXPECT_EQ(c.logLevel, "error");
  EXPECT_EQ(c.arenaPages, "plain");
  EXPECT_EQ(c.socketPath, "s.sock");
}

TEST(ConfigLoad, ArenaLockFlagOverridesFalse) {
  EXPECT_TRUE(ok(load({"--arena-lock"}, {{"SIDECAR_ARENA_LOCK", "0"}})).arenaLock);
  EXPECT_TRUE(ok(load({}, {{"SIDECAR_ARENA_LOCK", "ON"}})).arenaLock);
}

TEST(ConfigLoad, ArenaPopulateFromEachLayer) {
  EXPECT_FALSE(ok(load({})).arenaPopulate);
  TempToml file("[arena]\npopulate = true\n");
  EXPECT_TRUE(ok(load({"--config", file.path()})).arenaPopulate);
  EXPECT_TRUE(ok(load({}, {{"SIDECAR_ARENA_POPULATE", "yes"}})).arenaPopulate);
  // The flag beats the environment, which beats the file.
  EXPECT_FALSE(ok(load({"--config", file.path(), "--no-arena-populate"},
                       {{"SIDECAR_ARENA_POPULATE", "1"}})).arenaPopulate);
  EXPECT_FALSE(ok(load({"--config", file.path()}, {{"SIDECAR_ARENA_POPULATE", "off"}})).arenaPopulate);
  EXPECT_TRUE(ok(load({"--arena-populate"}, {{"SIDECAR_ARENA_POPULATE", "0"}})).arenaPopulate);
}

// [peers] direct_sends in all three layers, a later layer winning; a wrong value says what to do.
TEST(ConfigLoad, PeerDirectSendsSwitch) {
  EXPECT_TRUE(ok(load({})).peers.directSends);
  EXPECT_FALSE(ok(load({"--no-peer-direct-sends"})).peers.directSends);
  EXPECT_FALSE(ok(load({}, {{"SIDECAR_PEER_DIRECT_SENDS", "off"}})).peers.directSends);
  EXPECT_TRUE(ok(load({"--peer-direct-sends"}, {{"SIDECAR_PEER_DIRECT_SENDS", "0"}})).peers.directSends);
  TempToml file("[peers]\ndirect_sends = false\n");
  EXPECT_FALSE(ok(load({"--config", file.path()})).peers.directSends);
  EXPECT_EQ(error(load({}, {{"SIDECAR_PEER_DIRECT_SENDS", "maybe"}})),
            "sidecard: config error: SIDECAR_PEER_DIRECT_SENDS=\"maybe\": must be true or false "
            "(also 1/0, yes/no, on/off)");
}

// [peers] ucx_messages in all three layers, a later layer winning; a wrong value says what to do.
TEST(ConfigLoad, PeerUcxMessagesSwitch) {
  EXPECT_TRUE(ok(load({})).peers.ucxMessages);
  EXPECT_FALSE(ok(load({"--no-peer-ucx-messages"})).peers.ucxMessages);
  EXPECT_FALSE(ok(load({}, {{"SIDECAR_PEER_UCX_MESSAGES", "off"}})).peers.ucxMessages);
  EXPECT_TRUE(ok(load({"--peer-ucx-messages"}, {{"SIDECAR_PEER_UCX_MESSAGES", "0"}})).peers.ucxMessages);
  TempToml file("[peers]\nucx_messages = false\n");
  EXPECT_FALSE(ok(load({"--config", file.path()})).peers.ucxMessages);
  EXPECT_TRUE(ok(load({"--config", file.path()}, {{"SIDECAR_PEER_UCX_MESSAGES", "yes"}})).peers.ucxMessages);
  EXPECT_EQ(error(load({}, {{"SIDECAR_PEER_UCX_MESSAGES", "sometimes"}})),
            "sidecard: config error: SIDECAR_PEER_UCX_MESSAGES=\"sometimes\": must be true or false "
            "(also 1/0, yes/no, on/off)");
  // The two bool flags are independent (each has its own value).
  Config c = ok(load({"--arena-lock", "--no-peer-ucx-messages"}));
  EXPECT_TRUE(c.arenaLock);
  EXPECT_FALSE(c.peers.ucxMessages);
}

// [peers] ack_delay_us: 0 by default (acks at once), a delay from each layer, bounded above
// with the range named in the error.
TEST(ConfigLoad, PeerAckDelay) {
  EXPECT_EQ(ok(load({})).peers.ackDelayUs, 0u);
  EXPECT_EQ(ok(load({"--peer-ack-delay-us", "20"})).peers.ackDelayUs, 20u);
  EXPECT_EQ(ok(load({"--peer-ack-delay-us", "0"})).peers.ackDelayUs, 0u);
  EXPECT_EQ(ok(load({}, {{"SIDECAR_PEER_ACK_DELAY_US", "500"}})).peers.ackDelayUs, 500u);
  TempToml file("[peers]\nack_delay_us = 7\n");
  EXPECT_EQ(ok(load({"--config", file.path()})).peers.ackDelayUs, 7u);
  EXPECT_EQ(error(load({"--peer-ack-delay-us", "20000"})),
            "sidecard: config error: --peer-ack-delay-us=\"20000\": must be an integer from 0 to "
            "10000 (microseconds)");
}

TEST(ConfigLoad, KeysOnlyInFileSurviveOtherLayers) {
  TempToml file("[arena]\npages = \"thp\"\n");
  Config c = ok(load({"--config", file.path(), "--cores", "2"}, {{"SIDECAR_SPIN_US", "5"}}));
  EXPECT_EQ(c.arenaPages, "thp");
  EXPECT_EQ(c.cores, 2u);
  EXPECT_EQ(c.spinUs, 5u);
}

TEST(ConfigLoad, EmptyEnvVarCountsAsUnset) {
  Config c = ok(load({}, {{"SIDECAR_CORES", ""}, {"SIDECAR_TCP", ""}, {"SIDECAR_CONFIG", ""}}));
  EXPECT_EQ(c.cores, 1u);
  EXPECT_EQ(c.tcpListen, "0.0.0.0:7650");
  EXPECT_EQ(c.configPath, "");
}

TEST(ConfigLoad, RepeatedFlagTakesLastValue) {
  EXPECT_EQ(ok(load({"--cores", "2", "--cores", "5"})).cores, 5u);
}

// ---- cores and cpus.

TEST(ConfigCores, CpusAloneSetCoresToTheirCount) {
  EXPECT_EQ(ok(load({"--cpus", "0-3,6"})).cores, 5u);
  TempToml file("[reactor]\ncpus = \"2-3\"\n");
  Config c = ok(load({"--config", file.path()}));
  EXPECT_EQ(c.cores, 2u);
  EXPECT_EQ(c.cpuList, (std::vector<int>{2, 3}));
}

TEST(ConfigCores, MoreCpusThanCoresIsAllowed) {
  Config c = ok(load({"--cores", "2"}, {{"SIDECAR_CPUS", "0-3"}}));
  EXPECT_EQ(c.cores, 2u);
  EXPECT_EQ(c.cpuList.size(), 4u);
}

TEST(ConfigCores, FewerCpusThanCoresNamesBothSources) {
  std::string line = error(load({"--cores", "6"}, {{"SIDECAR_CPUS", "0-3,6"}}));
  EXPECT_EQ(line,
            "sidecard: config error: --cores: cores = 6 but cpus (0-3,6, from SIDECAR_CPUS) lists "
            "only 5 CPUs; list at least one CPU per core, or leave cores unset to use one core "
            "per listed CPU");
}

TEST(ConfigCores, FewerCpusThanCoresInFileNamesLines) {
  TempToml file("[reactor]\ncores = 4\ncpus = [0, 1]\n");
  std::string line = error(load({"--config", file.path()}));
  EXPECT_NE(line.find(file.path() + ":2: [reactor] cores"), std::string::npos) << line;
  EXPECT_NE(line.find("from " + file.path() + ":3: [reactor] cpus"), std::string::npos) << line;
}

// ---- Errors: one line naming where, the value, and what is accepted.

TEST(ConfigErrors, FileValueErrorNamesPathLineTableKeyAndValue) {
  TempToml file("# comment\n[reactor]\ncores = -3\n");
  EXPECT_EQ(error(load({"--config", file.path()})),
            "sidecard: config error: " + file.path() +
                ":3: [reactor] cores = -3: must be an integer from 1 to 1024");
}

TEST(ConfigErrors, EnvValueErrorNamesVariable) {
  EXPECT_EQ(error(load({}, {{"SIDECAR_ARENA_SIZE", "12XB"}})),
            "sidecard: config error: SIDECAR_ARENA_SIZE=\"12XB\": not a size; use e.g. 1GiB, "
            "512MiB or a byte count");
}

TEST(ConfigErrors, FlagValueErrorNamesFlag) {
  EXPECT_EQ(error(load({"--cores", "abc"})),
            "sidecard: config error: --cores=\"abc\": must be an integer from 1 to 1024");
}

TEST(ConfigErrors, ControlCharactersAreEscapedToKeepOneLine) {
  std::string line = error(load({}, {{"SIDECAR_NODE_ID", "a\nb"}}));
  EXPECT_NE(line.find("SIDECAR_NODE_ID=\"a\\x0ab\""), std::string::npos) << line;
}

struct BadValue {
  const char* toml;      // a line in its table; the file is "[table]\n" + toml (or top-level)
  const char* table;     // "" for top-level
  const char* where;     // expected text after "path:line: "
  const char* accepted;  // expected in the problem
};

class ConfigFileErrors : public testing::TestWithParam<BadValue> {};

TEST_P(ConfigFileErrors, NamesKeyAndWhatIsAccepted) {
  const BadValue& p = GetParam();
  std::string content = std::string(p.table).empty()
                            ? std::string(p.toml) + "\n"
                            : "[" + std::string(p.table) + "]\n" + p.toml + "\n";
  int line = std::string(p.table).empty() ? 1 : 2;
  TempToml file(content);
  std::string got = error(load({"--config", file.path()}));
  std::string prefix =
      "sidecard: config error: " + file.path() + ":" + std::to_string(line) + ": " + p.where + ": ";
  EXPECT_EQ(got.find(prefix), 0u) << got << "\nexpected prefix: " << prefix;
  EXPECT_NE(got.find(p.accepted), std::string::npos) << got;
}

INSTANTIATE_TEST_SUITE_P(
    EveryKey, ConfigFileErrors,
    testing::Values(
        BadValue{"node_id = \"has space\"", "", "node_id = \"has space\"", "printable"},
        BadValue{"node_id = 5", "", "node_id = 5", "must be a string"},
        BadValue{"log_level = \"loud\"", "", "log_level = \"loud\"", "trace, debug, info"},
        BadValue{"log_level = 3", "", "log_level = 3", "must be a string"},
        BadValue{"log_format = \"json\"", "", "log_format = \"json\"", "\"text\""},
        BadValue{"socket = \"\"", "listen", "[listen] socket = \"\"", "at most 107 bytes"},
        BadValue{"socket = 1", "listen", "[listen] socket = 1", "must be a string"},
        BadValue{"tcp = \"localhost\"", "listen", "[listen] tcp = \"localhost\"",
                 "port from 0 to 65535"},
        BadValue{"tcp = \"h:-1\"", "listen", "[listen] tcp = \"h:-1\"", "port from 0 to 65535"},
        BadValue{"cores = 0", "reactor", "[reactor] cores = 0", "from 1 to 1024"},
        BadValue{"cores = 1025", "reactor", "[reactor] cores = 1025", "from 1 to 1024"},
        BadValue{"cores = \"4\"", "reactor", "[reactor] cores = \"4\"", "from 1 to 1024"},
        BadValue{"cores = 2.5", "reactor", "[reactor] cores = 2.5", "from 1 to 1024"},
        BadValue{"cpus = [0, \"a\"]", "reactor", "[reactor] cpus = [0, \"a\"]",
                 "[0, 1, 2]"},
        BadValue{"cpus = [1024]", "reactor", "[reactor] cpus = [1024]", "above 1023"},
        BadValue{"cpus = [-1]", "reactor", "[reactor] cpus = [-1]", "not a CPU number"},
        BadValue{"cpus = \"3-1\"", "reactor", "[reactor] cpus = \"3-1\"", "reversed range"},
        BadValue{"cpus = 3", "reactor", "[reactor] cpus = 3", "[0, 1, 2]"},
        BadValue{"spin_us = -1", "reactor", "[reactor] spin_us = -1", "from 0 to 1000000"},
        BadValue{"spin_us = 1000001", "reactor", "[reactor] spin_us = 1000001", "1000000"},
        BadValue{"ring_entries = 100", "reactor", "[reactor] ring_entries = 100",
                 "power of two from 8 to 32768"},
        BadValue{"ring_entries = 4", "reactor", "[reactor] ring_entries = 4", "power of two"},
        BadValue{"ring_entries = 65536", "reactor", "[reactor] ring_entries = 65536",
                 "power of two"},
        BadValue{"size = \"1GB\"", "arena", "[arena] size = \"1GB\"", "not a size"},
        BadValue{"size = -1", "arena", "[arena] size = -1", "not a size"},
        BadValue{"size = 1.5", "arena", "[arena] size = 1.5", "not a size"},
        BadValue{"pages = \"huge\"", "arena", "[arena] pages = \"huge\"",
                 "auto, hugetlb-1g, hugetlb-2m, thp, plain"},
        BadValue{"lock = \"yes\"", "arena", "[arena] lock = \"yes\"", "true or false"},
        BadValue{"lock = 1", "arena", "[arena] lock = 1", "true or false"}));

struct BadText {
  const char* env;
  const char* flag;
  const char* value;
  const char* accepted;
};

class ConfigTextErrors : public testing::TestWithParam<BadText> {};

TEST_P(ConfigTextErrors, EnvAndFlagNameThemselves) {
  const BadText& p = GetParam();
  std::string quoted = std::string("=\"") + p.value + "\": ";
  std::string fromEnv = error(load({}, {{p.env, p.value}}));
  EXPECT_EQ(fromEnv.find("sidecard: config error: " + std::string(p.env) + quoted), 0u)
      << fromEnv;
  EXPECT_NE(fromEnv.find(p.accepted), std::string::npos) << fromEnv;
  std::string fromFlag = error(load({std::string(p.flag) + "=" + p.value}));
  EXPECT_EQ(fromFlag.find("sidecard: config error: " + std::string(p.flag) + quoted), 0u)
      << fromFlag;
  EXPECT_NE(fromFlag.find(p.accepted), std::string::npos) << fromFlag;
}

INSTANTIATE_TEST_SUITE_P(
    EveryVariable, ConfigTextErrors,
    testing::Values(
        BadText{"SIDECAR_NODE_ID", "--node-id", "a b", "printable"},
        BadText{"SIDECAR_LOG_LEVEL", "--log-level", "verbose", "trace, debug, info"},
        BadText{"SIDECAR_LOG_FORMAT", "--log-format", "json", "\"text\""},
        BadText{"SIDECAR_SOCKET", "--socket",
                "/run/sidecar/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                "aaaaaaaaaaaaaaaaaaaaaaaa.sock",
                "at most 107 bytes"},
        BadText{"SIDECAR_TCP", "--tcp", "7650", "host:port"},
        BadText{"SIDECAR_TCP", "--tcp", ":7650", "host is missing"},
        BadText{"SIDECAR_TCP", "--tcp", "::1:7650", "need brackets"},
        BadText{"SIDECAR_TCP", "--tcp", "[zz]:7650", "not an IPv6 address"},
        BadText{"SIDECAR_TCP", "--tcp", "1.2.3.999:7650", "not an IPv4 address"},
        BadText{"SIDECAR_TCP", "--tcp", "h:65536", "port from 0 to 65535"},
        BadText{"SIDECAR_CORES", "--cores", "-3", "from 1 to 1024"},
        BadText{"SIDECAR_CORES", "--cores", "4x", "from 1 to 1024"},
        BadText{"SIDECAR_CPUS", "--cpus", "0-3,x", "not a CPU number or range"},
        BadText{"SIDECAR_CPUS", "--cpus", "0-1,1", "repeats CPU 1"},
        BadText{"SIDECAR_SPIN_US", "--spin-us", "fast", "from 0 to 1000000"},
        BadText{"SIDECAR_RING_ENTRIES", "--ring-entries", "300", "power of two"},
        BadText{"SIDECAR_ARENA_SIZE", "--arena-size", "12XB", "not a size"},
        BadText{"SIDECAR_ARENA_PAGES", "--arena-pages", "2m", "hugetlb-2m"}));

TEST(ConfigErrors, ArenaPopulateMustBeBoolean) {
  EXPECT_EQ(error(load({}, {{"SIDECAR_ARENA_POPULATE", "sometimes"}})),
            "sidecard: config error: SIDECAR_ARENA_POPULATE=\"sometimes\": must be true or false "
            "(also 1/0, yes/no, on/off)");
  TempToml file("[arena]\npopulate = \"yes\"\n");
  EXPECT_NE(error(load({"--config", file.path()})).find("[arena] populate"), std::string::npos);
}

TEST(ConfigErrors, ArenaLockEnvMustBeBoolean) {
  EXPECT_EQ(error(load({}, {{"SIDECAR_ARENA_LOCK", "maybe"}})),
            "sidecard: config error: SIDECAR_ARENA_LOCK=\"maybe\": must be true or false (also "
            "1/0, yes/no, on/off)");
}

TEST(ConfigErrors, MissingConfigFileNamesFlagOrVariable) {
  EXPECT_EQ(error(load({"--config", "/nonexistent/sidecar.toml"})),
            "sidecard: config error: --config=\"/nonexistent/sidecar.toml\": cannot read the "
            "config file: No such file or directory");
  EXPECT_EQ(error(load({}, {{"SIDECAR_CONFIG", "/nonexistent/s.toml"}})),
            "sidecard: config error: SIDECAR_CONFIG=\"/nonexistent/s.toml\": cannot read the "
            "config file: No such file or directory");
}

TEST(ConfigErrors, ConfigPathThatIsADirectory) {
  std::string dir = std::filesystem::temp_directory_path().string();
  std::string line = error(load({"--config", dir}));
  EXPECT_NE(line.find("is a directory"), std::string::npos) << line;
}

TEST(ConfigErrors, TomlSyntaxErrorGivesFileLineColumn) {
  TempToml file("[reactor]\ncores = 2\nspin_us = = 5\n");
  std::string line = error(load({"--config", file.path()}));
  std::string prefix = "sidecard: config error: " + file.path() + ":3:";
  ASSERT_EQ(line.find(prefix), 0u) << line;
  size_t column = skipDigits(line, prefix.size());
  ASSERT_NE(column, std::string::npos) << line;
  EXPECT_EQ(line.find(": TOML syntax error: ", column), column) << line;
  EXPECT_GT(line.size(), column + std::string_view(": TOML syntax error: ").size()) << line;
}

TEST(ConfigErrors, UnknownKeyInTableListsKnownKeys) {
  TempToml file("[reactor]\ncores = 2\ncorez = 4\n");
  EXPECT_EQ(error(load({"--config", file.path()})),
            "sidecard: config error: " + file.path() +
                ":3: unknown key 'corez' in [reactor]; known keys: cores, cpus, spin_us, "
                "ring_entries");
}

TEST(ConfigErrors, UnknownKeysInEveryTable) {
  for (const char* table : {"listen", "arena"}) {
    TempToml file(std::string("[") + table + "]\nbogus = 1\n");
    std::string line = error(load({"--config", file.path()}));
    EXPECT_NE(line.find(std::string("unknown key 'bogus' in [") + table + "]"),
              std::string::npos)
        << line;
  }
}

TEST(ConfigErrors, UnknownTopLevelKeyAndTable) {
  TempToml key("nodeid = \"x\"\n");
  EXPECT_EQ(error(load({"--config", key.path()})),
            "sidecard: config error: " + key.path() +
                ":1: unknown key 'nodeid'; known top-level keys: node_id, log_level, "
                "log_format, [listen], [reactor], [arena], [transfer], [peers]");
  TempToml table("\n[reacter]\ncores = 2\n");
  std::string line = error(load({"--config", table.path()}));
  EXPECT_NE(line.find(table.path() + ":2: unknown key 'reacter'"), std::string::npos) << line;
}

TEST(ConfigErrors, NestedTableInsideSectionIsUnknown) {
  TempToml file("[reactor.extra]\nx = 1\n");
  std::string line = error(load({"--config", file.path()}));
  EXPECT_NE(line.find("unknown key 'extra' in [reactor]"), std::string::npos) << line;
}

TEST(ConfigErrors, SectionWrittenAsScalar) {
  TempToml file("reactor = 5\n");
  std::string line = error(load({"--config", file.path()}));
  EXPECT_NE(line.find(file.path() + ":1: reactor = 5: 'reactor' must be a table"),
            std::string::npos)
      << line;
}

TEST(ConfigErrors, UnknownFlagIsAUsageError) {
  std::string line = error(load({"--corse", "2"}));
  EXPECT_EQ(line.find("sidecard: usage error: "), 0u) << line;
  EXPECT_NE(line.find("--corse"), std::string::npos) << line;
  EXPECT_NE(line.find("--help"), std::string::npos) << line;
}

TEST(ConfigErrors, MissingFlagValueIsAUsageError) {
  std::string line = error(load({"--cores"}));
  EXPECT_NE(line.find("--cores"), std::string::npos) << line;
}

TEST(ConfigErrors, PositionalArgumentsAreRejected) {
  std::string line = error(load({"extra"}));
  EXPECT_NE(line.find("extra"), std::string::npos) << line;
}

// ---- Accepted edge values.

TEST(ConfigValues, BoundariesAreAccepted) {
  EXPECT_EQ(ok(load({"--cores", "1024"})).cores, 1024u);
  EXPECT_EQ(ok(load({"--ring-entries", "32768"})).ringEntries, 32768u);
  EXPECT_EQ(ok(load({"--ring-entries", "8"})).ringEntries, 8u);
  EXPECT_EQ(ok(load({"--spin-us", "0"})).spinUs, 0u);
  EXPECT_EQ(ok(load({"--tcp", "h:65535"})).tcpListen, "h:65535");
  // Port 0 asks the kernel for any free port (tests, several daemons on one host).
  EXPECT_EQ(ok(load({"--tcp", "127.0.0.1:0"})).tcpListen, "127.0.0.1:0");
  EXPECT_EQ(ok(load({"--tcp", "node-1.example.com:1"})).tcpListen, "node-1.example.com:1");
  EXPECT_EQ(ok(load({"--tcp", "[::]:7650"})).tcpListen, "[::]:7650");
  EXPECT_EQ(ok(load({"--tcp", "OFF"})).tcpListen, "");
  EXPECT_EQ(ok(load({"--tcp", ""})).tcpListen, "");
  std::string path107 = "/" + std::string(106, 's');
  EXPECT_EQ(ok(load({"--socket", path107})).socketPath, path107);
  EXPECT_NE(error(load({"--socket", path107 + "s"})).find("this one has 108"), std::string::npos);
}

TEST(ConfigValues, LogLevelIsNormalized) {
  EXPECT_EQ(ok(load({}, {{"SIDECAR_LOG_LEVEL", "WARNING"}})).logLevel, "warn");
  EXPECT_EQ(ok(load({"--log-level", "err"})).logLevel, "error");
  EXPECT_EQ(ok(load({"--log-level", "off"})).logLevel, "off");
}

TEST(ConfigValues, TomlSizeAsIntegerOrString) {
  TempToml bytes("[arena]\nsize = 1073741824\n");
  EXPECT_EQ(ok(load({"--config", bytes.path()})).arenaBytes, 1ull << 30);
  TempToml text("[arena]\nsize = \"64GiB\"\n");
  EXPECT_EQ(ok(load({"--config", text.path()})).arenaBytes, 64ull << 30);
  TempToml zero("[arena]\nsize = 0\n");
  EXPECT_EQ(ok(load({"--config", zero.path()})).arenaBytes, 0u);
}

TEST(ConfigValues, DottedKeysAndInlineTablesWork) {
  TempToml file("reactor.cores = 2\nlisten = { tcp = \"off\" }\n");
  Config c = ok(load({"--config", file.path()}));
  EXPECT_EQ(c.cores, 2u);
  EXPECT_EQ(c.tcpListen, "");
}

// ---- --help and --version.

TEST(ConfigHelp, HelpExitsZeroAndListsFlagsAndVariables) {
  for (const char* flag : {"--help", "-h"}) {
    LoadResult r = load({flag});
    const auto* exit = std::get_if<ExitNow>(&r);
    ASSERT_NE(exit, nullptr);
    EXPECT_EQ(exit->code, 0);
    for (const char* want : {"Usage", "--config", "--socket", "--tcp", "--node-id", "--cores",
                             "--cpus", "--spin-us", "--ring-entries", "--log-level",
                             "--arena-size", "--arena-pages", "--arena-lock", "--arena-populate", "--version",
                             "SIDECAR_CORES", "SIDECAR_CONFIG", "Precedence"}) {
      EXPECT_NE(exit->text.find(want), std::string::npos) << want << " missing from\n"
                                                          << exit->text;
    }
  }
}

TEST(ConfigHelp, HelpWinsOverBrokenEnvironment) {
  LoadResult r = load({"--help"}, {{"SIDECAR_CORES", "lots"}});
  ASSERT_TRUE(std::holds_alternative<ExitNow>(r));
  EXPECT_EQ(std::get<ExitNow>(r).code, 0);
}

TEST(ConfigHelp, VersionExitsZero) {
  LoadResult r = load({"--version"}, {}, "1.2.3");
  const auto* exit = std::get_if<ExitNow>(&r);
  ASSERT_NE(exit, nullptr);
  EXPECT_EQ(exit->code, 0);
  EXPECT_EQ(exit->text, "sidecard 1.2.3\n");

  LoadResult built = load({"--version"});
  const auto* builtExit = std::get_if<ExitNow>(&built);
  ASSERT_NE(builtExit, nullptr);
  EXPECT_EQ(builtExit->code, 0);
  EXPECT_EQ(builtExit->text.find("sidecard "), 0u) << builtExit->text;
}

// ---- The shipped example file.

std::string examplePath() { return std::string(SIDECAR_SOURCE_ROOT) + "/docs/sidecar.example.toml"; }

TEST(ConfigExample, LoadsAsShipped) {
  Config c = ok(load({"--config", examplePath()}));
  EXPECT_EQ(c.configPath, examplePath());
  expectDefaults(c);
}

// Every key in the example is commented out and shows its default: uncommenting them all must
// load and change nothing but node_id, so the documented defaults cannot drift from the code.
TEST(ConfigExample, UncommentedKeysAreExactlyTheDefaults) {
  std::ifstream in(examplePath());
  ASSERT_TRUE(in) << examplePath();
  std::string content;
  int keys = 0;
  for (std::string line; std::getline(in, line);) {
    // "# key = value" -> "key = value"; prose comments never have " = " after one word.
    size_t eq = line.find(" = ");
    if (line.rfind("# ", 0) == 0 && eq != std::string::npos &&
        std::all_of(line.begin() + 2, line.begin() + eq,
                    [](char c) { return (c >= 'a' && c <= 'z') || c == '_'; })) {
      line = line.substr(2);
      ++keys;
    }
    content += line + "\n";
  }
  EXPECT_EQ(keys, 25);  // every key of Config but configPath and [peers] rank (no default)
  TempToml file(content);
  Config c = ok(load({"--config", file.path()}));
  expectDefaults(c);
  EXPECT_EQ(c.nodeId, "gpu-node-17");
}

// ---- [peers] (where ranks live: see also rank_directory_test.cc).

TEST(PeersConfig, ReferenceEnvironmentVariables) {
  auto r = load({}, {{"SIDECAR_WORLD_SIZE", "8"},
                         {"SIDECAR_LOCAL_PEER_RANKS", "0,1,2,3"},
                         {"SIDECAR_RANK", "2"},
                         {"SIDECAR_PEER_DNS_TEMPLATE", "sidecar-{rank}.svc:7650"}});
  ASSERT_TRUE(std::holds_alternative<Config>(r)) << std::get<ExitNow>(r).text;
  const Config& c = std::get<Config>(r);
  EXPECT_EQ(c.worldSize, 8);
  EXPECT_EQ(c.peers.localRanks, (std::set<int32_t>{0, 1, 2, 3}));
  RankDirectory directory(c.peers);
  EXPECT_EQ(directory.remoteAddress(5), "sidecar-5.svc:7650");
  EXPECT_EQ(c.peers.timeoutMs, 5000u);
}

TEST(PeersConfig, AdvertiseDefaultsToTheTcpListenerWhenItNamesAHost) {
  auto r = load({"--tcp", "10.77.0.1:7650", "--peers", "0=10.77.0.1:7650,1=10.77.0.2:7650"});
  ASSERT_TRUE(std::holds_alternative<Config>(r)) << std::get<ExitNow>(r).text;
  RankDirectory directory(std::get<Config>(r).peers);
  EXPECT_EQ(directory.remoteAddress(0), std::nullopt);
  EXPECT_EQ(directory.remoteAddress(1), "10.77.0.2:7650");
}

TEST(PeersConfig, MapWithoutKnowingWhichEntryIsThisNodeIsAnError) {
  auto r = load({"--peers", "0=10.77.0.1:7650"});  // listens on 0.0.0.0: which entry is us?
  ASSERT_TRUE(std::holds_alternative<ExitNow>(r));
  EXPECT_NE(std::get<ExitNow>(r).text.find("set [peers] advertise"), std::string::npos)
      << std::get<ExitNow>(r).text;
  auto bad = load({"--peer-timeout-ms", "5"});
  ASSERT_TRUE(std::holds_alternative<ExitNow>(bad));
  EXPECT_NE(std::get<ExitNow>(bad).text.find("--peer-timeout-ms"), std::string::npos);
  auto badTemplate = load({"--peer-dns-template", "sidecar.svc:7650"});
  ASSERT_TRUE(std::holds_alternative<ExitNow>(badTemplate));
  EXPECT_NE(std::get<ExitNow>(badTemplate).text.find("{rank}"), std::string::npos);
}


// ---- [transfer].

TEST(ConfigTransfer, FileEnvAndFlags) {
  TempToml file("[transfer]\nsend_timeout_ms = 500\nobject_bytes_max = \"64KiB\"\nttl_ms = 2000\n"
                "world_size = 8\n");
  Config c = ok(load({"--config", file.path()}));
  EXPECT_EQ(c.sendTimeoutMs, 500u);
  EXPECT_EQ(c.objectBytesMax, 64u << 10);
  EXPECT_EQ(c.transferTtlMs, 2000u);
  EXPECT_EQ(c.worldSize, 8);
  Config f = ok(load({"--config", file.path(), "--send-timeout-ms", "750", "--world-size", "0"}));
  EXPECT_EQ(f.sendTimeoutMs, 750u);
  EXPECT_EQ(f.worldSize, 0);
}

TEST(ConfigTransfer, BadValuesNameTheKey) {
  EXPECT_NE(error(load({"--send-timeout-ms", "0"})).find("--send-timeout-ms"), std::string::npos);
  EXPECT_NE(error(load({"--object-bytes-max", "1"})).find("1 KiB to 64 MiB"), std::string::npos);
  EXPECT_NE(error(load({"--ttl-ms", "soon"})).find("--ttl-ms"), std::string::npos);
  EXPECT_NE(error(load({"--world-size", "-1"})).find("--world-size"), std::string::npos);
}

// ---- parseSize.

TEST(ParseSize, Accepted) {
  struct Case {
    const char* text;
    uint64_t bytes;
  };
  for (const Case& c : std::initializer_list<Case>{
           {"0", 0},
           {"auto", 0},
           {"AUTO", 0},
           {"4096", 4096},
           {"4096B", 4096},
           {"2K", 2048},
           {"2KiB", 2048},
           {"2M", 2ull << 20},
           {"512MiB", 512ull << 20},
           {"512mib", 512ull << 20},
           {"1G", 1ull << 30},
           {"1g", 1ull << 30},
           {"64GiB", 64ull << 30},
           {"64 GiB", 64ull << 30},
           {" 1T ", 1ull << 40},
           {"2TiB", 2ull << 40},
           {"16777215TiB", 16777215ull << 40},
           {"18446744073709551615", 18446744073709551615ull},
       }) {
    EXPECT_EQ(parseSize(c.text), c.bytes) << c.text;
  }
}

TEST(ParseSize, Rejected) {
  for (const char* text : {"", " ", "GiB", "12XB", "1GB", "1MB", "1.5GiB", "-1", "+1", "1 G i B",
                           "0x10", "1e9", "1Gi", "16777216TiB", "18446744073709551616"}) {
    EXPECT_THROW(parseSize(text), std::invalid_argument) << '"' << text << '"';
  }
  try {
    parseSize("12XB");
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "not a size; use e.g. 1GiB, 512MiB or a byte count");
  }
}

// ---- parseCpuList.

TEST(ParseCpuList, Accepted) {
  EXPECT_EQ(parseCpuList("0-3,6"), (std::vector<int>{0, 1, 2, 3, 6}));
  EXPECT_EQ(parseCpuList(""), std::vector<int>{});
  EXPECT_EQ(parseCpuList("5"), std::vector<int>{5});
  EXPECT_EQ(parseCpuList(" 7 , 2-3 "), (std::vector<int>{7, 2, 3}));
  EXPECT_EQ(parseCpuList("4-4"), std::vector<int>{4});
  EXPECT_EQ(parseCpuList("1023"), std::vector<int>{1023});
  EXPECT_EQ(parseCpuList("0-1023").size(), 1024u);
}

TEST(ParseCpuList, Rejected) {
  for (const char* text : {"a", "1,,2", ",", "1,", "-1", "3-1", "1024", "0-1024", "1,1",
                           "0-2,2", "1-", "-", "1-2-3", "0x1", "1.5"}) {
    EXPECT_THROW(parseCpuList(text), std::invalid_argument) << '"' << text << '"';
  }
}

// ---- resolveReactorCpus (reads the real affinity mask, so it adapts to the machine).

std::vector<int> affinity() {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  EXPECT_EQ(sched_getaffinity(0, sizeof mask, &mask), 0);
  std::vector<int> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &mask)) cpus.push_back(cpu);
  }
  return cpus;
}

TEST(ResolveReactorCpus, DefaultIsTheFirstCpusOfTheMask) {
  std::vector<int> mask = affinity();
  ASSERT_FALSE(mask.empty());
  Config c;
  c.cores = 1;
  EXPECT_EQ(resolveReactorCpus(c), std::vector<int>{mask[0]});
}

TEST(ResolveReactorCpus, ExplicitListTakesTheFirstCores) {
  std::vector<int> mask = affinity();
  Config c;
  c.cpuList = mask;
  c.cores = 1;
  EXPECT_EQ(resolveReactorCpus(c), std::vector<int>{mask[0]});
}

TEST(ResolveReactorCpus, MoreCoresThanTheMaskHolds) {
  std::vector<int> mask = affinity();
  if (mask.size() >= 1024) GTEST_SKIP() << "this machine allows 1024 CPUs";
  Config c;
  c.cores = 1024;
  EXPECT_THROW(resolveReactorCpus(c), std::runtime_error);
}

TEST(ResolveReactorCpus, CpuOutsideTheMask) {
  std::vector<int> mask = affinity();
  int outside = -1;
  for (int cpu = CPU_SETSIZE - 1; cpu >= 0 && outside < 0; --cpu) {
    if (std::find(mask.begin(), mask.end(), cpu) == mask.end()) outside = cpu;
  }
  if (outside < 0) GTEST_SKIP() << "every CPU is in the mask";
  Config c;
  c.cpuList = {outside};
  c.cores = 1;
  try {
    resolveReactorCpus(c);
    FAIL() << "expected an error for CPU " << outside;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("CPU " + std::to_string(outside)), std::string::npos)
        << e.what();
  }
}

TEST(DescribeConfig, OneLineWithEveryKey) {
  Config c;
  c.nodeId = "n1";
  c.cpuList = {0, 1, 2, 3, 6, 8, 9};
  c.arenaBytes = 64ull << 30;
  c.tcpListen = "";
  std::string s = describeConfig(c);
  EXPECT_EQ(s.find('\n'), std::string::npos);
  for (const char* want : {"node_id=n1", "cpus=0-3,6,8,9", "arena_size=64GiB", "tcp=off",
                           "socket=/run/sidecar/sidecar.sock", "cores=1", "spin_us=50",
                           "ring_entries=256", "log_level=info", "arena_pages=auto",
                           "arena_lock=false", "file=(none)"}) {
    EXPECT_NE(s.find(want), std::string::npos) << want << " missing from " << s;
  }
}

// ---- Logging.

TEST(Logging, ParseLogLevel) {
  using spdlog::level::level_enum;
  EXPECT_EQ(parseLogLevel("trace"), level_enum::trace);
  EXPECT_EQ(parseLogLevel("debug"), level_enum::debug);
  EXPECT_EQ(parseLogLevel("INFO"), level_enum::info);
  EXPECT_EQ(parseLogLevel("warn"), level_enum::warn);
  EXPECT_EQ(parseLogLevel("warning"), level_enum::warn);
  EXPECT_EQ(parseLogLevel("error"), level_enum::err);
  EXPECT_EQ(parseLogLevel("critical"), level_enum::critical);
  EXPECT_EQ(parseLogLevel("off"), level_enum::off);
  EXPECT_EQ(parseLogLevel("loud"), std::nullopt);
  EXPECT_EQ(parseLogLevel(""), std::nullopt);
}

TEST(Logging, EveryLevelTheLoaderAcceptsIsKnownToLogging) {
  for (const char* level : {"trace", "debug", "info", "warn", "error", "critical", "off",
                            "WARNING", "err"}) {
    Config c = ok(load({"--log-level", level}));
    EXPECT_TRUE(parseLogLevel(c.logLevel).has_value()) << c.logLevel;
  }
}

TEST(Logging, PatternHasTimeLevelAndThreadId) {
  std::ostringstream out;
  setupLogging("info", std::make_shared<spdlog::sinks::ostream_sink_mt>(out));
  spdlog::debug("hidden");
  spdlog::info("hello {}", 42);
  spdlog::default_logger()->flush();
  // [2026-11-22 03:14:59.123] [info] [t:1234] hello 42
  std::string line = out.str();
  std::string_view head = "[9999-99-99 99:99:99.999] [info] [t:";
  ASSERT_TRUE(startsWithShape(line, head)) << line;
  size_t tid = skipDigits(line, head.size());
  ASSERT_NE(tid, std::string::npos) << line;
  EXPECT_EQ(line.substr(tid), "] hello 42\n") << line;
  EXPECT_EQ(out.str().find("hidden"), std::string::npos);
  setupLogging("info");  // back to stderr for later tests
}

TEST(Logging, UnknownLevelThrows) {
  EXPECT_THROW(setupLogging("loud"), std::invalid_argument);
}

}  // namespace
}  // namespace sidecar::daemon
