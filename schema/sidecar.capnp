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

const protocolVersion :UInt32 = 2;  # 2: packed delivers from executors (docs/PROTOCOL.md)

struct CoreInfo {
  index @0 :UInt32;          # reactor index, 0-based
  cpu @1 :Int32;             # CPU the reactor thread is pinned to (-1: not pinned)
  connections @2 :UInt32;    # client and peer connections this core serves now
  completions @3 :UInt64;    # io_uring completions handled since start
  sleeps @4 :UInt64;         # times the thread slept in io_uring since start
  lanes @5 :UInt32;          # sessions' lanes this core serves now (docs/LANES.md)
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
  ucxWorkerAddress @13 :Data;
  # The UCX worker address peers send to (PeerHello.ucxAddress); empty without UCX. For tools
  # that test the wire to this daemon with UCX alone (bench/cross_node/wire-check).
}

# ---- Transfers -------------------------------------------------------------------------------
#
# Errors: a failed call raises a Cap'n Proto exception whose description starts with the error's
# kind in brackets, then a message a person can act on, e.g.
#   "[already-done] chunk 3 of id 'ab12' was already marked done by group [2,3]".
# Kinds: invalid-argument, chunk-out-of-range, num-chunks-mismatch, already-sent, already-done,
# not-receiver, not-available, too-large, expired, cancelled, timeout, arena-full,
# already-registered, not-registered, peer-unreachable, peer-lost, version-mismatch.

enum Dtype {
  bool @0; uint8 @1; int8 @2; int16 @3; int32 @4; int64 @5;
  float16 @6; bfloat16 @7; float32 @8; float64 @9;
}

struct MemoryHint {
  # The unit of allocation: one row, prod(rowShape) elements of dtype, e.g. (4096,) bfloat16 is
  # 8 KiB. A tensor of n rows then occupies n contiguous units.
  dtype @0 :Dtype;
  rowShape @1 :List(Int64);
}

struct Registration {
  rank @0 :Int32;
  group @1 :List(Int32);      # sorted, contains `rank`
  sendHint @2 :MemoryHint;
  recvHint @3 :MemoryHint;
  concurrentCopy @4 :Bool;
}

struct Tensor {
  dtype @0 :Dtype;
  shape @1 :List(Int64);
  offset @2 :UInt64;          # in the arena
  sizeBytes @3 :UInt64;       # prod(shape) * size of dtype
}

struct Object {
  typeTag @0 :UInt32;         # the client's meaning (the Python layer: str, bytes, int, ...)
  bytes @1 :Data;
}

struct InlineTensor {
  # A small tensor sent with its bytes in the message: the daemon allocates and copies, so the
  # send costs one round trip instead of two (allocate, then send). Only to daemons that announce
  # it (register's inlineTensorMaxBytes > 0), at most that many bytes.
  dtype @0 :Dtype;
  shape @1 :List(Int64);
  bytes @2 :Data;             # prod(shape) * size of dtype, contiguous (row-major)
}

struct Payload {
  union {
    tensor @0 :Tensor;        # offset must be an allocation of this session (Session.allocate)
    object @1 :Object;
    inlineTensor @2 :InlineTensor;
  }
}

struct RecvResult {
  union {
    tensor @0 :Tensor;        # valid until this receiver's group marks the chunk done
    object @1 :Object;
    endOfStream @2 :Void;     # chunkId >= numChunks
  }
}

struct Destination {
  ranks @0 :List(Int32);      # one destination group, sorted
}

interface ArenaHandle {
  # Carries the arena's memfd (Capability::Client::getFd()); map it read/write, whole.
}

interface Session {
  # One registered rank. Dropping the session (or the connection) unregisters the rank: its
  # unsent allocations are freed and its pending recvs fail.

  allocate @0 (sizeBytes :UInt64, timeoutMs :UInt32) -> (offset :UInt64, sizeBytes :UInt64);
  # A writable region of the arena in units of this rank's send hint, owned by the session until
  # it is sent or released. When the arena is full, waits up to timeoutMs (0: the daemon's
  # default) for space, then fails with [arena-full].

  release @1 (offset :UInt64) -> ();
  # Gives back an allocation that will not be sent.

