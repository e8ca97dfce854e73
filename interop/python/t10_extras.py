"""10. Further behaviours from the README a gRPC user relies on:
 weights, per-status metrics (all 16 codes), bidi with zero messages, server finishing early while the
 client still streams, outlier detection on backend-produced UNAVAILABLE, blackhole / non-HTTP2 endpoints
 (connect_timeout + failover), Health/Watch routed, Health route forwarding, health thresholds / timeout,
 backend SIGKILLed mid-stream, slow consumer head-of-line blocking.
Run: ./venv/bin/python t10_extras.py [section ...]"""
import collections
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lib import (HERE, Backend, Checker, Proxy, basic_config, channel, echo_pb2, expect_error, metric,
                 rpc_error_desc, series, stub, teardown, CODES, BIG_OPTS)

P, ADMIN = 21340, 21349
B1, B2, B3 = 21341, 21342, 21343
BH = 21345     # blackhole (listens, never answers)
H1 = 21346     # HTTP/1.1 server
TO = 5


def cfg(clusters, routes=None):
    return basic_config(P, ADMIN, clusters, routes)


def sec_weights(c):
    b1, b2 = Backend(B1, name="b1"), Backend(B2, name="b2")
    px = Proxy("t10-w", cfg([("echo", [B1, {"address": f"127.0.0.1:{B2}", "weight": 3}], 'balancer = "round_robin"')]), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, b1, b2):
        cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend for _ in range(40))
        c.record("weights 1:3 round_robin: 40 calls -> 10:30", cnt == {"b1": 10, "b2": 30}, str(dict(cnt)))
        m = px.metrics()
        c.record("weighted endpoint's metric label is its address", metric(m, "grpcgate_requests_total", endpoint=f"127.0.0.1:{B2}", grpc_status="OK") == 30)


def sec_codes(c):
    b1 = Backend(B1, name="b1")
    px = Proxy("t10-codes", cfg([("echo", [B1], "")]), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, b1):
        for n in range(1, 17):
            try:
                s.Unary(echo_pb2.EchoRequest(fail_code=n, fail_message="m"), timeout=TO)
            except grpc.RpcError:
                pass
            try:
                list(s.ServerStream(echo_pb2.EchoRequest(count=1, fail_code=n, fail_message="m"), timeout=TO))
            except grpc.RpcError:
                pass
        s.Unary(echo_pb2.EchoRequest(), timeout=TO)
        m = px.metrics()
        bad = []
        for n in range(0, 17):
            name = CODES[n].name
            v = metric(m, "grpcgate_requests_total", listener="edge", cluster="echo", endpoint=f"127.0.0.1:{B1}", grpc_status=name)
            want = 1 if n == 0 else 2
            if v != want:
                bad.append(f"{name}={v}")
        c.record("requests_total counts every upstream status under its canonical name (trailers-only and trailers)",
                 not bad, f"wrong: {bad}; series={[ (l['grpc_status'], v) for l, v in series(m, 'grpcgate_requests_total')]}")
        # zero-message bidi / server finishing early
        r = list(s.Bidi(iter([]), timeout=TO))
        c.record("bidi with zero request messages -> zero responses, OK", r == [])

        def early_cstream():
            def gen():
                for i in range(200):
                    yield echo_pb2.EchoRequest(payload=b"e" * 1000)
                    time.sleep(0.005)
            r = s.ClientStream(gen(), metadata=[("x-early", "1")], timeout=TO)
            return r.seq == 1, f"seq={r.seq}"
        c.check("client stream: server answers after 1st msg while client keeps sending -> OK", early_cstream)

        def early_bidi(fail):
            def f():
                def gen():
                    for i in range(200):
                        yield echo_pb2.EchoRequest(payload=b"e" * 1000)
                        time.sleep(0.005)
                md = [("x-early", "1")] + ([("x-early-fail", "1")] if fail else [])
                got = []
                try:
                    for m_ in s.Bidi(gen(), metadata=md, timeout=TO):
                        got.append(m_)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                want = "ABORTED" if fail else "OK"
                return code == want and len(got) == 1, f"{code} got={len(got)}"
            return f
        c.check("bidi: server ends OK after 1st msg while client keeps sending -> OK", early_bidi(False))
        c.check("bidi: server aborts after 1st msg while client keeps sending -> ABORTED", early_bidi(True))
        c.record("still fine afterwards", s.Unary(echo_pb2.EchoRequest(payload=b"k"), timeout=TO).payload == b"k")


