#!/usr/bin/env bash
# `concatd once` against the tools a user would script, in one run, as one table of ratios.
#
#   bash bench/engine.sh                         # everything below, 9 runs each (needs root)
#   RUNS=5 SETS="L" FS="ext4 xfs" bash bench/engine.sh
#
# Sets: L (16 x 64 MiB), M (1000 x 1 MiB), S (20000 x 4 KiB), P (1,000,000 parts from a list:
# 1000 files of 256 B, each listed 1000 times). Filesystems: ext4 (BENCH_DIR's own, page cache
# warm), ext4-cold (the same, `echo 3 > drop_caches` before every run: sources and output cold),
# xfs (a loop image made with `mkfs.xfs -m reflink=1`), btrfs (a loop image). For each, concatd
# (write_mode auto) with fsync off and on, against `cat`, `cat && b3sum` and `cat && sync`
# `cat && b3sum && sync` (`xargs cat` for P) measured in the same hyperfine run (medians and minimums). Every run writes
# a new output (removed and synced in --prepare: truncating an existing file makes ext4 flush on
# close and every tool 2-3x slower). Also measured once per row: peak RssAnon (bench/rssanon.py)
# and, on xfs/btrfs, the new disk space the output took (free space before and after, synced).
# Needs hyperfine, b3sum, xfsprogs, btrfs-progs; images are 4 GiB sparse files under BENCH_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${BENCH_DIR:-/tmp/concatd-bench-perf}
runs=${RUNS:-9}
sets=${SETS-L M S P}
filesystems=${FS-ext4 ext4-cold xfs btrfs}
target=${CARGO_TARGET_DIR:-$repo/target}

# CONCATD_BIN: a binary to measure instead of building this checkout.
bin=${CONCATD_BIN:-$target/release/concatd}
[ -n "${CONCATD_BIN:-}" ] || CARGO_TARGET_DIR=$target cargo build --release --manifest-path "$repo/Cargo.toml" >&2
mkdir -p "$dir/results"
# APPEND=1 adds rows to the previous run's table (SETS=P FS=ext4 APPEND=1 after the rest, say).
[ -n "${APPEND:-}" ] || rm -f "$dir/results/"*

root_of() { # fs: the folder its data and outputs live in (mounting images on first use)
  case $1 in
    ext4 | ext4-cold) mkdir -p "$dir/ext4"; echo "$dir/ext4" ;;
    xfs | btrfs)
      local mnt="$dir/mnt/$1"
      if ! mountpoint -q "$mnt"; then
        mkdir -p "$mnt"
        rm -f "$dir/$1.img"; truncate -s 4G "$dir/$1.img"
        # mkfs and mount must not print on stdout: it is the folder this function returns.
        if [ "$1" = xfs ]; then mkfs.xfs -q -m reflink=1 "$dir/$1.img"; else mkfs.btrfs -q "$dir/$1.img"; fi >&2
        mount -o loop "$dir/$1.img" "$mnt" >&2
      fi
      echo "$mnt" ;;
  esac
}

make_set() { # root name count size [repeat]
  local d="$1/data/$2" n=$3 size=$4 repeat=${5:-1}
  if [ "$(ls "$d" 2>/dev/null | wc -l)" != "$((n + (repeat > 1)))" ]; then
    rm -rf "$d"; mkdir -p "$d"
    python3 - "$d" "$n" "$size" "$repeat" <<'PY'
import os, sys
d, n, size, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
block = os.urandom(size)
for i in range(n):
    with open(f"{d}/p{i:06d}", "wb") as f:
        f.write(block[i % 251:] + block[:i % 251])  # distinct files, cheap to make
if repeat > 1:
    with open(f"{d}/list", "w") as f:
        for _ in range(repeat):
            f.write("".join(f"p{i:06d}\n" for i in range(n)))
PY
  fi
  if [ "$repeat" -gt 1 ]; then
    echo '{"output":"concatd.bin","source_lists":["list"]}'
  else
    ls "$d" | python3 -c "import json,sys; print(json.dumps({'output':'concatd.bin','sources':[l.strip() for l in sys.stdin]}))"
  fi > "$1/$2.json"
}

rules() { # root set fsync
  cat > "$1/rules-$2-$3.yaml" <<YAML
log_dir: $1/logs
rules:
  - name: b
    watch: $1/in
    output_root: $1/out
    source_root: $1/data/$2
    write_mode: auto
    fsync: $3
YAML
  echo "$1/rules-$2-$3.yaml"
}

free_kib() { sync -f "$1"; df --output=avail -k "$1" | tail -1; }

for fs in $filesystems; do
  root=$(root_of "$fs")
  mkdir -p "$root/out" "$root/in" "$root/logs"
  for set in $sets; do
    case $set in
      L) make_set "$root" L 16 $((64 << 20)) ;;
      M) make_set "$root" M 1000 $((1 << 20)) ;;
      S) make_set "$root" S 20000 4096 ;;
      P) make_set "$root" P 1000 256 1000 ;;
    esac
    d="$root/data/$set"
    if [ "$fs" = ext4-cold ]; then
      prep="rm -f $root/out/*; sync; echo 3 > /proc/sys/vm/drop_caches"
    else
      prep="rm -f $root/out/*; cat $d/* > /dev/null; sync"
    fi
    if [ "$set" = P ]; then
      c="xargs -a list cat > $root/out/cat.bin"; cn="xargs cat"
    else
      c="cat p* > $root/out/cat.bin"; cn="cat"
    fi
    off=$(rules "$root" "$set" false)
    on=$(rules "$root" "$set" true)
    echo "== $fs $set: $(ls "$d" | wc -l) files, $(du -sh "$d" | cut -f1), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    cmds=(-n "$cn" "cd $d && $c" -n "$cn && sync" "cd $d && $c && sync $root/out/cat.bin")
    if [ "$set" != P ]; then # P's runs take seconds each: its b3sum rows are left out
      cmds+=(-n "$cn && b3sum" "cd $d && $c && b3sum $root/out/cat.bin"
        -n "$cn && b3sum && sync" "cd $d && $c && b3sum $root/out/cat.bin && sync $root/out/cat.bin")
    fi
    hyperfine --style none --runs "$runs" --prepare "sh -c '$prep'" "${cmds[@]}" \
      -n "concatd fsync=false" "$bin once -c $off --rule b $root/$set.json" \
      -n "concatd fsync=true" "$bin once -c $on --rule b $root/$set.json" \
      --export-json "$dir/results/$fs.$set.hyperfine.json" > /dev/null
    for fsync in false true; do
      sh -c "$prep"
      rules=$(rules "$root" "$set" $fsync)
      before=$(free_kib "$root")
      rss=$(python3 "$here/rssanon.py" "$bin" once -c "$rules" --rule b "$root/$set.json")
      after=$(free_kib "$root")
      size=$(stat -c %s "$root/out/concatd.bin")
      echo "{\"fs\":\"$fs\",\"set\":\"$set\",\"fsync\":$fsync,\"rss_kb\":$rss,\"new_kib\":$((before - after)),\"size\":$size}" \
        >> "$dir/results/extra.jsonl"
    done
    echo "$(cut -d' ' -f1-3 /proc/loadavg)" > "$dir/results/$fs.$set.load"
    rm -f "$root/out/"*
  done
done
python3 "$here/engine_table.py" "$dir/results"
