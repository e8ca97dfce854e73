"""14. grpc.aio (asyncio) server as the backend and grpc.aio client through grpcgate: four call types,
metadata both ways, status, deadline and cancellation.
Run: ./venv/bin/python t14_aio.py"""
import asyncio
import sys

import grpc
import grpc.aio

from lib import Checker, Proxy, basic_config, echo_pb2, echo_pb2_grpc

P, ADMIN, B1 = 21480, 21489, 21481
TO = 10
cancelled = asyncio.Event()


class AioEcho(echo_pb2_grpc.EchoServicer):
    async def Unary(self, req, ctx):
        md = dict(ctx.invocation_metadata())
        await ctx.send_initial_metadata((("x-init", "i"), ("x-init-bin", b"\x00\xff")))
        ctx.set_trailing_metadata((("x-trail", md.get("x-e", "")), ("x-trail-bin", md.get("x-e-bin", b""))))
        if req.delay_ms:
            try:
                await asyncio.sleep(req.delay_ms / 1000)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        if req.fail_code:
            await ctx.abort(grpc.StatusCode(list(grpc.StatusCode)[req.fail_code].value), req.fail_message)
        return echo_pb2.EchoResponse(payload=req.payload, backend="aio")

    async def ServerStream(self, req, ctx):
        try:
            for i in range(req.count or 1):
                if req.delay_ms:
                    await asyncio.sleep(req.delay_ms / 1000)
                yield echo_pb2.EchoResponse(payload=req.payload, seq=i, backend="aio")
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def ClientStream(self, it, ctx):
        n = total = 0
        async for r in it:
            n += 1
            total += len(r.payload)
        return echo_pb2.EchoResponse(seq=n, total_bytes=total, backend="aio")

    async def Bidi(self, it, ctx):
        async for r in it:
            yield echo_pb2.EchoResponse(payload=r.payload, backend="aio")


async def amain(c):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    echo_pb2_grpc.add_EchoServicer_to_server(AioEcho(), server)
    server.add_insecure_port(f"127.0.0.1:{B1}")
    await server.start()
    px = Proxy("t14", basic_config(P, ADMIN, [("echo", [f"127.0.0.1:{B1}"], "")]), P, ADMIN)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{P}", options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    s = echo_pb2_grpc.EchoStub(ch)
    try:
        big = b"\x07" * (4 << 20)
        call = s.Unary(echo_pb2.EchoRequest(payload=big), metadata=(("x-e", "v"), ("x-e-bin", b"\x01\x02")), timeout=TO)
        r = await call
        init = await call.initial_metadata()
        trail = await call.trailing_metadata()
        c.record("aio unary 4 MiB + metadata both ways", r.payload == big and ("x-init-bin", b"\x00\xff") in tuple(init)
                 and ("x-trail", "v") in tuple(trail) and ("x-trail-bin", b"\x01\x02") in tuple(trail), f"init={init} trail={trail}")
        got = [m async for m in s.ServerStream(echo_pb2.EchoRequest(payload=b"s", count=500), timeout=TO)]
        c.record("aio server stream 500", len(got) == 500)

        async def gen():
            for _ in range(300):
                yield echo_pb2.EchoRequest(payload=b"c" * 100)
        r = await s.ClientStream(gen(), timeout=TO)
        c.record("aio client stream 300", r.seq == 300 and r.total_bytes == 30000, f"{r.seq}")
        got = [m async for m in s.Bidi(gen(), timeout=TO)]
        c.record("aio bidi 300", len(got) == 300)
        try:
            await s.Unary(echo_pb2.EchoRequest(fail_code=9, fail_message="ünïcode msg"), timeout=TO)
            c.record("aio status + message", False, "no error")
        except grpc.aio.AioRpcError as e:
            c.record("aio status + message", e.code() == grpc.StatusCode.FAILED_PRECONDITION and e.details() == "ünïcode msg", f"{e.code()} {e.details()!r}")
        try:
            await s.Unary(echo_pb2.EchoRequest(delay_ms=3000), timeout=0.3)
            c.record("aio deadline", False, "no error")
        except grpc.aio.AioRpcError as e:
            ok = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            try:
                await asyncio.wait_for(cancelled.wait(), 2)
            except asyncio.TimeoutError:
                ok = False
            c.record("aio deadline -> DEADLINE_EXCEEDED, backend coroutine cancelled", ok, f"{e.code()} backend cancelled={cancelled.is_set()}")
        cancelled.clear()
        call = s.ServerStream(echo_pb2.EchoRequest(count=1000, delay_ms=50))
        n = 0
        async for _ in call:
            n += 1
            if n == 3:
                break
        call.cancel()
        try:
            await asyncio.wait_for(cancelled.wait(), 2)
            ok = True
        except asyncio.TimeoutError:
            ok = False
        c.record("aio client cancel -> backend coroutine cancelled", ok)
    finally:
        await ch.close()
        px.stop()
        await server.stop(0)


def main():
    c = Checker("t14_aio")
    with c.guard("t14 harness"):
        asyncio.run(asyncio.wait_for(amain(c), 120))
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