def sec_outlier(c):
    b1, b2 = Backend(B1, name="b1"), Backend(B2, name="b2")
    extra = '[clusters.outlier_detection]\nconsecutive_failures = 3\nbase_ejection_time = "2s"\nmax_ejection_percent = 50\n'
    px = Proxy("t10-outlier", cfg([("echo", [B1, B2], extra)]), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, b1, b2):
        b2.servicer.fail_all = grpc.StatusCode.UNAVAILABLE
        res = collections.Counter()
        for _ in range(12):
            try:
                res[s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend] += 1
            except grpc.RpcError as e:
                res[e.code().name] += 1
        m = px.metrics()
        ej = metric(m, "grpcgate_outlier_ejections_total", cluster="echo", endpoint=f"127.0.0.1:{B2}")
        hl = metric(m, "grpcgate_endpoint_healthy", cluster="echo", endpoint=f"127.0.0.1:{B2}")
        c.record("outlier detection: 3 backend UNAVAILABLEs in a row eject b2 (ejections_total 1, healthy 0), rest to b1",
                 res["UNAVAILABLE"] == 3 and res["b1"] == 9 and ej == 1 and hl == 0, f"{dict(res)} ejections={ej} healthy={hl}")
        b2.servicer.fail_all = None
        ok = px.wait_metric("grpcgate_endpoint_healthy", 1, 4, cluster="echo", endpoint=f"127.0.0.1:{B2}")
        cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend for _ in range(10))
        c.record("ejected endpoint returns after base_ejection_time and gets traffic", ok and cnt.get("b2", 0) >= 4, f"{dict(cnt)}")


def sec_bad_endpoints(c):
    bh = socket.socket()
    bh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bh.bind(("127.0.0.1", BH))
    bh.listen(64)   # never accepted: TCP connects, nothing answers
    import http.server
    hs = http.server.ThreadingHTTPServer(("127.0.0.1", H1), http.server.BaseHTTPRequestHandler)
    ht = threading.Thread(target=hs.serve_forever, daemon=True)
    ht.start()
    b1 = Backend(B1, name="b1")
    clusters = [("bh", [BH], 'connect_timeout = "500ms"'), ("h1", [H1], 'connect_timeout = "500ms"'),
                ("mixed", [BH, H1, B1], 'connect_timeout = "500ms"\nbalancer = "round_robin"')]
    routes = [{"service": "echo.Echo", "method": "Unary", "cluster": "mixed"},
              {"service": "echo.Echo", "method": "ServerStream", "cluster": "bh"},
              {"service": "echo.Echo", "method": "ClientStream", "cluster": "h1"}]
    px = Proxy("t10-bad", cfg(clusters, routes), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    try:
        def blackhole():
            t0 = time.monotonic()
            try:
                list(s.ServerStream(echo_pb2.EchoRequest(), timeout=TO))
                return False, "OK?"
            except grpc.RpcError as e:
                el = time.monotonic() - t0
                return e.code() == grpc.StatusCode.UNAVAILABLE and el < 1.5, f"{rpc_error_desc(e)} after {el:.2f}s"
        c.check("endpoint that accepts TCP but never speaks HTTP/2: UNAVAILABLE after connect_timeout 500ms", blackhole)

        c.check("endpoint that is an HTTP/1.1 server: UNAVAILABLE", lambda: expect_error(
            grpc.StatusCode.UNAVAILABLE, lambda: s.ClientStream(iter([echo_pb2.EchoRequest()]), timeout=TO)))

        def mixed():
            res = collections.Counter()
            t0 = time.monotonic()
            for _ in range(9):
                try:
                    res[s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend] += 1
                except grpc.RpcError as e:
                    res[f"{e.code().name}: {e.details()}"] += 1
            return res == {"b1": 9}, f"{dict(res)} in {time.monotonic() - t0:.2f}s"
        c.check("cluster [blackhole, http1, good]: connect failover -> every call OK on the good one", mixed)
    finally:
        ch.close()
        px.stop()
        b1.stop()
        hs.shutdown()
        bh.close()


def sec_health_routes(c):
    b1 = Backend(B1, name="b1", health=True)
    b2 = Backend(B2, name="b2", health=True)
    routes = [{"service": "grpc.health.v1.Health", "cluster": "hb"}, {"cluster": "echo"}]
    px = Proxy("t10-hr", cfg([("echo", [B1], ""), ("hb", [B2], "")], routes), P, ADMIN)
    ch = channel(P)
    hs = health_pb2_grpc.HealthStub(ch)
    with teardown(ch, px):
        b2.set_serving(False)
        r = hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=TO)
        c.record("route service=grpc.health.v1.Health: Check forwarded to the backend (NOT_SERVING from b2)",
                 r.status == health_pb2.HealthCheckResponse.NOT_SERVING, str(r.status))

        def watch():
            call = hs.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TO)
            it = iter(call)
            first = next(it).status
            b2.set_serving(True)
            second = next(it).status
            call.cancel()
            return first == health_pb2.HealthCheckResponse.NOT_SERVING and second == health_pb2.HealthCheckResponse.SERVING, \
                f"{first} -> {second}"
        c.check("Health/Watch routed to the backend: initial + update streamed", watch)
    px = Proxy("t10-hr2", cfg([("echo", [B1], "")]), P, ADMIN)
    ch = channel(P)
    hs = health_pb2_grpc.HealthStub(ch)
    with teardown(ch, px, b1, b2):
        def watch_default():
            b1.set_serving(True)
            call = hs.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TO)
            first = next(iter(call)).status
            call.cancel()
            return first == health_pb2.HealthCheckResponse.SERVING, str(first)
        c.check("Health/Watch without a health route goes to the catch-all route's backend", watch_default)


