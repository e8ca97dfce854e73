"""5. Per-request balancing over one client channel; SIGHUP reload adding/removing backends; bad config
on SIGHUP keeps the old one; --check.
Run: ./venv/bin/python t5_balancing_reload.py"""
import collections
import subprocess
import sys
import threading
import time

import grpc

from lib import (BINARY, Backend, Checker, Proxy, channel, echo_pb2, metric, rpc_error_desc, stub,
                 wait_for)

P, ADMIN = 21180, 21189
B1, B2, B3 = 21181, 21182, 21183
TO = 5


def config(balancer, addrs, hc=False, extra=""):
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in addrs)
    hcs = ""
    if hc:
        hcs = '[clusters.health_check]\ninterval = "300ms"\ntimeout = "250ms"\n'
    return f"""
[admin]
listen = "127.0.0.1:{ADMIN}"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{P}"
[[listeners.routes]]
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "{balancer}"
endpoints = [{eps}]
{hcs}
{extra}
"""


def spread(s, n, **kw):
    cnt, errs = collections.Counter(), collections.Counter()
    for _ in range(n):
        try:
            cnt[s.Unary(echo_pb2.EchoRequest(**kw), timeout=TO).backend] += 1
        except grpc.RpcError as e:
            errs[f"{e.code().name}: {e.details()}"] += 1
    return cnt, errs


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
    try:
        for bal in ("round_robin", "least_request", "join_shortest_queue"):
            px = Proxy(f"t5-{bal}", config(bal, [B1, B2, B3]), P, ADMIN)
            ch = channel(P)
            s = stub(ch)
            cnt, errs = spread(s, 60)
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
        cnt, errs = spread(s, 20)
        c.record("before reload: b1, b2 only", set(cnt) == {"b1", "b2"} and not errs, f"{dict(cnt)}")

        # a stream in flight across the reload
        result = {}

        def long_stream():
            try:
                result["msgs"] = len(list(s.ServerStream(echo_pb2.EchoRequest(count=15, delay_ms=100), timeout=10)))
            except grpc.RpcError as e:
                result["err"] = rpc_error_desc(e)
        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(0.3)

        px.write(config("round_robin", [B1, B2, B3]))
        px.hup()
        ok = wait_for(lambda: metric(px.metrics(), "grpcgate_config_reloads_total", result="success") == 1, 5)
        c.record("SIGHUP: grpcgate_config_reloads_total{result=success} == 1", ok)
        cnt, errs = spread(s, 30)
        c.record("after reload adding b3: b3 gets traffic (same channel)", cnt.get("b3", 0) == 10 and not errs,
                 f"{dict(cnt)} {dict(errs)}")
        t.join(10)
        c.record("stream in flight during the reload completes", result.get("msgs") == 15, str(result))

        # bad configs: syntax error, then semantic error
        for label, text in (("syntax error", config("round_robin", [B1]) + "\n[[clusters]\n"),
                            ("unknown balancer", config("rr", [B1])),
                            ("route to missing cluster", config("round_robin", [B1]).replace('cluster = "echo"', 'cluster = "nope"', 1))):
            before = metric(px.metrics(), "grpcgate_config_reloads_total", result="failure") or 0
            px.write(text)
            px.hup()
            ok = wait_for(lambda: (metric(px.metrics(), "grpcgate_config_reloads_total", result="failure") or 0) == before + 1, 5)
            cnt, errs = spread(s, 30)
            c.record(f"bad config on SIGHUP ({label}): failure counted, old config keeps serving b1,b2,b3",
                     ok and cnt == {"b1": 10, "b2": 10, "b3": 10} and not errs,
                     f"failure counted={ok} {dict(cnt)} {dict(errs)}")
        log = px.read_log()
        c.record("bad reload logs file:line:col", "t5-reload.toml:" in log and "reload" in log,
                 [l for l in log.splitlines() if "reload" in l][-1:].__str__())

        px.write(config("round_robin", [B2, B3]))
        px.hup()
        ok = wait_for(lambda: metric(px.metrics(), "grpcgate_config_reloads_total", result="success") == 2, 5)
        cnt, errs = spread(s, 20)
        c.record("reload removing b1: b1 gets no more traffic", ok and set(cnt) == {"b2", "b3"} and not errs,
                 f"{dict(cnt)} {dict(errs)}")

        # reload adding an endpoint to a health-checked cluster
        px.write(config("round_robin", [B2, B3], hc=True))
        px.hup()
        wait_for(lambda: metric(px.metrics(), "grpcgate_config_reloads_total", result="success") == 3, 5)
        wait_for(lambda: metric(px.metrics(), "grpcgate_endpoint_healthy", cluster="echo") == 2, 5)
        px.write(config("round_robin", [B1, B2, B3], hc=True))
        px.hup()
        wait_for(lambda: metric(px.metrics(), "grpcgate_config_reloads_total", result="success") == 4, 5)
        ok = wait_for(lambda: metric(px.metrics(), "grpcgate_endpoint_healthy", cluster="echo",
                                     endpoint=f"127.0.0.1:{B1}") == 1, 5)
        cnt, errs = spread(s, 30)
        c.record("reload adding b1 to a health-checked cluster: healthy after first check, gets traffic",
                 ok and cnt.get("b1", 0) == 10 and not errs, f"healthy={ok} {dict(cnt)} {dict(errs)}")
        ch.close()
        px.stop()
        px = None

        # --check
        good = Proxy.__new__(Proxy)  # only for writing a file
        import os
        from lib import RUN_DIR
        gp = os.path.join(RUN_DIR, "t5-check-good.toml")
        bp = os.path.join(RUN_DIR, "t5-check-bad.toml")
        open(gp, "w").write(config("round_robin", [B1]))
        open(bp, "w").write(config("rr", [B1]))
        r1 = subprocess.run([BINARY, "--config", gp, "--check"], capture_output=True, text=True, timeout=10)
        r2 = subprocess.run([BINARY, "--config", bp, "--check"], capture_output=True, text=True, timeout=10)
        c.record("--check good file: exit 0", r1.returncode == 0, (r1.stdout + r1.stderr).strip())
        c.record("--check bad file: non-zero exit with a clear error", r2.returncode != 0 and "balancer" in (r2.stdout + r2.stderr),
                 (r2.stdout + r2.stderr).strip())
        del good
    except Exception as e:  # noqa: BLE001
        import traceback
        c.record("t5 harness", False, rpc_error_desc(e) + traceback.format_exc())
    finally:
        if px:
            px.stop()
        for b in bs.values():
            b.stop()
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
