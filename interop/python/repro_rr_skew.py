"""Repro: round_robin with one of three endpoints unhealthy (or refusing connections): the remaining two do
not share evenly; the endpoint after the unavailable one in config order gets twice the calls.
Run: ./venv/bin/python repro_rr_skew.py"""
import collections
import sys

from lib import Backend, Proxy, basic_config, channel, echo_pb2, stub, teardown

P, ADMIN, B1, B2, B3 = 21440, 21449, 21441, 21442, 21443


def cfg(hc):
    h = '[clusters.health_check]\ninterval = "200ms"\ntimeout = "150ms"\n' if hc else ""
    return basic_config(P, ADMIN, [("echo", [B1, B2, B3], 'balancer = "round_robin"\n' + h)])


def main():
    rc = 0
    for mode in ("unhealthy", "refusing"):
        bs = [Backend(p, name=f"b{i + 1}", health=True) for i, p in enumerate((B1, B2, B3))]
        px = Proxy(f"rr-skew-{mode}", cfg(mode == "unhealthy"), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        with teardown(ch, px, *bs):
            if mode == "unhealthy":
                px.wait_metric("grpcgate_endpoint_healthy", 3, 5, cluster="echo")
                bs[1].set_serving(False)
                px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="echo")
            else:
                bs[1].stop()
            cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=5).backend for _ in range(300))
            even = abs(cnt["b1"] - cnt["b3"]) <= 30
            print(f"b2 {mode}: 300 calls -> {dict(sorted(cnt.items()))}  {'PASS' if even else 'FAIL'} (even would be 150/150)")
            rc |= 0 if even else 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
