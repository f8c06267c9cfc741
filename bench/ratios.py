#!/usr/bin/env python3
"""Print a hyperfine JSON export as a table of medians, minimums and ratios to a baseline."""
import json
import statistics
import sys

path, baseline = sys.argv[1], sys.argv[2]
results = json.load(open(path))["results"]
by_name = {r["command"]: r for r in results}
base = by_name[baseline]
base_med = statistics.median(base["times"])
base_min = min(base["times"])
print(f"{'command':<34} {'median s':>9} {'min s':>7} {'x ' + baseline + ' (med)':>18} {'(min)':>7}")
for r in results:
    med, mn = statistics.median(r["times"]), min(r["times"])
    print(f"{r['command']:<34} {med:>9.3f} {mn:>7.3f} {med / base_med:>18.2f} {mn / base_min:>7.2f}")
