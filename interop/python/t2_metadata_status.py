"""2. Metadata (ascii, -bin) both ways, trailers, grpc-status / grpc-message (non-ASCII, every code,
status details), trailers-only responses.
Run: ./venv/bin/python t2_metadata_status.py"""
import sys

import grpc

from lib import Checker, echo_pb2, echo_setup, rpc_error_desc, stub, CODES, ctx_trailing_for_details

P, ADMIN, B1 = 21120, 21129, 21121
TO = 10

REQ_MD = [
    ("x-e-ascii", "hello world"),
    ("x-e-spaces", "  a  b  "),
    ("x-e-punct", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    ("x-e-empty", ""),
    ("x-e-bin", bytes(range(256))),
    ("x-e-empty-bin", b""),
    ("x-e-multi", "one"),
    ("x-e-multi", "two"),
    ("x-e-long", "L" * 4000),
    ("authorization", "Bearer abc.def.ghi"),
    ("cookie", "a=1; b=2; c=3"),
    ("x-grpc-test-echo-initial", "test_initial_metadata_value"),
    ("x-grpc-test-echo-trailing-bin", b"\x0a\x0b\x0a\x0b\x0a\x0b"),
]


ECHO_KEYS = ("authorization", "cookie", "x-grpc-test-echo-initial", "x-grpc-test-echo-trailing-bin")


def norm(md):
    return sorted((k, v) for k, v in md if k.startswith("x-e-") or k in ECHO_KEYS)


def main():
    c = Checker("t2_metadata_status")
    with echo_setup("t2", P, ADMIN, B1) as (be, px, ch), c.guard("t2 harness"):
        s = stub(ch)

        def req_md():
            md = REQ_MD + [("x-call-id", "md1")]
            s.Unary(echo_pb2.EchoRequest(payload=b"a"), metadata=md, timeout=TO)
            got = norm(be.servicer.calls["md1"].metadata)
            want = norm(REQ_MD)
            multi = [v for k, v in be.servicer.calls["md1"].metadata if k == "x-e-multi"]
            return got == want and multi == ["one", "two"], f"multi={multi} diff: missing={set(want) - set(got)} extra={set(got) - set(want)}"
        c.check("request metadata (ascii, -bin, empty, repeated, 4 KB) reaches backend unchanged", req_md)

        def std_headers():
            s.Unary(echo_pb2.EchoRequest(), metadata=[("x-call-id", "md2")], timeout=TO)
            keys = {k for k, _ in be.servicer.calls["md2"].metadata}
            ua = dict(be.servicer.calls["md2"].metadata).get("user-agent", "")
            return "user-agent" in keys and "grpc-python" in ua, f"keys={sorted(keys)} ua={ua!r}"
        c.check("user-agent reaches backend", std_headers)

        def resp_md_unary():
            r, call = s.Unary.with_call(echo_pb2.EchoRequest(), metadata=REQ_MD + [("x-md-echo", "1")], timeout=TO)
            init, trail = norm(call.initial_metadata()), norm(call.trailing_metadata())
            want = norm(REQ_MD)
            return init == want and trail == want, f"init={init[:3]}... trail_missing={set(want) - set(trail)}"
        c.check("unary: initial + trailing metadata (ascii, -bin) reach client unchanged", resp_md_unary)

        def resp_md_stream():
            call = s.ServerStream(echo_pb2.EchoRequest(count=3), metadata=[("x-md", "1")], timeout=TO)
            init = call.initial_metadata()
            msgs = list(call)
            trail = call.trailing_metadata()
            want_i = set(be.servicer.INIT_MD)
            want_t = set(be.servicer.TRAIL_MD)
            ok = want_i <= set(init) and want_t <= set(trail) and len(msgs) == 3
            return ok, f"init={init} trail={trail}"
        c.check("server stream: initial + trailing metadata reach client", resp_md_stream)

        def resp_md_bidi():
            call = s.Bidi(iter([echo_pb2.EchoRequest(), echo_pb2.EchoRequest()]), metadata=[("x-md", "1")], timeout=TO)
            msgs = list(call)
            ok = set(be.servicer.INIT_MD) <= set(call.initial_metadata()) and \
                set(be.servicer.TRAIL_MD) <= set(call.trailing_metadata()) and len(msgs) == 2
            return ok, f"init={call.initial_metadata()} trail={call.trailing_metadata()}"
        c.check("bidi: initial + trailing metadata reach client", resp_md_bidi)

        # every status code, with messages; trailers-only (abort before any message)
        messages = {
            "ascii": "plain message",
            "non-ascii": "größe ñ 日本語 \u2603",
            "percent": "100% done %41 %zz",
            "controls": "line1\nline2\ttab\r",
            "empty": "",
            "interop-special": "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001F608\t\n",
            "spaces": "  leading and trailing spaces  ",
        }
        for code_num in range(1, 17):
            code = CODES[code_num]

            def f(code=code, code_num=code_num):
                bad = []
                for mname, msg in messages.items():
                    try:
                        s.Unary(echo_pb2.EchoRequest(fail_code=code_num, fail_message=msg), timeout=TO)
                        bad.append(f"{mname}: no error")
                    except grpc.RpcError as e:
                        if e.code() != code or (e.details() or "") != msg:
                            bad.append(f"{mname}: got {e.code().name} {e.details()!r}")
                return not bad, "; ".join(bad)
            c.check(f"unary trailers-only status {code.name} with ascii/non-ascii/percent/control/empty message", f)

        def status_after_messages():
            call = s.ServerStream(echo_pb2.EchoRequest(count=2, fail_code=9, fail_message="après 2 ✓"),
                                  metadata=[("x-md", "1")], timeout=TO)
            got = []
            try:
                for m in call:
                    got.append(m)
                return False, "no error"
            except grpc.RpcError as e:
                ok = e.code() == grpc.StatusCode.FAILED_PRECONDITION and e.details() == "après 2 ✓" and len(got) == 2
                ok = ok and set(be.servicer.TRAIL_MD) <= set(e.trailing_metadata())
                return ok, f"{rpc_error_desc(e)} msgs={len(got)} trail={e.trailing_metadata()}"
        c.check("server stream: status + trailing md after 2 messages", status_after_messages)

        def init_then_fail():
            try:
                s.Unary(echo_pb2.EchoRequest(fail_code=10, fail_message="aborted after headers"),
                        metadata=[("x-init-then-fail", "1")], timeout=TO)
                return False, "no error"
            except grpc.RpcError as e:
                ok = e.code() == grpc.StatusCode.ABORTED and e.details() == "aborted after headers"
                init = e.initial_metadata()
                ok = ok and set(be.servicer.INIT_MD) <= set(init)
                return ok, f"{rpc_error_desc(e)} init={init}"
        c.check("headers then status with no message (not trailers-only)", init_then_fail)

        def details():
            try:
                s.Unary(echo_pb2.EchoRequest(fail_code=3, fail_message="bad arg"),
                        metadata=[("x-details", "why-x")], timeout=TO)
                return False, "no error"
            except grpc.RpcError as e:
                from grpc_status import rpc_status
                st = rpc_status.from_call(e)
                ok = e.code() == grpc.StatusCode.INVALID_ARGUMENT and st is not None and len(st.details) == 1
                want = dict(ctx_trailing_for_details("why-x"))["grpc-status-details-bin"]
                got = dict(e.trailing_metadata()).get("grpc-status-details-bin")
                return ok and got == want, f"{rpc_error_desc(e)} details={st}"
        c.check("grpc-status-details-bin (rich error details) passes through", details)

        def abort_with_status_in_stream():
            # bidi: fail on 2nd request after one response
            reqs = iter([echo_pb2.EchoRequest(payload=b"1"), echo_pb2.EchoRequest(fail_code=8, fail_message="quota")])
            got = []
            try:
                for m in s.Bidi(reqs, timeout=TO):
                    got.append(m)
                return False, "no error"
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.details() == "quota" and len(got) == 1, \
                    f"{rpc_error_desc(e)} got={len(got)}"
        c.check("bidi: status mid-stream", abort_with_status_in_stream)

        def cstream_fail():
            try:
                s.ClientStream(iter([echo_pb2.EchoRequest(), echo_pb2.EchoRequest(fail_code=7, fail_message="nope")]), timeout=TO)
                return False, "no error"
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == "nope", rpc_error_desc(e)
        c.check("client stream: trailers-only status", cstream_fail)

        def big_trailer_md():
            md = [("x-e-big", "T" * 4000), ("x-e-big-bin", bytes(1500))]
            _, call = s.Unary.with_call(echo_pb2.EchoRequest(), metadata=md + [("x-md-echo", "1")], timeout=TO)
            return norm(call.trailing_metadata()) == norm(md) and norm(call.initial_metadata()) == norm(md), \
                f"trail keys={[k for k, _ in call.trailing_metadata()]}"
        c.check("~6 KB metadata echoed in headers and trailers", big_trailer_md)
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
