#!/usr/bin/env bash
# Daemon benchmark: latency from rename-in to result file for a 1 MiB job (p50/p99 over 200 jobs,
# one at a time), and throughput of 1,000 small manifests dropped at once (jobs/s).
# Runs the release binary on bench/data (the repository's disk), with fsync on and off.
#   bash bench/daemon.sh            # both fsync settings
#   FSYNC=false bash bench/daemon.sh
# Needs python3 (for sub-millisecond timing).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/concatd}
[ -x "$BIN" ] || cargo build --release
LATENCY_JOBS=${LATENCY_JOBS:-200}
BURST_JOBS=${BURST_JOBS:-1000}
CONCURRENCY=${CONCURRENCY:-2}

run_one() {
  local fsync=$1
  local root
  root=$(mktemp -d "$PWD/bench/data/daemon.XXXXXX")
  mkdir -p "$root"/{in,out,data,logs}
  head -c $((1 << 20)) /dev/urandom > "$root/data/one-mib"
  head -c 4096 /dev/urandom > "$root/data/small"
  cat > "$root/rules.yaml" <<YAML
log_dir: logs
max_jobs: 4
rules:
  - name: bench
    watch: in
    output_root: out
    source_root: data
    fsync: $fsync
    concurrency: $CONCURRENCY
YAML
  RUST_LOG=warn "$BIN" run -c "$root/rules.yaml" 2>"$root/daemon.stderr" &
  local pid=$!
  sleep 0.5
  python3 - "$root" "$fsync" "$LATENCY_JOBS" "$BURST_JOBS" "$CONCURRENCY" <<'PY'
import os, sys, time, statistics
root, fsync, n_lat, n_burst, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
inbox = os.path.join(root, "in")
def drop(name, text):
    tmp = os.path.join(inbox, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    t = time.perf_counter()
    os.rename(tmp, os.path.join(inbox, name))
    return t
def wait_for(path, limit=60):
    end = time.perf_counter() + limit
    while not os.path.exists(path):
        if time.perf_counter() > end:
            sys.exit(f"timed out waiting for {path}")
        time.sleep(0.0002)
    return time.perf_counter()
lat = []
for i in range(n_lat):
    name = f"lat{i:04}.json"
    t0 = drop(name, '{"output":"lat/%d.bin","sources":["one-mib"]}' % i)
    t1 = wait_for(os.path.join(inbox, "done", name + ".result.json"))
    lat.append((t1 - t0) * 1000)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]
print(f"fsync={fsync}: latency rename-in -> result, 1 MiB job, {n_lat} jobs: "
      f"p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, max {lat[-1]:.1f} ms")
t0 = time.perf_counter()
for i in range(n_burst):
    drop(f"burst{i:05}.json", '{"output":"burst/%d.bin","sources":["small"]}' % i)
t_dropped = time.perf_counter()
done = os.path.join(inbox, "done")
while True:
    n = sum(1 for e in os.listdir(done) if e.startswith("burst") and e.endswith(".result.json"))
    if n >= n_burst:
        break
    time.sleep(0.005)
t1 = time.perf_counter()
failed = len(os.listdir(os.path.join(inbox, "failed")))
print(f"fsync={fsync}: burst of {n_burst} manifests (4 KiB each, concurrency {conc}): "
      f"{n_burst / (t1 - t0):.0f} jobs/s ({t1 - t0:.2f} s, dropping took {t_dropped - t0:.2f} s), failed: {failed}")
PY
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$root"
}

mkdir -p bench/data
if [ -n "${FSYNC:-}" ]; then
  run_one "$FSYNC"
else
  run_one true
  run_one false
fi
