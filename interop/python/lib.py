"""Shared helpers for the grpcgate <-> Python grpcio interop checks.

Backends are grpcio servers running in-process (threads); grpcgate runs as a subprocess with a generated
config. Every wait is bounded. Ports: each script passes its own base in 21000-21999.
"""
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from concurrent import futures

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))          # <repo>/interop/python
REPO = os.path.dirname(os.path.dirname(HERE))                # <repo>
sys.path.insert(0, HERE)
try:
    import echo_pb2  # noqa: E402  (generated from <repo>/proto/echo.proto by setup.sh; not committed)
    import echo_pb2_grpc  # noqa: E402
except ImportError as e:
    raise SystemExit(f"{e}: run `bash {os.path.join(HERE, 'setup.sh')}` first "
                     "(creates ./venv and generates echo_pb2*.py from proto/echo.proto)") from e

BINARY = os.environ.get("GRPCGATE", os.path.join(REPO, "target", "release", "grpcgate"))
RUN_DIR = os.path.join(HERE, "run")   # generated configs, proxy logs, t7 certificates (git-ignored)
os.makedirs(RUN_DIR, exist_ok=True)

CODES = {c.value[0]: c for c in grpc.StatusCode}


# --------------------------------------------------------------------------------------------------
# result bookkeeping

class Checker:
    def __init__(self, script):
        self.script = script
        self.results = []

    def record(self, name, ok, detail=""):
        self.results.append((name, bool(ok), detail))
        tag = "PASS" if ok else "FAIL"
        print(f"[{tag}] {name}" + (f" -- {detail}" if detail else ""), flush=True)

    def check(self, name, fn):
        """Runs fn(); it returns (ok, detail) or raises (FAIL with the exception)."""
        try:
            r = fn()
            if isinstance(r, tuple):
                ok, detail = r
            else:
                ok, detail = bool(r), ""
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"exception: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        self.record(name, ok, detail)
        return ok

    @contextlib.contextmanager
    def guard(self, name):
        """`with c.guard("t1 harness"):` an exception in the block is recorded as a FAIL named `name`
        (with the traceback) and does not propagate."""
        try:
            yield
        except Exception as e:  # noqa: BLE001
            self.record(name, False, f"{rpc_error_desc(e)}\n{traceback.format_exc()}")

    def summary(self):
        fails = [r for r in self.results if not r[1]]
        print(f"\n== {self.script}: {len(self.results) - len(fails)} passed, {len(fails)} failed")
        for name, _, detail in fails:
            print(f"   FAIL {name}: {detail.splitlines()[0] if detail else ''}")
        return 1 if fails else 0


def rpc_error_desc(e):
    if isinstance(e, grpc.RpcError):
        try:
            return f"{e.code().name}: {e.details()!r}"
        except Exception:  # noqa: BLE001
            return repr(e)
    return repr(e)


