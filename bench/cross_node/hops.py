#!/usr/bin/env python3
"""Where each cross-node transfer's one-way time goes, step by step.

Inputs: xnode_bench --times FILE (per timed transfer: size, send ns, arrival ns) and the hop
traces of the two daemons (SIDECAR_HOP_TRACE=PREFIX writes PREFIX.<pid>: "ns point" lines, see
src/base/hop_trace.h). All times are CLOCK_MONOTONIC of one host.

For each transfer, the first time each daemon reached each step after the sender's send() call
is taken relative to that call; the medians over transfers are printed in order, with the time
since the step before. Steps that are not reached in most transfers (e.g. the sender's daemon
waking up when it was spinning anyway) are shown with how often they were. Then the medians of
each daemon's own work per transfer: the sender's from taking the lane request to calling the
UCX send, the receiver's from seeing the message to pushing the recv's answer.
  bench/cross_node/hops.py TIMES NODE_A_TRACE NODE_B_TRACE"""
import bisect
import statistics
import sys


def load(path):
    steps = []
    for line in open(path):
        ns, point = line.split()
        steps.append((int(ns), point))
    steps.sort()
    return steps


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    transfers = [tuple(int(x) for x in line.split()) for line in open(sys.argv[1]) if line.strip()]
    nodes = {"A": load(sys.argv[2]), "B": load(sys.argv[3])}
    offsets = {}  # (node, point) -> [ns after send]
    spans = {"sending daemon: lane request -> UCX send": ("A", "lane-taken", "message-sending"),
             "receiving daemon: message -> recv answer": ("B", "message-received", "lane-completion")}
    work = {name: [] for name in spans}
    for _, sent, arrived in transfers:
        firsts = {}
        for node, steps in nodes.items():
            times = [t for t, _ in steps]
            lo = bisect.bisect_left(times, sent)
            hi = bisect.bisect_right(times, arrived)
            seen = set()
            for t, point in steps[lo:hi]:
                if point in seen:
                    continue
                seen.add(point)
                offsets.setdefault((node, point), []).append(t - sent)
                firsts[(node, point)] = t
        for name, (node, start, end) in spans.items():
            if (node, start) in firsts and (node, end) in firsts and firsts[(node, end)] >= firsts[(node, start)]:
                work[name].append(firsts[(node, end)] - firsts[(node, start)])
    n = len(transfers)
    oneway = statistics.median(a - s for _, s, a in transfers)
    print("  %d transfers, one-way median %.2f us" % (n, oneway / 1e3))
    rows = sorted(((statistics.median(v), node, point, len(v)) for (node, point), v in offsets.items()))
    before = 0.0
    for med, node, point, count in rows:
        share = "" if count == n else "  (in %d%% of transfers)" % (100 * count // n)
        print("  %-2s %-18s at %7.2f us  (+%.2f)%s" % (node, point, med / 1e3, (med - before) / 1e3, share))
        if count * 2 > n:
            before = med
    print("  client B returns    at %7.2f us  (+%.2f)" % (oneway / 1e3, (oneway - before) / 1e3))
    for name, v in work.items():
        if v:
            print("  %-42s median %.2f us (n=%d)" % (name, statistics.median(v) / 1e3, len(v)))


main()
