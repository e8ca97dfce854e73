#!/usr/bin/env python3
"""echo.Echo/Unary calls with Python grpcio, for deploy/test-image.sh and deploy/ci-checks.sh.

    grpc_call.py TARGET [--delay-ms N] [--fail-code N] [--timeout S] [--payload TEXT]
    grpc_call.py TARGET --calls N [--parallel P] [--delay-ms N] [--fail-code N]

Sends an echo.EchoRequest (proto/echo.proto) built by hand, so no generated stubs are needed. One call
prints one line: `OK backend=<name> payload=<text> seconds=<t>` and exits 0, or `FAIL <status> <details>`
and exits 1. --delay-ms asks the echo backend to wait that long before answering (a call in flight for
the drain check); --fail-code asks it to answer with that gRPC status instead.
With --calls, makes N calls on one channel, P at a time, prints the count of each final status
(`OK=3 RESOURCE_EXHAUSTED=1`) and exits 0 whatever they were.
"""
import argparse
import sys
import time

import grpc


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(payload: bytes, delay_ms: int, fail_code: int = 0) -> bytes:
    # field 1 (payload, bytes), field 3 (delay_ms, uint32), field 4 (fail_code, int32)
    msg = b"\x0a" + varint(len(payload)) + payload
    if delay_ms:
        msg += b"\x18" + varint(delay_ms)
    if fail_code:
        msg += b"\x20" + varint(fail_code)
    return msg


def decode_fields(data: bytes) -> dict:
    """The length-delimited and varint fields of a protobuf message, by field number."""
    fields, i = {}, 0
    while i < len(data):
        key, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, shift = 0, 0
            while True:
                b = data[i]
                i += 1
                val |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            fields[num] = val
        elif wire == 2:
            ln, shift = 0, 0
            while True:
                b = data[i]
                i += 1
                ln |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            fields[num] = data[i : i + ln]
            i += ln
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--payload", default="hello through the container")
    ap.add_argument("--fail-code", type=int, default=0)
    ap.add_argument("--calls", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    if args.calls:
        return many(args)
    start = time.monotonic()
    with grpc.insecure_channel(args.target) as channel:
        # No serializers: the request and the response are raw bytes.
        call = channel.unary_unary("/echo.Echo/Unary")
        try:
            raw = call(
                encode_request(args.payload.encode(), args.delay_ms, args.fail_code),
                timeout=args.timeout,
                wait_for_ready=False,
            )
        except grpc.RpcError as e:
            print(f"FAIL {e.code().name} {e.details()!r} seconds={time.monotonic() - start:.2f}")
            return 1
    fields = decode_fields(raw)
    payload = fields.get(1, b"").decode(errors="replace")
    backend = fields.get(2, b"").decode(errors="replace")
    print(f"OK backend={backend} payload={payload!r} seconds={time.monotonic() - start:.2f}")
    if payload != args.payload:
        print("FAIL payload not echoed", file=sys.stderr)
        return 1
    return 0


def many(args) -> int:
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    request = encode_request(args.payload.encode(), args.delay_ms, args.fail_code)
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary("/echo.Echo/Unary")

        def one(_):
            try:
                call(request, timeout=args.timeout)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            counts = Counter(pool.map(one, range(args.calls)))
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
