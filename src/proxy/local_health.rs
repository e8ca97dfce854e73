//! The proxy's own `grpc.health.v1.Health/Check`: answered on a listener without a route for the
//! health service, from the state of the clusters (a data-plane answer; active checks of the
//! endpoints are the control plane's, in `health`).

use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use prost::Message;

use crate::grpc::{Code, Status, GRPC_ACCEPT_ENCODING, GRPC_ENCODING};
use crate::pb::health::health_check_response::ServingStatus;
use crate::pb::health::{HealthCheckRequest, HealthCheckResponse};

/// The encodings the proxy's own `Health/Check` accepts, sent as `grpc-accept-encoding` with every
/// answer (the gRPC compression spec asks for it with the UNIMPLEMENTED of an unsupported encoding).
const ACCEPTED_ENCODINGS: &str = "identity,deflate,gzip";
/// A compressed health check request may grow to this much when decompressed: a HealthCheckRequest
/// is one service name, so this is plenty and a zip bomb stops here.
const MAX_DECOMPRESSED: usize = 4 * 1024;

/// A request message encoding `Health/Check` can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    /// gRPC's "deflate" is the zlib format (RFC 1950).
    Deflate,
}

impl Encoding {
    /// The encoding named by a `grpc-encoding` header (absent = identity); an unsupported one is
    /// UNIMPLEMENTED, as the compression spec says.
    fn from_header(value: Option<&HeaderValue>) -> Result<Encoding, Status> {
        let Some(value) = value else {
            return Ok(Encoding::Identity);
        };
        let name = value.to_str().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("identity") {
            Ok(Encoding::Identity)
        } else if name.eq_ignore_ascii_case("gzip") {
            Ok(Encoding::Gzip)
        } else if name.eq_ignore_ascii_case("deflate") {
            Ok(Encoding::Deflate)
        } else {
            Err(Status::new(
                Code::Unimplemented,
                format!(
                    "grpcgate: unsupported grpc-encoding \"{}\" (supported: {ACCEPTED_ENCODINGS})",
                    String::from_utf8_lossy(value.as_bytes())
                ),
            ))
        }
    }

    /// Decompresses a message, at most [`MAX_DECOMPRESSED`] bytes of it.
    fn decompress(self, data: &[u8]) -> Result<Bytes, Status> {
        use std::io::Read;
        let mut decoder: Box<dyn Read + '_> = match self {
            Encoding::Identity => return Ok(Bytes::copy_from_slice(data)),
            Encoding::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
            Encoding::Deflate => Box::new(flate2::read::ZlibDecoder::new(data)),
        };
        let mut out = Vec::new();
        decoder
            .by_ref()
            .take(MAX_DECOMPRESSED as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                Status::new(
                    Code::Internal,
                    format!("grpcgate: cannot decompress the health check request: {e}"),
                )
            })?;
        if out.len() > MAX_DECOMPRESSED {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "grpcgate: decompressed health check request larger than {MAX_DECOMPRESSED} bytes"
                ),
            ));
        }
        Ok(out.into())
    }
}

/// Answers `grpc.health.v1.Health/Check` on a listener: service "" is SERVING while the proxy is not
/// draining; a cluster's name is SERVING while that cluster has an available endpoint; anything else
/// is NOT_FOUND, as the health protocol specifies. The request may be compressed with gzip or deflate.
pub async fn answer_check(
    mut req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    draining: bool,
    cluster_status: impl Fn(&str) -> Option<bool>,
) -> Code {
    let status = match read_request(&mut req).await {
        Err(status) => Err(status),
        Ok(r) if r.service.is_empty() => Ok(!draining),
        Ok(r) => match cluster_status(&r.service) {
            Some(up) => Ok(up && !draining),
            None => Err(Status::new(
                Code::NotFound,
                format!("grpcgate: unknown service \"{}\"", r.service),
            )),
        },
    };
    let accept = HeaderValue::from_static(ACCEPTED_ENCODINGS);
    let serving = match status {
        Ok(s) => s,
        Err(status) => {
            let mut head = status.to_trailers_only();
            head.headers_mut()
                .insert(GRPC_ACCEPT_ENCODING.clone(), accept);
            let _ = respond.send_response(head, true);
            return status.code;
        }
    };
    let msg = HealthCheckResponse {
        status: if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        } as i32,
    };
    let mut frame = BytesMut::with_capacity(5 + msg.encoded_len());
    frame.put_u8(0);
    frame.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut frame).expect("buffer has room");
    let mut head = Response::new(());
    head.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head.headers_mut()
        .insert(GRPC_ACCEPT_ENCODING.clone(), accept);
    if let Ok(mut send) = respond.send_response(head, false) {
        let _ = send.send_data(frame.freeze(), false);
        let _ = send.send_trailers(Status::new(Code::Ok, "").to_trailers());
    }
    Code::Ok
}

/// Reads the request's one message, decompresses it as its `grpc-encoding` says and decodes it.
async fn read_request(req: &mut Request<RecvStream>) -> Result<HealthCheckRequest, Status> {
    let encoding = req.headers().get(&GRPC_ENCODING).cloned();
    let body = read_body(req.body_mut()).await?;
    decode_request(encoding.as_ref(), body)
}

/// Decodes a whole request body: one length-prefixed message, compressed as `encoding` says.
fn decode_request(
    encoding: Option<&HeaderValue>,
    body: Bytes,
) -> Result<HealthCheckRequest, Status> {
    let (compressed, msg) = unframe(body)?;
    let encoding = Encoding::from_header(encoding)?;
    let msg = match (compressed, encoding) {
        (false, _) => msg,
        (true, Encoding::Identity) => return Err(Status::new(
            Code::Internal,
            "grpcgate: compressed health check request without a grpc-encoding (or with identity)",
        )),
        (true, encoding) => encoding.decompress(&msg)?,
    };
    HealthCheckRequest::decode(msg).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("grpcgate: bad HealthCheckRequest: {e}"),
        )
    })
}

