#!/usr/bin/env bash
# grpcgate load benchmark (issue 7): the same echo backends and the same load, with the same CPU pinning,
# against (1) the backends directly, (2) grpcgate, (3) NGINX grpc_pass, (4) HAProxy (h2c), and, in the
# one-call-in-flight and streaming scenarios only, (5) "tcp-relay": HAProxy in TCP mode, a byte relay that
# parses nothing, as the floor any proxy pays on this machine for the extra hop.
# Writes benches/load/results.md and benches/load/results.json. See benches/load/README.md.
#
#   bash benches/load/run.sh                 # everything, 5 s per scenario
#   DURATION=2 bash benches/load/run.sh      # quicker
#   ROUNDS=3 bash benches/load/run.sh        # every cell the median of 3 interleaved runs (steadier)
#   SYSTEMS="direct grpcgate" SCENARIOS="unary-closed unary-1x1" bash benches/load/run.sh
#   SCENARIOS="tls-unary tls-conns tls-resumed" SYSTEMS="grpcgate nginx haproxy" bash benches/load/run.sh
#                                            # the TLS edge: each proxy terminates TLS (same ECDSA P-256
#                                            # certificate), h2c to the backends
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD

DURATION=${DURATION:-5}            # measured seconds per scenario
WARMUP=${WARMUP:-1}                # warm-up seconds before each measured window
PROXY_CPU=${PROXY_CPU:-1}          # the proxy under test runs here (taskset -c)
LOAD_CPU=${LOAD_CPU:-0}            # load generator and echo backends run here
BASE_PORT=${BASE_PORT:-19000}      # backends on BASE+51.., grpcgate BASE+100, nginx BASE+200, haproxy BASE+300,
                                   # tcp-relay BASE+400; TLS listeners at +10 (grpcgate BASE+110, ...)
BACKENDS=${BACKENDS:-2}            # echo backends behind every proxy (and spread over by "direct")
SYSTEMS=${SYSTEMS:-"direct grpcgate nginx haproxy tcp-relay"}
SCENARIOS=${SCENARIOS:-"unary-closed unary-1x1 unary-open stream conns streams10k idle tls-unary tls-conns tls-resumed"}
PAYLOAD=${PAYLOAD:-64}             # unary payload bytes
UNARY_C=${UNARY_C:-4}              # unary-closed: connections x streams per connection
UNARY_S=${UNARY_S:-32}
RATE=${RATE:-}                     # unary-open req/s; default: half the lowest unary-closed rps of this run
OPEN_C=${OPEN_C:-4}
STREAM_C=${STREAM_C:-2}            # stream: connections x streams, messages per call, payload per message
STREAM_S=${STREAM_S:-4}
STREAM_COUNT=${STREAM_COUNT:-1000}
STREAM_PAYLOAD=${STREAM_PAYLOAD:-1024}
CONNS=${CONNS:-1000}               # conns: concurrent clients, calls per connection
REQS_PER_CONN=${REQS_PER_CONN:-5}
S10K_C=${S10K_C:-10}               # streams10k: connections x streams
S10K_S=${S10K_S:-1000}
IDLE_CONNS=${IDLE_CONNS:-1000}     # idle: connections held open to measure RSS per connection
TLS_CONNS=${TLS_CONNS:-100}        # tls-conns: concurrent clients, each: TLS connect, one call, close, repeat
                                   # (tls-unary is unary-closed's UNARY_C x UNARY_S over TLS)
TLS_RESUME_CONNS=${TLS_RESUME_CONNS:-4}  # tls-resumed: the same with resumption, fewer clients: they share one
                                   # session cache, and with 100 connecting at once most find no ticket
                                   # (13-35 % resumed); with 4, nearly every handshake resumes
MAX_STREAMS=${MAX_STREAMS:-1000}   # SETTINGS_MAX_CONCURRENT_STREAMS every proxy advertises to clients
RETRIES=${RETRIES:-2}               # re-runs of a run disturbed by other processes on our cores
ROUNDS=${ROUNDS:-1}                # >1: every scenario runs this many times per system, the systems
                                   # interleaved; each reported number is the median over the rounds
