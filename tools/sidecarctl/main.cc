// sidecarctl: the operator's view of a sidecard. `sidecarctl --help` lists the commands.

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <sidecar/client.h>

#include <chrono>
#include <algorithm>
#include <cstdio>
#include <vector>

namespace {

std::string humanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.1f} {}", value, units[unit]);
}

std::string humanDuration(uint64_t ms) {
  uint64_t s = ms / 1000;
  if (s < 60) return fmt::format("{}.{:03}s", s, ms % 1000);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
}

nlohmann::json toJson(const sidecar::NodeStatus& s) {
  nlohmann::json j;
  j["protocolVersion"] = s.protocolVersion;
  j["version"] = s.version;
  j["nodeId"] = s.nodeId;
  j["incarnation"] = fmt::format("{:016x}", s.incarnation);
  j["startedAtUnixMs"] = s.startedAtUnixMs;
  j["uptimeMs"] = s.uptimeMs;
  j["pid"] = s.pid;
  j["socketPath"] = s.socketPath;
  j["tcpAddress"] = s.tcpAddress;
  j["cudaAvailable"] = s.cudaAvailable;
  j["ucxAvailable"] = s.ucxAvailable;
  std::string address;
  for (unsigned char c : s.ucxWorkerAddress) address += fmt::format("{:02x}", c);
  j["ucxWorkerAddress"] = address;  // hex
  j["cores"] = nlohmann::json::array();
  for (const auto& c : s.cores) {
    j["cores"].push_back({{"index", c.index}, {"cpu", c.cpu}, {"connections", c.connections},
                          {"completions", c.completions}, {"sleeps", c.sleeps}});
  }
  if (s.arena) {
    const auto& a = *s.arena;
    nlohmann::json arena = {{"sizeBytes", a.sizeBytes}, {"pageKind", a.pageKind},
                            {"pageKindReason", a.pageKindReason}, {"locked", a.locked},
                            {"slabBytes", a.slabBytes}, {"slabsTotal", a.slabsTotal},
                            {"slabsFree", a.slabsFree}, {"usedBytes", a.usedBytes}};
    arena["hints"] = nlohmann::json::array();
    for (const auto& h : a.hints) {
      arena["hints"].push_back({{"hintBytes", h.hintBytes}, {"slabs", h.slabs},
                                {"unitsUsed", h.unitsUsed}, {"unitsFree", h.unitsFree},
                                {"largestFreeRunUnits", h.largestFreeRunUnits},
                                {"fragmentation", h.fragmentation},
                                {"allocationWaits", h.allocationWaits},
                                {"allocationFailures", h.allocationFailures}});
    }
    j["arena"] = arena;
  } else {
    j["arena"] = nullptr;
  }
  return j;
}

