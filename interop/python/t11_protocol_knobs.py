"""11. HTTP/2 knobs of grpcio on either side of the proxy, and bursts of very short deadlines:
 - client and backend advertising a large SETTINGS_MAX_FRAME_SIZE
 - BDP probing off and tiny stream windows (grpc.http2.lookahead_bytes) on client and backend
 - a burst of calls with 1-3 ms deadlines (HEADERS then RST_STREAM back to back) on a channel that also
   carries a long stream: the stream must survive (no connection-level GOAWAY from the proxy)
Run: ./venv/bin/python t11_protocol_knobs.py [section ...]"""
import collections
import os
import sys
import time

import grpc

from lib import BIG_OPTS, Checker, echo_pb2, echo_setup, metric, outcomes, rpc_error_desc, stream_in_background, stub

P, ADMIN, B1 = 21400, 21409, 21401
TO = 30


def run_payloads(c, tag, s):
    for size in (1 << 20, 8 << 20):
        def f(size=size):
            d = os.urandom(size)
            r = s.Unary(echo_pb2.EchoRequest(payload=d), timeout=TO)
            got = list(s.Bidi(iter([echo_pb2.EchoRequest(payload=d)] * 2), timeout=TO))
            return r.payload == d and len(got) == 2 and all(g.payload == d for g in got), ""
        c.check(f"{tag}: unary + bidi {size >> 20} MiB", f)

    def many():
        got = list(s.ServerStream(echo_pb2.EchoRequest(payload=b"m" * 3000, count=2000), timeout=TO))
        return len(got) == 2000, f"n={len(got)}"
    c.check(f"{tag}: 2000 x 3 KB server stream", many)


def with_setup(c, tag, client_opts, backend_opts, fn):
    with echo_setup(f"t11-{tag}", P, ADMIN, B1, BIG_OPTS + backend_opts, client_opts) as (be, px, ch), \
            c.guard(f"{tag} harness"):
        fn(c, tag, stub(ch), px)
    px.print_log(limit=5)


def sec_frames(c):
    big = [("grpc.http2.max_frame_size", 1 << 20)]
    with_setup(c, "bigframes", big, big, lambda c, t, s, px: run_payloads(c, t, s))


def sec_windows(c):
    small = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    with_setup(c, "smallwin", small, small, lambda c, t, s, px: run_payloads(c, t, s))


def sec_burst(c):
    def fn(c, tag, s, px):
        t, res = stream_in_background(s, echo_pb2.EchoRequest(count=40, delay_ms=100), TO)
        time.sleep(0.5)
        codes = collections.Counter()
        for rnd in range(5):
            futs = [s.Unary.future(echo_pb2.EchoRequest(delay_ms=50), timeout=0.001 + (i % 3) * 0.001) for i in range(200)]
            codes += outcomes(futs, details=False)
        t.join(TO)
        errs = []
        for _ in range(20):
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=5)
            except grpc.RpcError as e:
                errs.append(rpc_error_desc(e))
        conn_lines = [l for l in px.read_log().splitlines() if "calm" in l.lower() or "GOAWAY" in l or "reset" in l.lower()]
        c.record("burst of 1000 calls with 1-3 ms deadlines: long stream on the same connection survives",
                 res.get("n") == 40, f"stream={res} burst={dict(codes)} log={conn_lines[:2]}")
        c.record("burst: only DEADLINE_EXCEEDED (or OK) outcomes", set(codes) <= {"DEADLINE_EXCEEDED", "OK"}, str(dict(codes)))
        c.record("burst: 20 normal calls afterwards OK", not errs, str(errs[:3]))
        m = px.metrics()
        c.record("burst: in-flight gauge back to 0", metric(m, "grpcgate_endpoint_in_flight", cluster="echo") == 0,
                 str(metric(m, "grpcgate_endpoint_in_flight", cluster="echo")))
    with_setup(c, "burst", [], [], fn)


SECTIONS = dict(frames=sec_frames, windows=sec_windows, burst=sec_burst)


def main():
    c = Checker("t11_protocol_knobs")
    for n in sys.argv[1:] or list(SECTIONS):
        SECTIONS[n](c)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
