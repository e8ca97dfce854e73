"""8a. grpcio client keepalive pings against grpcgate: no GOAWAY(too_many_pings), no reconnects, calls and
long streams keep working.
Run: ./venv/bin/python t8_keepalive.py [seconds]"""
import sys
import threading
import time

import grpc

from lib import (Backend, Checker, Proxy, basic_config, channel, echo_pb2, metric, rpc_error_desc, stub)

P, ADMIN, B1 = 21240, 21249, 21241


def main():
    dur = float(sys.argv[1]) if len(sys.argv) > 1 else 8
    c = Checker("t8_keepalive")
    be = Backend(B1)
    px = Proxy("t8ka", basic_config(P, ADMIN, [("echo", [be.addr], "")]), P, ADMIN)
    states = []
    try:
        opts = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 2000),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.min_time_between_pings_ms", 200)]
        ch = channel(P, options=opts)
        ch.subscribe(lambda st: states.append((round(time.monotonic(), 2), st.name)), try_to_connect=True)
        s = stub(ch)
        s.Unary(echo_pb2.EchoRequest(), timeout=5)
        errs = []
        stream_res = {}

        def streamer():
            try:
                n = len(list(s.ServerStream(echo_pb2.EchoRequest(count=int(dur * 2), delay_ms=500), timeout=dur + 10)))
                stream_res["n"] = n
            except grpc.RpcError as e:
                stream_res["err"] = rpc_error_desc(e)
        t = threading.Thread(target=streamer)
        t.start()
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
        dc = metric(px.metrics(), "grpcgate_downstream_connections_active", listener="edge")
        c.record("one downstream connection", dc == 1, f"{dc}")
        ch.close()
    except Exception as e:  # noqa: BLE001
        c.record("t8_keepalive harness", False, rpc_error_desc(e))
    finally:
        px.stop()
        be.stop()
        log = px.read_log()
        bad = [l for l in log.splitlines() if "ping" in l.lower() or "GOAWAY" in l or "calm" in l.lower()]
        if bad:
            print("proxy log:", *bad[:10], sep="\n   ")
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
