#!/usr/bin/env bash
# Soak test (not in CI): N minutes of mixed jobs at a steady rate against the release binary,
# with the daemon killed (-9) and restarted every so often.
#   bash bench/soak.sh          # 5 minutes
#   bash bench/soak.sh 2        # 2 minutes
#   RATE=5 KILL_EVERY=10-30 bash bench/soak.sh 3
# Jobs: good small (local, some byte ranges), big (tens of MiB), remote (python3 -m http.server
# on 127.0.0.1 serving the data folder, some mixed with local sources), and bad: missing source,
# bad JSON, checksum mismatch, too large, missing URL. At the end it prints jobs done, failures by
# kind (from the result files, against the kind each job was made to fail with), results against
# manifests dropped (exactly one each), outputs verified (b3sum of every succeeded output equals
# its result's blake3 and the b3sum of the bytes its sources held), the daemon's peak RSS, its
# open files and threads at the start and at the end, kills survived, and jobs/s. Exit 1 when an
# invariant does not hold.
# Python's http.server answers whole files only (no Range), so remote jobs stay within one piece
# (remote.chunk_size 64MiB) and take whole URLs: ranged remote reads are tests/remote's business.
# Needs python3 and b3sum (`cargo install b3sum`).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-5}
BIN=${BIN:-target/release/concatd}
[ -x "$BIN" ] || cargo build --release
command -v b3sum >/dev/null || { echo "soak: needs b3sum (cargo install b3sum)" >&2; exit 2; }
mkdir -p bench/data
ROOT=$(mktemp -d "$PWD/bench/data/soak.XXXXXX")
export ROOT BIN MINUTES
echo "soak: $MINUTES min in $ROOT (RATE=${RATE:-3}/s, kill -9 every ${KILL_EVERY:-15-40}s)"
python3 - <<'PY'
import json, os, random, signal, socket, subprocess, sys, time

root, binary, minutes = os.environ["ROOT"], os.path.abspath(os.environ["BIN"]), float(os.environ["MINUTES"])
rate = float(os.environ.get("RATE", "3"))
kill_lo, kill_hi = (float(x) for x in os.environ.get("KILL_EVERY", "15-40").split("-"))
rng = random.Random(int(os.environ.get("SEED", "7")))
inbox, data, out = (os.path.join(root, d) for d in ("in", "data", "out"))
for d in ("in", "data", "out", "logs"):
    os.makedirs(os.path.join(root, d), exist_ok=True)

# Data: small files (0..64 KiB), medium (1..4 MiB, for remote jobs), big (24 and 40 MiB).
sizes = {}
def make(name, size):
    with open(os.path.join(data, name), "wb") as f:
        f.write(os.urandom(size))
    sizes[name] = size
for i in range(60):
    make(f"s{i:02}", rng.choice([0, 1, 1023, 1024, 1025]) if i < 5 else rng.randrange(1, 64 << 10))
for i in range(5):
    make(f"m{i}", rng.randrange(1 << 20, 4 << 20))
make("b0", 24 << 20)
make("b1", 40 << 20)
smalls = [n for n in sizes if n.startswith("s")]
mediums = [n for n in sizes if n.startswith("m")]

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
sock.close()
http = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", data, str(port)],
                        stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "http.stderr"), "w"))
base_url = f"http://127.0.0.1:{port}/"
deadline = time.time() + 10
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("soak: http.server did not start")
        time.sleep(0.05)

with open(os.path.join(root, "rules.yaml"), "w") as f:
    f.write(f"""log_dir: logs
max_jobs: 4
shutdown_grace: 5s
rules:
  - name: soak
    watch: in
    output_root: out
    source_root: data
    max_output_size: 256MiB
    concurrency: 3
    allow:
      urls: ["{base_url}"]
    remote:
      chunk_size: 64MiB
      attempts: 3
      backoff: 50ms
""")

# --- the daemon, its lives and its numbers ---------------------------------------------------
class Daemon:
    lives = 0
    def __init__(self):
        Daemon.lives += 1
        self.stderr = os.path.join(root, f"daemon.{Daemon.lives}.stderr")
        self.proc = subprocess.Popen([binary, "run", "-c", os.path.join(root, "rules.yaml")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr, "w"), env={**os.environ, "RUST_LOG": "info"})
        end = time.time() + 30
        while " ready" not in open(self.stderr).read():
            if self.proc.poll() is not None or time.time() > end:
                sys.exit(f"soak: daemon did not get ready, see {self.stderr}")
            time.sleep(0.01)
        self.at_start = self.sample()
    def status(self, key):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
    def sample(self):
        return {"fds": self.fds(), "threads": self.status("Threads"), "rss_kib": self.status("VmRSS")}

