"""8b. grpcio *server* behaviour on grpcgate's upstream connections:
 - server keepalive pings + ping enforcement (strikes) on the proxy's pooled connection
 - backend max_concurrent_streams=2 with 10/30 concurrent calls through the proxy
 - backend max_connection_idle / max_connection_age (server GOAWAYs the pooled connection)
 - backend grpc.max_receive_message_length / max_send_message_length
Run: ./venv/bin/python t8_backend_conn.py            (all)
     ./venv/bin/python t8_backend_conn.py age        (one section: keepalive|mcs|idle|age|msgsize)"""
import collections
import sys
import threading
import time

import grpc

from lib import Checker, echo_pb2, echo_setup, expect_error, outcomes, rpc_error_desc, run_threads, stub

P, ADMIN = 21260, 21269
B = 21261
TO = 10


def with_backend(c, tag, options, fn):
    with echo_setup(f"t8bc-{tag}", P, ADMIN, B, options) as (be, px, ch), c.guard(f"{tag} harness"):
        fn(c, stub(ch), be, px)
    px.print_log(lambda l: "preface" not in l and ("WARN" in l or "ERROR" in l or "DEBUG" in l), 15, f"  proxy log ({tag}):")


def sec_keepalive(c):
    def fn(c, s, be, px):
        errs, k = [], 0
        end = time.monotonic() + 6
        while time.monotonic() < end:
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                k += 1
            except grpc.RpcError as e:
                errs.append(rpc_error_desc(e))
            time.sleep(0.4)
        n = len(list(s.ServerStream(echo_pb2.EchoRequest(count=6, delay_ms=500), timeout=TO)))
        c.record("backend keepalive_time 300ms (+permit without calls): calls over 6s all OK", not errs and n == 6,
                 f"{k} calls errs={errs[:3]} stream={n}")
    with_backend(c, "keepalive", [("grpc.keepalive_time_ms", 300), ("grpc.keepalive_timeout_ms", 1000),
                                  ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)], fn)

    def fn2(c, s, be, px):
        # strict ping enforcement on the backend: the proxy must not send pings the server counts as abuse
        errs = []
        for i in range(30):
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=TO)
            except grpc.RpcError as e:
                errs.append(rpc_error_desc(e))
            time.sleep(0.1 if i % 10 else 1.0)
        c.record("backend with strict ping enforcement (min_recv_ping_interval 5m, 0 strikes): calls OK",
                 not errs, f"errs={errs[:3]}")
    with_backend(c, "pingstrict", [("grpc.http2.min_recv_ping_interval_without_data_ms", 300000),
                                   ("grpc.http2.max_ping_strikes", 0)], fn2)


def sec_mcs(c):
    def fn(c, s, be, px):
        for n in (10, 30):
            t0 = time.monotonic()
            res = outcomes([s.Unary.future(echo_pb2.EchoRequest(delay_ms=300, payload=b"%d" % i), timeout=TO) for i in range(n)])
            el = time.monotonic() - t0
            c.record(f"backend max_concurrent_streams=2: {n} concurrent unary calls through the proxy all OK",
                     res == {"OK": n}, f"{dict(res)} in {el:.2f}s")
        # streams
        res = collections.Counter()

        def one():
            try:
                got = list(s.Bidi((echo_pb2.EchoRequest(payload=b"x", delay_ms=50) for _ in range(5)), timeout=TO))
                res["OK" if len(got) == 5 else f"short {len(got)}"] += 1
            except grpc.RpcError as e:
                res[f"{e.code().name}: {e.details()}"] += 1
        run_threads([one] * 10, TO + 5)
        c.record("backend max_concurrent_streams=2: 10 concurrent bidi streams all OK", res == {"OK": 10}, f"{dict(res)}")
    with_backend(c, "mcs", [("grpc.max_concurrent_streams", 2)], fn)


def sec_mcs1(c):
    def fn(c, s, be, px):
        t0 = time.monotonic()
        res = outcomes([s.Unary.future(echo_pb2.EchoRequest(delay_ms=100), timeout=TO) for _ in range(100)])
        c.record("backend max_concurrent_streams=1: 100 concurrent calls all OK (proxy opens more connections / queues)",
                 res == {"OK": 100}, f"{dict(res)} in {time.monotonic() - t0:.2f}s")
    with_backend(c, "mcs1", [("grpc.max_concurrent_streams", 1)], fn)


def sec_idle(c):
    def fn(c, s, be, px):
        errs = []
        for i in range(6):
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=TO)
            except grpc.RpcError as e:
                errs.append(f"call {i}: {rpc_error_desc(e)}")
            time.sleep(1.0)   # > max_connection_idle: the backend GOAWAYs the idle pooled connection
        c.record("backend max_connection_idle 500ms: calls after each idle GOAWAY succeed", not errs, f"{errs[:3]}")
    with_backend(c, "idle", [("grpc.max_connection_idle_ms", 500)], fn)


