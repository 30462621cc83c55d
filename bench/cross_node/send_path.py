#!/usr/bin/env python3
"""The events inside each 4 KiB sendmsg() call, from tracefs output (bench/cross_node/send-path).

  bench/cross_node/send_path.py TRACE_A COMM_A TRACE_B COMM_B

For each trace, the sendmsg calls of threads whose name starts with COMM that returned 4000 to
4999 bytes (the 4 KiB messages; smaller ones are acks and control) are taken; every event between
the call's entry and exit on that CPU is named by its type, device (eth0, h0, ...) and whether
its packet carries the data or is small (an ACK), and numbered by occurrence within the call.
Printed per trace: the calls' median duration, then each event with how often it occurs per call
and its median offset from the call's entry, in that order. tracefs prints microseconds, so
offsets are whole microseconds; medians over thousands of calls are still comparable.
Python stdlib only."""
import collections
import re
import statistics
import sys

LINE = re.compile(r"^\s*(\S+)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+):\s+(\S+?):?\s(.*)$")
DATA_BYTES_MIN = 1000  # a packet longer than this carries the message, shorter ones are ACKs


def event_name(event, rest):
    name = event
    if event.startswith("softirq"):
        match = re.search(r"action=(\w+)", rest)
        if match:
            name += " " + match.group(1)
    if event == "sched_wakeup":
        match = re.search(r"comm=(\S+)", rest)
        name += " " + (match.group(1) if match else rest.split()[0])
    device = re.search(r"dev=(\S+)", rest)
    if device:
        name += " " + device.group(1)
    length = re.search(r"len=(\d+)", rest)
    if length:
        name += " data" if int(length.group(1)) > DATA_BYTES_MIN else " small"
    return name


def send_calls(path, comm_prefix):
    """[(duration_us, [(offset_us, name)])] for the 4 KiB sendmsg calls of comm_prefix*."""
    calls, current = [], None
    for line in open(path, errors="replace"):
        match = LINE.match(line)
        if not match:
            continue
        comm, _, _, stamp, event, rest = match.groups()
        t = float(stamp) * 1e6
        if event.startswith("sys_sendmsg") and comm.startswith(comm_prefix):
            if "(" in event:  # entry: "sys_sendmsg(fd: ..."
                current = (t, [])
            elif current is not None and "->" in rest:
                returned = int(rest.split("->")[1].strip(), 16)
                if 4000 <= returned < 5000:
                    calls.append((t - current[0], current[1]))
                current = None
            continue
        if current is not None:
            current[1].append((t - current[0], event_name(event, rest)))
    return calls


def report(path, comm_prefix):
    calls = send_calls(path, comm_prefix)
    if not calls:
        print(f"{comm_prefix}: no 4 KiB sendmsg calls in {path}")
        return
    print(f"{comm_prefix}: {len(calls)} send calls of 4 KiB, median duration "
          f"{statistics.median(d for d, _ in calls):.1f} us")
    counts, offsets = collections.Counter(), collections.defaultdict(list)
    for _, events in calls:
        seen = collections.Counter()
        for offset, name in events:
            seen[name] += 1
            key = f"{name} #{seen[name]}"
            counts[key] += 1
            offsets[key].append(offset)
    rows = [(statistics.median(offsets[k]), k, counts[k] / len(calls)) for k in counts]
    for at, key, per_call in sorted(rows):
        if per_call >= 0.05:  # rarer ones are timer ticks and the like
            print(f"  {key:38s} {per_call:5.2f} per call   at {at:5.1f} us")


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    report(sys.argv[1], sys.argv[2])
    report(sys.argv[3], sys.argv[4])


if __name__ == "__main__":
    main()