def sec_thresholds(c):
    b1, b2 = Backend(B1, name="b1", health=True), Backend(B2, name="b2", health=True)
    hc = ('[clusters.health_check]\ninterval = "200ms"\ntimeout = "150ms"\nunhealthy_threshold = 3\nhealthy_threshold = 3\n')
    px = Proxy("t10-thr", cfg([("echo", [B1, B2], hc)]), P, ADMIN)
    with teardown(px, b1, b2):
        ok = px.wait_metric("grpcgate_endpoint_healthy", 2, 3, 0.02, cluster="echo")
        c.record("new endpoints healthy after their first successful check", ok)
        succ0 = px.metric("grpcgate_health_checks_total", cluster="echo", endpoint=f"127.0.0.1:{B2}", result="failure") or 0
        t0 = time.monotonic()
        b2.set_serving(False)
        px.wait_metric("grpcgate_endpoint_healthy", 0, 3, 0.02, cluster="echo", endpoint=f"127.0.0.1:{B2}")
        t_unh = time.monotonic() - t0
        fails = (px.metric("grpcgate_health_checks_total", cluster="echo", endpoint=f"127.0.0.1:{B2}", result="failure") or 0) - succ0
        c.record("unhealthy_threshold=3 (interval 200ms): unhealthy after 3 failures (~0.4-0.9s)",
                 0.35 <= t_unh <= 1.2 and fails == 3, f"after {t_unh:.2f}s, {fails} failures counted")
        t0 = time.monotonic()
        b2.set_serving(True)
        px.wait_metric("grpcgate_endpoint_healthy", 1, 3, 0.02, cluster="echo", endpoint=f"127.0.0.1:{B2}")
        t_h = time.monotonic() - t0
        c.record("healthy_threshold=3: healthy again only after 3 successes (~0.4-0.9s)", 0.35 <= t_h <= 1.2, f"after {t_h:.2f}s")

    # health-check timeout: a backend whose Health/Check hangs
    class SlowHealth(health_pb2_grpc.HealthServicer):
        def __init__(self):
            self.delay = 0

        def Check(self, req, ctx):
            time.sleep(self.delay)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    import grpc as _g
    from concurrent import futures
    from lib import echo_pb2_grpc, EchoServicer
    sh = SlowHealth()
    srv = _g.server(futures.ThreadPoolExecutor(8))
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("slow"), srv)
    health_pb2_grpc.add_HealthServicer_to_server(sh, srv)
    srv.add_insecure_port(f"127.0.0.1:{B3}")
    srv.start()
    hc = '[clusters.health_check]\ninterval = "200ms"\ntimeout = "150ms"\nunhealthy_threshold = 2\n'
    px = Proxy("t10-hto", cfg([("echo", [B3], hc)]), P, ADMIN)
    try:
        ok = px.wait_metric("grpcgate_endpoint_healthy", 1, 3, 0.05, cluster="echo")
        sh.delay = 0.5
        ok2 = px.wait_metric("grpcgate_endpoint_healthy", 0, 3, 0.05, cluster="echo")
        sh.delay = 0
        ok3 = px.wait_metric("grpcgate_endpoint_healthy", 1, 3, 0.05, cluster="echo")
        c.record("health check slower than timeout -> unhealthy; fast again -> healthy", ok and ok2 and ok3, f"{ok} {ok2} {ok3}")
    finally:
        px.stop()
        srv.stop(0).wait(3)

    # start_healthy
    b1 = Backend(B1, name="b1", health=True)
    hc = '[clusters.health_check]\ninterval = "10s"\ntimeout = "1s"\nstart_healthy = true\n'
    px = Proxy("t10-sh", cfg([("echo", [B1], hc)]), P, ADMIN)
    with teardown(px, b1):
        v = px.metric("grpcgate_endpoint_healthy", cluster="echo")
        c.record("start_healthy = true: healthy before any check", v == 1, f"{v}")


