"""Repro: grpcgate's own grpc.health.v1.Health/Check rejects a request that a grpcio client sent
compressed (channel compression=Gzip): UNIMPLEMENTED "grpcgate: compressed health check requests are not
supported", where a grpcio server answers. C-core compresses only when it pays off, so it shows with a
compressible service name (here a 40-char cluster name) -- or any client that always compresses.
Run: ./venv/bin/python repro_health_gzip.py"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lib import Backend, Proxy, basic_config, rpc_error_desc, teardown

P, ADMIN, B1 = 21380, 21389, 21381
NAME = "a" * 40


def main():
    be = Backend(B1, health=True)
    be.health.set(NAME, health_pb2.HealthCheckResponse.SERVING)
    px = Proxy("repro-health-gzip", basic_config(P, ADMIN, [(NAME, [B1], "")]), P, ADMIN)
    rc = 0
    with teardown(px, be):
        for port, label in ((B1, "grpcio server"), (P, "grpcgate")):
            for comp in (None, grpc.Compression.Gzip):
                ch = grpc.insecure_channel(f"127.0.0.1:{port}", compression=comp)
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME), timeout=3)
                    out = f"OK status={health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"
                except grpc.RpcError as e:
                    out = rpc_error_desc(e)
                    rc = 1
                print(f"{label:14} compression={comp}: {out}")
                ch.close()
    print("RESULT:", "FAIL" if rc else "PASS")
    return rc


if __name__ == "__main__":
    sys.exit(main())
