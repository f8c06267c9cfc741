#!/usr/bin/env bash
# Throughput of `concatd once` against cat, cat+b3sum and cat+sync, on data this script makes.
#
#   bash bench/engine.sh            # L (16 x 64 MiB), M (1000 x 1 MiB), S (20000 x 4 KiB)
#   RUNS=10 SETS="L" bash bench/engine.sh
#
# Every run writes a *new* output (removed and synced in --prepare): truncating an existing file
# makes ext4 flush on close and every tool 2-3x slower. Inputs are re-read before each run so
# they are in the page cache. Needs hyperfine and b3sum (apt-get install hyperfine b3sum).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${BENCH_DIR:-/tmp/concatd-bench}
runs=${RUNS:-7}
sets=${SETS-L M S}
sparse_gib=${SPARSE_GIB-64}

cargo build --release --manifest-path "$repo/Cargo.toml" >&2
bin="$repo/target/release/concatd"
mkdir -p "$dir/out" "$dir/in" "$dir/logs"

make_set() { # name count size
  local d="$dir/data/$1"
  if [ "$(ls "$d" 2>/dev/null | wc -l)" != "$2" ]; then
    rm -rf "$d"; mkdir -p "$d"
    python3 - "$d" "$2" "$3" <<'PY'
import os, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(size)
for i in range(n):
    with open(f"{d}/p{i:06d}", "wb") as f:
        f.write(block[i % 251:] + block[:i % 251])  # distinct files, cheap to make
PY
  fi
  ls "$d" | python3 -c "import json,sys; print(json.dumps({'output':'concatd.bin','sources':[l.strip() for l in sys.stdin]}))" > "$dir/$1.json"
}

rules() { # set mode fsync
  cat > "$dir/rules-$1-$2-$3.yaml" <<YAML
log_dir: $dir/logs
rules:
  - name: b
    watch: $dir/in
    output_root: $dir/out
    source_root: $dir/data/$1
    write_mode: $2
    fsync: $3
YAML
  echo "$dir/rules-$1-$2-$3.yaml"
}

for set in $sets; do
  case $set in
    L) make_set L 16 $((64 << 20)) ;;
    M) make_set M 1000 $((1 << 20)) ;;
    S) make_set S 20000 4096 ;;
  esac
  d="$dir/data/$set"
  prep="rm -f $dir/out/*; cat $d/* > /dev/null; sync"
  cmds=(
    -n cat "cd $d && cat * > $dir/out/cat.bin"
    -n "cat && b3sum" "cd $d && cat * > $dir/out/cat.bin && b3sum $dir/out/cat.bin"
    -n "cat && sync" "cd $d && cat * > $dir/out/cat.bin && sync $dir/out/cat.bin"
  )
  for mode in pwrite copy_file_range mmap; do
    cmds+=(-n "concatd $mode fsync=false" "$bin once -c $(rules "$set" "$mode" false) --rule b $dir/$set.json")
  done
  cmds+=(-n "concatd auto fsync=true" "$bin once -c $(rules "$set" auto true) --rule b $dir/$set.json")
  echo "== $set: $(ls "$d" | wc -l) files, $(du -sh "$d" | cut -f1)"
  hyperfine --style none --runs "$runs" --prepare "sh -c '$prep'" "${cmds[@]}" \
    --export-json "$dir/$set.hyperfine.json" > /dev/null
  python3 "$here/ratios.py" "$dir/$set.hyperfine.json" cat
  python3 "$here/ratios.py" "$dir/$set.hyperfine.json" "cat && b3sum" | sed -n '1p;5,7p'
  python3 "$here/ratios.py" "$dir/$set.hyperfine.json" "cat && sync" | sed -n '1p;8p'
  if [ "$set" = L ]; then
    rm -f "$dir/out/"*
    echo "peak RssAnon, L, pwrite: $(python3 "$here/rssanon.py" "$bin" once -c "$(rules L pwrite false)" --rule b "$dir/L.json") kB"
  fi
  rm -f "$dir/out/"*
done

if [ "$sparse_gib" -gt 0 ]; then
  # The output is written for real (zeros): it needs that much free disk.
  free_gib=$(( $(df --output=avail -k "$dir" | tail -1) / 1048576 - 8 ))
  if [ "$free_gib" -lt "$sparse_gib" ]; then
    echo "only ${free_gib} GiB free (+8 kept): the sparse job shrinks from ${sparse_gib} to ${free_gib} GiB"
    sparse_gib=$free_gib
  fi
  mkdir -p "$dir/data/sparse"
  truncate -s "${sparse_gib}G" "$dir/data/sparse/hole"
  echo '{"output":"sparse.bin","sources":["hole"]}' > "$dir/sparse.json"
  rm -f "$dir/out/"*
  echo "peak RssAnon, ${sparse_gib} GiB sparse source, pwrite: $(python3 "$here/rssanon.py" "$bin" once -c "$(rules sparse pwrite false)" --rule b "$dir/sparse.json") kB"
  rm -f "$dir/out/"* "$dir/data/sparse/hole"
fi
