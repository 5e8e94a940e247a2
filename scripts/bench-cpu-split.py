#!/usr/bin/env python3
"""The server's CPU split into user and kernel time over a load run.

    python3 scripts/bench-cpu-split.py ANYWORK_BENCH [anywork-bench load options…]

Runs `ANYWORK_BENCH load OPTIONS`, samples the server's utime and stime
(/proc/<pid>/stat) every 20 ms, prints the bench's output, then the split over the
server's whole life and over the window from 15 % to 95 % of its CPU (the measured run,
without the start and the close), in all and by thread name (Tokio's workers, SQLite's
connection threads…). The server is the bench's child named anywork-server.
"""
import os
import subprocess
import sys
import time
from collections import defaultdict


def threads(server):
    """{tid: (name, utime, stime)} of the server's threads now."""
    out = {}
    for tid in os.listdir(f"/proc/{server}/task"):
        try:
            with open(f"/proc/{server}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[tid] = (name, int(fields[11]), int(fields[12]))
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    hz = os.sysconf("SC_CLK_TCK")
    bench = subprocess.Popen(
        [sys.argv[1], "load"] + sys.argv[2:],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    samples, server = [], None
    while bench.poll() is None:
        if server is None:
            found = subprocess.run(
                ["pgrep", "-P", str(bench.pid), "anywork-server"],
                capture_output=True,
                text=True,
            ).stdout.split()
            server = found[0] if found else None
        if server:
            try:
                with open(f"/proc/{server}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                samples.append((time.time(), int(fields[11]), int(fields[12]), threads(server)))
            except (OSError, StopIteration):
                pass
        time.sleep(0.02)
    print(bench.stdout.read())
    if not samples:
        sys.exit("no samples of the server")
    user, system = samples[-1][1], samples[-1][2]
    print(f"server life: utime {user / hz:.2f} s, stime {system / hz:.2f} s, "
          f"user share {user / max(1, user + system):.1%}")
    total = [s[1] + s[2] for s in samples]
    a = next(i for i, t in enumerate(total) if t >= 0.15 * total[-1])
    b = next(i for i, t in enumerate(total) if t >= 0.95 * total[-1])
    du, ds = samples[b][1] - samples[a][1], samples[b][2] - samples[a][2]
    print(f"window 15-95 % of the CPU ({samples[b][0] - samples[a][0]:.2f} s): "
          f"utime {du / hz:.2f} s, stime {ds / hz:.2f} s, user share {du / max(1, du + ds):.1%}")
    by_name = defaultdict(lambda: [0, 0])
    before, after = samples[a][3], samples[b][3]
    for tid, (name, u, s) in after.items():
        _, u0, s0 = before.get(tid, (name, 0, 0))
        by_name[name][0] += u - u0
        by_name[name][1] += s - s0
    for name, (u, s) in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        if u + s:
            print(f"  {name}: {(u + s) / max(1, du + ds):.1%} of the window's CPU "
                  f"(user {u / hz:.2f} s, system {s / hz:.2f} s)")


if __name__ == "__main__":
    main()
