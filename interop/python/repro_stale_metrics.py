"""Repro: after a SIGHUP reload removes an endpoint, its grpcgate_endpoint_healthy series stays exported
with value 1 (and in_flight 0) forever.
Run: ./venv/bin/python repro_stale_metrics.py"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import Backend, Proxy, basic_config, channel, echo_pb2, stub, series, metric, stop_all
P, ADMIN, B1, B2 = 21440, 21449, 21441, 21442
def cfg(eps):
    return basic_config(P, ADMIN, [("echo", eps, "")])
b1, b2 = Backend(B1), Backend(B2)
px = Proxy("stale", cfg([B1, B2]), P, ADMIN)
ch = channel(P); s = stub(ch)
try:
    for _ in range(4): s.Unary(echo_pb2.EchoRequest(), timeout=5)
    px.write(cfg([B1])); px.hup()
    px.wait_metric("grpcgate_config_reloads_total", 1, 5, result="success")
    m = px.metrics()
    for n in ("grpcgate_endpoint_healthy", "grpcgate_endpoint_in_flight"):
        print(n, series(m, n))
    v = metric(m, "grpcgate_endpoint_healthy", endpoint=f"127.0.0.1:{B2}")
    print("RESULT:", "FAIL" if v is not None else "PASS", f"(removed endpoint 127.0.0.1:{B2} healthy gauge = {v})")
finally:
    stop_all(ch, px, b1, b2)
