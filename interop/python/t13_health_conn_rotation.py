"""13. Active health checks against grpcio backends that rotate connections (grpc.max_connection_age_ms,
as many deployments set it) or close idle ones (grpc.max_connection_idle_ms): a healthy, SERVING backend
should never be marked unhealthy, and traffic should not fail.
Run: ./venv/bin/python t13_health_conn_rotation.py [seconds] [only-cases-containing]
     e.g. ./venv/bin/python t13_health_conn_rotation.py 8 watch+age   (the failing cases)"""
import collections
import sys
import time

import grpc

from lib import Backend, Checker, Proxy, basic_config, channel, echo_pb2, outcome, stub, teardown

P, ADMIN, B1, B2 = 21460, 21469, 21461, 21462


def cfg(mode, thr):
    hc = f'[clusters.health_check]\nmode = "{mode}"\ninterval = "300ms"\ntimeout = "250ms"\nunhealthy_threshold = {thr}\n'
    return basic_config(P, ADMIN, [("echo", [B1, B2], hc)])


def run(c, label, mode, thr, backend_opts, dur):
    bs = [Backend(p, name=f"b{i + 1}", health=True, options=backend_opts) for i, p in enumerate((B1, B2))]
    px = Proxy(f"t13-{label}", cfg(mode, thr), P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, *bs):
        px.wait_metric("grpcgate_endpoint_healthy", 2, 5, 0.05, cluster="echo")
        f0 = px.metric("grpcgate_health_checks_total", cluster="echo", result="failure") or 0
        healthy_samples = collections.Counter()
        outcomes = collections.Counter()
        end = time.monotonic() + dur
        while time.monotonic() < end:
            healthy_samples[px.metric("grpcgate_endpoint_healthy", cluster="echo")] += 1
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=3)
                outcomes["OK"] += 1
            except grpc.RpcError as e:
                outcomes[outcome(e)] += 1
            time.sleep(0.05)
        f1 = px.metric("grpcgate_health_checks_total", cluster="echo", result="failure") or 0
        ok1 = set(healthy_samples) == {2.0}
        c.record(f"{label}: SERVING backends never marked unhealthy", ok1,
                 f"healthy-count samples={dict(healthy_samples)} failed checks={f1 - f0}")
        c.record(f"{label}: no failed health checks counted", f1 == f0, f"failures={f1 - f0}")
        c.record(f"{label}: traffic all OK", list(outcomes) == ["OK"], str(dict(outcomes))[:300])
        px.print_log(lambda l: "unhealthy" in l or "broke" in l or "failed" in l, 4, "   proxy log:")


def main():
    dur = float(sys.argv[1]) if len(sys.argv) > 1 else 8
    c = Checker("t13_health_conn_rotation")
    age = [("grpc.max_connection_age_ms", 1000), ("grpc.max_connection_age_grace_ms", 500)]
    idle = [("grpc.max_connection_idle_ms", 200)]
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for label, mode, thr, opts in (("poll+age thr=1", "poll", 1, age), ("watch+age thr=2", "watch", 2, age),
                                   ("watch+age thr=1", "watch", 1, age), ("poll+idle thr=1", "poll", 1, idle),
                                   ("watch+idle thr=1", "watch", 1, idle)):
        if only in label:
            run(c, label, mode, thr, opts, dur)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
