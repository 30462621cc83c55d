// The copy engine of a build without CUDA: reports unavailable, fails every copy clearly.

#include "cuda/copy_engine.h"

namespace sidecar::cuda {

namespace {

class NoCopyEngine final : public CopyEngine {
 public:
  bool available() const override { return false; }
  const std::string& unavailableReason() const override { return reason_; }
  int deviceCount() const override { return 0; }
  void copyToArena(uint64_t, const DeviceSource&, uint64_t, uint64_t,
                   CopyCallbacks callbacks) override {
    callbacks.onDone(reason_);
  }
  void dropSession(uint64_t, std::function<void()> whenIdle) override { whenIdle(); }
  CopyEngineStats stats() const override { return {}; }

 private:
  std::string reason_ = "this sidecard was built without CUDA (meson -Dcuda=enabled needs the CUDA toolkit)";
};

}  // namespace

std::unique_ptr<CopyEngine> CopyEngine::create(reactor::Reactor&, void*, uint64_t,
                                               CopyEngineOptions) {
  return std::make_unique<NoCopyEngine>();
}

}  // namespace sidecar::cuda
