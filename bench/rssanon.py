#!/usr/bin/env python3
"""Run a command and print its peak anonymous memory (RssAnon, kB), sampled every 2 ms.

Peak RSS (/usr/bin/time's %M) counts mapped file pages too, which says nothing about what the
process itself allocates; RssAnon is the figure the benchmark's memory target is about.
"""
import subprocess
import sys
import time

proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
peak = 0
while proc.poll() is None:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
    except FileNotFoundError:
        break
    time.sleep(0.002)
if proc.wait() != 0:
    sys.exit(f"command failed: {sys.argv[1:]}")
print(peak)
