"""9. Header-compression / header-size interop (grpcgate carries HPACK patches in vendor/h2):
 - metadata churn: many calls with varying keys/values (dynamic-table inserts, hits, evictions), several
   client channels sharing the proxy's upstream connection, checked byte for byte at the backend and back
 - peers announcing a small / zero HPACK table (SETTINGS_HEADER_TABLE_SIZE) on client and backend side
 - header blocks larger than a frame (CONTINUATION) both ways, with raised metadata limits
 - many distinct method paths (":path" is dynamically indexed by the patched encoder)
Run: ./venv/bin/python t9_headers.py"""
import random
import sys

import grpc

from lib import Checker, channel, echo_pb2, echo_setup, rpc_error_desc, run_threads, stub

P, ADMIN, B1 = 21320, 21329, 21321
TO = 10
BIG_MD = [("grpc.max_metadata_size", 256 * 1024), ("grpc.absolute_max_metadata_size", 256 * 1024)]


def churn(s, be, n, seed, tag):
    rnd = random.Random(seed)
    names = [f"x-e-k{i}" for i in range(60)]
    values = ["v" * rnd.randint(1, 300) + str(i) for i in range(25)]
    bad = []
    for i in range(n):
        md = []
        for _ in range(rnd.randint(0, 8)):
            k = rnd.choice(names)
            if rnd.random() < 0.3:
                md.append((k + "-bin", bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 200)))))
            else:
                md.append((k, rnd.choice(values)))
        cid = f"{tag}-{i}"
        try:
            _, call = s.Unary.with_call(echo_pb2.EchoRequest(payload=b"p"), metadata=md + [("x-call-id", cid), ("x-md-echo", "1")], timeout=TO)
        except grpc.RpcError as e:
            bad.append(f"call {i}: {rpc_error_desc(e)}")
            if len(bad) > 3:
                break
            continue
        want = sorted(md)
        got_b = sorted((k, v) for k, v in be.servicer.calls[cid].metadata if k.startswith("x-e-"))
        got_i = sorted((k, v) for k, v in call.initial_metadata() if k.startswith("x-e-"))
        got_t = sorted((k, v) for k, v in call.trailing_metadata() if k.startswith("x-e-"))
        if not (got_b == want and got_i == want and got_t == want):
            bad.append(f"call {i}: md mismatch backend={got_b == want} init={got_i == want} trail={got_t == want}")
            if len(bad) > 3:
                break
    return bad


def main():
    c = Checker("t9_headers")
    with echo_setup("t9", P, ADMIN, B1, BIG_MD, BIG_MD) as (be, px, ch), c.guard("t9 harness"):
        s = stub(ch)
        bad = churn(s, be, 400, 1, "a")
        c.record("metadata churn: 400 calls, random keys/values, exact at backend and back", not bad, "; ".join(bad[:3]))

        res = {}

        def worker(k):
            chk = channel(P, options=BIG_MD)
            res[k] = churn(stub(chk), be, 150, 100 + k, f"w{k}")
            chk.close()
        run_threads([lambda k=k: worker(k) for k in range(4)], 120)
        allbad = [b for v in res.values() for b in v]
        c.record("metadata churn from 4 channels concurrently (shared upstream connection)", not allbad and len(res) == 4,
                 "; ".join(allbad[:3]))

        for size in (20_000, 70_000):
            def big(size=size):
                md = [("x-e-big", "B" * size), ("x-e-big2", "C" * 100), ("x-e-big-bin", bytes(range(256)) * 8)]
                _, call = s.Unary.with_call(echo_pb2.EchoRequest(), metadata=md + [("x-md-echo", "1"), ("x-call-id", f"big{size}")], timeout=TO)
                got_b = sorted((k, v) for k, v in be.servicer.calls[f"big{size}"].metadata if k.startswith("x-e-"))
                got_i = sorted((k, v) for k, v in call.initial_metadata() if k.startswith("x-e-"))
                got_t = sorted((k, v) for k, v in call.trailing_metadata() if k.startswith("x-e-"))
                return got_b == sorted(md) and got_i == sorted(md) and got_t == sorted(md), \
                    f"backend={got_b == sorted(md)} init={got_i == sorted(md)} trail={got_t == sorted(md)}"
            c.check(f"{size // 1000} KB metadata (CONTINUATION frames) both ways", big)
        bad = churn(s, be, 50, 7, "after-big")
        c.record("connection still healthy after big header blocks (50 churn calls)", not bad, "; ".join(bad[:3]))

        def many_paths():
            errs = []
            for i in range(200):
                m = ch.unary_unary(f"/echo.Echo/NoSuchMethod{i}")
                try:
                    m(b"", timeout=TO)
                    errs.append(f"{i}: OK?")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        errs.append(f"{i}: {rpc_error_desc(e)}")
                if i % 20 == 0:
                    if s.Unary(echo_pb2.EchoRequest(payload=b"%d" % i), timeout=TO).payload != b"%d" % i:
                        errs.append(f"{i}: echo mismatch")
            return not errs, "; ".join(errs[:3])
        c.check("200 distinct method paths (backend answers UNIMPLEMENTED), interleaved real calls OK", many_paths)
        ch.close()

        for label, opts in (("client hpack decoder table 0", [("grpc.http2.hpack_table_size.decoder", 0)]),
                            ("client hpack decoder table 100", [("grpc.http2.hpack_table_size.decoder", 100)]),
                            ("client hpack encoder table 0", [("grpc.http2.hpack_table_size.encoder", 0)])):
            def small_table(opts=opts, label=label):
                chs = channel(P, options=opts + BIG_MD)
                b = churn(stub(chs), be, 150, 33, label.replace(" ", "_"))
                chs.close()
                return not b, "; ".join(b[:3])
            c.check(f"{label}: 150 churn calls", small_table)

    # backend announcing small HPACK tables
    for label, opts in (("backend hpack decoder table 0", [("grpc.http2.hpack_table_size.decoder", 0)]),
                        ("backend hpack decoder table 100", [("grpc.http2.hpack_table_size.decoder", 100)])):
        with echo_setup("t9b", P, ADMIN, B1, opts + BIG_MD, BIG_MD) as (be, px, ch), c.guard(f"{label} harness"):
            b = churn(stub(ch), be, 150, 44, label.replace(" ", "_"))
            c.record(f"{label}: 150 churn calls", not b, "; ".join(b[:3]))
        px.print_log(limit=5)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
