"""12. Lifecycle: reload without blips/reconnects, reloads that must be refused, drain timeout cut-off,
SIGINT, --check error messages.
Run: ./venv/bin/python t12_lifecycle.py"""
import collections
import os
import re
import subprocess
import sys
import threading
import time

import grpc

from lib import (BINARY, RUN_DIR, Backend, Checker, Proxy, basic_config, channel, echo_pb2, outcome,
                 stop_all, stream_in_background, stub)

P, ADMIN, B1, B2 = 21420, 21429, 21421, 21422
TO = 5


def cfg(listen=P, extra_cluster="", drain="30s", workers=None):
    top = f'drain_timeout = "{drain}"' + (f"\nworkers = {workers}" if workers is not None else "")
    hc = '[clusters.health_check]\ninterval = "5s"\ntimeout = "1s"\n' + extra_cluster
    return basic_config(listen, ADMIN, [("echo", [B1, B2], hc)], top=top)


def upstream_conns():
    out = subprocess.run(["ss", "-tnH", "state", "established"], capture_output=True, text=True).stdout
    return sorted(l.split()[-2] for l in out.splitlines() if l.split()[-1] in (f"127.0.0.1:{B1}", f"127.0.0.1:{B2}"))


def main():
    c = Checker("t12_lifecycle")
    b1, b2 = Backend(B1, name="b1", health=True), Backend(B2, name="b2", health=True)
    px = Proxy("t12", cfg(), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with c.guard("t12 harness"):
        px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="echo")
        for _ in range(10):
            s.Unary(echo_pb2.EchoRequest(), timeout=TO)
        before = upstream_conns()
        # continuous traffic + /ready polling across 5 reloads (health interval 5s: a lost verdict would show)
        stop = threading.Event()
        outcomes = collections.Counter()
        ready_codes = collections.Counter()

        def traffic():
            while not stop.is_set():
                try:
                    s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                    outcomes["OK"] += 1
                except grpc.RpcError as e:
                    outcomes[outcome(e)] += 1

        def ready():
            while not stop.is_set():
                ready_codes[px.http_get("/ready")[0]] += 1
                time.sleep(0.01)
        ts = [threading.Thread(target=traffic), threading.Thread(target=ready)]
        for t in ts:
            t.start()
        for i in range(5):
            px.write(cfg(extra_cluster=f'[[clusters]]\nname = "other{i}"\nendpoints = ["127.0.0.1:{B1}"]\n'))
            px.hup()
            time.sleep(0.3)
        stop.set()
        for t in ts:
            t.join(10)
        after = upstream_conns()
        rl = px.metric("grpcgate_config_reloads_total", result="success")
        c.record("5 reloads under traffic: every call OK", list(outcomes) == ["OK"], f"{dict(outcomes)} reloads={rl}")
        c.record("5 reloads: /ready never blips", list(ready_codes) == [200], str(dict(ready_codes)))
        # the proxy's own upstream connections (to B1/B2 from the proxy) are those whose local port is not a
        # health-check connection; both sets should be unchanged (health checkers are restarted on reload,
        # so only compare the data-path count loosely)
        c.record("5 reloads: endpoints that stay keep their upstream connections", len(set(before) & set(after)) >= 2,
                 f"before={before} after={after}")

        # refused reloads
        for label, text in (("listener address changed", cfg(listen=P + 5)), ("workers changed", cfg(workers=1))):
            f0 = px.metric("grpcgate_config_reloads_total", result="failure") or 0
            px.write(text)
            px.hup()
            ok = px.wait_metric("grpcgate_config_reloads_total", f0 + 1, 5, result="failure")
            works = s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend in ("b1", "b2")
            c.record(f"reload with {label} is refused as a whole, proxy keeps serving", ok and works, f"failure counted={ok}")
        px.write(cfg())
        ch.close()
        px.stop()

        # drain timeout cut-off
        px = Proxy("t12-drain", cfg(drain="1s"), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        t, res = stream_in_background(s, echo_pb2.EchoRequest(count=50, delay_ms=100), 20)
        time.sleep(0.5)
        t0 = time.monotonic()
        px.proc.send_signal(2)   # SIGINT
        try:
            rc = px.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        el = time.monotonic() - t0
        t.join(10)
        c.record("SIGINT with a call longer than drain_timeout 1s: exit 0 after ~1s, call cut off",
                 rc == 0 and 0.8 < el < 3 and "err" in res, f"rc={rc} after {el:.2f}s, call: {res}")
        ch.close()
        px.stop()
        px = None

        # --check messages
        cases = {
            "unknown key": (cfg() + "\nbogus = 1\n", r"unknown key|bogus"),
            "bare number duration": (cfg().replace('interval = "5s"', "interval = 5"), r"health_check"),
            "duplicate endpoint": (cfg().replace(f'"127.0.0.1:{B2}"', f'"127.0.0.1:{B1}"'), r"duplicate endpoint"),
            "empty endpoints": (cfg().replace(f'endpoints = ["127.0.0.1:{B1}", "127.0.0.1:{B2}"]', "endpoints = []"), r"no endpoints"),
            "missing tls file": (cfg().replace(f'listen = "127.0.0.1:{P}"', f'listen = "127.0.0.1:{P}"\n[listeners.tls]\ncert = "nope.crt"\nkey = "nope.key"', 1), r"nope"),
        }
        for label, (text, pat) in cases.items():
            p = os.path.join(RUN_DIR, "t12-check.toml")
            with open(p, "w") as f:
                f.write(text)
            r = subprocess.run([BINARY, "--config", p, "--check"], capture_output=True, text=True, timeout=10)
            out = (r.stdout + r.stderr).strip()
            ok = r.returncode != 0 and re.search(pat, out) and re.search(r"t12-check\.toml:\d+:\d+", out)
            c.record(f"--check {label}: non-zero exit, file:line:col and the reason", bool(ok), f"rc={r.returncode} {out[:200]}")
    stop_all(ch, px, b1, b2)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