def expect_error(code, fn):
    """For Checker.check: fn() must fail with grpc status `code`. Returns (ok, detail)."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code() == code, rpc_error_desc(e)
    return False, "no error"


def outcome(e=None, details=True):
    """"OK", or the status name of a grpc.RpcError followed by ": details" (if details)."""
    if e is None:
        return "OK"
    return f"{e.code().name}: {e.details()}" if details else e.code().name


def outcomes(futs, details=True):
    """Counter of the outcomes (see outcome) of call futures, waiting for each."""
    res = collections.Counter()
    for f in futs:
        try:
            f.result()
            res["OK"] += 1
        except grpc.RpcError as e:
            res[outcome(e, details)] += 1
    return res


def spread(s, n, timeout=5, **req):
    """n sequential Unary calls: (Counter of answering backends, Counter of error outcomes)."""
    cnt, errs = collections.Counter(), collections.Counter()
    for _ in range(n):
        try:
            cnt[s.Unary(echo_pb2.EchoRequest(**req), timeout=timeout).backend] += 1
        except grpc.RpcError as e:
            errs[outcome(e)] += 1
    return cnt, errs


def run_threads(targets, timeout):
    """Runs every callable in targets in its own thread, all at once, and joins them (each join bounded)."""
    ts = [threading.Thread(target=t) for t in targets]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)


def stream_in_background(s, req, timeout):
    """Reads s.ServerStream(req) to its end in a thread. Returns (thread, result); result gets "n" (messages
    read), or "err" (rpc_error_desc) and "code" (status name) when the call fails."""
    res = {}

    def run():
        try:
            res["n"] = len(list(s.ServerStream(req, timeout=timeout)))
        except grpc.RpcError as e:
            res["err"] = rpc_error_desc(e)
            res["code"] = e.code().name
    t = threading.Thread(target=run)
    t.start()
    return t, res


def stop_all(*things):
    """Closes channels and stops proxies / backends, in the order given (None is skipped)."""
    for t in things:
        if t is not None:
            (t.close if hasattr(t, "close") else t.stop)()


@contextlib.contextmanager
def teardown(*things):
    """`with teardown(ch, px, be):` stop_all(ch, px, be) when the block ends (also on an exception, which
    propagates)."""
    try:
        yield
    finally:
        stop_all(*things)


# --------------------------------------------------------------------------------------------------
# backends

class CallRecord:
    def __init__(self):
        self.metadata = None
        self.time_remaining = None
        self.cancelled = threading.Event()    # handler saw is_active() == False before finishing
        self.terminated = threading.Event()   # add_callback fired
        self.started = threading.Event()
        self.received = 0
        self.sent = 0


class EchoServicer(echo_pb2_grpc.EchoServicer):
    """Behaviour is driven by request fields (delay_ms, count, fail_code, fail_message) and metadata:
    x-call-id: key under which the call is recorded in self.calls
    x-md: send fixed initial + trailing metadata (ascii and -bin)
    x-md-echo: echo every request metadata key starting with x-e- back as initial and trailing metadata
    x-compress: server compresses the response with gzip
    x-init-then-fail: send initial metadata, then fail with fail_code (no message)
    """
    INIT_MD = (("x-init-ascii", "hello init"), ("x-init-bin", b"\x00\x01\xfe\xff init"))
    TRAIL_MD = (("x-trail-ascii", "bye trail"), ("x-trail-bin", b"\xff\x00\x80 trail"))

    def __init__(self, name):
        self.name = name
        self.calls = {}
        self.count = 0
        self.lock = threading.Lock()
        self.fail_all = None   # a grpc.StatusCode: every Unary call fails with it

    # -- helpers
    def _start(self, ctx):
        md = tuple(ctx.invocation_metadata())
        mdd = {}
        for k, v in md:
            mdd.setdefault(k, v)
        rec = CallRecord()
        rec.metadata = md
        rec.time_remaining = ctx.time_remaining()
        ctx.add_callback(rec.terminated.set)
        with self.lock:
            self.count += 1
            cid = mdd.get("x-call-id")
            if cid:
                self.calls[cid] = rec
        rec.started.set()
        if "x-compress" in mdd:
            ctx.set_compression(grpc.Compression.Gzip)
        if "x-md" in mdd:
            ctx.send_initial_metadata(self.INIT_MD)
            ctx.set_trailing_metadata(self.TRAIL_MD)
        if "x-md-echo" in mdd:
            echo = [(k, v) for k, v in md if k.startswith("x-e-") or k in ("authorization", "cookie", "x-grpc-test-echo-initial", "x-grpc-test-echo-trailing-bin")]
            ctx.send_initial_metadata(echo)
            ctx.set_trailing_metadata(echo)
        return rec, mdd

    def _sleep(self, ctx, rec, ms):
        """Sleeps ms; returns False (and marks the record cancelled) if the call ends meanwhile."""
        end = time.monotonic() + ms / 1000.0
        while time.monotonic() < end:
            if not ctx.is_active():
                rec.cancelled.set()
                return False
            time.sleep(min(0.01, max(0, end - time.monotonic())))
        if not ctx.is_active():
            rec.cancelled.set()
            return False
        return True

    def _fail(self, ctx, req, mdd):
        if "x-init-then-fail" in mdd:
            ctx.send_initial_metadata(self.INIT_MD)
        if "x-details" in mdd:
            ctx.set_trailing_metadata(tuple(ctx_trailing_for_details(mdd["x-details"], req.fail_code)))
        ctx.abort(CODES[req.fail_code], req.fail_message)

    # -- methods
    def Unary(self, req, ctx):
        rec, mdd = self._start(ctx)
        if self.fail_all is not None:
            ctx.abort(self.fail_all, f"{self.name} failing")
        rec.received = 1
        if req.delay_ms and not self._sleep(ctx, rec, req.delay_ms):
            return echo_pb2.EchoResponse()
        if req.fail_code:
            self._fail(ctx, req, mdd)
        rec.sent = 1
        return echo_pb2.EchoResponse(payload=req.payload, backend=self.name, seq=0,
                                     total_bytes=len(req.payload))

    def ServerStream(self, req, ctx):
        rec, mdd = self._start(ctx)
        rec.received = 1
        n = req.count or 1
        for i in range(n):
            if req.delay_ms and not self._sleep(ctx, rec, req.delay_ms):
                return
            rec.sent += 1
            yield echo_pb2.EchoResponse(payload=req.payload, backend=self.name, seq=i)
        if req.fail_code:
            self._fail(ctx, req, mdd)

    def ClientStream(self, req_iter, ctx):
        rec, mdd = self._start(ctx)
        total = 0
        last = None
        try:
            for req in req_iter:
                rec.received += 1
                total += len(req.payload)
                last = req
                if "x-early" in mdd:
                    break
                if req.delay_ms and not self._sleep(ctx, rec, req.delay_ms):
                    return echo_pb2.EchoResponse()
        except Exception:  # noqa: BLE001  (the request stream broke: cancelled)
            rec.cancelled.set()
            raise
        if not ctx.is_active():
            rec.cancelled.set()
        if last is not None and last.fail_code:
            self._fail(ctx, last, mdd)
        rec.sent = 1
        return echo_pb2.EchoResponse(backend=self.name, seq=rec.received, total_bytes=total)

    def Bidi(self, req_iter, ctx):
        rec, mdd = self._start(ctx)
        try:
            for req in req_iter:
                rec.received += 1
                if req.fail_code:
                    self._fail(ctx, req, mdd)
                if req.delay_ms and not self._sleep(ctx, rec, req.delay_ms):
                    return
                for _ in range(req.count or 1):
                    rec.sent += 1
                    yield echo_pb2.EchoResponse(payload=req.payload, backend=self.name, seq=rec.sent - 1)
                if "x-early" in mdd:
                    if "x-early-fail" in mdd:
                        ctx.abort(grpc.StatusCode.ABORTED, "early end")
                    return
        except grpc.RpcError:
            raise
        except Exception:  # noqa: BLE001
            rec.cancelled.set()
            raise
        if not ctx.is_active():
            rec.cancelled.set()


def ctx_trailing_for_details(text, code=3):
    """grpc-status-details-bin built with grpcio-status (google.rpc.Status)."""
    from google.rpc import status_pb2, error_details_pb2
    from google.protobuf import any_pb2
    info = error_details_pb2.ErrorInfo(reason=text, domain="interop.test")
    a = any_pb2.Any()
    a.Pack(info)
    st = status_pb2.Status(code=code, message="bad arg", details=[a])
    return [("grpc-status-details-bin", st.SerializeToString())]


class Backend:
    def __init__(self, port, name=None, options=(), health=False, reflection=False, workers=32,
                 compression=None):
        self.port = port
        self.name = name or f"b{port}"
        self.options = list(options)
        self.health_enabled = health
        self.reflection = reflection
        self.workers = workers
        self.compression = compression
        self.servicer = EchoServicer(self.name)
        self.server = None
        self.health = None
        self.start()

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers),
                                  options=self.options, compression=self.compression)
        echo_pb2_grpc.add_EchoServicer_to_server(self.servicer, self.server)
        if self.health_enabled:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
            if self.health is None:
                self.health = health.HealthServicer()
                self.health.set("", health_pb2.HealthCheckResponse.SERVING)
                self.health.set("echo.Echo", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.reflection:
            from grpc_reflection.v1alpha import reflection
            names = (echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        bound = self.server.add_insecure_port(self.addr)
        if bound != self.port:
            raise RuntimeError(f"could not bind {self.addr}")
        self.server.start()

    def set_serving(self, serving, service=""):
        from grpc_health.v1 import health_pb2
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service, st)

    def stop(self, grace=0):
        if self.server is not None:
            self.server.stop(grace).wait(5)
            self.server = None


# --------------------------------------------------------------------------------------------------
# proxy

def wait_port(port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Proxy:
    def __init__(self, name, config_text, listen_port, admin_port=None, env=None):
        self.name = name
        self.path = os.path.join(RUN_DIR, f"{name}.toml")
        self.log_path = os.path.join(RUN_DIR, f"{name}.log")
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.write(config_text)
        self.log = open(self.log_path, "wb")
        e = dict(os.environ)
        e.setdefault("RUST_LOG", "info")
        if env:
            e.update(env)
        self.proc = subprocess.Popen([BINARY, "--config", self.path], stdout=self.log, stderr=self.log, env=e)
        if not wait_port(listen_port, 10):
            self.stop()
            raise RuntimeError(f"grpcgate did not listen on {listen_port}; log:\n{self.read_log()}")
        if admin_port and not wait_port(admin_port, 10):
            self.stop()
            raise RuntimeError(f"grpcgate admin did not listen on {admin_port}")

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def http_get(self, path, timeout=3):
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self):
        return parse_metrics(self.http_get("/metrics")[1])

    def metric(self, name, **labels):
        """metric() of a fresh scrape."""
        return metric(self.metrics(), name, **labels)

    def wait_metric(self, name, want, timeout, interval=0.1, **labels):
        """Waits (bounded) until metric(name, **labels) == want; True if it got there."""
        return wait_for(lambda: self.metric(name, **labels) == want, timeout, interval)

    def print_log(self, keep=lambda l: "WARN" in l or "ERROR" in l, limit=10, title="proxy log:"):
        """Prints the proxy log lines for which keep(line) is true (at most `limit`), if any."""
        lines = [l for l in self.read_log().splitlines() if keep(l)]
        if lines:
            print(title, *lines[:limit], sep="\n    ")

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value}"""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            head, value = line.rsplit(" ", 1)
            if "{" in head:
                name, rest = head.split("{", 1)
                rest = rest.rstrip("}")
                labels = {}
                # values never contain '",' sequences in our tests
                for part in filter(None, _split_labels(rest)):
                    k, v = part.split("=", 1)
                    labels[k] = v.strip('"')
            else:
                name, labels = head, {}
            out[(name, frozenset(labels.items()))] = float(value)
        except ValueError:
            continue
    return out


