"""Repro: a grpcio backend with grpc.max_connection_idle_ms closes the proxy's idle pooled connection with
GOAWAY; a call the proxy sends on that connection at the same moment fails with UNAVAILABLE
("grpcgate: upstream ... closed the connection (GOAWAY ... connection idle)"). Talking to the backend
directly, the grpcio client retries such a never-processed stream transparently and the call succeeds.

Calls are spaced ~1 s apart (backend idle timeout 500 ms) to hit the race; it does not hit every time.
Run: ./venv/bin/python repro_idle_goaway.py [iterations] [gap-seconds] [--direct]"""
import collections
import random
import sys
import time

import grpc

from lib import Backend, Proxy, basic_config, channel, echo_pb2, stub, teardown

P, ADMIN, B1 = 21560, 21569, 21561
IDLE_MS = 500


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 60
    direct = "--direct" in sys.argv
    global GAP
    GAP = float(args[1]) if len(args) > 1 else 1.0
    be = Backend(B1, options=[("grpc.max_connection_idle_ms", IDLE_MS)])
    px = None if direct else Proxy("repro-idle", basic_config(P, ADMIN, [("echo", [be.addr], "")]), P, ADMIN)
    ch = channel(B1 if direct else P)
    s = stub(ch)
    res = collections.Counter()
    examples = []
    rnd = random.Random(5)
    with teardown(ch, px, be):
        for i in range(n):
            try:
                s.Unary(echo_pb2.EchoRequest(), timeout=5)
                res["OK"] += 1
            except grpc.RpcError as e:
                res[e.code().name] += 1
                if len(examples) < 2:
                    examples.append(e.details())
            time.sleep(GAP * rnd.uniform(0.9, 1.1))
    print(f"{'direct' if direct else 'via grpcgate'}: {n} calls -> {dict(res)}")
    for ex in examples:
        print("   e.g.", ex)
    bad = n - res["OK"]
    print("RESULT:", "FAIL" if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
