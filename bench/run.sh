#!/usr/bin/env bash
# bench/run.sh - build breakwater in release mode and run the shared peer benchmark
# (nginx, haproxy, breakwater in front of the same nginx upstream) against it.
#
#   bench/run.sh                        # "bare" config -> bench/results-bare.md (+ .tsv)
#   BENCH_CONFIG=layers bench/run.sh    # every resilience layer on -> bench/results-layers.md
#   BENCH_CONFIG=observed bench/run.sh  # access log on, no tracing (baseline for traced)
#   BENCH_CONFIG=traced bench/run.sh    # access log on + tracing at ratio 1.0 to a live OTLP sink
#   PIN=1 bench/run.sh                  # pinned variant -> bench/results-bare-pinned.md
#   SKIP_BUILD=1 bench/run.sh           # reuse target/release/breakwater as it is
#   PEERS=/path/to/peers.sh bench/run.sh
#
# Every other peers.sh knob (DURATION, REPEATS, CONNS, H2, QUIET_MAX, KEEP, ...) passes
# through the environment. See bench/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PEERS=${PEERS:-"$(dirname "$0")/../../shared/bench/peers.sh"}
BENCH_CONFIG=${BENCH_CONFIG:-bare}
CONFIG=$REPO/bench/breakwater-$BENCH_CONFIG.yaml
BIN=$REPO/target/release/breakwater

say() { printf '[bench/run.sh] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[[ -f $PEERS ]] || die "peers.sh not found at $PEERS (set PEERS=/path/to/peers.sh)"
[[ -f $CONFIG ]] || die "no config $CONFIG (BENCH_CONFIG is bare, layers, observed or traced)"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  say "building: cargo build --release (in $REPO)"
  (cd "$REPO" && cargo build --release)
fi
[[ -x $BIN ]] || die "$BIN not found; build it first (cargo build --release)"

say "checking the config: $BIN validate -c $CONFIG"
"$BIN" validate -c "$CONFIG" || die "$CONFIG does not validate"

# peers.sh checks :18092 itself; the h2c and admin ports would only show up as a failed start.
for port in 18093 19901; do
  if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
    die "port $port is already in use (another breakwater?); stop it first"
  fi
done

if [[ ${PIN:-0} == 1 ]]; then
  OUT=${OUT:-$HERE/results-$BENCH_CONFIG-pinned.md}
else
  OUT=${OUT:-$HERE/results-$BENCH_CONFIG.md}
fi

# One tokio worker thread, to match the peers' single worker. Logs at warn: access logs are
# off in the config, and nothing on the hot path should log.
printf -v PROXY_CMD 'exec %q --workers 1 run -c %q' "$BIN" "$CONFIG"
export PROXY_CMD PROXY_NAME=breakwater PROXY_H2_PORT=18093 OUT
case $BENCH_CONFIG in
  # The access log is on in these two: let its info lines through.
  observed|traced) export RUST_LOG=${RUST_LOG:-warn,breakwater::access=info} ;;
  *) export RUST_LOG=${RUST_LOG:-warn} ;;
esac

say "PROXY_CMD=$PROXY_CMD"
SINK_PID=
if [[ $BENCH_CONFIG == traced ]]; then
  # A live OTLP/HTTP receiver outside the proxy's process tree, so its CPU is not billed
  # to breakwater. nginx by default: it reads every POST body and answers 200 (an empty
  # ExportTraceServiceResponse) for a few µs of CPU, where the Python sink (SINK=python)
  # spends ~0.4 ms a batch; on 2 vCPUs that CPU is taken from the proxy's neighbours.
  # Its access log counts what arrived.
  SINK_DIR=$(mktemp -d /tmp/otlp-sink.XXXXXX)
  if [[ ${SINK:-nginx} == nginx ]]; then
    cat > "$SINK_DIR/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $SINK_DIR/nginx.pid;
error_log $SINK_DIR/error.log;
events { worker_connections 256; }
http {
  log_format sink '\$content_length \$status';
  access_log $SINK_DIR/access.log sink;
  client_max_body_size 16m;
  client_body_buffer_size 4m;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:14318;
    location = /v1/traces { return 200; }
    location / { return 404; }
  }
}
CONF
    nginx -c "$SINK_DIR/nginx.conf" -e "$SINK_DIR/error.log" &
  else
    python3 "$HERE/otlp-sink.py" 14318 &
  fi
  SINK_PID=$!
  trap '[[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null; wait "$SINK_PID" 2>/dev/null;
        [[ -f $SINK_DIR/access.log ]] && awk "{n++; b+=\$1; if (\$2 != 200) e++} END {printf \"otlp-sink (nginx): %d batches, %d bytes, %d not 200\n\", n, b, e}" "$SINK_DIR/access.log" >&2' EXIT
  sleep 0.5
fi

say "running $PEERS; results go to $OUT"
bash "$PEERS"
