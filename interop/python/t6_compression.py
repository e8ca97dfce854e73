"""6. Compression: gzip/deflate client requests, server-compressed responses, all call types.
Run: ./venv/bin/python t6_compression.py"""
import os
import sys

import grpc

from lib import BIG_OPTS, Backend, Checker, Proxy, basic_config, channel, echo_pb2, stub, teardown

P, ADMIN, B1, B2 = 21200, 21209, 21201, 21202
TO = 20


def main():
    c = Checker("t6_compression")
    be = Backend(B1, options=BIG_OPTS)                                      # compresses per call (x-compress)
    bz = Backend(B2, options=BIG_OPTS, compression=grpc.Compression.Gzip)   # compresses everything
    routes = [{"service": "echo.Echo", "method": "Bidi", "cluster": "gz"}, {"cluster": "echo"}]
    px = Proxy("t6", basic_config(P, ADMIN, [("echo", [be.addr], ""), ("gz", [bz.addr], "")], routes), P, ADMIN)
    with teardown(px, be, bz), c.guard("t6 harness"):
        for comp in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            ch = channel(P, compression=comp)
            s = stub(ch)
            data = b"A" * (1 << 20) + os.urandom(1000)
            for srv in (False, True):
                md = [("x-compress", "1")] if srv else []
                tag = f"{comp.name} client" + (" + gzip server" if srv else "")

                def unary(md=md):
                    r = s.Unary(echo_pb2.EchoRequest(payload=data), metadata=md, timeout=TO)
                    return r.payload == data, f"len={len(r.payload)}"
                c.check(f"{tag}: unary 1 MiB compressible", unary)

                def sstream(md=md):
                    got = list(s.ServerStream(echo_pb2.EchoRequest(payload=b"x" * 5000, count=50), metadata=md, timeout=TO))
                    return len(got) == 50 and all(g.payload == b"x" * 5000 for g in got), f"n={len(got)}"
                c.check(f"{tag}: server stream 50 msgs", sstream)

                def cstream(md=md):
                    r = s.ClientStream((echo_pb2.EchoRequest(payload=b"y" * 10000) for _ in range(50)), metadata=md, timeout=TO)
                    return r.seq == 50 and r.total_bytes == 500000, f"seq={r.seq}"
                c.check(f"{tag}: client stream 50 msgs", cstream)

            def bidi_gz():
                got = list(s.Bidi((echo_pb2.EchoRequest(payload=b"z" * 20000) for _ in range(30)), timeout=TO))
                return len(got) == 30 and all(g.payload == b"z" * 20000 for g in got), f"n={len(got)}"
            c.check(f"{comp.name} client, server with compression=Gzip: bidi 30 msgs", bidi_gz)

            def per_call_none():
                r = s.Unary(echo_pb2.EchoRequest(payload=b"q" * 1000), compression=grpc.Compression.NoCompression, timeout=TO)
                return r.payload == b"q" * 1000
            c.check(f"{comp.name} channel, per-call NoCompression", per_call_none)
            ch.close()
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