/// The most a health check request body may hold.
const MAX_BODY: usize = 64 * 1024;

/// Reads a request body, at most [`MAX_BODY`] bytes of it.
async fn read_body(body: &mut RecvStream) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| {
            Status::new(
                Code::Cancelled,
                format!("grpcgate: request body failed: {e}"),
            )
        })?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_BODY {
            return Err(Status::new(
                Code::ResourceExhausted,
                "grpcgate: health check request too large",
            ));
        }
    }
    Ok(buf.freeze())
}

/// The one length-prefixed message of a unary gRPC request body: whether its compressed flag is set,
/// and its bytes.
fn unframe(buf: Bytes) -> Result<(bool, Bytes), Status> {
    if buf.len() < 5 {
        return Err(Status::new(
            Code::Internal,
            "grpcgate: empty health check request",
        ));
    }
    let compressed = match buf[0] {
        0 => false,
        1 => true,
        flag => {
            return Err(Status::new(
                Code::Internal,
                format!("grpcgate: bad gRPC message flag {flag}"),
            ))
        }
    };
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() != 5 + len {
        return Err(Status::new(
            Code::Internal,
            "grpcgate: malformed gRPC message framing",
        ));
    }
    Ok((compressed, buf.slice(5..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encodings() {
        let header = |v: &'static str| HeaderValue::from_static(v);
        assert_eq!(Encoding::from_header(None).unwrap(), Encoding::Identity);
        assert_eq!(
            Encoding::from_header(Some(&header("gzip"))).unwrap(),
            Encoding::Gzip
        );
        assert_eq!(
            Encoding::from_header(Some(&header("deflate"))).unwrap(),
            Encoding::Deflate
        );
        let err = Encoding::from_header(Some(&header("snappy"))).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);

        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&[7; MAX_DECOMPRESSED]).unwrap();
        let at_cap = z.finish().unwrap();
        assert_eq!(
            Encoding::Deflate.decompress(&at_cap).unwrap().len(),
            MAX_DECOMPRESSED
        );
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        g.write_all(&[7; MAX_DECOMPRESSED + 1]).unwrap();
        let over = g.finish().unwrap();
        assert_eq!(
            Encoding::Gzip.decompress(&over).unwrap_err().code,
            Code::ResourceExhausted
        );
        assert_eq!(
            Encoding::Gzip.decompress(b"not gzip").unwrap_err().code,
            Code::Internal
        );
    }

    /// Property tests: the request framing and decoding against requests built here (every
    /// encoding, any service name), the same cut short or with bytes added, and arbitrary bytes.
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::io::Write;

        /// A Health/Check request body for `service`, compressed as `encoding` names (None: no
        /// grpc-encoding header).
        fn body(service: &str, encoding: Option<&str>) -> Bytes {
            let msg = HealthCheckRequest {
                service: service.to_string(),
            }
            .encode_to_vec();
            let (flag, msg) = match encoding {
                Some("gzip") => {
                    let mut g =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    g.write_all(&msg).unwrap();
                    (1, g.finish().unwrap())
                }
                Some("deflate") => {
                    let mut z =
                        flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                    z.write_all(&msg).unwrap();
                    (1, z.finish().unwrap())
                }
                _ => (0, msg),
            };
            let mut frame = vec![flag];
            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            frame.extend_from_slice(&msg);
            frame.into()
        }

        fn encodings() -> impl Strategy<Value = Option<&'static str>> {
            proptest::sample::select(vec![None, Some("identity"), Some("gzip"), Some("deflate")])
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 2000,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// What a client sends is what the proxy reads, in every encoding it accepts.
            #[test]
            fn requests_round_trip(service in "\\PC{0,200}", encoding in encodings()) {
                let header = encoding.map(HeaderValue::from_static);
                let r = decode_request(header.as_ref(), body(&service, encoding));
                match r {
                    Ok(r) => prop_assert_eq!(r.service, service),
                    Err(e) => prop_assert!(false, "refused: {}", e.message),
                }
            }

            /// A body cut short, or with bytes after its one message, is refused (INTERNAL), not
            /// misread.
            #[test]
            fn bad_framing_is_refused(
                service in "\\PC{0,40}",
                encoding in encodings(),
                cut in any::<proptest::sample::Index>(),
                extra in proptest::collection::vec(any::<u8>(), 1..16),
            ) {
                let header = encoding.map(HeaderValue::from_static);
                let whole = body(&service, encoding);
                let short = whole.slice(..cut.index(whole.len()));
                let e = decode_request(header.as_ref(), short).unwrap_err();
                prop_assert_eq!(e.code, Code::Internal, "{}", e.message);
                let long: Bytes = [&whole[..], &extra].concat().into();
                let e = decode_request(header.as_ref(), long).unwrap_err();
                prop_assert_eq!(e.code, Code::Internal, "{}", e.message);
            }

            /// Arbitrary bytes under any encoding header: an answer, never a panic.
            #[test]
            fn arbitrary_bodies_never_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..300),
                flag in 0u8..3,
                encoding in encodings(),
            ) {
                let header = encoding.map(HeaderValue::from_static);
                let mut framed = vec![flag];
                framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                framed.extend_from_slice(&bytes);
                let _ = decode_request(header.as_ref(), framed.into());
                let _ = decode_request(header.as_ref(), bytes.into());
            }
        }
    }
}