void printTable(const sidecar::NodeStatus& s) {
  fmt::print("node         {}\n", s.nodeId);
  fmt::print("version      {} (protocol {})\n", s.version, s.protocolVersion);
  fmt::print("incarnation  {:016x}\n", s.incarnation);
  fmt::print("pid          {}\n", s.pid);
  fmt::print("uptime       {}\n", humanDuration(s.uptimeMs));
  fmt::print("unix socket  {}\n", s.socketPath.empty() ? "off" : s.socketPath);
  fmt::print("tcp          {}\n", s.tcpAddress.empty() ? "off" : s.tcpAddress);
  fmt::print("cuda         {}\n", s.cudaAvailable ? "available" : "unavailable");
  fmt::print("ucx          {}\n", s.ucxAvailable ? "available" : "unavailable");
  fmt::print("\n{:<6}{:>5}{:>13}{:>7}{:>14}{:>10}\n", "CORE", "CPU", "CONNECTIONS", "LANES",
             "COMPLETIONS", "SLEEPS");
  for (const auto& c : s.cores) {
    fmt::print("{:<6}{:>5}{:>13}{:>7}{:>14}{:>10}\n", c.index,
               c.cpu < 0 ? std::string("-") : std::to_string(c.cpu), c.connections, c.lanes,
               c.completions, c.sleeps);
  }
  if (!s.arena) {
    fmt::print("\narena        none\n");
    return;
  }
  const auto& a = *s.arena;
  fmt::print("\narena        {} of {} pages{}\n", humanBytes(a.sizeBytes), a.pageKind,
             a.locked ? ", locked in RAM" : "");
  if (!a.pageKindReason.empty()) fmt::print("  why        {}\n", a.pageKindReason);
  fmt::print("  used       {}\n", humanBytes(a.usedBytes));
  fmt::print("  slabs      {} of {} free, {} each\n", a.slabsFree, a.slabsTotal,
             humanBytes(a.slabBytes));
  if (a.hints.empty()) return;
  fmt::print("\n{:>12}{:>7}{:>12}{:>12}{:>12}{:>7}{:>8}{:>9}\n", "HINT", "SLABS", "UNITS USED",
             "UNITS FREE", "LARGEST RUN", "FRAG", "WAITS", "FAILURES");
  for (const auto& h : a.hints) {
    fmt::print("{:>12}{:>7}{:>12}{:>12}{:>12}{:>7.2f}{:>8}{:>9}\n", humanBytes(h.hintBytes),
               h.slabs, h.unitsUsed, h.unitsFree, h.largestFreeRunUnits, h.fragmentation,
               h.allocationWaits, h.allocationFailures);
  }
}

nlohmann::json transfersJson_(const sidecar::TransferStatus& t) {
  nlohmann::json j = {{"dataIds", t.dataIds}, {"items", t.items}, {"chunks", t.chunks},
                      {"bytesHeld", t.bytesHeld}, {"waiters", t.waiters},
                      {"duplicatesDropped", t.duplicatesDropped}, {"expiredHolds", t.expiredHolds},
                      {"chunksCompleted", t.chunksCompleted}};
  j["ranks"] = nlohmann::json::array();
  for (const auto& r : t.ranks) {
    j["ranks"].push_back({{"rank", r.rank}, {"group", r.group},
                          {"bytesAllocated", r.bytesAllocated}, {"bytesHeld", r.bytesHeld}});
  }
  j["peers"] = nlohmann::json::array();
  for (const auto& p : t.peers) {
    j["peers"].push_back({{"direction", p.outgoing ? "out" : "in"}, {"nodeId", p.nodeId},
                          {"address", p.address}, {"incarnation", fmt::format("{:016x}", p.incarnation)},
                          {"up", p.up}, {"bodies", p.bodies}, {"chunks", p.chunks},
                          {"bytes", p.bytes}, {"directChunks", p.directChunks}});
  }
  return j;
}

