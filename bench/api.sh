#!/usr/bin/env bash
# API benchmark: a 1 MiB local job through the sync API (POST /v1/rules/bench/jobs?wait=true)
# over the Unix socket and over TCP (bearer token), beside the same jobs through
# `concatd submit --wait` and plain drops (rename in, time until the result file appears), in
# the same run against one daemon: p50/p99 latency and jobs/s with 1 and 16 concurrent clients.
# Target: sync API p50 <= 20 ms.
#   bash bench/api.sh                       # fsync on (the default), JOBS jobs per case
#   FSYNC=false JOBS=400 bash bench/api.sh
# Release binary from CARGO_TARGET_DIR (default target/); the client is Python's http.client
# (threads, one keep-alive connection each). Everything talks to this machine only: a Unix
# socket and 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/concatd}
[ -n "${BIN_BUILT:-}" ] || CARGO_TARGET_DIR=$TARGET cargo build --release --locked
JOBS=${JOBS:-200}
FSYNC=${FSYNC:-true}
CONCURRENCY=${CONCURRENCY:-16}

mkdir -p bench/data
root=$(mktemp -d "$PWD/bench/data/api.XXXXXX")
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$root"
}
trap cleanup EXIT
mkdir -p "$root"/{in,out,data,logs,manifests}
head -c $((1 << 20)) /dev/urandom >"$root/data/one-mib"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$root/rules.yaml" <<YAML
log_dir: logs
max_jobs: $CONCURRENCY
api:
  socket: $root/api.sock
  socket_uids: [$(id -u)]
  listen: 127.0.0.1:$port
  tokens_file: $root/tokens
rules:
  - name: bench
    watch: in
    output_root: out
    source_root: data
    fsync: $FSYNC
    concurrency: $CONCURRENCY
YAML
touch "$root/tokens"
chmod 600 "$root/tokens"
token=$("$BIN" token -c "$root/rules.yaml" --rule bench)
RUST_LOG=warn "$BIN" run -c "$root/rules.yaml" 2>"$root/daemon.stderr" &
pid=$!

CONCATD_TOKEN=$token python3 - "$root" "$port" "$BIN" "$JOBS" "$CONCURRENCY" "$FSYNC" <<'PY'
import http.client, json, os, socket, subprocess, sys, threading, time

root, port, binary, jobs, wide, fsync = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
token = os.environ["CONCATD_TOKEN"]
inbox = os.path.join(root, "in")
DEADLINE = 30.0  # seconds for any one job: a stuck case fails instead of hanging

class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=DEADLINE)
        self.unix_path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(self.unix_path)
        self.sock = s

def connect(kind):
    if kind == "unix":
        return UnixConnection(os.path.join(root, "api.sock")), {}
    return http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE), {"Authorization": "Bearer " + token}

# Wait for every watch to be armed.
start = time.monotonic()
while True:
    try:
        c, _ = connect("unix")
        c.request("GET", "/healthz")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    if time.monotonic() - start > 30:
        sys.exit("the daemon's API did not come up: " + open(os.path.join(root, "daemon.stderr")).read())
    time.sleep(0.05)

def manifest(name):
    return json.dumps({"output": name + ".bin", "sources": ["one-mib"]}).encode()

def api_worker(kind):
    state = {}
    def one(name):
        if "conn" not in state:
            state["conn"], state["headers"] = connect(kind)
        c = state["conn"]
        c.request("POST", "/v1/rules/bench/jobs?wait=true", body=manifest(name),
                  headers={"Content-Type": "application/json", **state["headers"]})
        r = c.getresponse()
        body = r.read()
        if r.status != 200 or json.loads(body).get("status") != "succeeded":
            raise RuntimeError(f"{name}: {r.status} {body[:300]!r}")
    return one

def submit_worker():
    def one(name):
        path = os.path.join(root, "manifests", name + ".json")
        with open(path, "wb") as f:
            f.write(manifest(name))
        p = subprocess.run([binary, "submit", "-c", os.path.join(root, "rules.yaml"), "--rule", "bench",
                            "--wait", "--timeout", "30s", path], capture_output=True, timeout=DEADLINE)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: submit exit {p.returncode}: {p.stderr[:300]!r}")
    return one

def drop_worker():
    def one(name):
        temp = os.path.join(inbox, "." + name + ".part")
        with open(temp, "wb") as f:
            f.write(manifest(name))
        os.rename(temp, os.path.join(inbox, name + ".json"))
        result = os.path.join(inbox, "done", name + ".json.result.json")
        failed = os.path.join(inbox, "failed", name + ".json.result.json")
        limit = time.monotonic() + DEADLINE
        # Polled every 0.2 ms: the figure is at most that late.
        while not os.path.exists(result):
            if os.path.exists(failed) or time.monotonic() > limit:
                raise RuntimeError(f"{name}: no success result")
            time.sleep(0.0002)
    return one

def run(case, clients, make):
    names = [f"{case}-c{clients}-{i:05}" for i in range(jobs)]
    shares = [names[i::clients] for i in range(clients)]
    latencies, errors = [], []
    lock = threading.Lock()
    def client(share):
        one = make()
        mine = []
        for name in share:
            t = time.monotonic()
            try:
                one(name)
            except Exception as e:
                with lock:
                    errors.append(str(e))
                return
            mine.append(time.monotonic() - t)
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        sys.exit(f"{case} x{clients}: {len(errors)} failed, first: {errors[0]}")
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    print(f"{case:<14} {clients:>7} {len(latencies):>5} {p(0.50):>9.1f} {p(0.99):>9.1f} {len(latencies) / wall:>8.1f}", flush=True)
    # Keep the disk from filling across cases: the outputs of this case are not needed.
    for n in names:
        for suffix in (".bin", ".bin.b3"):
            try:
                os.remove(os.path.join(root, "out", n + suffix))
            except FileNotFoundError:
                pass
    return p(0.50)

load = " ".join(f"{x:.1f}" for x in os.getloadavg())
print(f"1 MiB local job, fsync {fsync}, {jobs} jobs per case, {os.cpu_count()} cores, load average {load}")
print(f"{'case':<14} {'clients':>7} {'jobs':>5} {'p50 ms':>9} {'p99 ms':>9} {'jobs/s':>8}")
sync_p50 = None
for clients in (1, wide):
    p50 = run("api-unix", clients, lambda: api_worker("unix"))
    if clients == 1:
        sync_p50 = p50
    run("api-tcp", clients, lambda: api_worker("tcp"))
    run("submit-wait", clients, submit_worker)
    run("drop", clients, drop_worker)
verdict = "met" if sync_p50 <= 20 else "MISSED"
print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
print(f"target: sync API p50 <= 20 ms (1 client, Unix socket): {sync_p50:.1f} ms, {verdict}")
PY
