"""8d. Misc things a grpcio user hits: server reflection through the proxy, bursts of deadline-cancelled
calls, listener max_concurrent_streams small, health_check mode=watch and service name, HTTP/1.1 -> 505,
SIGTERM drain with an in-flight call.
Run: ./venv/bin/python t8_misc.py"""
import collections
import socket
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2

from lib import (Backend, Checker, Proxy, channel, echo_pb2, gate_config, outcomes, rpc_error_desc,
                 run_threads, stream_in_background, stub, teardown)

P, P2, ADMIN = 21300, 21301, 21309
B1, B2 = 21302, 21303
TO = 5


HC = '[clusters.health_check]\nmode = "watch"\ninterval = "1s"\ntimeout = "500ms"\nservice = "echo.Echo"'
CONFIG = gate_config(ADMIN, [("edge", P, [{"cluster": "echo"}], ""),
                             ("narrow", P2, [{"cluster": "echo"}], "max_concurrent_streams = 2")],
                     [("echo", [B1, B2], HC)], top='drain_timeout = "10s"')


def main():
    c = Checker("t8_misc")
    b1 = Backend(B1, name="b1", health=True, reflection=True)
    b2 = Backend(B2, name="b2", health=True, reflection=True)
    px = Proxy("t8misc", CONFIG, P, ADMIN)
    ch = channel(P)
    s = stub(ch)
    with teardown(ch, px, b1, b2), c.guard("t8_misc harness"):
        px.wait_metric("grpcgate_endpoint_healthy", 2, 5, cluster="echo")

        # ---- reflection
        def reflection():
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
            rs = reflection_pb2_grpc.ServerReflectionStub(ch)
            reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="echo.Echo")]
            resps = list(rs.ServerReflectionInfo(iter(reqs), timeout=TO))
            names = [x.name for x in resps[0].list_services_response.service]
            fds = resps[1].file_descriptor_response.file_descriptor_proto
            return "echo.Echo" in names and len(fds) >= 1, f"services={names} fds={len(fds)}"
        c.check("server reflection (bidi ServerReflectionInfo) through the proxy", reflection)

        # ---- health watch mode + service name
        def watch_mode():
            t0 = time.monotonic()
            b2.set_serving(False, "echo.Echo")
            ok = px.wait_metric("grpcgate_endpoint_healthy", 0, 3, 0.02, cluster="echo", endpoint=f"127.0.0.1:{B2}")
            el = time.monotonic() - t0
            cnt = collections.Counter(s.Unary(echo_pb2.EchoRequest(), timeout=TO).backend for _ in range(10))
            b2.set_serving(True, "echo.Echo")
            ok2 = px.wait_metric("grpcgate_endpoint_healthy", 2, 3, 0.02, cluster="echo")
            return ok and el < 0.8 and cnt == {"b1": 10} and ok2, f"unhealthy after {el:.2f}s; {dict(cnt)}; back={ok2}"
        c.check("health_check mode=watch, service=echo.Echo: NOT_SERVING applied at once, traffic moves, recovers", watch_mode)

        def other_service_not_affecting():
            b1.set_serving(False, "")   # whole-server status; the checked service is echo.Echo
            time.sleep(1.5)
            v = px.metric("grpcgate_endpoint_healthy", cluster="echo", endpoint=f"127.0.0.1:{B1}")
            b1.set_serving(True, "")
            return v == 1, f"healthy={v}"
        c.check("health_check service=echo.Echo: only that service's status matters", other_service_not_affecting)

        # ---- burst of deadline-cancelled calls (client RST_STREAM + proxy CANCEL upstream)
        def cancel_storm():
            res = collections.Counter()
            lock = threading.Lock()

            def worker():
                for _ in range(15):
                    try:
                        s.Unary(echo_pb2.EchoRequest(delay_ms=300), timeout=0.03)
                        k = "OK"
                    except grpc.RpcError as e:
                        k = e.code().name
                    with lock:
                        res[k] += 1
            run_threads([worker] * 10, 30)
            errs = []
            for _ in range(40):
                try:
                    s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                except grpc.RpcError as e:
                    errs.append(rpc_error_desc(e))
            return res == {"DEADLINE_EXCEEDED": 150} and not errs, f"storm={dict(res)} after={errs[:3]}"
        c.check("150 calls with 30ms deadline (10 concurrent), then 40 normal calls all OK", cancel_storm)

        def inflight_zero():
            ok = px.wait_metric("grpcgate_endpoint_in_flight", 0, 3, cluster="echo")
            return ok, str(px.metric("grpcgate_endpoint_in_flight", cluster="echo"))
        c.check("in-flight gauge 0 after the storm", inflight_zero)

        # ---- listener max_concurrent_streams = 2
        def narrow():
            ch2 = channel(P2)
            s2 = stub(ch2)
            t0 = time.monotonic()
            res = outcomes([s2.Unary.future(echo_pb2.EchoRequest(delay_ms=200), timeout=TO) for _ in range(10)])
            el = time.monotonic() - t0
            ch2.close()
            # 10 calls, 2 at a time, 200ms each -> ~1s
            return res == {"OK": 10} and el >= 0.9, f"{dict(res)} in {el:.2f}s"
        c.check("listener max_concurrent_streams=2: grpcio queues, 10 concurrent calls all OK (~1s)", narrow)

        # ---- HTTP/1.1 -> 505
        def http1():
            with socket.create_connection(("127.0.0.1", P), timeout=TO) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(TO)
                data = b""
                while True:
                    d = sock.recv(4096)
                    if not d:
                        break
                    data += d
            return data.startswith(b"HTTP/1.1 505"), data[:60]
        c.check("HTTP/1.1 request -> 505", http1)

        # ---- proxy's own health via grpcio's health client on the listener (cluster name)
        def own_health():
            from grpc_health.v1 import health_pb2_grpc
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="echo"), timeout=TO)
            return r.status == health_pb2.HealthCheckResponse.SERVING, str(r.status)
        c.check("Health/Check on the listener for a cluster name -> SERVING", own_health)

        # ---- drain on SIGTERM with an in-flight call
        def drain():
            t, res = stream_in_background(s, echo_pb2.EchoRequest(count=10, delay_ms=150), 10)
            time.sleep(0.3)
            t0 = time.monotonic()
            px.proc.send_signal(15)
            time.sleep(0.2)
            st, body = px.http_get("/ready")
            refused = False
            try:
                socket.create_connection(("127.0.0.1", P), timeout=1).close()
            except OSError:
                refused = True
            t.join(12)
            try:
                rc = px.proc.wait(12)
            except Exception:  # noqa: BLE001
                rc = None
            el = time.monotonic() - t0
            return (res.get("n") == 10 and st == 503 and refused and rc == 0 and el < 5,
                    f"stream={res} ready={st} {body.strip()!r} new-conn-refused={refused} rc={rc} exit after {el:.2f}s")
        c.check("SIGTERM: /ready 503, new connections refused, in-flight stream completes, exit 0", drain)
    px.print_log()
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