MAX_OTHER=${MAX_OTHER:-0.05}       # "disturbed": other processes (or steal) took more CPU-s/s than this
PERF=${PERF:-0}                    # 1: afterwards, perf record -g grpcgate under PERF_SCENARIO
PERF_SCENARIO=${PERF_SCENARIO:-unary-closed}  # -> perf-grpcgate.txt (unary-closed) or
                                   # perf-grpcgate-<scenario>.txt, and the flame graph likewise
BUILD=${BUILD:-1}                  # 0: use the binaries already in target/release (and target/pgo)
PGO=${PGO:-1}                      # 1: benchmark the profile-guided build of grpcgate (benches/load/pgo.sh,
                                   # the recommended release build); 0: the plain `cargo build --release`
BUSY_POLL=${BUSY_POLL:-0}          # 1: grpcgate busy_poll = true and HAProxy busy-polling (NGINX has none);
                                   # proxy CPU figures then count the spinning, not the work
OUT_DIR=${OUT_DIR:-$ROOT/benches/load}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
HAPROXY=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}

if [[ -n ${GRPCGATE:-} ]]; then
  :                                # GRPCGATE=path: measure that grpcgate binary (e.g. an older build)
elif [[ $PGO == 1 ]]; then
  GRPCGATE=$ROOT/target/pgo/$(rustc -vV | sed -n 's/^host: //p')/release/grpcgate
else
  GRPCGATE=$ROOT/target/release/grpcgate
fi
# GRPCGATE_BASE=path adds the system "grpcgate-base": that binary with grpcgate's config, e.g. the build
# before a change, measured in the same run (SYSTEMS="grpcgate grpcgate-base ...").
GRPCGATE_BASE=${GRPCGATE_BASE:-}
LOADGEN=$ROOT/target/release/examples/loadgen
ECHO_SERVER=$ROOT/target/release/examples/echo-server

WORK=$(mktemp -d /tmp/grpcgate-load.XXXXXX)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
NOTES=()
ECHO_PID=""
PROXY_PID=""

log() { printf '[run.sh] %s\n' "$*" >&2; }
note() { NOTES+=("$*"); log "NOTE: $*"; }