  send @2 (dataId :Text, chunkId :UInt32, numChunks :UInt32, destinations :List(Destination),
           payload :Payload, directLink :UInt32, directSeq :UInt32) -> ();
  # numChunks 0: a stream whose length closeStream fixes later. A tensor payload's allocation
  # passes to the daemon (also when the call fails, it is then freed). directLink, directSeq: as
  # in LaneRequest.send (a direct send whose lane request did not fit the lane).

  closeStream @3 (dataId :Text, numChunks :UInt32, destinations :List(Destination)) -> ();

  recv @4 (dataId :Text, chunkId :UInt32, timeoutMs :UInt32) -> (result :RecvResult);
  # Waits until the chunk is there (timeoutMs 0: no limit). Idempotent until markDone.

  markDone @5 (dataId :Text, chunkId :UInt32) -> ();

  sendDevice @6 (dataId :Text, chunkId :UInt32, numChunks :UInt32,
                 destinations :List(Destination), tensor :DeviceTensor) -> ();
  # GPU (issue 6): sends a tensor that lives in the producer's GPU memory. The daemon copies it
  # into the arena on its own copy streams, after the producer's event, and then stores it like
  # `send`. Fails with [gpu-unavailable] on a daemon without CUDA or a GPU. See DeviceTensor.

  openLane @7 () -> (memory :FdHandle, requestBell :FdHandle, completionBell :FdHandle,
                     objectMaxBytes :UInt32, allocates :Bool);
  # This session's lane (docs/LANES.md): a shared-memory memfd with a request ring (client ->
  # daemon) and a completion ring, and two eventfds, the daemon's doorbell (the client writes it
  # when the daemon armed itself to sleep) and the client's. send, recv and markDone may then
  # travel as LaneRequest records instead of calls; everything else stays a call. A recv whose
  # object is over objectMaxBytes is answered `useCall` (recv it again with a call). Once per
  # session; a second call fails with [invalid-argument]. Older daemons answer `unimplemented`.
  # `allocates`: the lane also takes `allocate` requests (older daemons leave it false: the
  # client then allocates by call).

  directRoute @8 (destinations :List(Destination), renew :Bool) -> (route :DirectRoute);
  # Whether this session may send small deliveries for these destinations to their node itself,
  # over UCX, instead of through this daemon (docs/PROTOCOL.md, "Direct sends"): the latency path
  # of small cross-node tensors. A client that sends one that way still makes the send (naming
  # the message in LaneRequest.send.directSeq), and its daemon then awaits the peer's ack in place
  # of sending. The session keeps its block of seqs on that link across calls; `renew` (its block
  # is used up) gives it a new one, and the one before stays valid. Older daemons answer
  # `unimplemented`: the client then sends as before.
}

struct DirectRoute {
  union {
    none @0 :Text;              # why not (every destination must be on one other node, reached
                                # with UCX messages, its link up); ask again after retryMs
    ucx :group {
      workerAddress @1 :Data;   # the remote daemon's UCX worker (PeerHello.ucxAddress)
      deliverTag @2 :UInt64;    # the tag of PeerMessage.deliver messages on this link
      linkSerial @3 :UInt32;    # this daemon's id for the link: name it in LaneRequest.send.directLink
      seqBase @4 :UInt32;       # deliver seqs [seqBase, seqBase + seqCount) are this session's
      seqCount @5 :UInt32;
      messageMaxBytes @6 :UInt64;  # the largest deliver message the peer takes
    }
  }
  retryMs @7 :UInt32;           # ask again after this long: a route goes stale with its link
}

interface FdHandle {
  # Carries one file descriptor (Capability::Client::getFd()).
}

struct LaneRequest {
  # One record of a lane's request ring. `seq` is the client's, echoed by the completion.
  seq @0 :UInt64;
  dataId @1 :Text;
  chunkId @2 :UInt32;
  union {
    send :group {
      # As Session.send (an InlineTensor payload included).
      numChunks @3 :UInt32;
      destinations @4 :List(Destination);
      payload @5 :Payload;
      directLink @9 :UInt32;
      directSeq @10 :UInt32;
      # Non-zero: the client already sent this chunk to its node itself, as PeerMessage.deliver
      # `directSeq` on the link `directLink` (Session.directRoute). The daemon stores it as any
      # send and awaits that message's ack instead of forwarding it; a seq that is not this
      # session's, or a link that is gone, makes it forward the chunk itself.
    }
    recv :group {
      timeoutMs @6 :UInt32;
    }
    markDone @7 :Void;
    cancel @8 :UInt64;
    # Withdraws the recv whose request had this seq (its handle was dropped unanswered): that recv
    # is answered `failed` "[cancelled] ..." if it was still waiting, and this request `done`
    # either way. A daemon without it answers this request `failed` (the recv then waits on).
    allocate :group {
      # As Session.allocate (dataId and chunkId unused); answered `allocated`. Only to daemons
      # whose openLane said `allocates`.
      sizeBytes @11 :UInt64;
      timeoutMs @12 :UInt32;
    }
  }
}

