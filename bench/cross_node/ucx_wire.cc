// ucx_wire: the UCX wire alone, for telling the wire's time from ours
// (bench/cross_node/wire-check, docs/PERFORMANCE.md "Is the wire slower for us?").
//
//   ucx_wire rx --address-file F --times T   a bare receiver: writes its worker address to F,
//       takes tagged messages of the deliveries' kind (as a daemon posts for them) and writes each
//       arrival's CLOCK_MONOTONIC ns to T; ends after --count messages or --idle-ms without one.
//   ucx_wire tx --address-hex H | --address-file F --times T   a bare sender: sends --count
//       messages of --bytes, one every --gap-us (spinning between, as ucx_perftest's processes
//       do), and writes "before after" ns of each send call to T; --touch-bytes writes that much
//       memory before each send, as an application's own work between sends would.
// The sender's address may be a daemon's (sidecarctl status --json: ucxWorkerAddress), which
// takes the messages as deliveries on a link it does not have and drops them: what is timed is
// the wire to that daemon's worker, up to its UCX callback (its hop trace's ucx-done).
// Both pin themselves to --cpu when given. Runs for seconds: a tool, not a test.

#include <sched.h>
#include <ucp/api/ucp.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/clock.h"

namespace {

using sidecar::monotonicNs;

// The deliveries' tag kind and mask (daemon/peer_messages.h): a daemon's posted receive for
// deliveries takes any tag with these high bits.
constexpr uint64_t kDeliverKind = 1ull << 32;
constexpr uint64_t kKindMask = 0xffffffff00000000ull;
constexpr size_t kReceiveBytes = 128 << 10;

struct Options {
  std::string role;
  std::string addressFile;
  std::string addressHex;
  std::string timesFile;
  uint64_t count = 20000;
  uint64_t bytes = 4189;  // an executor's packed 4 KiB delivery
  uint32_t gapUs = 50;
  uint64_t touchBytes = 0;  // written between sends: an application's use of the caches
  uint32_t idleMs = 2000;
  int cpu = -1;
};

void check(ucs_status_t status, const char* what) {
  if (status != UCS_OK) throw std::runtime_error(std::string(what) + ": " + ucs_status_string(status));
}

class Worker {
 public:
  Worker() {
    ucp_config_t* config = nullptr;
    check(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG;
    ucs_status_t status = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    check(status, "ucp_init");
    ucp_worker_params_t workerParams{};
    workerParams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    workerParams.thread_mode = UCS_THREAD_MODE_SINGLE;
    check(ucp_worker_create(context_, &workerParams, &worker_), "ucp_worker_create");
  }
  ~Worker() {
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
  }
  ucp_worker_h get() { return worker_; }
  std::string address() {
    ucp_address_t* address = nullptr;
    size_t size = 0;
    check(ucp_worker_get_address(worker_, &address, &size), "ucp_worker_get_address");
    std::string bytes(reinterpret_cast<const char*>(address), size);
    ucp_worker_release_address(worker_, address);
    return bytes;
  }
  void progressFor(uint64_t ns) {
    uint64_t end = monotonicNs() + ns;
    while (monotonicNs() < end) ucp_worker_progress(worker_);
  }

 private:
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
};

std::string fromHex(const std::string& hex) {
  if (hex.size() % 2 != 0) throw std::runtime_error("--address-hex: an odd number of digits");
  std::string bytes;
  for (size_t i = 0; i < hex.size(); i += 2) bytes += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return bytes;
}

void receive(const Options& o) {
  Worker worker;
  {
    std::ofstream(o.addressFile, std::ios::binary) << worker.address();
  }
  std::vector<char> buffer(kReceiveBytes);
  std::vector<uint64_t> arrivals;
  arrivals.reserve(o.count);
  while (arrivals.size() < o.count) {
    bool done = false;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.recv = [](void*, ucs_status_t, const ucp_tag_recv_info_t*, void* flag) { *static_cast<bool*>(flag) = true; };
    param.user_data = &done;
    ucs_status_ptr_t request = ucp_tag_recv_nbx(worker.get(), buffer.data(), buffer.size(), kDeliverKind, kKindMask, &param);
    if (UCS_PTR_IS_ERR(request)) check(UCS_PTR_STATUS(request), "ucp_tag_recv_nbx");
    if (request != nullptr) {
      uint64_t idleEnd = monotonicNs() + uint64_t{o.idleMs} * 1'000'000;
      while (!done && monotonicNs() < idleEnd) ucp_worker_progress(worker.get());
      if (!done) {
        ucp_request_cancel(worker.get(), request);
        while (!done) ucp_worker_progress(worker.get());
        ucp_request_free(request);
        break;
      }
      ucp_request_free(request);
    }
    arrivals.push_back(monotonicNs());
  }
  std::ofstream out(o.timesFile);
  for (uint64_t t : arrivals) out << t << '\n';
  std::cerr << "ucx_wire rx: " << arrivals.size() << " messages\n";
}

void send(const Options& o) {
  std::string address = o.addressHex.empty() ? std::string() : fromHex(o.addressHex);
  if (address.empty()) {
    std::ifstream in(o.addressFile, std::ios::binary);
    address.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (address.empty()) throw std::runtime_error("no worker address (--address-hex or --address-file)");
  Worker worker;
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as our endpoints
  ucp_ep_h endpoint = nullptr;
  check(ucp_ep_create(worker.get(), &params, &endpoint), "ucp_ep_create");
  worker.progressFor(100'000'000);  // wire-up before the first timed send
  std::vector<char> message(o.bytes, 'x');
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  calls.reserve(o.count);
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;  // as direct sends
  std::vector<char> touched(o.touchBytes);
  uint64_t next = monotonicNs();
  for (uint64_t i = 0; i < o.count; ++i) {
    for (size_t at = 0; at < touched.size(); at += 64) touched[at] = static_cast<char>(touched[at] + 1);
    while (monotonicNs() < next) {
    }
    uint64_t before = monotonicNs();
    ucs_status_ptr_t request;
    while ((request = ucp_tag_send_nbx(endpoint, message.data(), message.size(), kDeliverKind, &param)) != nullptr) {
      if (UCS_PTR_IS_ERR(request) && UCS_PTR_STATUS(request) == UCS_ERR_NO_RESOURCE) {
        ucp_worker_progress(worker.get());
        continue;
      }
      check(UCS_PTR_IS_ERR(request) ? UCS_PTR_STATUS(request) : UCS_ERR_NO_MESSAGE, "ucp_tag_send_nbx");
    }
    uint64_t after = monotonicNs();
    calls.emplace_back(before, after);
    next = after + uint64_t{o.gapUs} * 1000;
  }
  worker.progressFor(500'000'000);  // what UCX still holds goes out before the endpoint closes
  ucp_request_param_t closeParam{};
  closeParam.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  closeParam.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t closing = ucp_ep_close_nbx(endpoint, &closeParam);
  if (closing != nullptr && !UCS_PTR_IS_ERR(closing)) {
    while (ucp_request_check_status(closing) == UCS_INPROGRESS) ucp_worker_progress(worker.get());
    ucp_request_free(closing);
  }
  std::ofstream out(o.timesFile);
  for (auto [before, after] : calls) out << before << ' ' << after << '\n';
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"ucx_wire: a bare UCX sender or receiver, to time the wire alone"};
  app.require_subcommand(1);
  auto* rx = app.add_subcommand("rx", "receive deliveries-kind tagged messages, stamp each arrival");
  auto* tx = app.add_subcommand("tx", "send messages one at a time, stamp each send call");
  for (auto* sub : {rx, tx}) {
    sub->add_option("--times", o.timesFile, "where the stamps go")->required();
    sub->add_option("--count", o.count, "messages")->check(CLI::Range(1, 10'000'000));
    sub->add_option("--cpu", o.cpu, "pin to this CPU");
  }
  rx->add_option("--address-file", o.addressFile, "where this worker's address is written")->required();
  rx->add_option("--idle-ms", o.idleMs, "end after this long without a message")->check(CLI::Range(1, 600'000));
  tx->add_option("--address-file", o.addressFile, "the receiver's worker address (bytes)");
  tx->add_option("--address-hex", o.addressHex, "the receiver's worker address in hex (sidecarctl status --json)");
  tx->add_option("--bytes", o.bytes, "message size")->check(CLI::Range(1, 64 << 10));
  tx->add_option("--touch-bytes", o.touchBytes, "memory written between sends (cold caches)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30));
  tx->add_option("--gap-us", o.gapUs, "pause between a send call's return and the next")->check(CLI::Range(0, 1'000'000));
  CLI11_PARSE(app, argc, argv);
  try {
    if (o.cpu >= 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(o.cpu, &set);
      if (sched_setaffinity(0, sizeof set, &set) != 0) throw std::runtime_error("cannot pin to --cpu");
    }
    if (rx->parsed()) {
      receive(o);
    } else {
      send(o);
    }
  } catch (const std::exception& e) {
    std::cerr << "ucx_wire: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
