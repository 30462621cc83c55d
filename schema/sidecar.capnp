@0xaa62a0ac61a616ee;
# Sidecar's control protocol: what executors (over the node's unix socket) and operators and peer
# daemons (over TCP) say to `sidecard`. Bodies of large transfers never travel here.
#
# Versioning: `protocolVersion` below is bumped whenever a change is not wire-compatible.
# Compatible changes (new fields at the end of a struct, new methods at the end of an interface)
# keep the number; Cap'n Proto gives old readers the defaults and old servers answer new methods
# with `unimplemented`. Clients compare `NodeInfo.protocolVersion` with their own after connecting
# and refuse a daemon whose number differs.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("sidecar::proto");

const protocolVersion :UInt32 = 1;

struct CoreInfo {
  index @0 :UInt32;          # reactor index, 0-based
  cpu @1 :Int32;             # CPU the reactor thread is pinned to (-1: not pinned)
  connections @2 :UInt32;    # client and peer connections this core serves now
  completions @3 :UInt64;    # io_uring completions handled since start
  sleeps @4 :UInt64;         # times the thread slept in io_uring since start
}

struct HintStats {
  hintBytes @0 :UInt64;      # the unit size this slab class serves
  slabs @1 :UInt32;
  unitsUsed @2 :UInt64;
  unitsFree @3 :UInt64;
  largestFreeRunUnits @4 :UInt64;
  fragmentation @5 :Float64; # 1 - largestFreeRun / free (0: all free space is one run)
  allocationWaits @6 :UInt64;
  allocationFailures @7 :UInt64;
}

struct ArenaInfo {
  sizeBytes @0 :UInt64;
  pageKind @1 :Text;         # "hugetlb-1g", "hugetlb-2m", "thp" or "plain"
  pageKindReason @2 :Text;   # why this kind (e.g. which better kind was unavailable and why)
  locked @3 :Bool;           # mlocked into RAM
  slabBytes @4 :UInt64;
  slabsTotal @5 :UInt32;
  slabsFree @6 :UInt32;
  usedBytes @7 :UInt64;
  hints @8 :List(HintStats);
}

struct NodeInfo {
  protocolVersion @0 :UInt32;
  version @1 :Text;          # software version of sidecard
  nodeId @2 :Text;           # operator-chosen name, hostname by default
  incarnation @3 :UInt64;    # random, new on every start: tells a restarted daemon from the old one
  startedAtUnixMs @4 :Int64;
  uptimeMs @5 :UInt64;
  pid @6 :Int32;
  socketPath @7 :Text;       # "" when the unix socket is off
  tcpAddress @8 :Text;       # "" when TCP is off
  cores @9 :List(CoreInfo);
  arena @10 :ArenaInfo;      # unset until the arena exists
  cudaAvailable @11 :Bool;   # this daemon can copy from GPUs
  ucxAvailable @12 :Bool;    # this daemon can reach other nodes over UCX
}

interface Sidecar {
  # The bootstrap interface every connection gets.

  ping @0 (payload :Data) -> (payload :Data);
  # Echoes `payload` back: a liveness and latency probe (sidecarctl ping, benchmarks).

  info @1 () -> (info :NodeInfo);
  # Who this daemon is and how it is doing.
}