const laneCompletionBytes :UInt32 = 1024;
# The most bytes a LaneCompletion other than a recv's `received` may take; a recv's may take
# objectMaxBytes (openLane) more. The client reserves that much completion ring per request
# (docs/LANES.md, "Credits"); the daemon answers `useCall` rather than write a larger one.

struct LaneCompletion {
  seq @0 :UInt64;
  union {
    done @1 :Void;             # a send or markDone succeeded
    received @2 :RecvResult;   # a recv's answer
    failed @3 :Text;           # "[kind] message", as a call's exception (at most 512 bytes)
    useCall @4 :Void;          # the answer does not fit the lane: make the same request as a call
    allocated :group {         # an allocate's answer, as Session.allocate's results
      offset @5 :UInt64;
      sizeBytes @6 :UInt64;
    }
  }
}

struct TransferSummary {
  dataIds @0 :List(Text);
  items @1 :UInt64;
  chunks @2 :UInt64;
  bytesHeld @3 :UInt64;
  waiters @4 :UInt64;
  duplicatesDropped @5 :UInt64;
  expiredHolds @6 :UInt64;
  chunksCompleted @7 :UInt64;
  ranks @8 :List(RankInfo);
  peers @9 :List(PeerLinkInfo);  # links to and from other nodes' daemons
}

struct PeerLinkInfo {
  outgoing @0 :Bool;          # true: this daemon opened it (it sends over it)
  nodeId @1 :Text;
  address @2 :Text;           # host:port of the peer ("" when it does not accept peers)
  incarnation @3 :UInt64;
  up @4 :Bool;                # false: still connecting
  bodies @5 :Text;            # how large bodies move: "ucx ..." or "inline"
  chunks @6 :UInt64;          # chunks delivered over this link (stored by the receiving side)
  bytes @7 :UInt64;           # their tensor bytes
  directChunks @8 :UInt64;    # of `chunks`, those the sending clients put on the wire themselves
}

struct RankInfo {
  rank @0 :Int32;
  group @1 :List(Int32);
  bytesAllocated @2 :UInt64;  # allocated and not yet sent
  bytesHeld @3 :UInt64;       # received data its group has not marked done yet
}

interface Sidecar {
  # The bootstrap interface every connection gets.

  ping @0 (payload :Data) -> (payload :Data);
  # Echoes `payload` back: a liveness and latency probe (sidecarctl ping, benchmarks).

  info @1 () -> (info :NodeInfo);
  # Who this daemon is and how it is doing.

  register @2 (registration :Registration) -> (session :Session, arena :ArenaHandle,
                                              arenaBytes :UInt64, inlineTensorMaxBytes :UInt64);
  # Registers a rank (unix socket only: the arena travels as a file descriptor). Fails with
  # [already-registered] while another live client holds the rank.

  transfers @3 () -> (summary :TransferSummary);
  # What is in flight, for sidecarctl.

  inspect @4 (dataId :Text) -> (description :Text);
  # A readable description of one data id; [invalid-argument] when unknown.

  peer @5 (hello :PeerHello) -> (peer :Peer, hello :PeerHello);
  # Daemon to daemon, over TCP: opens a peer link. The caller says who it is; the answer says who
  # this daemon is. Refused with [version-mismatch] when the protocol versions differ. See
  # docs/PROTOCOL.md, "Between daemons".
}

# ---- Between daemons ---------------------------------------------------------------------------
#
# A daemon that has data for ranks on another node opens one link to that node's daemon (lazily,
# on first use) and keeps it while it is used. Descriptors and small bodies travel here; large
# tensor bodies travel over UCX, tied to their descriptor by a tag. Every call is answered only
# once its effect is durable on the receiving node (the chunk is stored in its transfer table),
# so the sender frees its copy only then: nothing is lost when either side dies in between.

