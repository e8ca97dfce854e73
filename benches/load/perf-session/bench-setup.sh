# shellcheck shell=bash
# Sourced by the single-binary measurement scripts (perf-session/callgrind.sh, perf-session/wallclock.sh,
# idle-rss.sh, syscalls.sh): the same proxy config and backends as run.sh, so their figures compare.
# Needs W (a scratch directory), PORT and ECHO_SERVER set by the caller.

# Writes $W/gg.toml: one worker, one h2c listener on 127.0.0.1:$PORT, round robin over the two echo
# backends at PORT+51 and PORT+52. TOML_TOP: extra top-level TOML; LISTENER_KEYS: extra listener keys.
bench_config() {
  cat >"$W/gg.toml" <<TOML
workers = 1
drain_timeout = "1s"

${TOML_TOP:-}

[[listeners]]
name = "bench"
listen = "127.0.0.1:$PORT"
${LISTENER_KEYS:-}

[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["127.0.0.1:$((PORT + 51))", "127.0.0.1:$((PORT + 52))"]
TOML
}

# Starts the two echo backends on CPU 0 (PID in ECHO) and waits until they are ready.
start_echo() {
  taskset -c 0 "$ECHO_SERVER" --ports "$((PORT + 51)),$((PORT + 52))" >"$W/echo.log" 2>&1 &
  # shellcheck disable=SC2034 # the callers stop it
  ECHO=$!
  for _ in $(seq 100); do grep -q READY "$W/echo.log" && break; sleep 0.1; done
}

# Waits until something accepts on 127.0.0.1:$PORT (the proxy), up to TRIES x DELAY s (100 x 0.05).
wait_proxy() {
  for _ in $(seq "${1:-100}"); do
    (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && return 0
    sleep "${2:-0.05}"
  done
}
