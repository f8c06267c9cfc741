#!/usr/bin/env bash
# S3 outputs (issue 9): `concatd once` writing s3:// against the two ways people do it today, all
# in the same run, on moto_server on loopback:
#   cli        `aws s3 cp` every source down, `cat` them, `aws s3 cp` the result up;
#   s3-concat  the Python package (`S3Concat(...).add_file(...)...concat()`), which copies
#              objects ≥ 5 MiB inside the store and downloads smaller ones to join them.
# Cases: A 3 × 64 MiB objects; B 200 objects of 1–8 MiB; C a 1 GiB mixed job (8 × 96 MiB objects
# and 8 × 32 MiB local files, interleaved; s3-concat cannot read local files: n/a).
#
# Wall time: RUNS runs of each command (median, min). Bytes through the host: every tool talks
# to moto through a counting TCP proxy on loopback (in this script), which adds request and
# response bytes (headers and bodies, both directions) per run — the proxy is in every tool's
# path alike. Each tool's output is then fetched straight from moto and its BLAKE3 (b3sum)
# compared with that of the expected concatenation, made locally.
#
#   bash bench/s3.sh                  # needs moto_server (pip install 'moto[server]' awscrt),
#   RUNS=5 CASES="A B" bash bench/s3.sh   # aws (the AWS CLI), b3sum, python3 with boto3
#
# s3-concat is installed into a venv in BENCH_DIR if `import s3_concat` fails. The release
# binary is built unless CONCATD names one (CARGO_TARGET_DIR is honoured).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${BENCH_DIR:-/tmp/concatd-s3bench}
runs=${RUNS:-3}
cases=${CASES-A B C}
target=${CARGO_TARGET_DIR:-$repo/target}

for tool in moto_server aws b3sum python3; do
  command -v "$tool" >/dev/null || { echo "bench/s3.sh: $tool is missing" >&2; exit 2; }
done
python3 -c 'import boto3' || { echo "bench/s3.sh: python3 has no boto3" >&2; exit 2; }
python3 -c 'import awscrt' 2>/dev/null || echo "bench/s3.sh: no awscrt: moto keeps no CRC64NVME" >&2
if [ -n "${CONCATD:-}" ]; then
  bin=$(realpath "$CONCATD")
else
  cargo build --release --manifest-path "$repo/Cargo.toml" >&2
  bin="$target/release/concatd"
fi
mkdir -p "$dir"
py=python3
if ! python3 -c 'import s3_concat' 2>/dev/null; then
  if [ ! -x "$dir/venv/bin/python" ] || ! "$dir/venv/bin/python" -c 'import s3_concat' 2>/dev/null; then
    echo "installing s3-concat into $dir/venv…" >&2
    python3 -m venv --system-site-packages "$dir/venv" >&2
    "$dir/venv/bin/pip" install -q s3-concat >&2
  fi
  py="$dir/venv/bin/python"
fi

exec "$py" - "$bin" "$dir" "$runs" "$cases" <<'PY'
import hashlib, json, os, random, shutil, socket, statistics, subprocess, sys, threading, time

bin_, work, runs, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
MIB = 1 << 20
env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
           AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
           AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/dev/null")
os.environ.update(env)
import boto3

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

shutil.rmtree(f"{work}/run", ignore_errors=True)
os.makedirs(f"{work}/run/in"); os.makedirs(f"{work}/run/logs")
moto_port, proxy_port = free_port(), free_port()
moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(moto_port)],
                        stdout=subprocess.DEVNULL, stderr=open(f"{work}/run/moto.log", "w"))
try:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", moto_port)).close(); break
        except OSError:
            time.sleep(0.1)

    # The counting proxy: bytes each way, summed over every connection.
    counts = {"up": 0, "down": 0}
    lock = threading.Lock()
    def pump(src, dst, key):
        buf = bytearray(1 << 20); view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                dst.sendall(view[:n])
                with lock:
                    counts[key] += n
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try: s.shutdown(socket.SHUT_RDWR)
                except OSError: pass
    def serve():
        ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", proxy_port)); ls.listen(256)
        while True:
            c, _ = ls.accept()
            m = socket.create_connection(("127.0.0.1", moto_port))
            threading.Thread(target=pump, args=(c, m, "up"), daemon=True).start()
            threading.Thread(target=pump, args=(m, c, "down"), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    proxy = f"http://127.0.0.1:{proxy_port}"
    direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1")
    direct.create_bucket(Bucket="bkt")

    rng = random.Random(9)
    def blob(n):
        # Random but cheap: a random MiB rotated per object, plus a random tail.
        base = os.urandom(MIB)
        out = bytearray()
        while len(out) < n:
            k = rng.randrange(MIB)
            out += base[k:] + base[:k]
        return bytes(out[:n])

    # Each case: (kind, name, size) in output order, kind "s3" (key src/NAME) or "local".
    def layout(case):
        if case == "A":
            return [("s3", f"A/o{i:03d}.bin", 64 * MIB) for i in range(3)]
        if case == "B":
            return [("s3", f"B/o{i:03d}.bin", rng.randint(MIB, 8 * MIB)) for i in range(200)]
        items = []
        for i in range(8):
            items.append(("s3", f"C/o{i:03d}.bin", 96 * MIB))
            items.append(("local", f"C-l{i:03d}.bin", 32 * MIB))
        return items

    local = f"{work}/run/local"
    os.makedirs(local)
    open(f"{work}/run/rules.yaml", "w").write(f"""log_dir: {work}/run/logs
rules:
  - name: r
    watch: {work}/run/in
    output_root: s3://bkt/out/
    source_root: {local}
    overwrite: true
    checksum_file: false
    allow:
      urls: ["s3://bkt/src/"]
    s3:
      endpoint: {proxy}
      region: us-east-1
      path_style: true
""")

    def timed(cmd, **kw):
        with lock:
            before = dict(counts)
        t = time.monotonic()
        p = subprocess.run(cmd, env=env, capture_output=True, **kw)
        took = time.monotonic() - t
        time.sleep(0.3)  # let the proxy count the last bytes
        with lock:
            moved = counts["up"] - before["up"] + counts["down"] - before["down"]
        if p.returncode != 0:
            sys.exit(f"failed: {cmd}\n{p.stdout.decode()[-3000:]}\n{p.stderr.decode()[-3000:]}")
        return took, moved, p.stdout

    def b3(chunks):
        p = subprocess.Popen(["b3sum", "--no-names", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for d in chunks:
            p.stdin.write(d)
        p.stdin.close()
        out = p.stdout.read().decode().split()[0]
        p.wait()
        return out

    def fetched_b3(key):
        try:
            body = direct.get_object(Bucket="bkt", Key=key)["Body"]
        except direct.exceptions.NoSuchKey:
            return "missing"
        return b3(iter(lambda: body.read(8 * MIB), b""))

    def cli_script(case, items):
        d = f"{work}/run/cli"
        lines = ["set -e", f"rm -rf {d}; mkdir -p {d}",
                 f"aws --endpoint-url {proxy} s3 cp --quiet --recursive s3://bkt/src/{case}/ {d}/"]
        parts = [f"{d}/{n.split('/', 1)[1]}" if k == "s3" else f"{local}/{n}" for k, n, _ in items]
        open(f"{work}/run/cli-{case}.list", "w").write("\n".join(parts) + "\n")
        lines.append(f"tr '\\n' '\\0' < {work}/run/cli-{case}.list | xargs -0 cat > {d}/all.bin")
        lines.append(f"aws --endpoint-url {proxy} s3 cp --quiet {d}/all.bin s3://bkt/out/cli-{case}.bin")
        lines.append(f"rm -rf {d}")
        return ["bash", "-c", "\n".join(lines)]

    def s3concat_script(case, items):
        keys = [f"src/{n}" for _, n, _ in items]
        code = (
            "import json, sys\nfrom s3_concat import S3Concat\n"
            f"job = S3Concat('bkt', 'out/s3concat-{case}.bin', None, s3_client_kwargs={{'endpoint_url': '{proxy}'}})\n"
            f"for k in json.load(open('{work}/run/s3concat-{case}.json')):\n    job.add_file(k)\n"
            "job.concat(small_parts_threads=4)\n")
        json.dump(keys, open(f"{work}/run/s3concat-{case}.json", "w"))
        return [sys.executable, "-c", code]

    rows = []
    for case in cases:
        items = layout(case)
        total = sum(n for _, _, n in items)
        print(f"case {case}: {len(items)} sources, {total / MIB:.0f} MiB: making them…", file=sys.stderr)
        hasher = subprocess.Popen(["b3sum", "--no-names", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for kind, name, size in items:
            data = blob(size)
            hasher.stdin.write(data)
            if kind == "s3":
                direct.put_object(Bucket="bkt", Key=f"src/{name}", Body=data, ChecksumAlgorithm="CRC64NVME")
            else:
                open(f"{local}/{name}", "wb").write(data)
        hasher.stdin.close()
        want = hasher.stdout.read().decode().split()[0]
        hasher.wait()
        manifest = f"{work}/run/{case}.json"
        json.dump({"output": f"concatd-{case}.bin",
                   "sources": [f"s3://bkt/src/{n}" if k == "s3" else n for k, n, _ in items]},
                  open(manifest, "w"))
        tools = [("concatd once", [bin_, "once", "-c", f"{work}/run/rules.yaml", "--rule", "r", manifest],
                  f"out/concatd-{case}.bin"),
                 ("aws s3 cp + cat + cp", cli_script(case, items), f"out/cli-{case}.bin")]
        if all(k == "s3" for k, _, _ in items):
            tools.append(("s3-concat", s3concat_script(case, items), f"out/s3concat-{case}.bin"))
        for name, cmd, key in tools:
            times, moved, extra = [], [], ""
            for r in range(runs):
                took, nbytes, out = timed(cmd)
                times.append(took); moved.append(nbytes)
                if name == "concatd once":
                    res = json.loads(out)
                    assert res["status"] == "succeeded", res
                    extra = f"copied {res.get('copied_bytes', 0) / MIB:.0f} MiB, uploaded {res.get('uploaded_bytes', 0) / MIB:.0f} MiB"
                print(f"  {case} {name} run {r + 1}: {took:.2f} s, {nbytes / MIB:.1f} MiB through the host", file=sys.stderr)
            got = fetched_b3(key)
            rows.append(dict(case=case, tool=name, total=total, med=statistics.median(times), min=min(times),
                             bytes=statistics.median(moved), ok=(got == want), extra=extra))
        if case != cases[-1]:
            for kind, name, _ in items:
                if kind == "s3":
                    direct.delete_object(Bucket="bkt", Key=f"src/{name}")
                else:
                    os.remove(f"{local}/{name}")
            for _, _, key in tools:
                direct.delete_object(Bucket="bkt", Key=key)

    print(f"\n{runs} runs each; bytes through the host = request + response bytes at a counting proxy (median of the runs)")
    print(f"{'case':<4} {'tool':<22} {'MiB':>6} {'median s':>9} {'min s':>7} {'x concatd':>9} {'host MiB':>9} {'host/output':>11} {'x concatd':>9}  output")
    for case in cases:
        mine = [r for r in rows if r["case"] == case]
        base = mine[0]
        for r in mine:
            ratio_b = r["bytes"] / base["bytes"] if base["bytes"] else float("inf")
            rb = f"{ratio_b:9.1f}" if base["bytes"] else f"{'∞' if r['bytes'] else '1.0':>9}"
            print(f"{case:<4} {r['tool']:<22} {r['total'] / MIB:6.0f} {r['med']:9.2f} {r['min']:7.2f} "
                  f"{r['med'] / base['med']:9.2f} {r['bytes'] / MIB:9.2f} {r['bytes'] / r['total']:11.3f} {rb}  "
                  f"{'correct' if r['ok'] else 'WRONG BYTES'}{'  (' + r['extra'] + ')' if r['extra'] else ''}")
finally:
    moto.kill()
PY
