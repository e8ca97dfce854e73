"""1. All four call types through grpcgate: small, empty, large (1 MiB, 8 MiB), many messages.
Run: ./venv/bin/python t1_calltypes.py"""
import os
import sys

from lib import BIG_OPTS, Checker, echo_pb2, echo_setup, stub

P, ADMIN, B1 = 21100, 21109, 21101
TO = 30  # per-call deadline in the checks


def main():
    c = Checker("t1_calltypes")
    with echo_setup("t1", P, ADMIN, B1, BIG_OPTS) as (be, px, ch), c.guard("t1 harness"):
        s = stub(ch)

        def unary(size):
            def f():
                data = os.urandom(size)
                r = s.Unary(echo_pb2.EchoRequest(payload=data), timeout=TO)
                return r.payload == data and r.backend == be.name, f"len={len(r.payload)}"
            return f

        c.check("unary small", unary(100))
        c.check("unary empty request message", lambda: s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend == be.name)
        c.check("unary 1 MiB", unary(1 << 20))
        c.check("unary 8 MiB", unary(8 << 20))

        def empty_response():
            # ServerStream with count=3 and an empty payload: the response messages are empty except
            # seq/backend; use ClientStream with 0 messages for a truly empty request stream.
            r = s.ClientStream(iter([]), timeout=TO)
            return r.seq == 0 and r.total_bytes == 0, f"seq={r.seq}"
        c.check("client stream with zero messages", empty_response)

        def sstream(n, size):
            def f():
                data = os.urandom(size)
                got = list(s.ServerStream(echo_pb2.EchoRequest(payload=data, count=n), timeout=TO))
                ok = len(got) == n and all(g.payload == data and g.seq == i for i, g in enumerate(got))
                return ok, f"got {len(got)} msgs"
            return f
        c.check("server stream 5 msgs", sstream(5, 10))
        c.check("server stream 2000 small msgs", sstream(2000, 20))
        c.check("server stream 4 x 8 MiB", sstream(4, 8 << 20))
        c.check("server stream 3 empty msgs", sstream(3, 0))

        def cstream(n, size):
            def f():
                data = os.urandom(size)
                r = s.ClientStream((echo_pb2.EchoRequest(payload=data) for _ in range(n)), timeout=TO)
                return r.seq == n and r.total_bytes == n * size, f"seq={r.seq} total={r.total_bytes}"
            return f
        c.check("client stream 5 msgs", cstream(5, 10))
        c.check("client stream 3000 small msgs", cstream(3000, 20))
        c.check("client stream 3 x 8 MiB", cstream(3, 8 << 20))
        c.check("client stream 10 empty msgs", cstream(10, 0))

        def bidi(n, size):
            def f():
                data = [os.urandom(size) for _ in range(min(n, 8))]
                reqs = (echo_pb2.EchoRequest(payload=data[i % len(data)]) for i in range(n))
                got = list(s.Bidi(reqs, timeout=TO))
                ok = len(got) == n and all(g.payload == data[i % len(data)] for i, g in enumerate(got))
                return ok, f"got {len(got)}"
            return f
        c.check("bidi 5 msgs", bidi(5, 10))
        c.check("bidi 3000 msgs", bidi(3000, 30))
        c.check("bidi 3 x 8 MiB", bidi(3, 8 << 20))
        c.check("bidi 5 empty msgs", bidi(5, 0))

        def bidi_pingpong():
            # true ping-pong: next request only after the previous response arrived
            import queue
            q = queue.Queue()

            def gen():
                for i in range(50):
                    yield echo_pb2.EchoRequest(payload=str(i).encode())
                    if q.get(timeout=10) != str(i).encode():
                        return
            call = s.Bidi(gen(), timeout=TO)
            n = 0
            for r in call:
                q.put(r.payload)
                n += 1
            return n == 50, f"n={n}"
        c.check("bidi ping-pong 50 rounds", bidi_pingpong)

        def many_unary():
            for i in range(300):
                r = s.Unary(echo_pb2.EchoRequest(payload=b"x%d" % i), timeout=TO)
                if r.payload != b"x%d" % i:
                    return False, f"mismatch at {i}"
            return True, ""
        c.check("300 sequential unary calls on one channel", many_unary)

        def concurrent_unary():
            futs = [s.Unary.future(echo_pb2.EchoRequest(payload=b"c%d" % i), timeout=TO) for i in range(200)]
            bad = [i for i, f in enumerate(futs) if f.result().payload != b"c%d" % i]
            return not bad, f"bad={bad[:5]}"
        c.check("200 concurrent unary calls on one channel", concurrent_unary)
    rc = px.proc.returncode
    c.record("proxy exits 0 on SIGTERM", rc == 0, f"rc={rc}")
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
