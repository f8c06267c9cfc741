#!/usr/bin/env python3
"""The table of bench/engine.sh: concatd against cat and friends, per set, filesystem and fsync.

Reads RESULTS/<fs>.<set>.hyperfine.json, RESULTS/<fs>.<set>.load and RESULTS/extra.jsonl.
Ratios are medians (minimums in brackets) of concatd over the baseline measured in the same run.
"""
import json
import os
import statistics
import sys

res = sys.argv[1]
extra = {}
if os.path.exists(f"{res}/extra.jsonl"):
    for line in open(f"{res}/extra.jsonl"):
        e = json.loads(line)
        extra[(e["fs"], e["set"], e["fsync"])] = e
order_fs = ["ext4", "ext4-cold", "xfs", "btrfs"]
order_set = ["L", "M", "S", "P"]
rows = []
for name in os.listdir(res):
    if name.endswith(".hyperfine.json"):
        fs, st = name[: -len(".hyperfine.json")].rsplit(".", 1)
        rows.append((fs, st))
rows.sort(key=lambda r: (order_set.index(r[1]) if r[1] in order_set else 9,
                         order_fs.index(r[0]) if r[0] in order_fs else 9))


def stats(r):
    return statistics.median(r["times"]), min(r["times"])


print("| set | fs | fsync | concatd s | × cat | × cat && b3sum | × cat && sync | × cat && b3sum && sync | CPU s concatd / cat | RssAnon | new space | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for fs, st in rows:
    try:
        results = json.load(open(f"{res}/{fs}.{st}.hyperfine.json"))["results"]
    except ValueError:  # being written
        continue
    by = {r["command"].replace("xargs cat", "cat"): r for r in results}
    load = open(f"{res}/{fs}.{st}.load").read().strip() if os.path.exists(f"{res}/{fs}.{st}.load") else ""
    for fsync in (False, True):
        c = by.get(f"concatd fsync={'true' if fsync else 'false'}")
        if c is None:  # a run still under way
            continue
        cm, cn = stats(c)
        cells = []
        for base in ["cat", "cat && b3sum", "cat && sync", "cat && b3sum && sync"]:
            durable_base = base.endswith("sync")
            if base not in by or durable_base != fsync:
                cells.append("–")
                continue
            bm, bn = stats(by[base])
            if bm < 0.005 or bn < 0.005:  # below hyperfine's resolution (XFS cat shares extents)
                cells.append(f"– of {bm:.3f} s")
                continue
            cells.append(f"{cm / bm:.2f} ({cn / bn:.2f}) of {bm:.3f} s")
        base = by["cat && sync" if fsync else "cat"]
        cpu = f"{c['user'] + c['system']:.2f} / {base['user'] + base['system']:.2f}"
        cells.append(cpu)
        e = extra.get((fs, st, fsync), {})
        rss = f"{e['rss_kb'] / 1024:.1f} MiB" if "rss_kb" in e else "?"
        space = ""
        if fs in ("xfs", "btrfs") and "new_kib" in e:
            space = f"{max(e['new_kib'], 0) * 1024 * 100 / e['size']:.1f} %"
        print(f"| {st} | {fs} | {'on' if fsync else 'off'} | {cm:.3f} ({cn:.3f}) | " + " | ".join(cells)
              + f" | {rss} | {space} | {load} |")
