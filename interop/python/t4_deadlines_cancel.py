"""4. Deadlines (client deadline, route timeout) and client cancellation propagating to the backend.
Run: ./venv/bin/python t4_deadlines_cancel.py"""
import sys
import threading
import time
import uuid

import grpc

from lib import (Backend, Checker, Proxy, channel, echo_pb2, gate_config, metric, rpc_error_desc, series, stub,
                 teardown, wait_for)

P, P2, ADMIN, B1 = 21160, 21161, 21169, 21162

EDGE_ROUTES = [{"service": "echo.Echo", "method": "Unary", "cluster": "echo", "timeout": "10s"},
               {"service": "echo.Echo", "method": "ServerStream", "cluster": "echo", "timeout": "600ms"},
               {"cluster": "echo", "timeout": "600ms"}]
CONFIG = gate_config(ADMIN, [("edge", P, EDGE_ROUTES, ""), ("free", P2, [{"cluster": "echo"}], "")],
                     [("echo", [B1], "")])


def cid():
    return uuid.uuid4().hex[:12]


def main():
    c = Checker("t4_deadlines_cancel")
    be = Backend(B1)
    px = Proxy("t4", CONFIG, P, ADMIN)
    ch = channel(P)
    ch2 = channel(P2)
    s, s2 = stub(ch), stub(ch2)
    calls = be.servicer.calls
    with teardown(ch, ch2, px, be), c.guard("t4 harness"):
        s.Unary(echo_pb2.EchoRequest(), timeout=5)  # warm up the upstream connection
        s2.Unary(echo_pb2.EchoRequest(), timeout=5)

        def client_deadline():
            i = cid()
            t0 = time.monotonic()
            try:
                s.Unary(echo_pb2.EchoRequest(delay_ms=3000), metadata=[("x-call-id", i)], timeout=0.5)
                return False, "no error"
            except grpc.RpcError as e:
                el = time.monotonic() - t0
                rec = calls.get(i)
                canc = rec is not None and rec.cancelled.wait(2)
                tr = rec.time_remaining if rec else None
                ok = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and el < 1.5 and canc and tr is not None and tr <= 0.52  # C-core rounds grpc-timeout up slightly (direct too)
                return ok, f"{rpc_error_desc(e)} after {el:.2f}s; backend time_remaining={tr} cancelled={canc}"
        c.check("client deadline 0.5s < route timeout 10s -> DEADLINE_EXCEEDED; backend sees deadline, is cancelled",
                client_deadline)

        def route_timeout(timeout):
            def f():
                i = cid()
                t0 = time.monotonic()
                try:
                    list(s.ServerStream(echo_pb2.EchoRequest(delay_ms=3000), metadata=[("x-call-id", i)], timeout=timeout))
                    return False, "no error"
                except grpc.RpcError as e:
                    el = time.monotonic() - t0
                    rec = calls.get(i)
                    canc = rec is not None and rec.cancelled.wait(2)
                    tr = rec.time_remaining if rec else None
                    ok = (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0.5 <= el < 1.5 and canc
                          and tr is not None and tr <= 0.61)
                    return ok, f"{rpc_error_desc(e)} after {el:.2f}s; backend time_remaining={tr} cancelled={canc}"
            return f
        c.check("route timeout 600ms, no client deadline -> DEADLINE_EXCEEDED ~0.6s; backend sees ~0.6s deadline",
                route_timeout(None))
        c.check("route timeout 600ms < client deadline 5s -> DEADLINE_EXCEEDED ~0.6s", route_timeout(5))

        def route_timeout_midstream():
            i = cid()
            got = []
            t0 = time.monotonic()
            try:
                for m in s.ServerStream(echo_pb2.EchoRequest(count=20, delay_ms=100), metadata=[("x-call-id", i)]):
                    got.append(m)
                return False, f"no error, {len(got)} msgs"
            except grpc.RpcError as e:
                el = time.monotonic() - t0
                canc = calls[i].cancelled.wait(2)
                ok = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 2 <= len(got) <= 7 and canc
                return ok, f"{rpc_error_desc(e)} after {el:.2f}s, {len(got)} msgs, backend cancelled={canc}"
        c.check("route timeout expires mid-stream (after some messages) -> DEADLINE_EXCEEDED in trailers",
                route_timeout_midstream)

        def bidi_route_timeout():
            i = cid()
            ev = threading.Event()

            def gen():
                yield echo_pb2.EchoRequest(payload=b"a")
                ev.wait(5)
            got = []
            t0 = time.monotonic()
            try:
                for m in s.Bidi(gen(), metadata=[("x-call-id", i)]):
                    got.append(m)
                return False, "no error"
            except grpc.RpcError as e:
                el = time.monotonic() - t0
                canc = calls[i].cancelled.wait(2) or calls[i].terminated.wait(0.1)
                ev.set()
                return e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and len(got) == 1 and el < 1.5 and canc, \
                    f"{rpc_error_desc(e)} after {el:.2f}s got={len(got)} backend ended={canc}"
        c.check("bidi with open request stream: route timeout -> DEADLINE_EXCEEDED, backend call ended", bidi_route_timeout)

        def no_deadline_forwarded():
            i = cid()
            s2.Unary(echo_pb2.EchoRequest(), metadata=[("x-call-id", i)], timeout=None)
            tr = calls[i].time_remaining
            return tr is None or tr > 1e6, f"time_remaining={tr}"
        c.check("no route timeout, no client deadline -> backend sees no deadline", no_deadline_forwarded)

        def client_deadline_forwarded():
            i = cid()
            s2.Unary(echo_pb2.EchoRequest(), metadata=[("x-call-id", i)], timeout=7)
            tr = calls[i].time_remaining
            return tr is not None and 6.0 < tr <= 7.05, f"time_remaining={tr}"
        c.check("client deadline 7s forwarded to backend (6 < remaining <= 7 + C-core rounding)", client_deadline_forwarded)

        # ---- cancellation (no deadlines anywhere: listener "free")
        def cancel_server_stream():
            i = cid()
            call = s2.ServerStream(echo_pb2.EchoRequest(count=1000, delay_ms=50), metadata=[("x-call-id", i)])
            n = 0
            for _ in call:
                n += 1
                if n == 3:
                    break
            call.cancel()
            rec = calls[i]
            canc = rec.cancelled.wait(3)
            term = rec.terminated.wait(3)
            return canc and term and rec.sent < 100, f"backend cancelled={canc} callback={term} sent={rec.sent}"
        c.check("client cancels server stream after 3 msgs -> backend call cancelled", cancel_server_stream)

        def cancel_bidi():
            i = cid()
            stop = threading.Event()

            def gen():
                k = 0
                while not stop.is_set() and k < 1000:
                    yield echo_pb2.EchoRequest(payload=b"p", delay_ms=20)
                    k += 1
                    time.sleep(0.02)
            call = s2.Bidi(gen(), metadata=[("x-call-id", i)])
            n = 0
            for _ in call:
                n += 1
                if n == 5:
                    break
            call.cancel()
            stop.set()
            rec = calls[i]
            canc = rec.cancelled.wait(3) or rec.terminated.wait(0.1)
            term = rec.terminated.wait(3)
            return canc and term, f"backend cancelled/ended={canc} callback={term} recv={rec.received}"
        c.check("client cancels bidi mid-way -> backend call cancelled", cancel_bidi)

        def cancel_client_stream():
            i = cid()
            ev = threading.Event()

            def gen():
                for _ in range(3):
                    yield echo_pb2.EchoRequest(payload=b"q")
                ev.wait(10)
            fut = s2.ClientStream.future(gen(), metadata=[("x-call-id", i)])
            ok = wait_for(lambda: i in calls and calls[i].received == 3, 3, 0.02)
            fut.cancel()
            rec = calls.get(i)
            term = rec is not None and rec.terminated.wait(3)
            ev.set()
            return ok and term, f"backend got 3={ok} callback fired={term}"
        c.check("client cancels client stream mid-way -> backend call ends (callback)", cancel_client_stream)

        def cancel_unary():
            i = cid()
            fut = s2.Unary.future(echo_pb2.EchoRequest(delay_ms=5000), metadata=[("x-call-id", i)])
            ok = wait_for(lambda: i in calls, 3, 0.02)
            time.sleep(0.2)
            fut.cancel()
            rec = calls.get(i)
            canc = rec is not None and rec.cancelled.wait(3)
            return ok and canc, f"started={ok} backend cancelled={canc}"
        c.check("client cancels unary future -> backend call cancelled", cancel_unary)

        def close_channel():
            i = cid()
            ch3 = channel(P2)
            fut = stub(ch3).ServerStream.future if False else None  # noqa: F841
            call = stub(ch3).ServerStream(echo_pb2.EchoRequest(count=1000, delay_ms=50), metadata=[("x-call-id", i)])
            it = iter(call)
            next(it)
            ch3.close()
            rec = calls[i]
            canc = rec.cancelled.wait(3)
            return canc, f"backend cancelled={canc}"
        c.check("client closes its channel mid-stream -> backend call cancelled", close_channel)

        time.sleep(0.5)
        m = px.metrics()
        canc = metric(m, "grpcgate_requests_total", listener="free", grpc_status="CANCELLED")
        dl = metric(m, "grpcgate_requests_total", listener="edge", grpc_status="DEADLINE_EXCEEDED")
        c.record("metrics: 5 client-cancelled calls counted CANCELLED", canc == 5,
                 f"CANCELLED={canc}; {[x for x in series(m, 'grpcgate_requests_total') if x[0]['listener'] == 'free']}")
        c.record("metrics: 5 deadline calls counted DEADLINE_EXCEEDED", dl == 5,
                 f"DEADLINE_EXCEEDED={dl}; {[x for x in series(m, 'grpcgate_requests_total') if x[0]['listener'] == 'edge']}")
        inf = metric(m, "grpcgate_endpoint_in_flight", cluster="echo")
        c.record("in-flight gauge back to 0", inf == 0, f"{inf}")
        c.record("backend still serves after all that", s2.Unary(echo_pb2.EchoRequest(payload=b"z"), timeout=5).payload == b"z")
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
