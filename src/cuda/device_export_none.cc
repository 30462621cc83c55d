// libsidecar built without CUDA: every GPU call fails with a clear "unavailable".

#include "cuda/device_export.h"

namespace sidecar::cuda {

namespace {

const char* kReason = "libsidecar was built without CUDA; send host tensors, or rebuild with the "
                      "CUDA toolkit (meson -Dcuda=enabled)";

class NoDeviceExporter final : public DeviceExporter {
 public:
  ExportedTensor exportTensor(const void*, uint64_t, int, void*) override {
    throw DeviceError(true, kReason);
  }
  void stageToArena(void*, const void*, uint64_t, int, void*, void*, uint64_t) override {
    throw DeviceError(true, kReason);
  }
  void copyToDevice(void*, const void*, uint64_t, int, void*, void*, uint64_t) override {
    throw DeviceError(true, kReason);
  }
};

}  // namespace

std::unique_ptr<DeviceExporter> DeviceExporter::create() {
  return std::make_unique<NoDeviceExporter>();
}

}  // namespace sidecar::cuda
