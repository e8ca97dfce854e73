"""3. Routing errors (UNIMPLEMENTED), unreachable cluster (UNAVAILABLE), grpc.health.v1 checks moving
traffic (NOT_SERVING / SERVING), metrics names + labels, /healthz, /ready, the proxy's own Health/Check.
Run: ./venv/bin/python t3_routing_health_metrics.py"""
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lib import (Backend, Checker, Proxy, basic_config, channel, echo_pb2, expect_error, metric, rpc_error_desc,
                 series, spread, stub, teardown)

P, ADMIN = 21140, 21149
B1, B2, B3 = 21141, 21142, 21143
DEAD1, DEAD2 = 21147, 21148   # nothing listens there
TO = 5
HC = '[clusters.health_check]\ninterval = "300ms"\ntimeout = "250ms"\nunhealthy_threshold = 2\nhealthy_threshold = 1\n'
ROUTES = [{"service": "echo.Echo", "method": "ClientStream", "cluster": "named"},
          {"service": "echo.Echo", "cluster": "hc"},
          {"service": "dead.Dead", "cluster": "dead"}]
CLUSTERS = [("hc", [B1, B2], 'balancer = "round_robin"\n' + HC),
            ("dead", [DEAD1, DEAD2], 'connect_timeout = "500ms"'),
            ("named", [f"localhost:{B3}"], "")]


