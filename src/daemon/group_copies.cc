#include "daemon/group_copies.h"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace sidecar::daemon {

namespace {

std::string groupText(const transfer::Group& group) {
  std::string out = "[";
  for (size_t i = 0; i < group.size(); ++i) {
    if (i > 0) out += ',';
    out += std::to_string(group[i]);
  }
  return out + "]";
}

// The replica header every member must agree on (the bytes themselves are each member's own).
std::string headerMismatch(const GroupMemberSend& a, const GroupMemberSend& b) {
  const auto& x = a.request;
  const auto& y = b.request;
  if (x.tensor.dtype != y.tensor.dtype) return "another dtype";
  if (x.tensor.shape != y.tensor.shape) return "another shape";
  if (x.numChunks != y.numChunks) return "another numChunks";
  if (x.destinations != y.destinations) return "other destinations";
  return "";
}

}  // namespace

void GroupCopies::ErrorHandler::taskFailed(kj::Exception&& exception) {
  spdlog::warn("group copy: {}", exception.getDescription().cStr());
}

GroupCopies::GroupCopies(Hooks& hooks, kj::Timer& timer, uint32_t gatherTimeoutMs)
    : hooks_(hooks), timer_(timer), gatherTimeoutMs_(gatherTimeoutMs), tasks_(errorHandler_) {}

GroupCopies::~GroupCopies() {
  // The daemon stops: the transfer service frees every allocation itself; the sessions still
  // waiting for copies are unregistered now (their copies were waited for by the copy engine).
  auto pending = std::move(unregisters_);
  for (auto& [session, unregister] : pending) unregister();
}

std::string GroupCopies::describe(const Gather& g) const {
  return "chunk " + std::to_string(std::get<2>(g.key)) + " of '" + std::get<1>(g.key) +
         "' from group " + groupText(std::get<0>(g.key));
}

