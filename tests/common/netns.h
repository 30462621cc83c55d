#pragma once
// NetnsCluster: N "hosts" on one machine for cross-node tests (issue 5). Each node is a network
// namespace whose `eth0` (10.77.0.<i+1>/24) is one end of a veth pair; the other end sits in a hub
// namespace, enslaved to the Linux bridge `br0` there, so nodes reach each other only through
// the bridge, like hosts on a switch. tools/netns builds the same layout from the shell.
//
//   sc-<pid>-hub:  br0 ── h0, h1, ... (up)
//   sc-<pid>-n<i>: lo (up), eth0 10.77.0.<i+1>/24 ── peer h<i>
//
// Names carry the pid of the test process, so parallel test binaries never collide, and the
// constructor removes the namespaces of dead pids that a killed test left behind. The destructor
// removes everything it created (deleting a namespace deletes its veth ends and the bridge).
//
// Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's `ip`; tests call available() first and
// GTEST_SKIP with its reason. Every `ip` call is bounded (`timeout 10`).
//
// Processes in a node: Process::start(..., netns(i)) (tests/system/daemon_process.h) joins the
// namespace with setns() between fork and exec. Unlike `ip netns exec` this does not remount /sys,
// so /sys/class/net shows the host's interfaces; sidecard does not read it. Threads of the test
// itself can open sockets in a node with socketIn(): a socket keeps the namespace it was made in.
//
// Unix sockets named by a path live in the file system, not in a network namespace: a rank client
// outside the node's namespace reaches a daemon inside it through its --socket path.

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace sidecar::testing {

class NetnsCluster {
 public:
  // Whether this process may build namespaces; when not, *reason says why (for GTEST_SKIP).
  static bool available(std::string* reason) {
    if (geteuid() != 0) {
      *reason = "network-namespace tests need root (run the system suite as root)";
      return false;
    }
    if (run("ip -V") != 0) {
      *reason = "iproute2's `ip` is not installed (apt-get install iproute2)";
      return false;
    }
    std::string probe = "sc-probe-" + std::to_string(getpid());
    if (run("ip netns add " + probe) != 0) {
      *reason = "creating a network namespace was refused (a container without CAP_SYS_ADMIN?)";
      return false;
    }
    run("ip netns del " + probe);
    return true;
  }

  // Builds `nodes` nodes (at most 250). On failure `ok()` is false and `error()` names the step.
  explicit NetnsCluster(int nodes) : prefix_("sc-" + std::to_string(getpid())), nodes_(nodes) {
    removeStale();
    ok_ = build();
  }

  ~NetnsCluster() { removeAll(prefix_); }

  NetnsCluster(const NetnsCluster&) = delete;
  NetnsCluster& operator=(const NetnsCluster&) = delete;

  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  int nodes() const { return nodes_; }
  const std::string& prefix() const { return prefix_; }

  std::string netns(int node) const { return prefix_ + "-n" + std::to_string(node); }
  std::string hub() const { return prefix_ + "-hub"; }
  std::string netnsPath(int node) const { return "/var/run/netns/" + netns(node); }
  static std::string address(int node) { return "10.77.0." + std::to_string(node + 1); }

  // Cuts (false) or restores (true) node's cable: the hub's end of its veth goes down, so the
  // node's packets vanish silently, as when a switch port or a cable fails (the node's own eth0
  // stays configured; nothing tells its sockets).
  bool setLinkUp(int node, bool up) {
    return run("ip -n " + hub() + " link set h" + std::to_string(node) + (up ? " up" : " down")) ==
           0;
  }

  // A socket of `domain`/`type` that lives in node's namespace (made on a helper thread that
  // joined it: setns affects only the calling thread). -1 on failure.
  int socketIn(int node, int domain = AF_INET, int type = SOCK_STREAM | SOCK_CLOEXEC) const {
    int fd = -1;
    std::string path = netnsPath(node);
    std::thread([&] {
      int nsFd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (nsFd < 0) return;
      if (setns(nsFd, CLONE_NEWNET) == 0) fd = ::socket(domain, type, 0);
      close(nsFd);
    }).join();
    return fd;
  }

  // Runs a shell command line bounded by `timeout 10`; returns its exit code (124: timed out).
  static int run(const std::string& command) {
    std::string line = "timeout 10 " + command + " >/dev/null 2>&1";
    int status = std::system(line.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  // Output of a shell command (bounded like run()).
  static std::string output(const std::string& command) {
    std::string text;
    FILE* pipe = popen(("timeout 10 " + command + " 2>/dev/null").c_str(), "r");
    if (pipe == nullptr) return text;
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) text.append(buffer, n);
    pclose(pipe);
    return text;
  }

  // Names of the namespaces that start with `prefix` + "-".
  static std::vector<std::string> namespacesOf(const std::string& prefix) {
    std::vector<std::string> names;
    DIR* dir = opendir("/var/run/netns");
    if (dir == nullptr) return names;
    while (dirent* entry = readdir(dir)) {
      std::string name = entry->d_name;
      if (name.rfind(prefix + "-", 0) == 0) names.push_back(name);
    }
    closedir(dir);
    return names;
  }

 private:
  bool step(const std::string& command) {
    if (run(command) == 0) return true;
    error_ = "`" + command + "` failed";
    return false;
  }

  bool build() {
    if (nodes_ < 1 || nodes_ > 250) {
      error_ = "a cluster has 1..250 nodes";
      return false;
    }
    if (!step("ip netns add " + hub()) || !step("ip -n " + hub() + " link set lo up") ||
        !step("ip -n " + hub() + " link add br0 type bridge") ||
        !step("ip -n " + hub() + " link set br0 up")) {
      return false;
    }
    for (int i = 0; i < nodes_; ++i) {
      std::string n = netns(i), h = "h" + std::to_string(i);
      // Both veth ends are created directly in their namespaces: the names only need to be unique
      // there, so clusters of concurrent tests never clash on interface names.
      if (!step("ip netns add " + n) || !step("ip -n " + n + " link set lo up") ||
          !step("ip link add eth0 netns " + n + " type veth peer name " + h + " netns " + hub()) ||
          !step("ip -n " + hub() + " link set " + h + " master br0") ||
          !step("ip -n " + hub() + " link set " + h + " up") ||
          !step("ip -n " + n + " addr add " + address(i) + "/24 dev eth0") ||
          !step("ip -n " + n + " link set eth0 up")) {
        return false;
      }
    }
    return true;
  }

  static void removeAll(const std::string& prefix) {
    for (const std::string& name : namespacesOf(prefix)) run("ip netns del " + name);
  }

  // Namespaces "sc-<pid>-..." whose test process is gone.
  static void removeStale() {
    for (const std::string& name : namespacesOf("sc")) {
      int pid = std::atoi(name.c_str() + 3);
      if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) run("ip netns del " + name);
    }
  }

  std::string prefix_;
  int nodes_;
  bool ok_ = false;
  std::string error_;
};

}  // namespace sidecar::testing