def main():
    c = Checker("t3_routing_health_metrics")
    b1 = Backend(B1, name="b1", health=True)
    b2 = Backend(B2, name="b2", health=True)
    b3 = Backend(B3, name="b3")
    px = Proxy("t3", basic_config(P, ADMIN, CLUSTERS, ROUTES), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    raw = lambda path: ch.unary_unary(path, request_serializer=None, response_deserializer=None)  # noqa: E731
    with teardown(ch, px, b1, b2, b3), c.guard("t3 harness"):
        st, body = px.http_get("/healthz")
        c.record("/healthz 200 ok", st == 200 and body.strip() == "ok", f"{st} {body!r}")

        ok = px.wait_metric("grpcgate_endpoint_healthy", 2, 10, cluster="hc")
        c.record("both hc endpoints become healthy (grpcgate_endpoint_healthy == 1)", ok,
                 str(series(px.metrics(), "grpcgate_endpoint_healthy")))
        st, body = px.http_get("/ready")
        c.record("/ready 200 when every cluster has an available endpoint", st == 200 and "ready" in body, f"{st} {body!r}")

        def unimpl():
            try:
                raw("/nope.Nope/Call")(b"", timeout=TO)
                return False, "no error"
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNIMPLEMENTED and e.details().startswith("grpcgate:"), rpc_error_desc(e)
        c.check("no route -> UNIMPLEMENTED (grpcgate: message)", unimpl)

        c.check("no route, bidi call -> UNIMPLEMENTED", lambda: expect_error(
            grpc.StatusCode.UNIMPLEMENTED, lambda: list(ch.stream_stream("/nope.Nope/Bidi")(iter([b"a", b"b"]), timeout=TO))))

        def unavailable():
            codes = []
            for _ in range(4):
                t0 = time.monotonic()
                try:
                    raw("/dead.Dead/Call")(b"", timeout=TO)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append((e.code().name, e.details(), round(time.monotonic() - t0, 2)))
            return all(x[0] == "UNAVAILABLE" for x in codes), str(codes[:2])
        c.check("cluster whose endpoints refuse connections -> UNAVAILABLE", unavailable)

        c.check("refused cluster, bidi call -> UNAVAILABLE", lambda: expect_error(
            grpc.StatusCode.UNAVAILABLE, lambda: list(ch.stream_stream("/dead.Dead/Bidi")(iter([b"a"]), timeout=TO))))

        cnt, errs = spread(s, 20, TO)
        c.record("both healthy: 20 calls spread over b1 and b2", cnt["b1"] == 10 and cnt["b2"] == 10 and not errs,
                 f"{dict(cnt)} errs={dict(errs)}")

        b2.set_serving(False)
        ok = px.wait_metric("grpcgate_endpoint_healthy", 0, 5, cluster="hc", endpoint=f"127.0.0.1:{B2}")
        c.record("b2 NOT_SERVING -> grpcgate_endpoint_healthy{b2} 0", ok)
        cnt, errs = spread(s, 20, TO)
        c.record("b2 NOT_SERVING: all calls go to b1", cnt["b1"] == 20 and not errs, f"{dict(cnt)} errs={dict(errs)}")

        b1.set_serving(False)
        ok = px.wait_metric("grpcgate_endpoint_healthy", 0, 5, cluster="hc")
        c.record("b1 NOT_SERVING too -> both unhealthy", ok)
        c.check("no healthy endpoint -> UNAVAILABLE", lambda: expect_error(
            grpc.StatusCode.UNAVAILABLE, lambda: s.Unary(echo_pb2.EchoRequest(), timeout=TO)))
        c.check("no healthy endpoint, server stream -> UNAVAILABLE", lambda: expect_error(
            grpc.StatusCode.UNAVAILABLE, lambda: list(s.ServerStream(echo_pb2.EchoRequest(count=2), timeout=TO))))
        st, body = px.http_get("/ready")
        c.record("/ready 503 naming the cluster when it has no healthy endpoint", st == 503 and "hc" in body, f"{st} {body!r}")

        hs = health_pb2_grpc.HealthStub(ch)

        def own_health():
            r0 = hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=TO).status
            r1 = hs.Check(health_pb2.HealthCheckRequest(service="hc"), timeout=TO).status
            r2 = hs.Check(health_pb2.HealthCheckRequest(service="named"), timeout=TO).status
            try:
                hs.Check(health_pb2.HealthCheckRequest(service="nosuch"), timeout=TO)
                r3 = "OK"
            except grpc.RpcError as e:
                r3 = e.code().name
            ok = (r0 == health_pb2.HealthCheckResponse.SERVING and r1 == health_pb2.HealthCheckResponse.NOT_SERVING
                  and r2 == health_pb2.HealthCheckResponse.SERVING and r3 == "NOT_FOUND")
            return ok, f'""={r0} hc={r1} named={r2} nosuch={r3}'
        c.check("proxy's own Health/Check: '' SERVING, unhealthy cluster NOT_SERVING, unknown NOT_FOUND", own_health)

        b1.set_serving(True)
        b2.set_serving(True)
        ok = px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="hc")
        c.record("SERVING again -> both healthy", ok)
        cnt, errs = spread(s, 20, TO)
        c.record("recovered: calls spread over b1 and b2 again", cnt["b1"] >= 5 and cnt["b2"] >= 5 and not errs,
                 f"{dict(cnt)} errs={dict(errs)}")
        st, body = px.http_get("/ready")
        c.record("/ready 200 again after recovery", st == 200, f"{st} {body!r}")

        def backend_down_health():
            b2.stop()
            ok = px.wait_metric("grpcgate_endpoint_healthy", 0, 5, cluster="hc", endpoint=f"127.0.0.1:{B2}")
            cnt, errs = spread(s, 10, TO)
            b2.start()
            ok2 = px.wait_metric("grpcgate_endpoint_healthy", 1, 8, cluster="hc", endpoint=f"127.0.0.1:{B2}")
            return ok and ok2 and cnt["b1"] == 10 and not errs, f"down={ok} back={ok2} {dict(cnt)} {dict(errs)}"
        c.check("stopped backend -> unhealthy (connect failure), restarted -> healthy again", backend_down_health)

        # named endpoint label
        def named():
            r = s.ClientStream(iter([echo_pb2.EchoRequest(payload=b"x")]), timeout=TO)
            m = px.metrics()
            v = metric(m, "grpcgate_requests_total", listener="edge", cluster="named", endpoint=f"localhost:{B3}",
                       grpc_status="OK")
            return r.backend == "b3" and v == 1, f"backend={r.backend} series={[x for x in series(m, 'grpcgate_requests_total') if x[0].get('cluster') == 'named']}"
        c.check("endpoint written as localhost:port works and is the metric label as written", named)

        # ---- metrics
        m = px.metrics()
        req = series(m, "grpcgate_requests_total")
        c.record("grpcgate_requests_total has exactly labels listener,cluster,endpoint,grpc_status",
                 req and all(set(l) == {"listener", "cluster", "endpoint", "grpc_status"} for l, _ in req), str(req[:3]))
        v1 = metric(m, "grpcgate_requests_total", listener="edge", cluster="hc", endpoint=f"127.0.0.1:{B1}", grpc_status="OK")
        v2 = metric(m, "grpcgate_requests_total", listener="edge", cluster="hc", endpoint=f"127.0.0.1:{B2}", grpc_status="OK")
        c.record("requests_total OK per endpoint (b1 >= 40, b2 >= 15)", (v1 or 0) >= 40 and (v2 or 0) >= 15, f"b1={v1} b2={v2}")
        vu = metric(m, "grpcgate_requests_total", listener="edge", cluster="", endpoint="", grpc_status="UNIMPLEMENTED")
        c.record("requests_total UNIMPLEMENTED with cluster=\"\" endpoint=\"\" (2 calls)", vu == 2, f"{vu}")
        vd = metric(m, "grpcgate_requests_total", listener="edge", cluster="dead", grpc_status="UNAVAILABLE")
        vde = metric(m, "grpcgate_requests_total", listener="edge", cluster="dead", endpoint="", grpc_status="UNAVAILABLE")
        c.record("requests_total UNAVAILABLE for dead cluster (5 calls, endpoint=\"\")", vd == 5 and vde == 5,
                 f"total={vd} with endpoint=''={vde}; {[x for x in req if x[0]['cluster'] == 'dead']}")
        vh = metric(m, "grpcgate_requests_total", listener="edge", cluster="hc", endpoint="", grpc_status="UNAVAILABLE")
        c.record("requests_total UNAVAILABLE for no-healthy-endpoint calls with endpoint=\"\" (2 calls)", vh == 2, f"{vh}")
        vown = metric(m, "grpcgate_requests_total", listener="edge", cluster="", endpoint="", grpc_status="OK")
        c.record("proxy's own Health/Check counted with cluster=\"\" endpoint=\"\"", vown == 3, f"OK={vown}")
        cnt = metric(m, "grpcgate_request_duration_seconds_count", cluster="hc")
        bk = [l for l, _ in series(m, "grpcgate_request_duration_seconds_bucket") if l.get("cluster") == "hc"]
        c.record("grpcgate_request_duration_seconds{cluster} histogram (buckets, count)",
                 cnt and cnt >= 60 and len(bk) >= 10 and all(set(l) == {"cluster", "le"} for l in bk),
                 f"count={cnt} buckets={len(bk)}")
        inf = series(m, "grpcgate_endpoint_in_flight")
        c.record("grpcgate_endpoint_in_flight{cluster,endpoint} present and 0 at rest",
                 any(l == {"cluster": "hc", "endpoint": f"127.0.0.1:{B1}"} for l, _ in inf) and all(v == 0 for _, v in inf),
                 str(inf))
        hl = series(m, "grpcgate_endpoint_healthy")
        c.record("grpcgate_endpoint_healthy{cluster,endpoint} for every endpoint",
                 all(set(l) == {"cluster", "endpoint"} for l, _ in hl) and len(hl) == 5, str(hl))
        hc = series(m, "grpcgate_health_checks_total")
        okc = metric(m, "grpcgate_health_checks_total", cluster="hc", endpoint=f"127.0.0.1:{B2}", result="success")
        fc = metric(m, "grpcgate_health_checks_total", cluster="hc", endpoint=f"127.0.0.1:{B2}", result="failure")
        c.record("grpcgate_health_checks_total{cluster,endpoint,result=success|failure}",
                 all(set(l) == {"cluster", "endpoint", "result"} for l, _ in hc) and okc and fc
                 and not any(l["cluster"] != "hc" for l, _ in hc), f"success={okc} failure={fc} {hc}")
        dc = metric(m, "grpcgate_downstream_connections_active", listener="edge")
        c.record("grpcgate_downstream_connections_active{listener} == 1 with one channel open", dc == 1, f"{dc}")
        ch.close()
        ok = px.wait_metric("grpcgate_downstream_connections_active", 0, 5, listener="edge")
        c.record("downstream_connections_active back to 0 after channel close", ok)
        st, body = px.http_get("/nosuch")
        c.record("admin unknown path 404", st == 404, str(st))
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
