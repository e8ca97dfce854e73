"""Repro: slow consumers stall other calls through grpcgate (head-of-line blocking on a shared HTTP/2
connection window), compared with the same clients talking to the backend directly.

N server-streaming calls of 1 MiB messages whose clients read one message and then stop reading; then
one unary call and one small stream on another channel, each with a 5 s deadline.

Run: ./venv/bin/python repro_hol.py [N] [--direct] [--separate-conns]
  --direct          clients talk to the grpcio backend directly (control)
  --separate-conns  every channel gets its own TCP connection (grpc.use_local_subchannel_pool)"""
import os
import sys
import time

import grpc

from lib import BIG_OPTS, Backend, Proxy, basic_config, channel, echo_pb2, metric, rpc_error_desc, stop_all, stub

P, ADMIN, B1 = 21360, 21369, 21361


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10
    direct = "--direct" in sys.argv
    sep = "--separate-conns" in sys.argv
    be = Backend(B1, options=BIG_OPTS, workers=n + 10)
    px = None if direct else Proxy("repro-hol", basic_config(P, ADMIN, [("echo", [be.addr], "")], top="workers = 1"), P, ADMIN,
                                   env={"RUST_LOG": os.environ.get("RUST_LOG", "info")})
    port = B1 if direct else P
    opts = [("grpc.use_local_subchannel_pool", 1)] if sep else []
    chs = [channel(port, options=opts) for _ in range(n)]
    calls = []
    ok = False
    try:
        for chx in chs:
            call = stub(chx).ServerStream(echo_pb2.EchoRequest(payload=b"h" * (1 << 20), count=30), timeout=30)
            next(iter(call))   # read one message, then stop reading
            calls.append(call)
        time.sleep(3.0)
        if px:
            m = px.metrics()
            print("downstream connections:", metric(m, "grpcgate_downstream_connections_active", listener="edge"))
        ch = channel(port, options=opts)
        t0 = time.monotonic()
        try:
            stub(ch).Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5)
            print(f"unary: OK in {time.monotonic() - t0:.2f}s")
            ok = True
        except grpc.RpcError as e:
            print(f"unary: {rpc_error_desc(e)} after {time.monotonic() - t0:.2f}s")
        ch.close()
    finally:
        for call in calls:
            call.cancel()
        stop_all(*chs, px, be)
    print("RESULT:", "PASS" if ok else "FAIL", f"(N={n}, {'direct' if direct else 'via grpcgate'}, "
          f"{'separate connections' if sep else 'shared subchannel'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
