"""Rolling restart of two grpcio backends behind grpcgate (server.stop(grace=2s): GOAWAY, in-flight calls may
finish), with 4 callers making short (20 ms) calls. With a grace period longer than any call, no call
should fail because of the proxy (errors whose message starts with "grpcgate:"). Rarely (~1 in 3,000 calls)
a call that reaches a grpcio server in the instant between its shutdown GOAWAY and final GOAWAY is answered
CANCELLED by the server itself (trailers-only + RST_STREAM(NO_ERROR), seen in h2 debug logs); the proxy
passes that through unchanged, so it is not counted as a proxy failure.
Run: ./venv/bin/python repro_rolling_restart.py [rounds]"""
import collections
import sys
import threading
import time

import grpc

from lib import Backend, Proxy, basic_config, channel, echo_pb2, series, stop_all, stub

P, ADMIN, B1, B2 = 21600, 21609, 21601, 21602


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    bs = [Backend(B1, name="b1"), Backend(B2, name="b2")]
    import os
    px = Proxy("repro-rolling", basic_config(P, ADMIN, [("echo", [bs[0].addr, bs[1].addr], "")]), P, ADMIN,
               env={"RUST_LOG": os.environ.get("RUST_LOG", "info")})
    ch = channel(P)
    s = stub(ch)
    res = collections.Counter()
    examples = collections.Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def caller():
        while not stop.is_set():
            try:
                s.Unary(echo_pb2.EchoRequest(delay_ms=20), timeout=5)
                k = "OK"
            except grpc.RpcError as e:
                k = e.code().name + (" (grpcgate)" if (e.details() or "").startswith("grpcgate:") else " (backend)")
                with lock:
                    examples[f"{time.strftime('%H:%M:%S', time.gmtime())}{time.time() % 1:.3f} {e.details()[:160]} | trailers={e.trailing_metadata()} | {e.debug_error_string()[:300]}"] += 1
            with lock:
                res[k] += 1
    ts = [threading.Thread(target=caller) for _ in range(4)]
    for t in ts:
        t.start()
    try:
        for r in range(rounds):
            for b in bs:
                time.sleep(0.7)
                b.server.stop(2.0)        # graceful: GOAWAY, in-flight calls get 2 s
                time.sleep(0.3)
                b.server = None
                b.start()                 # same port, new server
        time.sleep(0.7)
    finally:
        stop.set()
        for t in ts:
            t.join(10)
        ch.close()
        status = [(l["endpoint"], l["grpc_status"], v) for l, v in series(px.metrics(), "grpcgate_requests_total")]
        stop_all(px, *bs)
    print(f"{rounds} rolling rounds: {dict(res)}")
    print("   proxy counted:", status)
    for ex, n in examples.most_common(4):
        print(f"   {n} x {ex}")
    bad = sum(v for k, v in res.items() if "(grpcgate)" in k)
    print("RESULT:", "FAIL" if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
