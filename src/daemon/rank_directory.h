#pragma once
// Where ranks live: which ranks this node's daemon serves itself and, for the others, the
// host:port of the daemon that does. A pure function of the configuration (no I/O, no DNS): the
// address it returns may be a name that is resolved when the link is opened.
//
// Sources, from the most to the least explicit (docs/CONFIG.md, [peers]):
// - local_ranks (or the reference's SIDECAR_LOCAL_PEER_RANKS / SIDECAR_RANK): exactly these
//   ranks are local; every other rank is remote.
// - ranks: a static map of rank ranges to host:port. Without local_ranks, a rank is local when
//   its address is this node's own (advertise).
// - dns_template: "sidecar-{rank}.sidecar.default.svc.cluster.local:7650" for ranks the map does
//   not name (Kubernetes: one stable name per rank).
// With none of them every rank is local (a single node), which is what a daemon without a [peers]
// section does.

#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sidecar::daemon {

struct RankRange {
  int32_t first = 0;
  int32_t last = 0;  // inclusive
  std::string address;  // host:port
};

struct PeerSettings {
  std::vector<RankRange> ranks;  // disjoint
  std::string dnsTemplate;       // contains "{rank}" and ends in :port; "" when unset
  std::set<int32_t> localRanks;
  std::string advertise;         // this node's host:port as peers know it; "" when unknown
  uint32_t timeoutMs = 5'000;    // a peer silent this long is dead (pending work fails)
  bool ucxMessages = true;       // small deliveries as single UCX messages (peer_messages.h)
  // Their acks wait this long (or until kAckBatchMax are due) before they are sent, so that an
  // ack's send (a system call) does not occupy the daemon just when the receiver's answer to what
  // it acknowledges is on its way. 0 (the default): each ack goes as soon as its delivery is
  // stored, after that turn's other work. A delay holds every sender's send() completion that
  // much longer; on the H100 host 20 us made a sender that waits for each send before the next
  // 2.2x slower end to end (4 KiB one-way 17-19 us at 0, 38-44 us at 20, docs/PERFORMANCE.md)
  // and bought nothing measurable in a ping-pong.
  uint32_t ackDelayUs = 0;
  // Executors may send small deliveries to a peer themselves, over their own UCX worker, instead
  // of through this daemon (Session.directRoute; docs/PROTOCOL.md, "Direct sends"): two process
  // hops off the latency path. Needs ucxMessages.
  bool directSends = true;
};

// "0-3=10.77.0.1:7650, 4-7=10.77.0.2:7650" (also ';' between entries; "5=host:port" for one
// rank). Throws std::invalid_argument saying what is wrong and what is accepted.
std::vector<RankRange> parseRankMap(std::string_view text);
// "0-3,6" or "0,1,2" -> the set. Throws std::invalid_argument.
std::set<int32_t> parseRankSet(std::string_view text);
// Checks the template has "{rank}" and ends in ":port". Throws std::invalid_argument.
void validateDnsTemplate(std::string_view text);

class RankDirectory {
 public:
  explicit RankDirectory(PeerSettings settings);

  // nullopt: the rank is served here. Otherwise the address of its node's daemon.
  // Throws std::invalid_argument when the rank is neither local nor has a known address.
  std::optional<std::string> remoteAddress(int32_t rank) const;

  // True when some rank may live on another node (there is a map, a template or local_ranks).
  bool distributed() const;
  const PeerSettings& settings() const { return settings_; }

 private:
  std::optional<std::string> mapped(int32_t rank) const;

  PeerSettings settings_;
};

}  // namespace sidecar::daemon
