#pragma once
// CPU placement for benchmarks: a benchmark states where each party runs, because on these
// virtual machines waking a CPU costs more than the work being measured.

#include <pthread.h>
#include <sched.h>

#include <thread>

namespace sidecar::bench {

// CPU numbers wrap around the machine's CPUs, so placements still run on a 1-CPU machine.
inline int cpuOf(int cpu) { return cpu % static_cast<int>(std::thread::hardware_concurrency()); }

// Pins the calling thread to one CPU.
inline void pinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpuOf(cpu), &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Undoes pinTo(), so that a daemon started next (which inherits the mask) may pin anywhere.
inline void unpin() {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (unsigned cpu = 0; cpu < std::thread::hardware_concurrency(); ++cpu) CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

}  // namespace sidecar::bench
