"""8a. grpcio client keepalive pings against grpcgate: no GOAWAY(too_many_pings), no reconnects, calls and
long streams keep working.
Run: ./venv/bin/python t8_keepalive.py [seconds]"""
import sys
import time

import grpc

from lib import Checker, echo_pb2, echo_setup, rpc_error_desc, stream_in_background, stub

P, ADMIN, B1 = 21240, 21249, 21241


def main():
    dur = float(sys.argv[1]) if len(sys.argv) > 1 else 8
    c = Checker("t8_keepalive")
    states = []
    opts = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 2000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", 200)]
    with echo_setup("t8ka", P, ADMIN, B1, client_opts=opts) as (be, px, ch), c.guard("t8_keepalive harness"):
        ch.subscribe(lambda st: states.append((round(time.monotonic(), 2), st.name)), try_to_connect=True)
        s = stub(ch)
        s.Unary(echo_pb2.EchoRequest(), timeout=5)
        errs = []
        t, stream_res = stream_in_background(s, echo_pb2.EchoRequest(count=int(dur * 2), delay_ms=500), dur + 10)
        end = time.monotonic() + dur
        k = 0
        while time.monotonic() < end:
            time.sleep(0.7)   # idle gaps between calls: pings without data
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=5)
                k += 1
            except grpc.RpcError as e:
                errs.append(rpc_error_desc(e))
        t.join(dur + 15)
        # idle only, no calls at all
        time.sleep(3)
        try:
            s.Unary(echo_pb2.EchoRequest(), timeout=5)
        except grpc.RpcError as e:
            errs.append("after idle: " + rpc_error_desc(e))
        ready_count = sum(1 for _, st in states if st == "READY")
        c.record(f"keepalive 200ms for {dur:.0f}s + 3s idle: all unary calls OK", not errs, f"{k} calls, errors={errs[:3]}")
        c.record("keepalive: long server stream completes", stream_res.get("n") == int(dur * 2), str(stream_res))
        c.record("keepalive: channel never left READY (no GOAWAY / reconnect)", ready_count == 1, str(states))
        dc = px.metric("grpcgate_downstream_connections_active", listener="edge")
        c.record("one downstream connection", dc == 1, f"{dc}")
    px.print_log(lambda l: "ping" in l.lower() or "GOAWAY" in l or "calm" in l.lower())
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
