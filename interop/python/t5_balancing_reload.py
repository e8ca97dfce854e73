"""5. Per-request balancing over one client channel; SIGHUP reload adding/removing backends; bad config
on SIGHUP keeps the old one; --check.
Run: ./venv/bin/python t5_balancing_reload.py"""
import collections
import os
import subprocess
import sys
import time

import grpc

from lib import (BINARY, RUN_DIR, Backend, Checker, Proxy, basic_config, channel, echo_pb2, spread,
                 stop_all, stream_in_background, stub)

P, ADMIN = 21180, 21189
B1, B2, B3 = 21181, 21182, 21183
TO = 5


HC = '[clusters.health_check]\ninterval = "300ms"\ntimeout = "250ms"\n'


def config(balancer, ports, hc=False, extra=""):
    return basic_config(P, ADMIN, [("echo", ports, f'balancer = "{balancer}"\n' + (HC if hc else "") + extra)])


def concurrent_spread(s, n, delay_ms):
    futs = [s.Unary.future(echo_pb2.EchoRequest(delay_ms=delay_ms), timeout=TO) for _ in range(n)]
    cnt, errs = collections.Counter(), collections.Counter()
    for f in futs:
        try:
            cnt[f.result().backend] += 1
        except grpc.RpcError as e:
            errs[e.code().name] += 1
    return cnt, errs


def main():
    c = Checker("t5_balancing_reload")
    bs = {p: Backend(p, name=f"b{i + 1}", health=True) for i, p in enumerate((B1, B2, B3))}
    px = None
    with c.guard("t5 harness"):
        for bal in ("round_robin", "least_request", "join_shortest_queue"):
            px = Proxy(f"t5-{bal}", config(bal, [B1, B2, B3]), P, ADMIN)
            ch = channel(P)
            s = stub(ch)
            cnt, errs = spread(s, 60, TO)
            if bal == "round_robin":
                ok = cnt == {"b1": 20, "b2": 20, "b3": 20}
            else:
                ok = len(cnt) == 3 and min(cnt.values()) >= 8
            c.record(f"{bal}: 60 sequential calls on one channel spread over 3 backends", ok and not errs,
                     f"{dict(cnt)} {dict(errs)}")
            cnt, errs = concurrent_spread(s, 30, 300)
            c.record(f"{bal}: 30 concurrent calls on one channel spread over 3 backends",
                     len(cnt) == 3 and min(cnt.values()) >= 6 and not errs, f"{dict(cnt)} {dict(errs)}")
            ch.close()
            px.stop()
            px = None

        # ---- reload
        px = Proxy("t5-reload", config("round_robin", [B1, B2]), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        cnt, errs = spread(s, 20, TO)
        c.record("before reload: b1, b2 only", set(cnt) == {"b1", "b2"} and not errs, f"{dict(cnt)}")

        # a stream in flight across the reload
        t, result = stream_in_background(s, echo_pb2.EchoRequest(count=15, delay_ms=100), 10)
        time.sleep(0.3)

        px.write(config("round_robin", [B1, B2, B3]))
        px.hup()
        ok = px.wait_metric("grpcgate_config_reloads_total", 1, 5, result="success")
        c.record("SIGHUP: grpcgate_config_reloads_total{result=success} == 1", ok)
        cnt, errs = spread(s, 30, TO)
        c.record("after reload adding b3: b3 gets traffic (same channel)", cnt.get("b3", 0) == 10 and not errs,
                 f"{dict(cnt)} {dict(errs)}")
        t.join(10)
        c.record("stream in flight during the reload completes", result.get("n") == 15, str(result))

        # bad configs: syntax error, then semantic error
        for label, text in (("syntax error", config("round_robin", [B1]) + "\n[[clusters]\n"),
                            ("unknown balancer", config("rr", [B1])),
                            ("route to missing cluster", config("round_robin", [B1]).replace('cluster = "echo"', 'cluster = "nope"', 1))):
            before = px.metric("grpcgate_config_reloads_total", result="failure") or 0
            px.write(text)
            px.hup()
            ok = px.wait_metric("grpcgate_config_reloads_total", before + 1, 5, result="failure")
            cnt, errs = spread(s, 30, TO)
            c.record(f"bad config on SIGHUP ({label}): failure counted, old config keeps serving b1,b2,b3",
                     ok and cnt == {"b1": 10, "b2": 10, "b3": 10} and not errs,
                     f"failure counted={ok} {dict(cnt)} {dict(errs)}")
        log = px.read_log()
        c.record("bad reload logs file:line:col", "t5-reload.toml:" in log and "reload" in log,
                 [l for l in log.splitlines() if "reload" in l][-1:].__str__())

        px.write(config("round_robin", [B2, B3]))
        px.hup()
        ok = px.wait_metric("grpcgate_config_reloads_total", 2, 5, result="success")
        cnt, errs = spread(s, 20, TO)
        c.record("reload removing b1: b1 gets no more traffic", ok and set(cnt) == {"b2", "b3"} and not errs,
                 f"{dict(cnt)} {dict(errs)}")

        # reload adding an endpoint to a health-checked cluster
        px.write(config("round_robin", [B2, B3], hc=True))
        px.hup()
        px.wait_metric("grpcgate_config_reloads_total", 3, 5, result="success")
        px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="echo")
        px.write(config("round_robin", [B1, B2, B3], hc=True))
        px.hup()
        px.wait_metric("grpcgate_config_reloads_total", 4, 5, result="success")
        ok = px.wait_metric("grpcgate_endpoint_healthy", 1, 5, cluster="echo", endpoint=f"127.0.0.1:{B1}")
        cnt, errs = spread(s, 30, TO)
        c.record("reload adding b1 to a health-checked cluster: healthy after first check, gets traffic",
                 ok and cnt.get("b1", 0) == 10 and not errs, f"healthy={ok} {dict(cnt)} {dict(errs)}")
        ch.close()
        px.stop()
        px = None

        # --check
        gp = os.path.join(RUN_DIR, "t5-check-good.toml")
        bp = os.path.join(RUN_DIR, "t5-check-bad.toml")
        open(gp, "w").write(config("round_robin", [B1]))
        open(bp, "w").write(config("rr", [B1]))
        r1 = subprocess.run([BINARY, "--config", gp, "--check"], capture_output=True, text=True, timeout=10)
        r2 = subprocess.run([BINARY, "--config", bp, "--check"], capture_output=True, text=True, timeout=10)
        c.record("--check good file: exit 0", r1.returncode == 0, (r1.stdout + r1.stderr).strip())
        c.record("--check bad file: non-zero exit with a clear error", r2.returncode != 0 and "balancer" in (r2.stdout + r2.stderr),
                 (r2.stdout + r2.stderr).strip())
    stop_all(px, *bs.values())
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