def sec_age(c):
    def fn(c, s, be, px):
        res = collections.Counter()
        errs = []
        end = time.monotonic() + 8
        while time.monotonic() < end:
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                res["OK"] += 1
            except grpc.RpcError as e:
                res[e.code().name] += 1
                errs.append(rpc_error_desc(e))
            time.sleep(0.02)
        c.record("backend max_connection_age 1s (grace 5s): 8s of sequential calls all OK", list(res) == ["OK"],
                 f"{dict(res)} {errs[:3]}")

        res = collections.Counter()
        errs = []
        lock = threading.Lock()

        def worker():
            end = time.monotonic() + 6
            while time.monotonic() < end:
                try:
                    s.Unary(echo_pb2.EchoRequest(delay_ms=20), timeout=TO)
                    k = "OK"
                except grpc.RpcError as e:
                    k = e.code().name
                    with lock:
                        errs.append(rpc_error_desc(e))
                with lock:
                    res[k] += 1
        run_threads([worker] * 4, 20)
        c.record("backend max_connection_age 1s: 4 concurrent callers for 6s all OK", list(res) == ["OK"],
                 f"{dict(res)} {errs[:3]}")

        # a stream longer than the connection age (grace covers it)
        try:
            n = len(list(s.ServerStream(echo_pb2.EchoRequest(count=10, delay_ms=300), timeout=TO)))
            c.record("backend max_connection_age 1s: 3s stream within grace completes", n == 10, f"n={n}")
        except grpc.RpcError as e:
            c.record("backend max_connection_age 1s: 3s stream within grace completes", False, rpc_error_desc(e))
    with_backend(c, "age", [("grpc.max_connection_age_ms", 1000), ("grpc.max_connection_age_grace_ms", 5000)], fn)


def sec_msgsize(c):
    def fn(c, s, be, px):
        exhausted = lambda fn: lambda: expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, fn)  # noqa: E731
        c.check("backend max_receive_message_length 1024: 4 KiB unary -> RESOURCE_EXHAUSTED",
                exhausted(lambda: s.Unary(echo_pb2.EchoRequest(payload=b"x" * 4096), timeout=TO)))
        c.check("backend max_receive_message_length 1024: client stream with a 100 KB msg -> RESOURCE_EXHAUSTED",
                exhausted(lambda: s.ClientStream(iter([echo_pb2.EchoRequest(payload=b"x" * 10)] * 3 + [echo_pb2.EchoRequest(payload=b"x" * 100000)] * 5), timeout=TO)))
        c.check("backend max_receive_message_length 1024: 4 MiB unary (bigger than windows) -> RESOURCE_EXHAUSTED",
                exhausted(lambda: s.Unary(echo_pb2.EchoRequest(payload=b"x" * (4 << 20)), timeout=TO)))

        def too_big_response():
            try:
                list(s.ServerStream(echo_pb2.EchoRequest(payload=b"y" * 900, count=1), timeout=TO))
                # response ~ 900 B < 2048 send limit -> OK; now request a response above the send limit
                s.Unary(echo_pb2.EchoRequest(payload=b"y" * 1000, fail_code=0), metadata=[("x-md", "1")], timeout=TO)
                return True, "ok"
            except grpc.RpcError as e:
                return False, rpc_error_desc(e)
        c.check("small messages still fine", too_big_response)

        ok = s.Unary(echo_pb2.EchoRequest(payload=b"z"), timeout=TO).payload == b"z"
        c.record("calls after RESOURCE_EXHAUSTED still succeed on the same proxy connection", ok)
    with_backend(c, "msgsize", [("grpc.max_receive_message_length", 1024)], fn)

    def fn2(c, s, be, px):
        try:
            s.Unary(echo_pb2.EchoRequest(payload=b"x" * 4000), timeout=TO)
            c.record("backend max_send_message_length 1024: big response -> RESOURCE_EXHAUSTED", False, "no error")
        except grpc.RpcError as e:
            c.record("backend max_send_message_length 1024: big response -> RESOURCE_EXHAUSTED",
                     e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc_error_desc(e))
    with_backend(c, "sendsize", [("grpc.max_send_message_length", 1024)], fn2)


SECTIONS = {"keepalive": sec_keepalive, "mcs": sec_mcs, "mcs1": sec_mcs1, "idle": sec_idle, "age": sec_age, "msgsize": sec_msgsize}


def main():
    c = Checker("t8_backend_conn")
    names = sys.argv[1:] or list(SECTIONS)
    for n in names:
        SECTIONS[n](c)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