def sec_kill(c):
    bp = subprocess.Popen([sys.executable, f"{HERE}/backend_proc.py", str(B1), "k1"], stdout=subprocess.PIPE, text=True)
    try:
        ready = bp.stdout.readline().strip() == "ready"
        px = Proxy("t10-kill", cfg([("echo", [B1], "")]), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        with teardown(ch, px):
            got = []
            call = s.ServerStream(echo_pb2.EchoRequest(count=100, delay_ms=100), timeout=15)
            t0 = None
            try:
                for m_ in call:
                    got.append(m_)
                    if len(got) == 3:
                        bp.kill()
                        t0 = time.monotonic()
                code, det = "OK", ""
            except grpc.RpcError as e:
                code, det = e.code().name, e.details()
            el = time.monotonic() - (t0 or time.monotonic())
            c.record("backend SIGKILLed mid-stream -> client gets UNAVAILABLE promptly (README: connection broke)",
                     ready and code == "UNAVAILABLE" and el < 3, f"{code} {det!r} after {el:.2f}s, {len(got)} msgs")
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            c.record("after the kill: new call -> UNAVAILABLE", code == "UNAVAILABLE", code)
    finally:
        if bp.poll() is None:
            bp.kill()
        bp.wait(5)


def sec_hol(c):
    """Slow consumers vs the shared upstream connection window: 10 server streams whose clients stop
    reading, then an ordinary call on another channel."""
    b1 = Backend(B1, name="b1", options=BIG_OPTS, workers=40)
    px = Proxy("t10-hol", cfg([("echo", [B1], "")]), P, ADMIN)
    chs = [channel(P) for _ in range(10)]
    with teardown(*chs, px, b1):
        calls = []
        for chx in chs:
            call = stub(chx).ServerStream(echo_pb2.EchoRequest(payload=b"h" * (1 << 20), count=30), timeout=30)
            next(iter(call))     # read one message, then stop reading
            calls.append(call)
        time.sleep(1.5)
        ch = channel(P)
        t0 = time.monotonic()
        try:
            r = stub(ch).Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            res = f"OK in {time.monotonic() - t0:.2f}s"
            ok = True
        except grpc.RpcError as e:
            res = f"{rpc_error_desc(e)} after {time.monotonic() - t0:.2f}s"
            ok = False
        try:
            n = len(list(stub(ch).ServerStream(echo_pb2.EchoRequest(payload=b"y" * 100000, count=5), timeout=5)))
            res += f"; small stream n={n}"
            ok = ok and n == 5
        except grpc.RpcError as e:
            res += f"; small stream {rpc_error_desc(e)}"
            ok = False
        c.record("10 stalled slow-consumer streams do not block other clients' calls", ok, res)
        for call in calls:
            call.cancel()
        ch.close()


SECTIONS = dict(weights=sec_weights, codes=sec_codes, outlier=sec_outlier, bad=sec_bad_endpoints,
                healthroutes=sec_health_routes, thresholds=sec_thresholds, kill=sec_kill, hol=sec_hol)


def main():
    c = Checker("t10_extras")
    for n in sys.argv[1:] or list(SECTIONS):
        with c.guard(f"{n} harness"):
            SECTIONS[n](c)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