# Ends a process we started (by pid): SIGTERM, then SIGKILL after 5 s.
stop_pid() {
  local pid=$1
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  stop_pid "$PROXY_PID"
  stop_pid "$ECHO_PID"
  PROXY_PID=""
  ECHO_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
  local port=$1 pid=$2
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# ---------------------------------------------------------------------------------------------------
# Prerequisites

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"
if (($(ulimit -n) < 12000)); then
  note "ulimit -n is $(ulimit -n): streams10k through NGINX needs one upstream connection per stream"
fi

if [[ $BUILD == 1 ]]; then
  log "building (release)"
  # Two invocations: building the examples in the same one would give the proxy the features their
  # dev-dependencies turn on (tokio's test-util, which makes every clock read check for a paused clock).
  cargo build --release --bins
  cargo build --release --examples
  if [[ $PGO == 1 ]]; then
    log "building grpcgate with PGO (benches/load/pgo.sh)"
    if ! bash "$ROOT/benches/load/pgo.sh" >/dev/null; then
      note "the PGO build failed (llvm-tools missing?): grpcgate is the plain release build in this run"
      PGO=0
      GRPCGATE=$ROOT/target/release/grpcgate
    fi
  fi
fi
for b in "$GRPCGATE" "$LOADGEN" "$ECHO_SERVER"; do
  [[ -x $b ]] || { log "missing $b (run with BUILD=1, or PGO=0 for the plain build)"; exit 1; }
done

try_install() {
  local pkg=$1
  if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    log "$pkg missing: trying apt-get install $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >/dev/null 2>&1 || true
  fi
}

want() { [[ " $SYSTEMS " == *" $1 "* ]]; }
if want grpcgate-base && [[ ! -x $GRPCGATE_BASE ]]; then
  note "grpcgate-base skipped: GRPCGATE_BASE is not an executable"
  SYSTEMS=${SYSTEMS//grpcgate-base/}
fi
if want nginx; then
  [[ -x $NGINX ]] || { try_install nginx; NGINX=$(command -v nginx || echo /usr/sbin/nginx); }
  if [[ ! -x $NGINX ]]; then
    note "NGINX skipped: not installed and apt-get install nginx failed"
    SYSTEMS=${SYSTEMS//nginx/}
  elif ! "$NGINX" -V 2>&1 | grep -q http_v2_module || "$NGINX" -V 2>&1 | grep -q without-http_grpc_module; then
    note "NGINX skipped: built without http_v2 or grpc"
    SYSTEMS=${SYSTEMS//nginx/}
  fi
fi
if want haproxy || want tcp-relay; then
  [[ -x $HAPROXY ]] || { try_install haproxy; HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy); }
  if [[ ! -x $HAPROXY ]]; then
    note "HAProxy and tcp-relay skipped: not installed and apt-get install haproxy failed"
    SYSTEMS=${SYSTEMS//haproxy/}
    SYSTEMS=${SYSTEMS//tcp-relay/}
  fi
fi

# ---------------------------------------------------------------------------------------------------
# Backends and proxy configs

BACKEND_ADDRS=()
for i in $(seq 0 $((BACKENDS - 1))); do BACKEND_ADDRS+=("127.0.0.1:$((BASE_PORT + 51 + i))"); done
BACKEND_PORTS=$(IFS=,; echo "${BACKEND_ADDRS[*]//127.0.0.1:/}")
BACKEND_LIST=$(IFS=,; echo "${BACKEND_ADDRS[*]}")
GG_PORT=$((BASE_PORT + 100))
NGINX_PORT=$((BASE_PORT + 200))
HAPROXY_PORT=$((BASE_PORT + 300))
TCP_RELAY_PORT=$((BASE_PORT + 400))
# The TLS edge (scenarios tls-*): every proxy also terminates TLS on its port + 10, with the same
# certificate (ECDSA P-256, made by `loadgen cert`), ALPN h2, h2c to the backends.
TLS_WANTED=0
[[ " $SCENARIOS " == *" tls-"* ]] && TLS_WANTED=1
TLS_DIR=$WORK/tls
if [[ $TLS_WANTED == 1 ]]; then
  "$LOADGEN" cert --cert-dir "$TLS_DIR"
  # HAProxy wants the certificate and its key in one file.
  cat "$TLS_DIR/server.crt" "$TLS_DIR/server.key" >"$TLS_DIR/haproxy.pem"
fi

{
  echo 'drain_timeout = "1s"'
  [[ $BUSY_POLL == 1 ]] && echo 'busy_poll = true'
  echo
  echo '[[listeners]]'
  echo 'name = "bench"'
  echo "listen = \"127.0.0.1:$GG_PORT\""
  echo "max_concurrent_streams = $MAX_STREAMS"
  echo
  echo '[[listeners.routes]]'
  echo 'cluster = "echo"'
  echo
  if [[ $TLS_WANTED == 1 ]]; then
    echo '[[listeners]]'
    echo 'name = "bench-tls"'
    echo "listen = \"127.0.0.1:$((GG_PORT + 10))\""
    echo "max_concurrent_streams = $MAX_STREAMS"
    echo
    echo '[listeners.tls]'
    echo "cert = \"$TLS_DIR/server.crt\""
    echo "key = \"$TLS_DIR/server.key\""
    echo
    echo '[[listeners.routes]]'
    echo 'cluster = "echo"'
    echo
  fi
  echo '[[clusters]]'
  echo 'name = "echo"'
  echo 'balancer = "round_robin"'
  printf 'endpoints = [%s]\n' "$(printf '"%s", ' "${BACKEND_ADDRS[@]}" | sed 's/, $//')"
} >"$WORK/grpcgate.toml"

mkdir -p "$WORK/nginx/logs"
{
  cat <<EOF
# One worker: the proxy gets one core (taskset), like grpcgate (one tokio worker on one CPU) and HAProxy
# (nbthread 1). More workers than cores would only add context switches.
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log error;
events {
    worker_connections $(( $(ulimit -n) - 100 ));
    multi_accept on;
}
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    http2_max_concurrent_streams $MAX_STREAMS;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_max_body_size 0;
    upstream echo {
EOF
  # max_fails=0: no passive ejection, like grpcgate (no outlier detection configured) and HAProxy (no check).
  for a in "${BACKEND_ADDRS[@]}"; do echo "        server $a max_fails=0;"; done
  cat <<EOF
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT http2 backlog=4096;
        location / {
            grpc_pass grpc://echo;
            grpc_read_timeout 600s;
            grpc_send_timeout 600s;
        }
    }
EOF
  # TLS: NGINX 1.22's default ssl_protocols stop at TLSv1.2 (1.3 joined the default in 1.23.4); the
  # other two negotiate 1.3, so NGINX gets it too. Its other defaults stay (session tickets on, no
  # shared session cache).
  [[ $TLS_WANTED == 1 ]] && cat <<EOF
    server {
        listen 127.0.0.1:$((NGINX_PORT + 10)) ssl http2 backlog=4096;
        ssl_certificate $TLS_DIR/server.crt;
        ssl_certificate_key $TLS_DIR/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            grpc_pass grpc://echo;
            grpc_read_timeout 600s;
            grpc_send_timeout 600s;
        }
    }
EOF
  echo "}"
} >"$WORK/nginx/nginx.conf"

HAPROXY_MAXCONN=$(( ($(ulimit -n) - 200) / 2 ))
{
  cat <<EOF
global
    nbthread 1
    $([[ $BUSY_POLL == 1 ]] && echo busy-polling)
    maxconn $HAPROXY_MAXCONN
    tune.h2.max-concurrent-streams $MAX_STREAMS
    tune.h2.initial-window-size 1048576

defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    maxconn $HAPROXY_MAXCONN

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT proto h2 backlog 4096
    default_backend be
$([[ $TLS_WANTED == 1 ]] && printf 'frontend fe_tls\n    bind 127.0.0.1:%s ssl crt %s alpn h2 backlog 4096\n    default_backend be\n' "$((HAPROXY_PORT + 10))" "$TLS_DIR/haproxy.pem")

backend be
    balance roundrobin
    http-reuse always
EOF
  i=0
  for a in "${BACKEND_ADDRS[@]}"; do echo "    server b$i $a proto h2"; i=$((i + 1)); done
} >"$WORK/haproxy.cfg"

# tcp-relay: HAProxy as a plain TCP relay (no HTTP/2 parsing, no per-request balancing: a connection goes to
# one backend). Not a gRPC load balancer; it shows what the extra hop alone costs.
{
  cat <<EOF
global
    nbthread 1
    $([[ $BUSY_POLL == 1 ]] && echo busy-polling)
    maxconn $HAPROXY_MAXCONN

defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    maxconn $HAPROXY_MAXCONN

frontend fe
    bind 127.0.0.1:$TCP_RELAY_PORT backlog 4096
    default_backend be

backend be
    balance roundrobin
EOF
  i=0
  for a in "${BACKEND_ADDRS[@]}"; do echo "    server b$i $a"; i=$((i + 1)); done
} >"$WORK/tcp-relay.cfg"

"$GRPCGATE" --config "$WORK/grpcgate.toml" --check >/dev/null
if want nginx; then "$NGINX" -t -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" >/dev/null 2>&1 || {
  "$NGINX" -t -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" || true
  note "NGINX skipped: config test failed"; SYSTEMS=${SYSTEMS//nginx/}; }; fi
if want haproxy; then "$HAPROXY" -c -q -f "$WORK/haproxy.cfg" || {
  note "HAProxy skipped: config check failed"; SYSTEMS=${SYSTEMS//haproxy/}; }; fi
if want tcp-relay; then "$HAPROXY" -c -q -f "$WORK/tcp-relay.cfg" || {
  note "tcp-relay skipped: config check failed"; SYSTEMS=${SYSTEMS//tcp-relay/}; }; fi

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "work dir: $WORK (load average $LOAD_AT_START)"
log "starting $BACKENDS echo backends on CPU $LOAD_CPU: $BACKEND_LIST"
taskset -c "$LOAD_CPU" "$ECHO_SERVER" --ports "$BACKEND_PORTS" >"$WORK/echo.log" 2>&1 &
ECHO_PID=$!
for _ in $(seq 100); do grep -q READY "$WORK/echo.log" 2>/dev/null && break; sleep 0.1; done
grep -q READY "$WORK/echo.log" || { cat "$WORK/echo.log" >&2; log "echo backends did not start"; exit 1; }

# Starts the proxy of a system pinned to PROXY_CPU; sets PROXY_PID and TARGET (its TLS listener for a
# tls-* scenario).
start_proxy() {
  local system=$1 scenario=${2:-} port
  case $system in
    direct) PROXY_PID=""; TARGET=$BACKEND_LIST; return 0 ;;
    grpcgate)
      port=$GG_PORT
      taskset -c "$PROXY_CPU" "$GRPCGATE" --config "$WORK/grpcgate.toml" >>"$WORK/grpcgate.log" 2>&1 &
      ;;
    grpcgate-base)
      port=$GG_PORT
      taskset -c "$PROXY_CPU" "$GRPCGATE_BASE" --config "$WORK/grpcgate.toml" >>"$WORK/grpcgate-base.log" 2>&1 &
      ;;
    nginx)
      port=$NGINX_PORT
      taskset -c "$PROXY_CPU" "$NGINX" -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" >>"$WORK/nginx.log" 2>&1 &
      ;;
    haproxy)
      port=$HAPROXY_PORT
      taskset -c "$PROXY_CPU" "$HAPROXY" -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
      ;;
    tcp-relay)
      port=$TCP_RELAY_PORT
      taskset -c "$PROXY_CPU" "$HAPROXY" -db -f "$WORK/tcp-relay.cfg" >>"$WORK/tcp-relay.log" 2>&1 &
      ;;
  esac
  PROXY_PID=$!
  [[ $scenario == tls-* ]] && port=$((port + 10))
  TARGET=127.0.0.1:$port
  if ! wait_port "$port" "$PROXY_PID"; then
    log "$system did not start; its log:"
    tail -20 "$WORK/$system.log" >&2 || true
    stop_pid "$PROXY_PID"
    PROXY_PID=""
    return 1
  fi
}

stop_proxy() {
  stop_pid "$PROXY_PID"
  PROXY_PID=""
}

# Arguments of the load generator for a scenario.
scenario_args() {
  case $1 in
    unary-closed) echo "unary-closed -c $UNARY_C -s $UNARY_S --payload $PAYLOAD" ;;
    unary-1x1) echo "unary-closed -c 1 -s 1 --payload $PAYLOAD" ;;
    unary-open) echo "unary-open -c $OPEN_C --rate $RATE --payload $PAYLOAD" ;;
    stream) echo "stream -c $STREAM_C -s $STREAM_S --count $STREAM_COUNT --payload $STREAM_PAYLOAD" ;;
    conns) echo "conns -c $CONNS --requests-per-conn $REQS_PER_CONN --payload $PAYLOAD" ;;
    streams10k) echo "streams10k -c $S10K_C -s $S10K_S --payload $PAYLOAD" ;;
    idle) echo "idle -c $IDLE_CONNS --payload $PAYLOAD" ;;
    tls-unary) echo "unary-closed -c $UNARY_C -s $UNARY_S --payload $PAYLOAD --tls-ca $TLS_DIR/ca.crt" ;;
    tls-conns) echo "conns -c $TLS_CONNS --requests-per-conn 1 --payload $PAYLOAD --tls-ca $TLS_DIR/ca.crt" ;;
    tls-resumed) echo "conns -c $TLS_RESUME_CONNS --requests-per-conn 1 --payload $PAYLOAD --tls-ca $TLS_DIR/ca.crt --tls-resume" ;;
    *) return 1 ;;
  esac
}