def _split_labels(s):
    parts, cur, inq = [], "", False
    for ch in s:
        if ch == '"':
            inq = not inq
        if ch == "," and not inq:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def metric(m, name, **labels):
    """Sum of the series of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for (n, ls), v in m.items():
        if n != name:
            continue
        d = dict(ls)
        if all(d.get(k) == str(val) for k, val in labels.items()):
            total += v
            found = True
    return total if found else None


def series(m, name):
    return [(dict(ls), v) for (n, ls), v in m.items() if n == name]


def _endpoint(e):
    """An endpoint for the TOML: a port (on 127.0.0.1), "host:port", or a dict (inline table, e.g. a weight)."""
    if isinstance(e, int):
        return f'"127.0.0.1:{e}"'
    if isinstance(e, dict):
        return "{ " + ", ".join(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in e.items()) + " }"
    return f'"{e}"'


def gate_config(admin_port, listeners, clusters, top=""):
    """grpcgate TOML. listeners: list of (name, port, routes, extra_toml); routes: list of dicts (every value
    written as a string). clusters: list of (name, [endpoint...], extra_toml), endpoints as for _endpoint."""
    lines = [top, "[admin]", f'listen = "127.0.0.1:{admin_port}"']
    for name, port, routes, extra in listeners:
        lines += ["", "[[listeners]]", f'name = "{name}"', f'listen = "127.0.0.1:{port}"', extra]
        for r in routes:
            lines.append("[[listeners.routes]]")
            for k, v in r.items():
                lines.append(f'{k} = "{v}"')
    for name, addrs, extra in clusters:
        lines += ["", "[[clusters]]", f'name = "{name}"',
                  "endpoints = [" + ", ".join(_endpoint(a) for a in addrs) + "]", extra]
    return "\n".join(lines) + "\n"


def basic_config(listen_port, admin_port, clusters, routes=None, extra_listener="", top=""):
    """One listener "edge". clusters: list of (name, [endpoint...], extra_toml). routes: list of dict or None
    (catch-all to the first cluster)."""
    if routes is None:
        routes = [{"cluster": clusters[0][0]}]
    return gate_config(admin_port, [("edge", listen_port, routes, extra_listener)], clusters, top)


BIG_OPTS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def channel(port, options=(), compression=None):
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=BIG_OPTS + list(options), compression=compression)


def stub(ch):
    return echo_pb2_grpc.EchoStub(ch)


@contextlib.contextmanager
def echo_setup(name, port, admin_port, backend_port, backend_opts=(), client_opts=(), **proxy_kw):
    """One Backend on backend_port (with backend_opts), proxy `name` on port/admin_port routing every call to
    it (cluster "echo"), and a client channel (with client_opts). Yields (backend, proxy, channel) and tears
    them down when the block ends."""
    be = Backend(backend_port, options=backend_opts)
    px = Proxy(name, basic_config(port, admin_port, [("echo", [be.addr], "")]), port, admin_port, **proxy_kw)
    ch = channel(port, options=client_opts)
    with teardown(ch, px, be):
        yield be, px, ch


def wait_for(fn, timeout, interval=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if fn():
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(interval)
    return False