peak_rss = 0
def note_peak(d):
    global peak_rss
    try:
        peak_rss = max(peak_rss, d.status("VmHWM") or 0)
    except FileNotFoundError:
        pass

# --- jobs ------------------------------------------------------------------------------------
def item(name, ranged=False):
    if ranged and sizes[name] > 0 and rng.random() < 0.5:
        off = rng.randrange(0, sizes[name] + 1)
        length = rng.randrange(0, sizes[name] - off + 1)
        return {"path": name, "offset": off, "length": length}, (name, off, length)
    return name, (name, 0, sizes[name])

def job(i):
    """(manifest text, kind expected or 'succeeded', [(file, offset, length)] for good jobs)."""
    kind = rng.choices(["small", "big", "remote", "missing", "badjson", "checksum", "toolarge", "url404"],
                       [40, 8, 15, 8, 8, 8, 5, 4])[0]
    out_name = f"o/{i:05}-{kind}.bin"
    parts, srcs = [], []
    if kind == "small":
        for _ in range(rng.randrange(1, 13)):
            j, p = item(rng.choice(smalls), ranged=True)
            srcs.append(j); parts.append(p)
    elif kind == "big":
        j, p = item(rng.choice(["b0", "b1"]), ranged=rng.random() < 0.3)
        srcs.append(j); parts.append(p)
        for _ in range(rng.randrange(0, 4)):
            j, p = item(rng.choice(smalls)); srcs.append(j); parts.append(p)
    elif kind == "remote":
        for _ in range(rng.randrange(1, 5)):
            if rng.random() < 0.3:
                j, p = item(rng.choice(smalls))
            else:
                n = rng.choice(mediums + smalls)
                j, p = {"url": base_url + n}, (n, 0, sizes[n])
            srcs.append(j); parts.append(p)
    elif kind == "missing":
        srcs = [rng.choice(smalls), f"nope-{i}"]
    elif kind == "badjson":
        return '{"output": "%s", "sources": [' % out_name, "invalid_manifest", None
    elif kind == "checksum":
        n = rng.choice(smalls)
        srcs = [{"path": n, "blake3": "0" * 64}]
    elif kind == "toolarge":
        srcs = ["b1"] * 8
    elif kind == "url404":
        srcs = [{"url": base_url + f"nope-{i}"}]
    text = json.dumps({"output": out_name, "sources": srcs})
    expect = {"small": "succeeded", "big": "succeeded", "remote": "succeeded", "missing": "source_not_found",
              "checksum": "checksum_mismatch", "toolarge": "too_large", "url404": "source_not_found"}[kind]
    return text, expect, parts if expect == "succeeded" else None

def drop(name, text):
    tmp = os.path.join(inbox, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(inbox, name))

def results():
    found = {}
    for sub in ("done", "failed"):
        d = os.path.join(inbox, sub)
        if not os.path.isdir(d):
            continue
        for n in os.listdir(d):
            if n.endswith(".result.json"):
                try:
                    r = json.load(open(os.path.join(d, n)))
                except (OSError, ValueError) as e:
                    r = {"status": "unreadable", "manifest": n, "error": {"kind": str(e)}}
                found.setdefault(r.get("manifest"), []).append(r)
    return found

# --- the run ---------------------------------------------------------------------------------
daemon = Daemon()
first = daemon.at_start
dropped = {}   # name -> (expected, parts)
kills = 0
start = time.time()
stop_at = start + minutes * 60
quiet_at = start + minutes * 60 * 0.8   # no kills in the last fifth: the last life shows leaks
next_kill = start + rng.uniform(kill_lo, kill_hi)
i = 0
while time.time() < stop_at:
    target = start + i / rate
    if time.time() < target:
        time.sleep(min(target - time.time(), 0.05))
        if int(time.time() * 2) % 2 == 0:
            note_peak(daemon)
        continue
    text, expect, parts = job(i)
    name = f"job-{i:05}.json"
    drop(name, text)
    dropped[name] = (expect, parts)
    i += 1
    if time.time() >= next_kill and time.time() < quiet_at:
        note_peak(daemon)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        kills += 1
        daemon = Daemon()
        next_kill = time.time() + rng.uniform(kill_lo, kill_hi)
