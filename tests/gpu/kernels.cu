// Test kernels for tests/gpu (built by nvcc only when it is found; never part of a library).
#include <cuda_runtime.h>

#include "kernels.h"

namespace {

// One thread spins for `spinNs` (globaltimer), then the grid writes `value` everywhere: a
// producer kernel still running when send() is called.
__global__ void spinThenFill(float* out, size_t count, float value, unsigned long long spinNs) {
  if (threadIdx.x == 0) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < spinNs);
  }
  __syncthreads();
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    out[i] = value;
  }
}

}  // namespace

int launchSpinThenFill(float* out, size_t count, float value, unsigned spinMs, void* stream) {
  // One block: the spin gates every write.
  spinThenFill<<<1, 1024, 0, static_cast<cudaStream_t>(stream)>>>(
      out, count, value, static_cast<unsigned long long>(spinMs) * 1000000ull);
  return static_cast<int>(cudaGetLastError());
}
