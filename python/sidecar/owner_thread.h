#pragma once
// The thread that owns a rank's sidecar::Sidecar for the Python package.
//
// A sidecar::Sidecar belongs to the thread that created it, and its blocking calls would block the
// Python thread (and an asyncio loop) that made them. So each Python Sidecar has one owner thread
// that connects, runs every call in the order the Python threads queued them, and sleeps in
// Sidecar::waitForWake() between them. recv never blocks that thread: it is issued with
// RecvHandle::onDone, so any number of recvs wait in the daemon at once and complete in whatever
// order their data arrives. A send blocks the owner thread while it waits for arena space (the
// daemon's backpressure): calls queued behind it wait too; recv completions do not.
//
// Contract: commands run on the owner thread and must not throw; their callbacks (the binding's
// Python completions) run there too, without the GIL unless they take it. Commands queued after
// stop(), and callbacks of calls still pending when the Sidecar is destroyed, get `onAbandoned`
// instead, so no caller waits forever.

#include <sidecar/sidecar.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

namespace sidecar::python {

class OwnerThread {
 public:
  using Command = std::function<void(Sidecar& sidecar)>;

  // Starts the thread and connects; throws the connect error (sidecar::Error) here.
  explicit OwnerThread(const RankConfig& config);
  ~OwnerThread();  // stop()
  OwnerThread(const OwnerThread&) = delete;
  OwnerThread& operator=(const OwnerThread&) = delete;

  // Queues `command`; false once stopped (the command is dropped unrun). Any thread.
  bool post(Command command);

  // Runs the queue to its end, unregisters (destroys the Sidecar) and joins. Idempotent; any
  // thread but the owner's. Pending completions are abandoned (see addPending).
  // The arena's address range is then backed by private zero pages until this object is
  // destroyed, so that a received view read after shutdown reads zeros instead of faulting.
  void stop();

  // True on the owner thread itself (where stop() must not be called: it would join itself).
  bool onOwnerThread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Calls pending at destruction: each registers an `abandon` function that stop() runs for those
  // whose callback never came. Owner thread only (from commands).
  uint64_t addPending(std::function<void()> abandon);
  void removePending(uint64_t key);

 private:
  void run(const RankConfig& config);

  std::thread thread_;
  std::mutex mutex_;          // guards queue_, stopping_, sidecar_ (for wake())
  std::deque<Command> queue_;
  bool stopping_ = false;
  Sidecar* sidecar_ = nullptr;  // the owner thread's, while it lives

  std::mutex stopMutex_;      // one stop() at a time
  bool joined_ = false;

  // The arena's range in this process (fixed once connected), and the placeholder mapped over
  // it after the Sidecar unmapped it.
  void* arenaBase_ = nullptr;
  uint64_t arenaBytes_ = 0;
  void* placeholder_ = nullptr;

  // Owner thread only.
  uint64_t nextPending_ = 1;
  std::map<uint64_t, std::function<void()>> pending_;

  // The connect outcome, handed from the owner thread to the constructor.
  std::mutex connectMutex_;
  std::condition_variable connected_;
  bool connectDone_ = false;
  std::optional<Error> connectError_;
};

}  // namespace sidecar::python