void printTransfers(const sidecar::TransferStatus& t) {
  fmt::print("in flight    {} data id(s), {} chunk(s), {} held, {} waiting recv(s)\n", t.items,
             t.chunks, humanBytes(t.bytesHeld), t.waiters);
  fmt::print("completed    {} chunk(s); {} duplicate replica(s) dropped; {} hold(s) expired\n",
             t.chunksCompleted, t.duplicatesDropped, t.expiredHolds);
  if (!t.ranks.empty()) {
    fmt::print("\n{:<8}{:<20}{:>14}{:>14}\n", "RANK", "GROUP", "ALLOCATED", "HELD");
  }
  for (const auto& r : t.ranks) {
    fmt::print("{:<8}{:<20}{:>14}{:>14}\n", r.rank, fmt::format("[{}]", fmt::join(r.group, ",")),
               humanBytes(r.bytesAllocated), humanBytes(r.bytesHeld));
  }
  if (!t.peers.empty()) {
    fmt::print("\n{:<5}{:<20}{:<24}{:<18}{:<6}{:>9}{:>12}  {}\n", "LINK", "NODE", "ADDRESS",
               "INCARNATION", "UP", "CHUNKS", "BYTES", "BODIES");
  }
  for (const auto& p : t.peers) {
    fmt::print("{:<5}{:<20}{:<24}{:<18}{:<6}{:>9}{:>12}  {}\n", p.outgoing ? "out" : "in", p.nodeId,
               p.address.empty() ? "-" : p.address, fmt::format("{:016x}", p.incarnation),
               p.up ? "yes" : "no", p.chunks, humanBytes(p.bytes),
               p.directChunks == 0 ? p.bodies
                                   : fmt::format("{}; {} sent direct", p.bodies, p.directChunks));
  }
  if (!t.dataIds.empty()) fmt::print("\nDATA IDS\n");
  for (const auto& id : t.dataIds) fmt::print("  {}\n", id);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sidecarctl: inspect and probe a Sidecar node daemon (sidecard)"};
  app.set_version_flag("--version", std::string("sidecarctl ") + sidecar::libraryVersion());
  std::string socketPath = sidecar::Client::defaultSocketPath();
  std::string connect;
  app.add_option("-s,--socket", socketPath, "unix socket of the local daemon")
      ->capture_default_str()
      ->envname("SIDECAR_SOCKET");
  app.add_option("-c,--connect", connect, "reach a daemon over TCP instead, as host:port");
  app.require_subcommand(1);

  bool json = false;
  auto* status = app.add_subcommand("status", "show the daemon's identity, cores and arena");
  status->add_flag("--json", json, "print JSON instead of a table");

  int count = 10;
  size_t payloadBytes = 0;
  auto* ping = app.add_subcommand("ping", "measure control round trips to the daemon");
  ping->add_option("-n,--count", count, "round trips to make")->check(CLI::Range(1, 10000000));
  ping->add_option("--bytes", payloadBytes, "payload bytes per ping (at most 65536)")
      ->check(CLI::Range(0, 65536));

  bool transfersJson = false;
  auto* transfers = app.add_subcommand("transfers", "list registered ranks and data ids in flight");
  transfers->add_flag("--json", transfersJson, "print JSON instead of a table");

  std::string inspectId;
  auto* inspect = app.add_subcommand("inspect", "describe one data id in flight");
  inspect->add_option("id", inspectId, "the data id")->required();

  CLI11_PARSE(app, argc, argv);

  try {
    sidecar::Client client = connect.empty() ? sidecar::Client::connectUnix(socketPath)
                                             : sidecar::Client::connectTcp(connect);
    if (status->parsed()) {
      auto s = client.status();
      auto t = client.transfers();
      if (json) {
        auto j = toJson(s);
        j["transfers"] = transfersJson_(t);
        std::puts(j.dump(2).c_str());
      } else {
        printTable(s);
        fmt::print("\n");
        printTransfers(t);
      }
    } else if (transfers->parsed()) {
      auto t = client.transfers();
      if (transfersJson) {
        std::puts(transfersJson_(t).dump(2).c_str());
      } else {
        printTransfers(t);
      }
    } else if (inspect->parsed()) {
      std::fputs(client.inspect(inspectId).c_str(), stdout);
    } else if (ping->parsed()) {
      std::string payload(payloadBytes, 'x');
      std::vector<double> us;
      us.reserve(static_cast<size_t>(count));
      for (int i = 0; i < count; ++i) {
        auto start = std::chrono::steady_clock::now();
        std::string echo = client.ping(payload);
        auto end = std::chrono::steady_clock::now();
        if (echo != payload) {
          std::fprintf(stderr, "sidecarctl: ping %d: the echo differs from the payload\n", i);
          return 1;
        }
        us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
      }
      std::sort(us.begin(), us.end());
      auto at = [&](double q) { return us[static_cast<size_t>(q * static_cast<double>(us.size() - 1))]; };
      fmt::print("{} pings of {} B: min {:.1f} us, median {:.1f} us, p99 {:.1f} us, max {:.1f} us\n",
                 count, payloadBytes, us.front(), at(0.5), at(0.99), us.back());
    }
  } catch (const sidecar::Error& e) {
    std::fprintf(stderr, "sidecarctl: %s\n", e.what());
    return e.code() == sidecar::ErrorCode::kUnavailable ? 3 : 1;
  }
  return 0;
}
