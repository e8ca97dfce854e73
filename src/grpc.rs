//! The gRPC facts the proxy needs, in one place: status codes, `grpc-timeout`, `grpc-message` encoding,
//! trailers-only responses and the spec's mapping of HTTP/2 errors and HTTP statuses to gRPC codes.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

/// The canonical gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// Number of canonical codes; codes index arrays of per-status metric handles.
pub const CODE_COUNT: usize = 17;

impl Code {
    const ALL: [Code; CODE_COUNT] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code for a numeric value; anything out of range is UNKNOWN, as the spec says.
    pub fn from_i32(v: i32) -> Code {
        usize::try_from(v)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .unwrap_or(Code::Unknown)
    }

    /// Parses a `grpc-status` header value.
    pub fn from_header(v: &HeaderValue) -> Code {
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32)
    }

    /// The canonical upper-case name used as the `grpc_status` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The `grpc-status` header value for this code.
    pub fn header_value(self) -> HeaderValue {
        const DIGITS: [&str; CODE_COUNT] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        HeaderValue::from_static(DIGITS[self as usize])
    }
}

/// `grpc-status`
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// `grpc-encoding`: how a stream's messages are compressed.
pub static GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
/// `grpc-accept-encoding`: the encodings a peer can read.
pub static GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// Whether an HTTP/2 error says the peer refused the stream before any processing, so that the call
/// may be sent again: a GOAWAY whose last_stream_id is below it (RFC 9113 §6.8), or
/// RST_STREAM(REFUSED_STREAM) (§8.7).
pub fn refused(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// A status the proxy itself produces, with a human-readable message.
#[derive(Debug, Clone)]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// Adds `grpc-status` and the percent-encoded `grpc-message` to a header map.
    pub fn write_to(&self, headers: &mut HeaderMap) {
        headers.insert(GRPC_STATUS.clone(), self.code.header_value());
        if !self.message.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&encode_message(&self.message)) {
                headers.insert(GRPC_MESSAGE.clone(), v);
            }
        }
    }

    /// A trailers-only response: HTTP 200, `content-type: application/grpc` and the status, all in one
    /// HEADERS frame that ends the stream.
    pub fn to_trailers_only(&self) -> Response<()> {
        let mut resp = Response::new(());
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        self.write_to(headers);
        resp
    }

    /// Trailers carrying this status, for a response whose headers already went out.
    pub fn to_trailers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(2);
        self.write_to(&mut h);
        h
    }
}

/// Percent-encodes a `grpc-message` as the gRPC spec requires (everything outside 0x20..=0x7E, and '%').
pub fn encode_message(msg: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    percent_encoding::utf8_percent_encode(msg, SET).to_string()
}

/// Decodes a `grpc-message` value.
pub fn decode_message(v: &HeaderValue) -> String {
    percent_encoding::percent_decode(v.as_bytes())
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses a `grpc-timeout` value ("1S", "250m", "100u", "2H"...). Up to 8 digits and a unit, per the spec.
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    if b.len() < 2 || b.len() > 9 {
        return None;
    }
    let (digits, unit) = b.split_at(b.len() - 1);
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Request headers whose value differs on (almost) every call: tracing and request ids. They are
/// sent upstream as "never indexed" literals, so one client's stream of unique values does not churn
/// the HPACK dynamic table of an upstream connection that other clients' calls share.
const PER_CALL_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "grpc-trace-bin",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-amzn-trace-id",
    "x-cloud-trace-context",
    "uber-trace-id",
];

/// Checks the request headers a gRPC backend parses and the proxy can check, before any of them is
/// forwarded; returns the client's `grpc-timeout`, if it sent one.
///
/// An upstream connection is shared by many clients' calls and its HPACK dynamic table with them: a
/// value a backend cannot parse, once forwarded (and indexed), failed other clients' calls on the
/// same connection (grpc-core answered them `INTERNAL: Error parsing 'grpc-timeout' metadata`). So a
/// `grpc-timeout` that does not parse, or a `-bin` value that is not base64, is answered here
/// (`INTERNAL`, as a gRPC server answers it) and never forwarded. One pass over the headers.
pub fn check_request_headers(headers: &mut HeaderMap) -> Result<Option<Duration>, Status> {
    let mut timeout = None;
    for (name, value) in headers.iter_mut() {
        let name = name.as_str();
        if name == "grpc-timeout" {
            match parse_timeout(value) {
                Some(t) => timeout = Some(t),
                None => {
                    return Err(Status::new(
                        Code::Internal,
                        format!(
                            "grpcgate: invalid grpc-timeout \"{}\"",
                            shown(value.as_bytes())
                        ),
                    ))
                }
            }
        } else if name.ends_with("-bin") {
            if !is_base64_list(value.as_bytes()) {
                return Err(Status::new(
                    Code::Internal,
                    format!("grpcgate: binary metadata \"{name}\" is not valid base64"),
                ));
            }
        } else if PER_CALL_HEADERS.contains(&name) {
            value.set_sensitive(true);
        }
    }
    Ok(timeout)
}