last_life = daemon.at_start
dropping_ended = time.time()
end = time.time() + 300
while True:
    found = results()
    if all(n in found for n in dropped):
        break
    if time.time() > end:
        print("soak: timed out waiting for results", file=sys.stderr)
        break
    note_peak(daemon)
    time.sleep(0.2)
finished = time.time()
time.sleep(1)  # let the last job's files settle before the idle sample
final = daemon.sample()
note_peak(daemon)
daemon.proc.send_signal(signal.SIGTERM)
exit_code = daemon.proc.wait(timeout=60)
http.terminate(); http.wait()

# --- the report ------------------------------------------------------------------------------
found = results()
problems = []
kinds, wrong_kind = {}, []
succeeded = 0
for name, (expect, parts) in dropped.items():
    rs = found.get(name, [])
    if len(rs) != 1:
        problems.append(f"{name}: {len(rs)} results")
        continue
    r = rs[0]
    got = "succeeded" if r["status"] == "succeeded" else r.get("error", {}).get("kind", "?")
    if got == "succeeded":
        succeeded += 1
    else:
        kinds[got] = kinds.get(got, 0) + 1
    if got != expect:
        wrong_kind.append(f"{name}: expected {expect}, got {got}: {r.get('error', {}).get('message', '')}")
extra = [n for n in found if n not in dropped]
total_results = sum(len(v) for v in found.values())

def b3(stream_parts=None, path=None):
    if path is not None:
        return subprocess.run(["b3sum", "--no-names", path], capture_output=True, text=True, check=True).stdout.strip()
    p = subprocess.Popen(["b3sum", "--no-names"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
    for n, off, length in stream_parts:
        with open(os.path.join(data, n), "rb") as f:
            f.seek(off)
            p.stdin.write(f.read(length))
    p.stdin.close()
    h = p.stdout.read().decode().strip()
    p.wait()
    return h

verified, bad_outputs = 0, []
for name, (expect, parts) in dropped.items():
    rs = found.get(name, [])
    if len(rs) != 1 or rs[0]["status"] != "succeeded":
        continue
    r = rs[0]
    got = b3(path=r["output"])
    want = b3(parts)
    if got == r["blake3"] == want:
        verified += 1
    else:
        bad_outputs.append(f"{name}: output {got}, result {r['blake3']}, sources {want}")
leftovers = [n for n in os.listdir(os.path.join(inbox, ".work"))] if os.path.isdir(os.path.join(inbox, ".work")) else []
temps = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if f.startswith(".concatd-")]
panics = sum(open(os.path.join(root, f"daemon.{k}.stderr")).read().count("panicked") for k in range(1, Daemon.lives + 1))

elapsed = finished - start
print(f"duration            {elapsed:.0f} s ({dropping_ended - start:.0f} s dropping at {rate}/s)")
print(f"manifests dropped   {len(dropped)}")
print(f"results             {total_results}" + ("  (exactly one each)" if not problems and not extra and total_results == len(dropped) else "  MISMATCH"))
print(f"jobs done           {succeeded + sum(kinds.values())}: {succeeded} succeeded, {sum(kinds.values())} failed")
print("failures by kind    " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"))
print(f"unexpected kinds    {len(wrong_kind)}")
print(f"outputs verified    {verified}/{succeeded} (b3sum of output == result blake3 == b3sum of the sources' bytes)")
print(f"daemon peak RSS     {peak_rss / 1024:.1f} MiB (VmHWM, max over {Daemon.lives} lives)")
print(f"daemon fds/threads  start {first['fds']}/{first['threads']}, last life at its start {last_life['fds']}/{last_life['threads']}, end (idle) {final['fds']}/{final['threads']}")
print(f"daemon RSS          start {first['rss_kib'] / 1024:.1f} MiB, end (idle) {final['rss_kib'] / 1024:.1f} MiB")
print(f"kills survived      {kills} (kill -9, then a restart)")
print(f"jobs/s              {len(dropped) / elapsed:.2f}")
print(f"left in .work/      {len(leftovers)}; temporary outputs left {len(temps)}; panics {panics}; final SIGTERM exit {exit_code}")
for p in (problems + [f"unknown result for {n}" for n in extra] + wrong_kind + bad_outputs)[:20]:
    print("  " + p)
failed = problems or extra or wrong_kind or bad_outputs or leftovers or temps or panics or exit_code != 0 or total_results != len(dropped)
print("soak: " + ("FAILED" if failed else "OK") + f" (files in {root})")
sys.exit(1 if failed else 0)
PY
