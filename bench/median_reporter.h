#pragma once
// A console reporter that also keeps, per benchmark, the figures of the run that stands for it:
// the median aggregate when the benchmark was repeated, else its single run. The benchmarks'
// main() prints the ratios against their baselines from these, measured in the same run.

#include <benchmark/benchmark.h>

#include <map>
#include <string>
#include <vector>

namespace sidecar::bench {

class MedianReporter : public benchmark::ConsoleReporter {
 public:
  struct Figures {
    double realTimeUs = 0;                    // per iteration
    std::map<std::string, double> counters;
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& run : runs) {
      bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      bool single = run.run_type == Run::RT_Iteration && run.repetitions <= 1;
      if ((!median && !single) || run.error_occurred) continue;
      Figures& out = figures[plainName(run.run_name.str())];
      out.realTimeUs = run.GetAdjustedRealTime() / 1000.0;  // benchmark time unit: ns
      for (const auto& [key, counter] : run.counters) out.counters[key] = counter.value;
    }
  }

  // Keyed by the benchmark's name and arguments, e.g. "BM_PingSidecardUnix/0/50", without the
  // "/real_time", "/manual_time" and "/iterations:N" parts google benchmark appends.
  std::map<std::string, Figures> figures;

 private:
  static std::string plainName(std::string name) {
    for (const std::string part : {"/iterations:", "/manual_time", "/real_time"}) {
      if (auto at = name.find(part); at != std::string::npos) {
        auto end = name.find('/', at + 1);
        name.erase(at, end == std::string::npos ? std::string::npos : end - at);
      }
    }
    return name;
  }
};

}  // namespace sidecar::bench
