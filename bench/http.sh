#!/usr/bin/env bash
# A 1 GiB object from a loopback nginx: `concatd once` (release build) against `curl -o`, in the
# same run, with hyperfine. concatd runs twice: one ranged request at a time (like curl) and four
# in parallel. Rules use fsync: false and no .b3 sidecar, so every command just writes the file
# (concatd also hashes it with BLAKE3 — curl does not).
#
#   bench/http.sh            # needs nginx (apt-get install nginx-light), hyperfine, curl
#   RUNS=10 SIZE=2G bench/http.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SIZE=${SIZE:-1G}
BIN=${CONCATD:-target/release/concatd}
[ -x "$BIN" ] || cargo build --release
BIN=$(realpath "$BIN")
for tool in nginx hyperfine curl; do
  command -v "$tool" >/dev/null || { echo "bench/http.sh: $tool is missing" >&2; exit 2; }
done

WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/concatd-http.XXXXXX")
NGINX_PID=
cleanup() {
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"/{www,in,in-p1,in-p4,out,logs,nginx}
chmod a+rx "$WORK" "$WORK/www"   # nginx workers run as an unprivileged user

echo "writing a $SIZE object…" >&2
head -c "$SIZE" /dev/urandom > "$WORK/www/big.bin"
BYTES=$(stat -c %s "$WORK/www/big.bin")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
daemon on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  server { listen 127.0.0.1:$PORT; root $WORK/www; }
}
EOF
nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx"
for _ in $(seq 50); do [ -s "$WORK/nginx/nginx.pid" ] && break; sleep 0.1; done
NGINX_PID=$(cat "$WORK/nginx/nginx.pid")
URL="http://127.0.0.1:$PORT/big.bin"

rule() { # name parallel
  cat <<EOF
  - name: $1
    watch: in-$1
    output_root: out
    fsync: false
    checksum_file: false
    allow:
      urls: ["http://127.0.0.1:$PORT/"]
    remote:
      parallel: $2
      chunk_size: 8MiB
EOF
}
{ echo "log_dir: logs"; echo "rules:"; rule p1 1; rule p4 4; } > "$WORK/rules.yaml"
echo "{\"output\": \"big.bin\", \"sources\": [\"$URL\"]}" > "$WORK/in/m.json"

# One checked run first: the output must be byte-equal to the object.
"$BIN" once -c "$WORK/rules.yaml" --rule p4 "$WORK/in/m.json" > /dev/null
cmp "$WORK/www/big.bin" "$WORK/out/big.bin"
rm -f "$WORK/out/big.bin"

hyperfine --runs "$RUNS" --warmup 1 --prepare "rm -f $WORK/out/big.bin $WORK/out/curl.bin" \
  --export-json "$WORK/result.json" \
  -n "curl -o" "curl -s -o $WORK/out/curl.bin $URL" \
  -n "concatd once (1 request)" "$BIN once -c $WORK/rules.yaml --rule p1 $WORK/in/m.json" \
  -n "concatd once (4 ranged requests)" "$BIN once -c $WORK/rules.yaml --rule p4 $WORK/in/m.json" \
  >&2

python3 - "$WORK/result.json" "$BYTES" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
size = int(sys.argv[2])
curl = size / results[0]["mean"]
print(f"{'command':36} {'mean s':>8} {'± s':>6} {'MiB/s':>8} {'× curl':>7}")
for r in results:
    rate = size / r["mean"]
    print(f"{r['command']:36} {r['mean']:8.3f} {r['stddev']:6.3f} {rate / 2**20:8.0f} {rate / curl:7.2f}")
EOF