struct PeerHello {
  protocolVersion @0 :UInt32;
  nodeId @1 :Text;
  incarnation @2 :UInt64;     # a restarted daemon has a new one: links to the old are dead
  address @3 :Text;           # host:port where this daemon accepts peers ("" if it does not)
  ucxAddress @4 :Data;        # this daemon's UCX worker address; empty without UCX
  linkId @5 :UInt32;          # in answers: the receiver's id for this link, the top bits of tags;
                              # in requests: the sender's id for it, the low bits of UCX ack tags
  ucxMessageMaxBytes @6 :UInt64;
  # The largest PeerMessage this daemon takes over UCX (docs/PROTOCOL.md, "Small deliveries over
  # UCX"); 0: it takes none (no UCX, switched off, or an older daemon), so deliveries to it are
  # Peer.deliver calls.
}

struct PeerMessage {
  # A small delivery, or its answer, as one UCX tagged message instead of a Peer.deliver call:
  # the latency path. The message is a flat Cap'n Proto message (one segment table + segments).
  # Tags: top 24 bits zero (body tags never are), bits 32-39 the kind (1 deliver, 2 ack), the low
  # 32 bits the id of the link at the receiving end of this message (for a deliver: the
  # receiver's linkId from the hello's answer; for an ack: the sender's linkId from its request).
  union {
    deliver :group {
      seq @0 :UInt32;         # per link, echoed by the ack
      chunk @1 :PeerChunk;    # a tensor body rides inline (never ucx)
    }
    ack :group {
      seq @2 :UInt32;
      error @3 :Text;         # "" when stored; else "[kind] message", as a deliver call's failure
    }
  }
}

struct PeerTensor {
  dtype @0 :Dtype;
  shape @1 :List(Int64);
  sizeBytes @2 :UInt64;
  body :union {
    inline @3 :Data;          # the bytes, in this message (small tensors: one message, no UCX)
    ucx @4 :UcxBody;          # the bytes follow over UCX
  }
}

struct UcxBody {
  tag @0 :UInt64;             # piece i travels as a UCX tagged message with tag + i
  pieces @1 :UInt32;          # >= 1
  pieceBytes @2 :UInt64;      # every piece but the last has this size
}

struct PeerChunk {
  dataId @0 :Text;
  chunkId @1 :UInt32;
  numChunks @2 :UInt32;       # 0: a stream of unknown length
  senderRank @3 :Int32;
  senderGroup @4 :List(Int32);
  destinations @5 :List(Destination);  # only the groups that live on the receiving node
  payload :union {
    tensor @6 :PeerTensor;
    object @7 :Object;
  }
}

interface Peer {
  deliver @0 (chunk :PeerChunk) -> ();
  # Stores the chunk for its destination groups on this node. The receiver allocates arena space
  # first (waiting while the arena is full: this is the backpressure between nodes), then
  # receives the body, then stores it; the answer comes after that. Errors are the transfer
  # errors of Session.send, plus [peer-lost] when the body stopped arriving.

  closeStream @1 (dataId :Text, numChunks :UInt32, senderRank :Int32,
                  destinations :List(Destination)) -> ();

  heartbeat @2 () -> ();
  # The caller sends one every few seconds; a link silent for the peer timeout is dead on both
  # sides (pending work on it fails with [peer-lost]).
}

# ==== GPU (issue 6): device tensors ===========================================================
# Kept in one block (with Session.sendDevice above) so that other additions merge cleanly.

struct DeviceTensor {
  # A contiguous tensor in GPU memory that the producer shares with the daemon through CUDA IPC.
  # The daemon opens `memHandle` once per (session, handle) and closes it when the session ends.
  dtype @0 :Dtype;
  shape @1 :List(Int64);
  sizeBytes @2 :UInt64;        # prod(shape) * size of dtype
  memHandle @3 :Data;          # the 64-byte cudaIpcMemHandle_t of the allocation holding the tensor
  offsetBytes @4 :UInt64;      # from the allocation's base to the tensor's first byte
  deviceUuid @5 :Data;         # the 16-byte CUDA UUID of the GPU; the daemon maps it to its own
                               # device index (indices differ between processes)
  eventHandle @6 :Data;        # 64-byte cudaIpcEventHandle_t recorded on the producer's stream
                               # after the work that writes the tensor; empty: ready now
  allocationBytes @7 :UInt64;  # size of the allocation, so the daemon checks offset + size
}
