#!/usr/bin/env python3
"""Hop-by-hop times of cross-node transfers from two daemons' trace logs (--log-level trace;
CLOCK_MONOTONIC ns, one clock for the host's namespaces), one transfer at a time:
  A: lane send request taken -> peer message about to be sent (UCX send call)
  wire: that -> message received on B (the send call, TCP through the kernel, B's UCX progress)
  B: received -> chunk stored; stored -> the next lane completion pushed (the recv's answer).
Medians over transfers. Each trace line is a synchronous write: the figures include them.
  bench/cross_node/hops.py NODE_A_LOG NODE_B_LOG"""
import re, statistics, sys
ev = []
for path, node in ((sys.argv[1], "A"), (sys.argv[2], "B")):
    for line in open(path):
        m = re.search(r"(lane: request \d+ taken|lane: completion \d+ pushed|peer message \d+ of '[^']*' to node .* sent|peer message on link \d+ received|chunk \d+ of '[^']*' from link \d+ stored) at (\d+) ns", line)
        if m:
            kind = m.group(1)
            k = ("taken" if "taken" in kind else "pushed" if "pushed" in kind else "sent" if " sent" in kind
                 else "received" if "received" in kind else "stored")
            ev.append((int(m.group(2)), node, k))
ev.sort()
hops = {"A taken->sent": [], "sent->B received": [], "B received->stored": [], "B stored->pushed": []}
last = {}
for t, node, k in ev:
    last[(node, k)] = t
    if node == "A" and k == "sent" and ("A", "taken") in last:
        hops["A taken->sent"].append(t - last[("A", "taken")])
    if node == "B" and k == "received" and ("A", "sent") in last:
        hops["sent->B received"].append(t - last[("A", "sent")])
    if node == "B" and k == "stored" and ("B", "received") in last:
        hops["B received->stored"].append(t - last[("B", "received")])
    if node == "B" and k == "pushed" and ("B", "stored") in last and last[("B", "stored")] > last.get(("B", "pushed_seen"), 0):
        hops["B stored->pushed"].append(t - last[("B", "stored")])
        last[("B", "pushed_seen")] = t
for name, v in hops.items():
    if v:
        print("  %-22s median %6.1f us  (n=%d, p10 %.1f, p90 %.1f)" % (name, statistics.median(v) / 1e3, len(v),
              sorted(v)[len(v) // 10] / 1e3, sorted(v)[len(v) * 9 // 10] / 1e3))
