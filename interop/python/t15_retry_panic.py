"""15. grpcio client retry policy (service config) through the proxy, and panic_threshold.
Run: ./venv/bin/python t15_retry_panic.py"""
import collections
import json
import sys

import grpc

from lib import Backend, Checker, Proxy, basic_config, channel, echo_pb2, stub, teardown

P, ADMIN, B1, B2, B3 = 21520, 21529, 21521, 21522, 21523
TO = 5


def cfg(ports, extra=""):
    return basic_config(P, ADMIN, [("echo", ports, 'balancer = "round_robin"\n' + extra)])


def main():
    c = Checker("t15_retry_panic")
    bs = [Backend(p, name=f"b{i + 1}", health=True) for i, p in enumerate((B1, B2, B3))]
    px = Proxy("t15", cfg([B1, B2]), P, ADMIN)
    with teardown(px):
        sc = json.dumps({"methodConfig": [{"name": [{"service": "echo.Echo"}], "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]})
        ch = channel(P, options=[("grpc.service_config", sc), ("grpc.enable_retries", 1)])
        s = stub(ch)
        bs[0].servicer.fail_all = grpc.StatusCode.UNAVAILABLE
        res = collections.Counter()
        prev = collections.Counter()
        for i in range(20):
            try:
                r = s.Unary(echo_pb2.EchoRequest(), metadata=[("x-call-id", f"r{i}")], timeout=TO)
                res[r.backend] += 1
                md = dict(bs[1].servicer.calls[f"r{i}"].metadata)
                prev[md.get("grpc-previous-rpc-attempts", "0")] += 1
            except grpc.RpcError as e:
                res[e.code().name] += 1
        bs[0].servicer.fail_all = None
        c.record("grpcio retry policy: backend-produced UNAVAILABLE (trailers-only) retried, lands on the healthy backend",
                 res == {"b2": 20}, f"{dict(res)} grpc-previous-rpc-attempts at backend={dict(prev)}")
        ch.close()

    hc = '[clusters.health_check]\ninterval = "200ms"\ntimeout = "150ms"\n'
    px = Proxy("t15-panic", cfg([B1, B2, B3], 'panic_threshold = 50\n' + hc), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, *bs):
        px.wait_metric("grpcgate_endpoint_healthy", 3, 5, cluster="echo")
        bs[0].set_serving(False)
        px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="echo")
        cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend for _ in range(30))
        c.record("panic_threshold 50, 2 of 3 available (67%): unhealthy b1 gets nothing", "b1" not in cnt, str(dict(cnt)))
        bs[1].set_serving(False)
        px.wait_metric("grpcgate_endpoint_healthy", 1, 5, cluster="echo")
        cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend for _ in range(30))
        c.record("panic_threshold 50, 1 of 3 available (33%): panic mode, all 3 get calls", len(cnt) == 3, str(dict(cnt)))
        st, body = px.http_get("/ready")
        c.record("/ready in panic mode (one endpoint still available) is 200", st == 200, f"{st} {body.strip()}")
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
