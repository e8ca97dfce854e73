"""Repro (upload direction): client-streaming calls whose backend handler stops reading stall the
client's other calls through grpcgate; direct to the grpcio backend they do not.

N client-streaming calls each try to send 30 x 1 MiB; the backend reads the first message, then sleeps
20 s without reading. Then one unary call (5 s deadline) on the same client connection.

Run: ./venv/bin/python repro_hol_upload.py [N] [--direct]"""
import sys
import threading
import time

import grpc

from lib import BIG_OPTS, Backend, Proxy, basic_config, channel, echo_pb2, rpc_error_desc, stop_all, stub

P, ADMIN, B1 = 21370, 21379, 21371


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 16
    direct = "--direct" in sys.argv
    be = Backend(B1, options=BIG_OPTS, workers=n + 10)
    px = None if direct else Proxy("repro-hol-up", basic_config(P, ADMIN, [("echo", [be.addr], "")]), P, ADMIN)
    port = B1 if direct else P
    ch = channel(port)
    s = stub(ch)
    stop = threading.Event()
    futs = []
    ok = False
    try:
        def gen():
            yield echo_pb2.EchoRequest(payload=b"u" * (1 << 20), delay_ms=20000)   # backend sleeps after this one
            for _ in range(29):
                if stop.is_set():
                    return
                yield echo_pb2.EchoRequest(payload=b"u" * (1 << 20))
        for _ in range(n):
            futs.append(s.ClientStream.future(gen(), timeout=30))
        time.sleep(2.0)
        t0 = time.monotonic()
        try:
            s.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            print(f"unary: OK in {time.monotonic() - t0:.2f}s")
            ok = True
        except grpc.RpcError as e:
            print(f"unary: {rpc_error_desc(e)} after {time.monotonic() - t0:.2f}s")
    finally:
        stop.set()
        for f in futs:
            f.cancel()
        stop_all(ch, px, be)
    print("RESULT:", "PASS" if ok else "FAIL", f"(N={n}, {'direct' if direct else 'via grpcgate'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