# Whether a system takes part in a scenario. A TCP relay pins each connection to one backend, so it runs
# only where that changes nothing (one connection; long streams over few connections).
takes_part() {
  local system=$1 scenario=$2
  [[ $scenario == idle && $system == direct ]] && return 1
  # The backends speak h2c only; a byte relay terminates no TLS.
  [[ $scenario == tls-* && ( $system == direct || $system == tcp-relay ) ]] && return 1
  [[ $system == tcp-relay && $scenario != unary-1x1 && $scenario != stream ]] && return 1
  return 0
}

# Runs one scenario against one system; a run disturbed by other processes or by the hypervisor (steal),
# more than MAX_OTHER CPU-seconds per second, is repeated up to RETRIES times; the least disturbed is kept.
run_one() {
  local system=$1 scenario=$2 args out best="" best_other=999 other attempt
  args=$(scenario_args "$scenario") || { note "unknown scenario $scenario"; return 0; }
  for attempt in $(seq 0 "$RETRIES"); do
    start_proxy "$system" "$scenario" || { note "$system failed to start for $scenario"; return 0; }
    local pidarg=()
    [[ -n $PROXY_PID ]] && pidarg=(--proxy-pid "$PROXY_PID")
    # shellcheck disable=SC2086
    out=$(taskset -c "$LOAD_CPU" "$LOADGEN" $args --name "$scenario" --label "$system" -t "$TARGET" \
        -d "$DURATION" --warmup "$WARMUP" --load-pid "$ECHO_PID" "${pidarg[@]}" 2>>"$WORK/loadgen.log") || out=""
    stop_proxy
    if [[ -z $out ]]; then
      note "$system / $scenario: load generator failed: $(tail -1 "$WORK/loadgen.log")"
      continue
    fi
    other=$(jq -r '[.interference.other_processes // 0, .interference.steal // 0] | max' <<<"$out")
    if awk "BEGIN{exit !($other < $best_other)}"; then best=$out; best_other=$other; fi
    if awk "BEGIN{exit !($other <= $MAX_OTHER)}"; then break; fi
    if ((attempt < RETRIES)); then
      log "  disturbed: other processes or steal took $other CPU-s/s; again in 5 s"
      sleep 5
    fi
  done
  [[ -n $best ]] || return 0
  if awk "BEGIN{exit !($best_other > $MAX_OTHER)}"; then
    note "$system / $scenario: disturbed by other processes or steal ($best_other CPU-s/s) in every attempt"
  fi
  echo "$best" >>"$RESULTS"
  jq -r '"  \(.system)\t\(.scenario)\t" + (if .kind == "idle" then "RSS/conn \(.rss_per_conn_kib) KiB (\(.connections) conns)"
    else "\(.rps) req/s  p50 \(.p50_us)  p99 \(.p99_us)  p99.9 \(.p999_us) µs  errors \(.errors)  cpu/1k \(.cpu_s_per_1k_req // "-")  rss \(.proxy_peak_rss_kib // "-") KiB  disturbance \(.interference.other_processes)/\(.interference.steal)"
    + (if .kind == "stream" then "  \(.mb_per_s) MB/s" else "" end) end)' <<<"$best" >&2
}

