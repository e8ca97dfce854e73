"""8c. Backend restart mid-traffic: single backend (calls fail UNAVAILABLE while down, succeed soon after
restart) and two backends (traffic fails over; in-flight stream on the killed one ends UNAVAILABLE).
Run: ./venv/bin/python t8_restart.py"""
import collections
import sys
import threading
import time

import grpc

from lib import Backend, Checker, Proxy, basic_config, channel, echo_pb2, stop_all, stream_in_background, stub

P, ADMIN, B1, B2 = 21280, 21289, 21281, 21282
TO = 5


class Traffic:
    """Sequential unary calls every 20ms in a thread; records (t, outcome)."""

    def __init__(self, s):
        self.s = s
        self.log = []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        while not self.stop_ev.is_set():
            t = time.monotonic()
            try:
                r = self.s.Unary(echo_pb2.EchoRequest(), timeout=TO)
                self.log.append((t, "OK:" + r.backend))
            except grpc.RpcError as e:
                self.log.append((t, f"{e.code().name}: {e.details()}"))
            time.sleep(0.02)

    def stop(self):
        self.stop_ev.set()
        self.t.join(TO + 2)


def main():
    c = Checker("t8_restart")
    b1 = Backend(B1, name="b1")
    b2 = Backend(B2, name="b2")
    px = None
    with c.guard("t8_restart harness"):
        # --- single backend
        px = Proxy("t8rs-single", basic_config(P, ADMIN, [("echo", [b1.addr], "")]), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        tr = Traffic(s)
        time.sleep(0.5)
        st, stream = stream_in_background(s, echo_pb2.EchoRequest(count=50, delay_ms=100), 20)
        time.sleep(0.5)
        t_down = time.monotonic()
        b1.stop(0)
        time.sleep(1.0)
        b1.start()
        t_up = time.monotonic()
        time.sleep(7)
        tr.stop()
        st.join(25)
        down = [o for t, o in tr.log if t_down + 0.1 < t < t_up - 0.1]
        after = [(t - t_up, o) for t, o in tr.log if t > t_up]
        first_ok = next((t for t, o in after if o.startswith("OK")), None)
        tail = [o for t, o in after if t > 6.0]
        c.record("single backend down: calls fail UNAVAILABLE", down and all(o.startswith("UNAVAILABLE") for o in down),
                 f"{collections.Counter(o.split(':')[0] for o in down)}")
        c.record("single backend restarted: calls succeed again within 6s (connect backoff <= 5s)",
                 first_ok is not None and first_ok < 6 and tail and all(o.startswith("OK") for o in tail),
                 f"first OK {first_ok if first_ok is None else round(first_ok, 2)}s after restart; after-6s outcomes={collections.Counter(tail)}")
        c.record("in-flight stream on the killed backend ends UNAVAILABLE (not hang, not OK)",
                 stream.get("code") == "UNAVAILABLE", str(stream))
        errs_after_first_ok = [o for t, o in after if first_ok is not None and t > first_ok and not o.startswith("OK")]
        c.record("no failures after the first success post-restart", not errs_after_first_ok, str(errs_after_first_ok[:3]))
        ch.close()
        px.stop()

        # --- two backends: failover
        px = Proxy("t8rs-two", basic_config(P, ADMIN, [("echo", [b1.addr, b2.addr], "")]), P, ADMIN)
        ch = channel(P)
        s = stub(ch)
        for _ in range(10):
            s.Unary(echo_pb2.EchoRequest(), timeout=TO)
        tr = Traffic(s)
        time.sleep(0.5)
        t_down = time.monotonic()
        b2.stop(0)
        time.sleep(2.0)
        b2.start()
        t_up = time.monotonic()
        time.sleep(7)
        tr.stop()
        down = [o for t, o in tr.log if t_down < t < t_up]
        bad = [o for o in down if not o.startswith("OK")]
        after = [o for t, o in tr.log if t > t_up + 6]
        c.record("two backends, one stopped: calls fail over to the other (no errors)", not bad,
                 f"{len(down)} calls, errors={collections.Counter(bad)}")
        c.record("stopped backend restarted: gets traffic again", "OK:b2" in after and all(o.startswith("OK") for o in after),
                 f"{collections.Counter(after)}")
        ch.close()
    stop_all(px, b1, b2)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