/// At most 32 bytes of a client's value, escaped, for an error message.
fn shown(v: &[u8]) -> String {
    let cut = &v[..v.len().min(32)];
    let mut s = cut.escape_ascii().to_string();
    if cut.len() < v.len() {
        s.push_str("...");
    }
    s
}

/// Whether a `-bin` value is base64 (standard alphabet, padding optional, as gRPC accepts it); several
/// values may be joined with commas.
fn is_base64_list(v: &[u8]) -> bool {
    v.split(|&b| b == b',').all(|part| {
        let part = part.trim_ascii();
        let data = part
            .strip_suffix(b"==")
            .or_else(|| part.strip_suffix(b"="))
            .unwrap_or(part);
        let padded = data.len() != part.len();
        data.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
            // One leftover character is never valid; padding must complete a 4-character group.
            && data.len() % 4 != 1
            && (!padded || part.len() % 4 == 0)
    })
}

/// The gRPC path of the standard health check, which the proxy can answer itself.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// The standard health service name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Encodes a duration as `grpc-timeout`, choosing the finest unit that fits in 8 digits.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (scale, unit) in units {
        // Round up so the upstream never sees a longer budget than we have, never 0.
        let v = nanos.div_ceil(scale);
        if v <= MAX {
            return HeaderValue::from_str(&format!("{v}{unit}")).expect("ascii");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Maps an HTTP/2 RST_STREAM / GOAWAY reason to a gRPC code, per the gRPC spec (PROTOCOL-HTTP2.md).
pub fn code_for_reason(reason: h2::Reason) -> Code {
    match reason {
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// Maps a non-gRPC HTTP response status to a gRPC code (http-grpc-status-mapping.md).
pub fn code_for_http_status(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Whether a content-type names a gRPC payload (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc_content_type(v: Option<&HeaderValue>) -> bool {
    v.is_some_and(|v| {
        let b = v.as_bytes();
        b.starts_with(b"application/grpc")
            && matches!(
                b.get(b"application/grpc".len()),
                None | Some(b'+') | Some(b';')
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_round_trip() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(parse_timeout(&v("1S")), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout(&v("250m")), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(&v("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(&v("123456789S")), None);
        assert_eq!(parse_timeout(&v("1x")), None);
        assert_eq!(parse_timeout(&v("S")), None);
        assert_eq!(encode_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(encode_timeout(Duration::from_nanos(1500)), "1500n");
        assert_eq!(encode_timeout(Duration::from_secs(10)), "10000000u");
        assert_eq!(encode_timeout(Duration::from_secs(1000)), "1000000m");
        assert_eq!(
            parse_timeout(&encode_timeout(Duration::from_secs(7 * 86400))),
            Some(Duration::from_secs(7 * 86400))
        );
    }

    #[test]
    fn message_encoding() {
        assert_eq!(encode_message("no route for /a.B/C"), "no route for /a.B/C");
        assert_eq!(encode_message("100% \n"), "100%25 %0A");
        assert_eq!(encode_message("é"), "%C3%A9");
        assert_eq!(
            decode_message(&HeaderValue::from_static("100%25 %0A")),
            "100% \n"
        );
    }

    #[test]
    fn codes() {
        assert_eq!(Code::from_i32(14), Code::Unavailable);
        assert_eq!(Code::from_i32(99), Code::Unknown);
        assert_eq!(
            Code::from_header(&HeaderValue::from_static("4")),
            Code::DeadlineExceeded
        );
        assert_eq!(
            code_for_reason(h2::Reason::REFUSED_STREAM),
            Code::Unavailable
        );
        assert_eq!(
            code_for_http_status(StatusCode::BAD_GATEWAY),
            Code::Unavailable
        );
        assert!(is_grpc_content_type(Some(&HeaderValue::from_static(
            "application/grpc+proto"
        ))));
        assert!(!is_grpc_content_type(Some(&HeaderValue::from_static(
            "application/grpcx"
        ))));
    }

    #[test]
    fn request_header_checks() {
        let check = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            check_request_headers(&mut h).map(|t| (t, h))
        };
        assert_eq!(check(&[]).unwrap().0, None);
        assert_eq!(
            check(&[("grpc-timeout", "5S")]).unwrap().0,
            Some(Duration::from_secs(5))
        );
        for bad in ["1x", "", "-1S", "S", "123456789S", "1 S"] {
            let e = check(&[("grpc-timeout", bad)]).unwrap_err();
            assert_eq!(e.code, Code::Internal, "{bad:?}");
            assert!(e.message.contains("grpc-timeout"), "{}", e.message);
        }
        for good in ["", "AA", "AAA", "AAAA", "AA==", "AAA=", "YWJj,ZGVm", "+/09"] {
            assert!(check(&[("x-bin", good)]).is_ok(), "{good:?}");
        }
        for bad in ["A", "AAAAA", "A===", "AA=", "a*b", "AA==AA"] {
            let e = check(&[("x-bin", bad)]).unwrap_err();
            assert_eq!(e.code, Code::Internal, "{bad:?}");
        }
        let (_, h) = check(&[("x-request-id", "1234"), ("user-agent", "t")]).unwrap();
        assert!(h["x-request-id"].is_sensitive());
        assert!(!h["user-agent"].is_sensitive());
    }

    /// Property tests: what the proxy parses and encodes from outside input (`grpc-timeout`,
    /// `grpc-message`, `-bin` values) never panics and round-trips.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        const UNITS: [(u8, u64); 6] = [
            (b'n', 1),
            (b'u', 1_000),
            (b'm', 1_000_000),
            (b'S', 1_000_000_000),
            (b'M', 60_000_000_000),
            (b'H', 3_600_000_000_000),
        ];

        /// The nanoseconds of one unit of an encoded `grpc-timeout`.
        fn unit_nanos(v: &HeaderValue) -> u128 {
            let unit = *v.as_bytes().last().unwrap();
            u128::from(UNITS.iter().find(|(u, _)| *u == unit).unwrap().1)
        }

        /// Durations at every scale the encoder switches units at, up to past 99,999,999 hours.
        fn durations() -> impl Strategy<Value = Duration> {
            prop_oneof![
                (0u64..1_000_000_000).prop_map(Duration::from_nanos),
                (0u64..100_000_000_000).prop_map(Duration::from_micros),
                (0u64..400_000_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
                (0u64..u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 4000,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// The encoder never gives the upstream more time than the call has, and at most one unit
            /// of its chosen unit less than exact; its output always parses.
            #[test]
            fn timeout_encode_then_parse(d in durations()) {
                let v = encode_timeout(d);
                prop_assert!(v.len() >= 2 && v.len() <= 9, "{v:?}");
                let back = parse_timeout(&v).expect("the encoder's output parses");
                let max = Duration::from_secs(99_999_999 * 3600);
                if d >= max {
                    prop_assert_eq!(back, max);
                } else {
                    let want = d.max(Duration::from_nanos(1));
                    prop_assert!(back >= want, "{d:?} -> {v:?} -> {back:?}");
                    prop_assert!(back.as_nanos() - want.as_nanos() < unit_nanos(&v), "{d:?} -> {v:?} -> {back:?}");
                }
            }

            /// Every value the spec allows (1-8 digits, leading zeros included, and a unit) parses to
            /// its duration, and encoding that duration gives it back exactly.
            #[test]
            fn timeout_parse_then_encode(n in 1u64..=99_999_999, width in 1usize..=8, unit in 0usize..6) {
                let (u, scale) = UNITS[unit];
                let text = format!("{n:0width$}{}", u as char);
                let v = HeaderValue::from_str(&text).unwrap();
                let d = parse_timeout(&v).expect("a valid grpc-timeout");
                prop_assert_eq!(d.as_nanos(), u128::from(n) * u128::from(scale));
                prop_assert_eq!(parse_timeout(&encode_timeout(d)), Some(d));
            }

            /// Any header value: no panic, and what parses is digits and one unit.
            #[test]
            fn timeout_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    if parse_timeout(&v).is_some() {
                        let (digits, unit) = bytes.split_at(bytes.len() - 1);
                        prop_assert!(!digits.is_empty() && digits.len() <= 8);
                        prop_assert!(digits.iter().all(u8::is_ascii_digit));
                        prop_assert!(b"HMSmun".contains(&unit[0]));
                    }
                    let mut h = HeaderMap::new();
                    h.insert("grpc-timeout", v.clone());
                    h.insert("x-bin", v.clone());
                    let checked = check_request_headers(&mut h);
                    let bin_ok = is_base64_list(v.as_bytes());
                    prop_assert_eq!(checked.is_ok(), parse_timeout(&v).is_some() && bin_ok);
                }
            }

            /// Any text, control characters and non-ASCII included, is sent as visible ASCII and
            /// decodes back to itself.
            #[test]
            fn message_round_trip(msg in any::<String>()) {
                let encoded = encode_message(&msg);
                prop_assert!(encoded.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{encoded:?}");
                let v = HeaderValue::from_str(&encoded).expect("a valid header value");
                prop_assert_eq!(decode_message(&v), msg);
            }

            /// A peer's `grpc-message`, whatever its bytes: no panic.
            #[test]
            fn message_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    let _ = decode_message(&v);
                }
            }
        }
    }
}