log "pinning: proxy on CPU $PROXY_CPU, load generator + backends on CPU $LOAD_CPU; $DURATION s per scenario (+$WARMUP s warm-up)"
for scenario in $SCENARIOS; do
  if [[ $scenario == unary-open && -z $RATE ]]; then
    RATE=$(jq -s '[.[] | select(.scenario == "unary-closed" and .rps > 0) | .rps] | if length == 0 then 5000 else (min / 2 / 100 | floor) * 100 end' "$RESULTS")
    log "unary-open rate: $RATE req/s (half the lowest unary-closed rps; set RATE to override)"
  fi
  for round in $(seq 1 "$ROUNDS"); do
    for system in $SYSTEMS; do
      takes_part "$system" "$scenario" || continue
      if ((ROUNDS > 1)); then log "$scenario: $system (round $round of $ROUNDS)"; else log "$scenario: $system"; fi
      run_one "$system" "$scenario"
    done
  done
done

# ---------------------------------------------------------------------------------------------------
# Optional profile of grpcgate under PERF_SCENARIO (not part of the measured runs).
PERF_SUFFIX=""
[[ $PERF_SCENARIO != unary-closed ]] && PERF_SUFFIX="-$PERF_SCENARIO"
if [[ $PERF == 1 ]] && want grpcgate; then
  if command -v perf >/dev/null && start_proxy grpcgate "$PERF_SCENARIO"; then
    log "perf: recording grpcgate under $PERF_SCENARIO"
    # DWARF unwinding: Rust release builds have no frame pointers, so plain -g gives one-frame stacks.
    perf record --call-graph dwarf,16384 -F 499 -o "$WORK/perf.data" -p "$PROXY_PID" -- sleep "$((DURATION + 1))" >/dev/null 2>&1 &
    perf_pid=$!
    # shellcheck disable=SC2046
    taskset -c "$LOAD_CPU" "$LOADGEN" $(scenario_args "$PERF_SCENARIO") --label grpcgate -t "$TARGET" \
      -d "$DURATION" --warmup 1 >/dev/null 2>>"$WORK/loadgen.log" || true
    wait "$perf_pid" || true
    stop_proxy
    {
      echo "# grpcgate under $PERF_SCENARIO ($(scenario_args "$PERF_SCENARIO" | sed "s|$WORK/||")), perf record --call-graph dwarf -F 499"
      echo "# 1) self time per symbol"
      perf report -i "$WORK/perf.data" --stdio --no-children -g none --percent-limit 0.4 2>/dev/null | grep -v '^$' | head -80
      echo
      echo "# 2) inclusive time (self + callees) of grpcgate's and h2's own functions"
      perf report -i "$WORK/perf.data" --stdio --children -g none --percent-limit 1 2>/dev/null \
        | grep -E '\] (<?grpcgate::|<?h2::|<?rustls::|<?tokio_rustls::|<?hyper::|<?http::|<?prometheus|<?tracing|<?tokio::(net|io|time)|<?bytes::)' | head -70
    } >"$OUT_DIR/perf-grpcgate$PERF_SUFFIX.txt" || true
    log "perf report: $OUT_DIR/perf-grpcgate$PERF_SUFFIX.txt"
    # Flame graph (inferno, from crates.io, installed on first use like NGINX and HAProxy are).
    if ! command -v inferno-flamegraph >/dev/null; then
      log "installing inferno (cargo install inferno) for the flame graph"
      cargo install --locked inferno >>"$WORK/install.log" 2>&1 || true
      PATH="$HOME/.cargo/bin:$PATH"
    fi
    if command -v inferno-flamegraph >/dev/null && command -v inferno-collapse-perf >/dev/null; then
      perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf 2>/dev/null \
        | inferno-flamegraph --minwidth 0.5 --title "grpcgate, $PERF_SCENARIO" \
          >"$OUT_DIR/flamegraph-grpcgate$PERF_SUFFIX.svg" 2>/dev/null && log "flame graph: $OUT_DIR/flamegraph-grpcgate$PERF_SUFFIX.svg"
    else
      note "flame graph skipped: inferno not available"
    fi
  else
    note "perf profile skipped"
  fi
