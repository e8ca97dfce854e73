"""Repro: after a SIGHUP reload removes an endpoint, its grpcgate_endpoint_healthy series stays exported
with value 1 (and in_flight 0) forever.
Run: ./venv/bin/python repro_stale_metrics.py"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import time
from lib import Backend, Proxy, channel, echo_pb2, stub, series, wait_for, metric
P, ADMIN, B1, B2 = 21440, 21449, 21441, 21442
def cfg(eps):
    e = ", ".join(f'"127.0.0.1:{p}"' for p in eps)
    return f'[admin]\nlisten = "127.0.0.1:{ADMIN}"\n[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:{P}"\n[[listeners.routes]]\ncluster = "echo"\n[[clusters]]\nname = "echo"\nendpoints = [{e}]\n'
b1, b2 = Backend(B1), Backend(B2)
px = Proxy("stale", cfg([B1, B2]), P, ADMIN)
ch = channel(P); s = stub(ch)
try:
    for _ in range(4): s.Unary(echo_pb2.EchoRequest(), timeout=5)
    px.write(cfg([B1])); px.hup()
    wait_for(lambda: metric(px.metrics(), "grpcgate_config_reloads_total", result="success") == 1, 5)
    m = px.metrics()
    for n in ("grpcgate_endpoint_healthy", "grpcgate_endpoint_in_flight"):
        print(n, series(m, n))
    v = metric(m, "grpcgate_endpoint_healthy", endpoint=f"127.0.0.1:{B2}")
    print("RESULT:", "FAIL" if v is not None else "PASS", f"(removed endpoint 127.0.0.1:{B2} healthy gauge = {v})")
finally:
    ch.close(); px.stop(); b1.stop(); b2.stop()
