#!/usr/bin/env bash
# bench/tracing-ab.sh - the cost of tracing, measured as an interleaved A/B: the same
# breakwater binary runs bench/breakwater-observed.yaml (A: access log on) and
# bench/breakwater-traced.yaml (B: access log on + every request traced to a live OTLP
# receiver) in alternating rounds, A B A B ..., against one nginx upstream. Drift of
# the box then hits both sides alike, where two separate peers.sh runs minutes apart
# can differ by more than the cost being measured.
#
#   bench/tracing-ab.sh                      # 5 rounds, 8 s each, HTTP/1.1 and h2c
#   ROUNDS=9 DURATION=10 bench/tracing-ab.sh
#   SKIP_BUILD=1 bench/tracing-ab.sh         # reuse target/release/breakwater
#
# Prints per-run lines and a markdown summary (medians; ratio B/A of req/s, and CPU
# per request of the proxy process from /proc, user + system). Loopback only; every
# load is bounded in time; everything started is stopped by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=$REPO/target/release/breakwater
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-16}

say() { printf '[tracing-ab %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

for tool in nginx wrk h2load ss; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install nginx wrk nghttp2-client)"
done
for port in 18080 18081 18092 18093 14318 19901; do
  [[ -z $(ss -Hltn "sport = :$port" 2>/dev/null) ]] || die "port $port is in use; stop what listens there"
done
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  (cd "$REPO" && cargo build --release)
fi
[[ -x $BIN ]] || die "$BIN not found; build it first (cargo build --release)"

WORK=$(mktemp -d /tmp/tracing-ab.XXXXXX)
PIDS=()
PROXY=
cleanup() {
  [[ -n $PROXY ]] && kill "$PROXY" 2>/dev/null && wait "$PROXY" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ -f $WORK/sink.log ]] && awk '{n++; if ($2 != 200) e++} END {printf "[tracing-ab] OTLP receiver: %d batches, %d not 200\n", n, e}' "$WORK/sink.log" >&2
  rm -rf "$WORK"
}
trap cleanup EXIT

# The upstream (as in peers.sh) and the OTLP/HTTP receiver: two nginx, each a worker.
cat > "$WORK/up.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/up.pid; error_log $WORK/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18080; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:18081 http2; location / { return 200 "ok\n"; } } }
CONF
cat > "$WORK/sink.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/sink.pid; error_log $WORK/sink.err;
events { worker_connections 256; }
http { log_format sink '\$content_length \$status'; access_log $WORK/sink.log sink;
  client_max_body_size 16m; client_body_buffer_size 4m; keepalive_requests 1000000;
  server { listen 127.0.0.1:14318; location = /v1/traces { return 200; } location / { return 404; } } }
CONF
nginx -c "$WORK/up.conf" -e "$WORK/up.err" & PIDS+=($!)
nginx -c "$WORK/sink.conf" -e "$WORK/sink.err" & PIDS+=($!)

wait_port() { # PORT: up to 5 s
  for _ in $(seq 50); do [[ -n $(ss -Hltn "sport = :$1") ]] && return 0; sleep 0.1; done
  return 1
}
wait_port 18081 || die "the upstream did not start: $(cat "$WORK/up.err")"
wait_port 14318 || die "the OTLP receiver did not start: $(cat "$WORK/sink.err")"

# cpu_ticks PID: user + system clock ticks of a process so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# run CONFIG PROTO: one measured run of a fresh proxy; prints "req/s us-per-req".
run() {
  local cfg=$1 proto=$2 out t0 t1 req rps
  RUST_LOG=warn,breakwater::access=info "$BIN" --workers 1 run -c "$REPO/bench/breakwater-$cfg.yaml" \
    >"$WORK/proxy.out" 2>&1 &
  PROXY=$!
  wait_port 18093 || die "breakwater did not start: $(tail -5 "$WORK/proxy.out")"
  if [[ $proto == h1 ]]; then
    timeout 30 wrk -t1 -c"$CONNS" -d"${WARMUP}s" http://127.0.0.1:18092/ >/dev/null
    t0=$(cpu_ticks "$PROXY")
    out=$(timeout 60 wrk -t1 -c"$CONNS" -d"${DURATION}s" http://127.0.0.1:18092/)
    t1=$(cpu_ticks "$PROXY")
    req=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  else
    timeout 30 h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$WARMUP" http://127.0.0.1:18093/ >/dev/null
    t0=$(cpu_ticks "$PROXY")
    out=$(timeout 60 h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$DURATION" http://127.0.0.1:18093/)
    t1=$(cpu_ticks "$PROXY")
    req=$(awk '/^requests:/{print $8}' <<<"$out")
    rps=$(awk '/finished in/{print $4}' <<<"$out")
  fi
  kill "$PROXY"; wait "$PROXY" 2>/dev/null || true; PROXY=
  [[ -n $req && $req -gt 0 ]] || die "no requests succeeded ($cfg $proto)"
  awk -v r="$rps" -v t=$((t1 - t0)) -v n="$req" -v hz="$HZ" 'BEGIN {printf "%.0f %.2f\n", r, t * 1e6 / hz / n}'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

say "$ROUNDS rounds of ${DURATION}s per side and protocol; work folder $WORK"
for proto in h1 h2; do
  : >"$WORK/observed.$proto" ; : >"$WORK/traced.$proto"
  for r in $(seq "$ROUNDS"); do
    for cfg in observed traced; do
      line=$(run "$cfg" "$proto")
      echo "$line" >>"$WORK/$cfg.$proto"
      say "round $r $proto $cfg: $line (req/s, µs CPU/req)"
    done
  done
done

echo
echo "| protocol | observed req/s | traced req/s | ratio | observed µs CPU/req | traced µs CPU/req | tracing µs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for proto in h1 h2; do
  ro=$(cut -d' ' -f1 "$WORK/observed.$proto" | median); rt=$(cut -d' ' -f1 "$WORK/traced.$proto" | median)
  co=$(cut -d' ' -f2 "$WORK/observed.$proto" | median); ct=$(cut -d' ' -f2 "$WORK/traced.$proto" | median)
  awk -v p="$proto" -v ro="$ro" -v rt="$rt" -v co="$co" -v ct="$ct" 'BEGIN {
    printf "| %s | %d | %d | %.0f%% | %.2f | %.2f | %+.2f |\n", (p == "h1" ? "HTTP/1.1" : "h2c"), ro, rt, 100 * rt / ro, co, ct, ct - co }'
done