fi

cleanup

# ---------------------------------------------------------------------------------------------------
# Report

meta=(
  "command=DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS$([[ $BUSY_POLL == 1 ]] && echo ' BUSY_POLL=1')$([[ $PGO == 0 ]] && echo ' PGO=0') bash benches/load/run.sh"
  "rounds=$ROUNDS per scenario and system, interleaved; each number is the median over the rounds"
  "pinning=proxy on CPU $PROXY_CPU; load generator and $BACKENDS echo backends on CPU $LOAD_CPU (taskset)"
  "proxies=grpcgate $(git rev-parse --short HEAD 2>/dev/null || echo ?)$(git diff --quiet HEAD -- src 2>/dev/null || echo '+dirty')$([[ $PGO == 1 ]] && echo ', profile-guided build (benches/load/pgo.sh)' || echo ', plain release build') (workers = 0: one worker thread on its one CPU, round_robin); $("$NGINX" -v 2>&1 | sed 's/nginx version: //') (worker_processes 1, grpc_pass, upstream keepalive 1024); $("$HAPROXY" -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}') (nbthread 1, proto h2 both sides, http-reuse always); tcp-relay: the same HAProxy in mode tcp (nbthread 1), unary-1x1 and stream only"
  "max_concurrent_streams=$MAX_STREAMS advertised by every proxy"
  "grpcgate_base=${GRPCGATE_BASE:-none} (system grpcgate-base: same config, port and pinning as grpcgate)"
  "load_average=$LOAD_AT_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
)
[[ -n $RATE ]] && meta+=("unary_open_rate=$RATE req/s")
note_args=()
for n in "${NOTES[@]+"${NOTES[@]}"}"; do note_args+=(--note "$n"); done
"$LOADGEN" report --input "$RESULTS" --md "$OUT_DIR/results.md" --json "$OUT_DIR/results.json" \
  "${note_args[@]+"${note_args[@]}"}" \
  "${meta[@]/#/--meta=}"
log "results: $OUT_DIR/results.md, $OUT_DIR/results.json (raw runs: $RESULTS)"