kj::Promise<void> GroupCopies::add(GroupMemberSend send) {
  auto position = static_cast<size_t>(
      std::lower_bound(send.group.begin(), send.group.end(), send.rank) - send.group.begin());
  if (position >= send.group.size() || send.group[position] != send.rank) {
    return rpc::transferError("invalid-argument", "rank " + std::to_string(send.rank) +
                                                      " is not in its group " +
                                                      groupText(send.group));
  }
  auto key = std::make_tuple(send.group, send.request.dataId, send.request.chunkId);
  GatherPtr g;
  auto found = live_.find(key);
  if (found == live_.end()) {
    g = std::make_shared<Gather>();
    g->id = nextId_++;
    g->key = key;
    g->members.resize(send.group.size());
    g->first = position;
    live_.emplace(key, g);
    uint64_t id = g->id;
    g->timeout = timer_.afterDelay(gatherTimeoutMs_ * kj::MILLISECONDS)
                     .then([this, key, id]() {
                       auto it = live_.find(key);
                       if (it == live_.end() || it->second->id != id) return;
                       GatherPtr gather = it->second;
                       std::string missing;
                       for (size_t i = 0; i < gather->members.size(); ++i) {
                         if (gather->members[i].send) continue;
                         if (!missing.empty()) missing += ',';
                         missing += std::to_string(std::get<0>(gather->key)[i]);
                       }
                       fail(gather, rpc::transferError(
                                        "timeout",
                                        "concurrent copy of " + describe(*gather) + ": rank(s) " +
                                            missing + " did not send it within " +
                                            std::to_string(gatherTimeoutMs_) +
                                            " ms of the first member; with concurrent copy on, "
                                            "every member of the group must send every chunk"));
                     })
                     .eagerlyEvaluate(nullptr);
  } else {
    g = found->second;
  }
  Member& member = g->members[position];
  if (member.send) {
    return rpc::transferError("already-sent", "rank " + std::to_string(send.rank) +
                                                  " already sent " + describe(*g) +
                                                  " and its group is still copying it");
  }
  if (g->arrived > 0) {
    std::string why = headerMismatch(*g->members[g->first].send, send);
    if (!why.empty()) {
      auto error = rpc::transferError(
          "invalid-argument", "rank " + std::to_string(send.rank) + " sent " + describe(*g) +
                                  " with " + why + " than rank " +
                                  std::to_string(g->members[g->first].send->rank) +
                                  "; every member of a group sends the same replica");
      fail(g, kj::cp(error));
      return kj::mv(error);
    }
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  member.fulfiller = kj::mv(paf.fulfiller);
  member.send = std::make_unique<GroupMemberSend>(std::move(send));
  ++g->arrived;

  if (g->space == Space::kNone) {
    // The first member allocates the whole tensor under its own session.
    g->space = Space::kPending;
    const GroupMemberSend& first = *member.send;
    uint64_t bytes = std::max<uint64_t>(first.request.tensor.sizeBytes, 1);
    tasks_.add(hooks_.allocate(first.session, bytes)
                   .then(
                       [this, g](shm::Allocation allocation) {
                         g->space = Space::kReady;
                         g->offset = allocation.offset;
                         if (!g->failed) {
                           for (size_t i = 0; i < g->members.size(); ++i) {
                             if (g->members[i].send) startCopy(g, i);
                           }
                         }
                         advance(g);
                       },
                       [this, g](kj::Exception&& e) {
                         g->space = Space::kRefused;
                         fail(g, kj::mv(e));
                         advance(g);
                       }));
  } else if (g->space == Space::kReady) {
    startCopy(g, position);
    advance(g);
  }
  return kj::mv(paf.promise);
}

void GroupCopies::startCopy(const GatherPtr& g, size_t position) {
  Member& member = g->members[position];
  if (member.copying || member.landed) return;
  const auto& tensor = member.send->request.tensor;
  GroupSlice slice = groupSlice(tensor.sizeBytes, transfer::dtypeBytes(tensor.dtype),
                                static_cast<uint32_t>(g->members.size()),
                                static_cast<uint32_t>(position));
  if (slice.sizeBytes == 0) {  // more members than elements: nothing to copy
    member.landed = true;
    ++g->landed;
    return;
  }
  member.copying = true;
  ++g->copiesInFlight;
  tasks_.add(hooks_.copySlice(*member.send, slice, g->offset + slice.offsetBytes)
                 .then(
                     [this, g, position]() {
                       --g->copiesInFlight;
                       g->members[position].copying = false;
                       g->members[position].landed = true;
                       ++g->landed;
                       advance(g);
                     },
                     [this, g](kj::Exception&& e) {
                       --g->copiesInFlight;
                       fail(g, kj::mv(e));
                       advance(g);
                     }));
}

void GroupCopies::advance(const GatherPtr& g) {
  if (g->failed) {
    if (g->copiesInFlight > 0 || g->space == Space::kPending) return;
    // Nothing writes into the space any more: give it back.
    if (g->space == Space::kReady && !g->spaceSessionEnded) {
      tasks_.add(hooks_.release(g->members[g->first].send->session, g->offset));
    }
    g->space = Space::kNone;
    draining_.erase(g->id);
    runUnregisters();
    return;
  }
  if (g->storing || g->space != Space::kReady || g->arrived < g->members.size() ||
      g->landed < g->members.size()) {
    return;
  }
  store(g);
}

void GroupCopies::store(const GatherPtr& g) {
  g->storing = true;
  live_.erase(g->key);  // the next send of this chunk (a re-send, once done) gathers anew
  retire(g);
  const GroupMemberSend& first = *g->members[g->first].send;
  tasks_.add(hooks_.store(first, g->offset)
                 .then(
                     [this, g]() {
                       ++stored_;
                       g->members[g->first].fulfiller->fulfill();
                       for (size_t i = 0; i < g->members.size(); ++i) {
                         if (i == g->first) continue;
                         tasks_.add(hooks_.storeReplica(*g->members[i].send)
                                        .then([g, i]() { g->members[i].fulfiller->fulfill(); },
                                              [g, i](kj::Exception&& e) {
                                                g->members[i].fulfiller->reject(kj::mv(e));
                                              }));
                       }
                     },
                     [this, g](kj::Exception&& e) {
                       ++failed_;
                       for (auto& member : g->members) member.fulfiller->reject(kj::cp(e));
                     }));
}

void GroupCopies::fail(const GatherPtr& g, kj::Exception error) {
  if (g->failed || g->storing) return;
  g->failed = true;
  ++failed_;
  spdlog::warn("group copy of {} failed: {}", describe(*g), error.getDescription().cStr());
  for (auto& member : g->members) {
    if (member.fulfiller) member.fulfiller->reject(kj::cp(error));
  }
  auto it = live_.find(g->key);
  if (it != live_.end() && it->second == g) live_.erase(it);
  draining_.emplace(g->id, g);
  retire(g);
  advance(g);
}

void GroupCopies::retire(const GatherPtr& g) {
  // Its timeout may be the promise running now: drop it on a later turn.
  auto timeout = kj::mv(g->timeout);
  g->timeout = nullptr;
  tasks_.add(kj::evalLater([timeout = kj::mv(timeout)]() mutable { timeout = nullptr; }));
}

bool GroupCopies::busyWith(rpc::SessionId session) const {
  auto writesInto = [session](const Gather& g) {
    return g.arrived > 0 && g.members[g.first].send->session == session &&
           (g.copiesInFlight > 0 || g.space == Space::kPending);
  };
  for (const auto& [key, g] : live_) {
    if (writesInto(*g)) return true;
  }
  for (const auto& [id, g] : draining_) {
    if (writesInto(*g)) return true;
  }
  return false;
}

void GroupCopies::runUnregisters() {
  for (size_t i = 0; i < unregisters_.size();) {
    if (busyWith(unregisters_[i].first)) {
      ++i;
      continue;
    }
    auto unregister = std::move(unregisters_[i].second);
    unregisters_.erase(unregisters_.begin() + static_cast<std::ptrdiff_t>(i));
    unregister();
  }
}

void GroupCopies::sessionEnded(rpc::SessionId session, std::function<void()> unregister) {
  std::vector<GatherPtr> ending;
  for (const auto& [key, g] : live_) {
    for (const auto& member : g->members) {
      if (member.send && member.send->session == session) {
        ending.push_back(g);
        break;
      }
    }
  }
  for (const auto& g : ending) {
    const GroupMemberSend& first = *g->members[g->first].send;
    if (first.session == session) g->spaceSessionEnded = true;
    transfer::Rank rank = 0;
    for (const auto& member : g->members) {
      if (member.send && member.send->session == session) rank = member.send->rank;
    }
    fail(g, rpc::transferError("cancelled", "rank " + std::to_string(rank) +
                                                " went away before its group finished copying " +
                                                describe(*g) + "; send the chunk again"));
  }
  // Gathers already failed whose space is this session's: its unregister will free the space.
  for (const auto& [id, g] : draining_) {
    if (g->members[g->first].send->session == session) g->spaceSessionEnded = true;
  }
  unregisters_.emplace_back(session, std::move(unregister));
  for (const auto& g : ending) advance(g);
  runUnregisters();
}

}  // namespace sidecar::daemon
