#pragma once
// libsidecar: the client side of Sidecar. A Client is one connection to a node's sidecard, over
// the node's unix socket (local executors) or TCP (operators, remote tools).
//
// Threading: a Client runs on an event loop that belongs to the thread that created it (shared by
// all Clients of that thread) and must be used and destroyed on that thread only. Calls block
// until the daemon answers or the connection fails.

#include <sidecar/error.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sidecar {

// The protocol version this library speaks (schema/sidecar.capnp, `protocolVersion`).
uint32_t protocolVersion();
// The library's version, e.g. "0.1.0".
const char* libraryVersion();

struct CoreStatus {
  uint32_t index = 0;
  int32_t cpu = -1;  // -1: not pinned
  uint32_t connections = 0;
  uint64_t completions = 0;
  uint64_t sleeps = 0;
  uint32_t lanes = 0;  // sessions' shared-memory lanes this core serves now
};

struct HintStatus {
  uint64_t hintBytes = 0;
  uint32_t slabs = 0;
  uint64_t unitsUsed = 0;
  uint64_t unitsFree = 0;
  uint64_t largestFreeRunUnits = 0;
  double fragmentation = 0;
  uint64_t allocationWaits = 0;
  uint64_t allocationFailures = 0;
};

struct ArenaStatus {
  uint64_t sizeBytes = 0;
  std::string pageKind;
  std::string pageKindReason;
  bool locked = false;
  uint64_t slabBytes = 0;
  uint32_t slabsTotal = 0;
  uint32_t slabsFree = 0;
  uint64_t usedBytes = 0;
  std::vector<HintStatus> hints;
};

struct NodeStatus {
  uint32_t protocolVersion = 0;
  std::string version;
  std::string nodeId;
  uint64_t incarnation = 0;
  int64_t startedAtUnixMs = 0;
  uint64_t uptimeMs = 0;
  int32_t pid = 0;
  std::string socketPath;
  std::string tcpAddress;
  std::vector<CoreStatus> cores;
  std::optional<ArenaStatus> arena;  // absent until the daemon has an arena
  bool cudaAvailable = false;
  bool ucxAvailable = false;
  std::string ucxWorkerAddress;  // bytes, as UCX packs them; empty without UCX
};

struct RankStatus {
  int32_t rank = 0;
  std::vector<int32_t> group;
  uint64_t bytesAllocated = 0;  // allocated in the arena and not yet sent
  uint64_t bytesHeld = 0;       // received data its group has not marked done yet
};

// A link between this node's daemon and another node's (cross-node transfers).
struct PeerLinkStatus {
  bool outgoing = false;     // this daemon opened it and sends over it
  std::string nodeId;
  std::string address;       // host:port of the peer
  uint64_t incarnation = 0;  // changes when the peer restarts
  bool up = false;           // false: still connecting
  std::string bodies;        // how large bodies move: "ucx ..." or "inline"
  uint64_t chunks = 0;       // chunks delivered over the link (stored by the receiving side)
  uint64_t bytes = 0;        // their tensor bytes
  uint64_t directChunks = 0; // of `chunks`, those the sending executors put on the wire themselves
};

struct TransferStatus {
  std::vector<std::string> dataIds;  // in flight
  uint64_t items = 0;
  uint64_t chunks = 0;
  uint64_t bytesHeld = 0;
  uint64_t waiters = 0;
  uint64_t duplicatesDropped = 0;
  uint64_t expiredHolds = 0;
  uint64_t chunksCompleted = 0;
  std::vector<RankStatus> ranks;  // registered
  std::vector<PeerLinkStatus> peers;
};

class Client {
 public:
  // $SIDECAR_SOCKET when set, else /run/sidecar/sidecar.sock.
  static std::string defaultSocketPath();

  // Connects and checks the daemon's protocol version. Throws Error (kUnavailable,
  // kProtocolMismatch).
  static Client connectUnix(const std::string& socketPath = defaultSocketPath());
  // `hostPort` is "host:port", e.g. "10.77.0.2:7650".
  static Client connectTcp(const std::string& hostPort);

  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  ~Client();

  // Round trip with an echoed payload (at most 64 KiB). Returns the echo.
  std::string ping(std::string_view payload = {});

  NodeStatus status();

  // What is in flight: registered ranks, data ids, bytes held, waiters.
  TransferStatus transfers();
  // A readable description of one data id (chunks, holds, waiters). Throws kInvalidArgument
  // when the id is not in flight.
  std::string inspect(const std::string& dataId);

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sidecar
