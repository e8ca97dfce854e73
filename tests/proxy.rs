//! End-to-end tests of the data path: real tonic echo backends and clients on loopback, an in-process
//! gateway between them, and (where a backend must misbehave) small raw HTTP/2 servers and clients.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use grpcgate::pb::echo::echo_client::EchoClient;
use grpcgate::pb::echo::{EchoRequest, EchoResponse};
use http::{HeaderMap, HeaderValue};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue, MetadataMap};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

// ---------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------

fn msg(payload: &[u8]) -> EchoRequest {
    EchoRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

fn slow(delay_ms: u32) -> EchoRequest {
    EchoRequest {
        delay_ms,
        ..Default::default()
    }
}

/// The error of a call that must fail.
fn expect_err<T: std::fmt::Debug>(r: Result<T, Status>) -> Status {
    match r {
        Ok(v) => panic!("call succeeded ({v:?}); expected an error status"),
        Err(s) => s,
    }
}

/// Reads a server stream to its end, which must be an error: (messages received, the status). A
/// trailers-only error may also come back from the call itself.
async fn stream_error<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> (usize, Status) {
    let mut s = match r {
        Ok(s) => s.into_inner(),
        Err(e) => return (0, e),
    };
    let mut n = 0;
    loop {
        match s.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("stream ended OK after {n} messages; expected an error"),
            Err(e) => return (n, e),
        }
    }
}

/// Every byte value, so `-bin` metadata and details exercise the whole range.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

/// Runs a blocking `EchoBackend::kill` without stalling the runtime (needs the multi-thread flavor).
fn kill(b: &mut grpcgate::echo::EchoBackend) {
    tokio::task::block_in_place(|| b.kill());
}

fn config_with(backends: &[SocketAddr], route_extra: &str) -> String {
    config_text(backends, "round_robin", route_extra, "")
}

fn addrs(b: &[grpcgate::echo::EchoBackend]) -> Vec<SocketAddr> {
    b.iter().map(|b| b.addr).collect()
}

/// One gRPC length-prefixed message.
fn grpc_frame(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(body.len() as u32);
    b.put_slice(&body);
    b.freeze()
}

/// What a raw HTTP/2 call saw.
#[derive(Debug)]
struct RawResponse {
    status: http::StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// Opens a gRPC stream on a fresh raw h2 connection; the request body is left open.
async fn raw_open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, HeaderValue::from_bytes(v).expect("header value"));
    }
    client
        .send_request(req.body(()).unwrap(), false)
        .expect("send request")
}

/// One gRPC call over a fresh raw h2 connection, so the test sees exact header bytes.
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Bytes,
) -> RawResponse {
    let (resp, mut send) = raw_open(addr, path, headers).await;
    send.send_data(body, true).expect("send body");
    let resp = resp.await.expect("response");
    let (head, mut recv) = resp.into_parts();
    let mut body = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("body");
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.expect("trailers");
    RawResponse {
        status: head.status,
        headers: head.headers,
        body: body.freeze(),
        trailers,
    }
}

/// The headers of a map whose names start with `x-` or `grpc-`, in order, as raw bytes.
/// (`x-forwarded-for` left out: the proxy adds the client's address to it, and the echo backend
/// sends it back.)
fn grpc_and_x(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .filter(|(k, _)| k.as_str().starts_with("x-") || k.as_str().starts_with("grpc-"))
        .filter(|(k, _)| k.as_str() != "x-forwarded-for")
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// A raw HTTP/2 upstream that misbehaves on request, by the request's `x-behave` header:
/// `http-<code>` answers that HTTP status without gRPC, `html` answers 200 with an HTML page,
/// `refuse` resets the stream with
/// REFUSED_STREAM, `no-status` answers 200 with one gRPC message and no grpc-status, `stream` sends
/// gRPC response headers and one message and then waits, `hang` never answers. Every request's
/// headers are sent on `seen`; how a waiting stream was reset, on `resets`.
struct RawUpstream {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<HeaderMap>,
    resets: mpsc::UnboundedReceiver<h2::Reason>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream() -> RawUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (reset_tx, resets) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen_tx = seen_tx.clone();
            let reset_tx = reset_tx.clone();
            conns.spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut streams = tokio::task::JoinSet::new();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let mut seen = req.headers().clone();
                    let path = HeaderValue::from_str(req.uri().path()).unwrap();
                    seen.insert("x-seen-path", path);
                    let _ = seen_tx.send(seen);
                    let behave = req
                        .headers()
                        .get("x-behave")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let reset_tx = reset_tx.clone();
                    streams.spawn(async move {
                        let _req = req; // keep the request stream open while we answer
                        if let Some(code) = behave.strip_prefix("http-") {
                            let resp = http::Response::builder()
                                .status(code.parse::<u16>().unwrap())
                                .header("content-type", "text/plain")
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(resp, false).unwrap();
                            let _ = s.send_data(Bytes::from_static(b"upstream is down\n"), true);
                        } else if behave == "html" {
                            let resp = http::Response::builder()
                                .header("content-type", "text/html")
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(resp, false).unwrap();
                            let _ = s.send_data(Bytes::from_static(b"<html>hello</html>"), true);
                        } else if behave == "refuse" {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        } else if behave == "no-status" {
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(resp, false).unwrap();
                            let _ = s.send_data(grpc_frame(&EchoResponse::default()), true);
                        } else if behave == "stream" {
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(resp, false).unwrap();
                            let _ = s.send_data(grpc_frame(&EchoResponse::default()), false);
                            if let Ok(r) = std::future::poll_fn(|cx| s.poll_reset(cx)).await {
                                let _ = reset_tx.send(r);
                            }
                        } else {
                            // hang: hold the stream until the peer resets it
                            if let Ok(r) = std::future::poll_fn(|cx| respond.poll_reset(cx)).await {
                                let _ = reset_tx.send(r);
                            }
                        }
                    });
                }
            });
        }
    });
    RawUpstream {
        addr,
        seen,
        resets,
        task,
    }
}

/// A hand-written HTTP/2 upstream, for what h2's server cannot be made to do: it answers the preface
/// and SETTINGS and, on every request's HEADERS, sends GOAWAY with `reason` and a last_stream_id of
/// that stream (`refuse` false: the stream may have been processed) or of the one before it (`refuse`
/// true: this stream was not processed), then keeps the connection open and says nothing more, as
/// nghttp2 does after a header block it cannot take. Counts the HEADERS it saw.
struct GoawayUpstream {
    addr: SocketAddr,
    headers_seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GoawayUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn goaway_upstream(reason: h2::Reason, refuse: bool) -> GoawayUpstream {
    goaway_upstream_answering(reason, refuse, false).await
}

/// [`goaway_upstream`] that, with `answer_first`, puts a whole trailers-only response (grpc-status 3)
/// before the GOAWAY, in the same write.
async fn goaway_upstream_answering(
    reason: h2::Reason,
    refuse: bool,
    answer_first: bool,
) -> GoawayUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let headers_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = headers_seen.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            conns.spawn(async move {
                let mut preface = [0u8; 24];
                tcp.read_exact(&mut preface).await?;
                tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?; // SETTINGS, empty
                loop {
                    let mut head = [0u8; 9];
                    tcp.read_exact(&mut head).await?;
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    tcp.read_exact(&mut payload).await?;
                    match kind {
                        // SETTINGS: acknowledge.
                        4 if flags & 1 == 0 => tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?,
                        // PING: answer.
                        6 if flags & 1 == 0 => {
                            tcp.write_all(&[0, 0, 8, 6, 1, 0, 0, 0, 0]).await?;
                            tcp.write_all(&payload).await?;
                        }
                        // HEADERS: GOAWAY.
                        1 => {
                            seen.fetch_add(1, SeqCst);
                            let last = if refuse {
                                stream.saturating_sub(2)
                            } else {
                                stream
                            };
                            let mut frame = Vec::new();
                            if answer_first {
                                // HPACK: :status 200 (static 8); content-type (static name 31)
                                // application/grpc; grpc-status 3, literal. END_STREAM | END_HEADERS.
                                let mut block = vec![0x88, 0x0f, 0x10, 16];
                                block.extend_from_slice(b"application/grpc");
                                block.extend_from_slice(&[0x00, 11]);
                                block.extend_from_slice(b"grpc-status");
                                block.extend_from_slice(&[1, b'3']);
                                frame.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
                                frame.extend_from_slice(&[1, 0x5]);
                                frame.extend_from_slice(&stream.to_be_bytes());
                                frame.extend_from_slice(&block);
                            }
                            frame.extend_from_slice(&[0, 0, 8, 7, 0, 0, 0, 0, 0]);
                            frame.extend_from_slice(&last.to_be_bytes());
                            frame.extend_from_slice(&u32::from(reason).to_be_bytes());
                            tcp.write_all(&frame).await?;
                        }
                        _ => {}
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), std::io::Error>(())
            });
        }
    });
    GoawayUpstream {
        addr,
        headers_seen,
        task,
    }
}

/// A client that shares `ch` (one connection) with any other client made from it.
fn echo(ch: &Channel) -> EchoClient<Channel> {
    EchoClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn edge_channel(gw: &grpcgate::Gateway) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", gw.listener_addr("edge").unwrap()))
        .unwrap()
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------------------------------
// The four call types
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn unary_call() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let r = bounded(c.unary(msg(b"hello"))).await.unwrap().into_inner();
    assert_eq!(r.payload, b"hello");
    assert_eq!(r.backend, "b0");
    wait_settled(&gw, &[("OK", 1)]).await;
}

#[tokio::test]
async fn server_streaming_call() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let mut s = bounded(c.server_stream(EchoRequest {
        payload: b"tick".to_vec(),
        count: 25,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = bounded(s.message()).await.unwrap() {
        assert_eq!(m.payload, b"tick");
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..25).collect::<Vec<_>>());
    wait_settled(&gw, &[("OK", 1)]).await;
}

#[tokio::test]
async fn client_streaming_call() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let reqs: Vec<EchoRequest> = (1..=40usize).map(|i| msg(&vec![7u8; i * 100])).collect();
    let want: u64 = reqs.iter().map(|r| r.payload.len() as u64).sum();
    let r = bounded(c.client_stream(tokio_stream::iter(reqs)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.seq, 40, "messages the backend received");
    assert_eq!(r.total_bytes, want);
    wait_settled(&gw, &[("OK", 1)]).await;
}

/// Ping-pong: each request is sent only after the previous response came back, so neither direction
/// may be buffered until the other side finishes.
#[tokio::test]
async fn bidi_streaming_call_is_interactive() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(b"0")).await.unwrap();
    let mut s = bounded(c.bidi(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20u32 {
        let m = bounded(s.message()).await.unwrap().expect("a response");
        assert_eq!(m.seq, i);
        assert_eq!(m.payload, i.to_string().as_bytes());
        if i < 19 {
            tx.send(msg((i + 1).to_string().as_bytes())).await.unwrap();
        }
    }
    drop(tx);
    assert!(bounded(s.message()).await.unwrap().is_none());
    wait_settled(&gw, &[("OK", 1)]).await;
}

/// Messages of sizes on both sides of the proxy's write-path thresholds (DATA payloads copied into the
/// write buffer below 8 KiB, chained above; a 16 KiB write buffer; 16 KiB frames), on four concurrent
/// bidi streams of one connection so their frames interleave: every byte comes back in order. Then the
/// connections, idle and holding no buffers, carry a call again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_size_messages_arrive_intact() {
    const SIZES: [usize; 14] = [
        0, 1, 200, 250, 251, 256, 1000, 4096, 8183, 8192, 8193, 16_371, 16_384, 40_000,
    ];
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let c = edge_client(&gw).await;
    let payload = |stream: usize, i: usize| -> Vec<u8> {
        let len = SIZES[(i + stream) % SIZES.len()];
        (0..len).map(|j| (j * 31 + i * 7 + stream) as u8).collect()
    };
    let calls = (0..4usize).map(|stream| {
        let mut c = c.clone();
        async move {
            let reqs: Vec<EchoRequest> = (0..3 * SIZES.len())
                .map(|i| msg(&payload(stream, i)))
                .collect();
            let mut s = c.bidi(tokio_stream::iter(reqs)).await?.into_inner();
            let mut i = 0;
            while let Some(m) = s.message().await? {
                assert!(
                    m.payload == payload(stream, i),
                    "stream {stream} message {i} corrupted"
                );
                i += 1;
            }
            assert_eq!(i, 3 * SIZES.len(), "stream {stream}: messages echoed");
            Ok::<_, Status>(())
        }
    });
    for r in bounded(futures_util::future::join_all(calls)).await {
        r.unwrap();
    }
    wait_settled(&gw, &[("OK", 4)]).await;
    let mut c = c;
    let r = bounded(c.unary(msg(b"again"))).await.unwrap().into_inner();
    assert_eq!(r.payload, b"again");
}

// ---------------------------------------------------------------------------------------------------
// Metadata, trailers, status details
// ---------------------------------------------------------------------------------------------------

/// Request metadata the echo backend sends back: ASCII, repeated keys and `-bin` values.
fn request_metadata(md: &mut MetadataMap) {
    md.insert(
        "x-plain",
        AsciiMetadataValue::from_static("Hello, World! ~`!@#$%^&*()"),
    );
    md.append("x-multi", AsciiMetadataValue::from_static("one"));
    md.append("x-multi", AsciiMetadataValue::from_static("two"));
    md.insert_bin("x-blob-bin", BinaryMetadataValue::from_bytes(&all_bytes()));
    md.append_bin("x-multi-bin", BinaryMetadataValue::from_bytes(&[0, 0, 0]));
    md.append_bin("x-multi-bin", BinaryMetadataValue::from_bytes(&[0xff; 17]));
}

fn check_echoed_metadata(md: &MetadataMap) {
    assert_eq!(md.get("x-plain").unwrap(), "Hello, World! ~`!@#$%^&*()");
    let multi: Vec<_> = md
        .get_all("x-multi")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(
        md.get_bin("x-blob-bin").unwrap().to_bytes().unwrap(),
        all_bytes()
    );
    let multi: Vec<_> = md
        .get_all_bin("x-multi-bin")
        .iter()
        .map(|v| v.to_bytes().unwrap())
        .collect();
    assert_eq!(
        multi,
        [Bytes::from_static(&[0, 0, 0]), Bytes::from(vec![0xff; 17])]
    );
}

#[tokio::test]
async fn metadata_round_trips_as_response_headers() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;

    let mut req = Request::new(msg(b"x"));
    request_metadata(req.metadata_mut());
    let r = bounded(c.unary(req)).await.unwrap();
    check_echoed_metadata(r.metadata());

    let mut req = Request::new(EchoRequest {
        count: 3,
        ..Default::default()
    });
    request_metadata(req.metadata_mut());
    let r = bounded(c.server_stream(req)).await.unwrap();
    check_echoed_metadata(r.metadata());
    let mut s = r.into_inner();
    while bounded(s.message()).await.unwrap().is_some() {}
    wait_settled(&gw, &[("OK", 2)]).await;
}

const FAIL_MESSAGE: &str = "précondition échouée: 100% sûr ✗ — ligne 1\nligne 2 \u{1F600}";

fn failing(fail_code: i32) -> EchoRequest {
    EchoRequest {
        payload: all_bytes(),
        fail_code,
        fail_message: FAIL_MESSAGE.to_string(),
        ..Default::default()
    }
}

fn check_failure(s: &Status, code: Code) {
    assert_eq!(s.code(), code, "{s:?}");
    assert_eq!(s.message(), FAIL_MESSAGE);
    assert_eq!(s.details(), &all_bytes()[..], "grpc-status-details-bin");
    check_echoed_metadata(s.metadata());
}

/// Unary failure (a trailers-only response), a failure after streamed messages (real trailers) and a
/// bidi failure: code, non-ASCII message, details and custom trailers all arrive intact.
#[tokio::test]
async fn error_status_message_details_and_trailers_pass_through() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;

    let mut req = Request::new(failing(Code::FailedPrecondition as i32));
    request_metadata(req.metadata_mut());
    check_failure(
        &expect_err(bounded(c.unary(req)).await),
        Code::FailedPrecondition,
    );

    let mut req = Request::new(EchoRequest {
        count: 3,
        ..failing(Code::ResourceExhausted as i32)
    });
    request_metadata(req.metadata_mut());
    let mut s = bounded(c.server_stream(req)).await.unwrap().into_inner();
    for _ in 0..3 {
        assert!(bounded(s.message()).await.unwrap().is_some());
    }
    check_failure(
        &expect_err(bounded(s.message()).await),
        Code::ResourceExhausted,
    );

    let mut req = Request::new(tokio_stream::iter(vec![
        msg(b"ok"),
        failing(Code::Aborted as i32),
    ]));
    request_metadata(req.metadata_mut());
    let mut s = bounded(c.bidi(req)).await.unwrap().into_inner();
    assert_eq!(bounded(s.message()).await.unwrap().unwrap().payload, b"ok");
    check_failure(&expect_err(bounded(s.message()).await), Code::Aborted);

    wait_settled(
        &gw,
        &[
            ("FAILED_PRECONDITION", 1),
            ("RESOURCE_EXHAUSTED", 1),
            ("ABORTED", 1),
        ],
    )
    .await;
}

/// The same raw requests straight to the backend and through the proxy: every `x-*` and `grpc-*`
/// header and trailer is byte for byte the same (including unpadded base64 in a `-bin` value and a
/// percent-encoded grpc-message), and so is the body.
#[tokio::test]
async fn raw_headers_and_trailers_identical_to_direct_call() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let edge = gw.listener_addr("edge").unwrap();
    let md: &[(&str, &[u8])] = &[
        ("x-plain", b"a b\tc ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}"),
        ("x-dup", b"1"),
        ("x-dup", b"2"),
        ("x-unpadded-bin", b"AAEC"), // 3 bytes, no padding needed
        ("x-odd-bin", b"/w"),        // one 0xff byte, unpadded
        ("x-padded-bin", b"/w=="),   // the same, padded
    ];
    let cases: Vec<(&str, EchoRequest)> = vec![
        ("/echo.Echo/Unary", msg(&all_bytes())),
        ("/echo.Echo/Unary", failing(Code::PermissionDenied as i32)),
        (
            "/echo.Echo/ServerStream",
            EchoRequest {
                count: 2,
                ..failing(Code::DataLoss as i32)
            },
        ),
    ];
    for (path, req) in cases {
        let direct = bounded(raw_call(b[0].addr, path, md, grpc_frame(&req))).await;
        let proxied = bounded(raw_call(edge, path, md, grpc_frame(&req))).await;
        assert_eq!(proxied.status, direct.status, "{path}");
        assert_eq!(
            grpc_and_x(&proxied.headers),
            grpc_and_x(&direct.headers),
            "{path} headers"
        );
        // The one header the proxy adds (echoed back by the backend in the response head).
        let xff = |r: &RawResponse| {
            let mut v: Vec<_> = r
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .cloned()
                .collect();
            if let Some(t) = &r.trailers {
                v.extend(t.get_all("x-forwarded-for").iter().cloned());
            }
            v
        };
        assert!(xff(&direct).is_empty(), "{path}");
        let proxied_xff = xff(&proxied);
        assert!(
            !proxied_xff.is_empty() && proxied_xff.iter().all(|v| v == "127.0.0.1"),
            "{path}: {proxied_xff:?}"
        );
        assert_eq!(
            proxied.headers.get("content-type"),
            direct.headers.get("content-type"),
            "{path}"
        );
        assert_eq!(proxied.body, direct.body, "{path} body");
        assert_eq!(
            proxied.trailers.as_ref().map(grpc_and_x),
            direct.trailers.as_ref().map(grpc_and_x),
            "{path} trailers"
        );
        // Make sure the comparison compared something.
        let all = proxied.trailers.as_ref().unwrap_or(&proxied.headers);
        assert!(all.contains_key("grpc-status"), "{path}: {proxied:?}");
        assert_eq!(proxied.headers.get("x-unpadded-bin").unwrap(), "AAEC");
    }
    let failed = bounded(raw_call(
        edge,
        "/echo.Echo/Unary",
        md,
        grpc_frame(&failing(7)),
    ))
    .await;
    // Still percent-encoded on the wire, exactly as the backend wrote it.
    let wire = failed.headers.get("grpc-message").expect("grpc-message");
    assert!(
        wire.to_str().unwrap().contains("pr%C3%A9condition"),
        "{wire:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Size and concurrency
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_message_each_way() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let payload: Vec<u8> = (0..16usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    let r = bounded(c.unary(msg(&payload))).await.unwrap().into_inner();
    assert_eq!(r.payload.len(), payload.len());
    assert!(r.payload == payload, "16 MiB payload corrupted");
    wait_settled(&gw, &[("OK", 1)]).await;
}

/// 1,000 bidi streams over ONE client connection, all open at the same time (each has had a response
/// and is held open until all have), then all finish OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_over_one_connection() {
    const N: usize = 1000;
    let b = backends(3).await;
    // Above the default of 100 streams per client connection.
    let text = config_text(&addrs(&b), "round_robin", "", "");
    let gw = start(&with_listener_keys(&text, "max_concurrent_streams = 1024")).await;
    let ch = edge_channel(&gw).await;
    let (release_tx, release_rx) = watch::channel(false);
    // Each call reports once it is open (or failed to open) and then waits for the release.
    let (opened_tx, mut opened_rx) = mpsc::channel::<Result<(), Status>>(N);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut c = echo(&ch);
        let mut release = release_rx.clone();
        let opened = opened_tx.clone();
        tasks.spawn(async move {
            let (tx, rx) = mpsc::channel(1);
            tx.send(msg(&(i as u32).to_be_bytes())).await.unwrap();
            let open = async {
                let mut s = c.bidi(ReceiverStream::new(rx)).await?.into_inner();
                let first = s.message().await?;
                Ok::<_, Status>((s, first))
            };
            let (mut s, first) = match open.await {
                Ok((s, Some(first))) => (s, first),
                Ok((_, None)) => {
                    let e = Status::internal(format!("stream {i} ended without a response"));
                    let _ = opened.send(Err(e.clone())).await;
                    return Err(e);
                }
                Err(e) => {
                    let _ = opened.send(Err(e.clone())).await;
                    return Err(e);
                }
            };
            assert_eq!(first.payload, (i as u32).to_be_bytes());
            let _ = opened.send(Ok(())).await;
            release.wait_for(|r| *r).await.unwrap();
            drop(tx);
            while s.message().await?.is_some() {}
            Ok::<_, Status>(first.backend)
        });
    }
    drop(opened_tx);
    bounded(async {
        for k in 0..N {
            match opened_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => panic!("a stream failed to open after {k} opened: {e:?}"),
                None => panic!("only {k} streams opened"),
            }
        }
    })
    .await;
    // All N are open right now: the proxy has them in flight, over one downstream connection.
    eventually(&gw, |s| {
        let in_flight = sample(s, "grpcgate_endpoint_in_flight", &[]);
        let conns = sample(
            s,
            "grpcgate_downstream_connections_active",
            &[("listener", "edge")],
        );
        if in_flight == N as f64 && conns == 1.0 {
            Ok(())
        } else {
            Err(format!(
                "in flight {in_flight}, downstream connections {conns}"
            ))
        }
    })
    .await;
    release_tx.send(true).unwrap();
    let mut per_backend = BTreeMap::<String, usize>::new();
    bounded(async {
        while let Some(r) = tasks.join_next().await {
            let backend = r.expect("task").expect("call");
            *per_backend.entry(backend).or_default() += 1;
        }
    })
    .await;
    let mut counts: Vec<usize> = per_backend.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [333, 333, 334], "{per_backend:?}");
    wait_settled(&gw, &[("OK", N as u64)]).await;
}

/// Round robin over 3 backends, 300 sequential calls on one connection: exactly 100 each, by the
/// backend that answered and by `grpcgate_requests_total{endpoint}`.
#[tokio::test]
async fn round_robin_spreads_exactly() {
    let b = backends(3).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let mut per_backend = BTreeMap::<String, u32>::new();
    for _ in 0..300 {
        let r = bounded(c.unary(msg(b""))).await.unwrap().into_inner();
        *per_backend.entry(r.backend).or_default() += 1;
    }
    let want: BTreeMap<String, u32> = [("b0", 100), ("b1", 100), ("b2", 100)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(per_backend, want);
    let s = wait_settled(&gw, &[("OK", 300)]).await;
    for backend in &b {
        let ep = backend.addr.to_string();
        let labels = [
            ("listener", "edge"),
            ("cluster", "echo"),
            ("endpoint", ep.as_str()),
            ("grpc_status", "OK"),
        ];
        assert_eq!(
            sample(&s, "grpcgate_requests_total", &labels),
            100.0,
            "{ep}"
        );
        assert_eq!(backend.stats.completed.load(SeqCst), 100, "{ep}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Errors the proxy produces
// ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_route_is_unimplemented() {
    let b = backends(1).await;
    let gw = start(&config_with(&addrs(&b), r#"service = "other.Svc""#)).await;
    let mut c = edge_client(&gw).await;

    let s = expect_err(bounded(c.unary(msg(b"x"))).await);
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    assert!(s.message().contains("no route"), "{s:?}");
    assert!(s.message().contains("/echo.Echo/Unary"), "{s:?}");

    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(b"x")).await.unwrap();
    let s = expect_err(bounded(c.bidi(ReceiverStream::new(rx))).await);
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    assert!(s.message().contains("/echo.Echo/Bidi"), "{s:?}");

    // The connection is still good for more calls.
    let s = expect_err(bounded(c.client_stream(tokio_stream::iter(vec![msg(b"1")]))).await);
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");

    assert_eq!(b[0].stats.started.load(SeqCst), 0);
    let s = wait_settled(&gw, &[("UNIMPLEMENTED", 3)]).await;
    assert_eq!(
        sample(
            &s,
            "grpcgate_requests_total",
            &[("listener", "edge"), ("grpc_status", "UNIMPLEMENTED")]
        ),
        3.0
    );
}

#[tokio::test]
async fn unreachable_endpoints_are_unavailable() {
    let (_s1, dead1) = dead_endpoint();
    let (_s2, dead2) = dead_endpoint();
    let gw = start(&config_with(&[dead1, dead2], "")).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..3 {
        let s = expect_err(bounded(c.unary(msg(b"x"))).await);
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        let m = s.message();
        assert!(
            m.contains(&dead1.to_string()) || m.contains(&dead2.to_string()),
            "message should name the endpoint: {m}"
        );
        assert!(m.contains("echo"), "message should name the cluster: {m}");
    }
    let (n, s) = bounded(async { stream_error(c.server_stream(msg(b"x")).await).await }).await;
    assert_eq!((n, s.code()), (0, Code::Unavailable), "{s:?}");
    wait_settled(&gw, &[("UNAVAILABLE", 4)]).await;
}

/// An upstream that ends its connection with an error GOAWAY but leaves the socket open (nghttp2 does,
/// after a header block too large for it) fails the calls on it at once with UNAVAILABLE, rather than
/// leaving them to hang until their deadline or forever.
#[tokio::test]
async fn upstream_error_goaway_fails_calls_at_once() {
    let up = goaway_upstream(h2::Reason::COMPRESSION_ERROR, false).await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..2 {
        let s = expect_err(bounded(c.unary(msg(b"x"))).await);
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("COMPRESSION_ERROR"), "{s:?}");
        assert!(s.message().contains(&up.addr.to_string()), "{s:?}");
    }
    // Server streaming too: its response never started.
    let (n, s) = bounded(async { stream_error(c.server_stream(msg(b"x")).await).await }).await;
    assert_eq!((n, s.code()), (0, Code::Unavailable), "{s:?}");
    assert_eq!(
        up.headers_seen.load(SeqCst),
        3,
        "a call on an errored connection was sent again"
    );
    wait_settled(&gw, &[("UNAVAILABLE", 3)]).await;
}

/// A whole trailers-only answer that arrives in the same read as the upstream's error GOAWAY reaches the
/// client with its own status, even for a call whose request is still open (the connection error must
/// not hide an END_STREAM already received).
#[tokio::test]
async fn answer_before_error_goaway_keeps_its_status() {
    let up = goaway_upstream_answering(h2::Reason::INTERNAL_ERROR, false, true).await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let mut c = edge_client(&gw).await;
    let (tx, rx) = mpsc::channel::<EchoRequest>(1);
    tx.send(msg(b"x")).await.unwrap();
    // `tx` stays alive: the request is still open when the answer comes.
    let s = expect_err(bounded(c.client_stream(ReceiverStream::new(rx))).await);
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // As a trailers-only answer: a client reading grpc-status from the headers (tonic) cannot tell,
    // but the proxy's own count shows what it forwarded.
    wait_settled(&gw, &[("INVALID_ARGUMENT", 1)]).await;
    drop(tx);
}

/// A stream the upstream refused without processing it is sent again, body included, to the endpoint
/// the balancer picks next, and the client never sees the refusal: a stream above the last_stream_id
/// of a GOAWAY (what a backend ending a connection at its max age does, with one GOAWAY, as nghttp2
/// does), or one reset with REFUSED_STREAM.
#[tokio::test]
async fn refused_streams_are_sent_again() {
    let refuser = goaway_upstream(h2::Reason::NO_ERROR, true).await;
    let b = backends(1).await;
    let gw = start(&config_with(&[refuser.addr, b[0].addr], "")).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..4 {
        let r = bounded(c.unary(msg(b"abc"))).await.expect("unary");
        assert_eq!(r.into_inner().payload, b"abc");
        // A body of many frames, replayed whole.
        let reqs: Vec<EchoRequest> = (1..=20usize).map(|i| msg(&vec![7u8; i * 100])).collect();
        let want: u64 = reqs.iter().map(|r| r.payload.len() as u64).sum();
        let r = bounded(c.client_stream(tokio_stream::iter(reqs)))
            .await
            .expect("client stream")
            .into_inner();
        assert_eq!((r.seq, r.total_bytes), (20, want));
    }
    // Round robin sent half of the first attempts to the refuser.
    assert!(
        refuser.headers_seen.load(SeqCst) >= 4,
        "the refuser was not tried"
    );
    let backend = b[0].addr.to_string();
    let ok = [("endpoint", backend.as_str()), ("grpc_status", "OK")];
    wait_sample(&gw, "grpcgate_requests_total", &ok, 8.0).await;
    // Every refusal is counted, against the endpoint that refused.
    let refuser_addr = refuser.addr.to_string();
    wait_sample(
        &gw,
        "grpcgate_upstream_refused_total",
        &[("endpoint", refuser_addr.as_str())],
        refuser.headers_seen.load(SeqCst) as f64,
    )
    .await;

    let up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr, b[0].addr], "")).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..4 {
        let mut req = Request::new(msg(b"x"));
        req.metadata_mut()
            .insert("x-behave", "refuse".parse().unwrap());
        bounded(c.unary(req))
            .await
            .expect("sent again after REFUSED_STREAM");
    }
    wait_sample(&gw, "grpcgate_requests_total", &ok, 4.0).await;
}

/// Calls whose client stopped reading hold up only themselves. Each keeps up to a stream window of
/// its upstream connection's window, which is shared with every other call on that connection (other
/// clients' too); a dozen stalled calls must not stop the rest (head-of-line blocking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_block_other_calls() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    // The client's own windows must not be what stalls: a small one per stream, plenty per connection.
    let ch = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        gw.listener_addr("edge").unwrap()
    ))
    .unwrap()
    .initial_stream_window_size(Some(256 * 1024))
    .initial_connection_window_size(Some(1 << 30))
    .connect_timeout(WAIT)
    .connect()
    .await
    .expect("connect");
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let req = EchoRequest {
            payload: vec![7u8; 256 * 1024],
            count: 64,
            ..Default::default()
        };
        let mut s = bounded(echo(&ch).server_stream(req))
            .await
            .expect("stream")
            .into_inner();
        bounded(s.message())
            .await
            .expect("first message")
            .expect("one");
        stalled.push(s); // and never read again
    }
    // 16 streams × up to 1 MiB each is twice the 8 MiB connection window grpcgate used to have.
    for _ in 0..3 {
        let r = bounded(echo(&ch).unary(msg(b"still here")))
            .await
            .expect("unary beside stalled streams");
        assert_eq!(r.into_inner().payload, b"still here");
    }
    drop(stalled);
}

#[tokio::test]
async fn route_timeout_is_deadline_exceeded() {
    let b = backends(1).await;
    let gw = start(&config_with(&addrs(&b), r#"timeout = "100ms""#)).await;
    let mut c = edge_client(&gw).await;
    let t = Instant::now();
    let s = expect_err(bounded(c.unary(slow(30_000))).await);
    let took = t.elapsed();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("100ms"), "{s:?}");
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    bounded(b[0].stats.wait_cancelled(1)).await;

    // A fast call on the same route is fine.
    bounded(c.unary(msg(b"quick"))).await.unwrap();
    wait_settled(&gw, &[("DEADLINE_EXCEEDED", 1), ("OK", 1)]).await;
}

/// The proxy's own deadline must win even when the upstream's answer to it arrives at the same time.
/// The proxy forwards the remaining budget as `grpc-timeout`, and a tonic backend answers CANCELLED
/// ("Timeout expired") when that runs out, a moment after the proxy's deadline. Here the proxy's runtime
/// is held up until the backend has timed out, so both are ready together: the client must still get
/// DEADLINE_EXCEEDED (the contract), every time.
#[tokio::test]
async fn route_deadline_wins_over_upstream_timeout_answer() {
    const CALLS: u64 = 40;
    let b = backends(1).await;
    let stats = b[0].stats.clone();
    let gw = start(&config_with(&addrs(&b), r#"timeout = "50ms""#)).await;
    let c = edge_client(&gw).await;
    let mut codes = Vec::new();
    for i in 1..=CALLS {
        let mut c1 = c.clone();
        let call = tokio::spawn(async move { c1.unary(slow(30_000)).await });
        bounded(stats.wait_started(i)).await;
        // Block this current-thread runtime (the proxy's) until the backend's timer has fired.
        let until = Instant::now() + WAIT;
        while stats.cancelled.load(SeqCst) < i {
            assert!(Instant::now() < until, "the backend never timed out");
            std::thread::yield_now();
        }
        codes.push(expect_err(bounded(call).await.unwrap()).code());
    }
    let wrong = codes
        .iter()
        .filter(|c| **c != Code::DeadlineExceeded)
        .count();
    assert_eq!(wrong, 0, "statuses seen by the client: {codes:?}");
    wait_settled(&gw, &[("DEADLINE_EXCEEDED", CALLS)]).await;
}

/// The route timeout also cuts off a stream that already sent messages: the trailers carry
/// DEADLINE_EXCEEDED.
#[tokio::test]
async fn route_timeout_ends_a_running_stream() {
    let b = backends(1).await;
    let gw = start(&config_with(&addrs(&b), r#"timeout = "400ms""#)).await;
    let mut c = edge_client(&gw).await;
    let (got, status) = bounded(async {
        stream_error(
            c.server_stream(EchoRequest {
                count: 100_000,
                delay_ms: 5,
                ..Default::default()
            })
            .await,
        )
        .await
    })
    .await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(got > 0, "no message arrived before the deadline");
    bounded(b[0].stats.wait_cancelled(1)).await;
    wait_settled(&gw, &[("DEADLINE_EXCEEDED", 1)]).await;
}

/// The client's `grpc-timeout` (200ms) beats the route's 10s: DEADLINE_EXCEEDED from the proxy, and
/// the backend's handler is cancelled. (A raw client, because a tonic client enforces its own
/// `grpc-timeout` locally and would give up before the proxy answers.)
#[tokio::test]
async fn client_deadline_shorter_than_route_timeout_wins() {
    let b = backends(1).await;
    let gw = start(&config_with(&addrs(&b), r#"timeout = "10s""#)).await;
    let edge = gw.listener_addr("edge").unwrap();
    let t = Instant::now();
    let r = bounded(raw_call(
        edge,
        "/echo.Echo/Unary",
        &[("grpc-timeout", b"200m")],
        grpc_frame(&slow(30_000)),
    ))
    .await;
    let took = t.elapsed();
    assert_eq!(r.status, http::StatusCode::OK);
    let end = r.trailers.as_ref().unwrap_or(&r.headers);
    assert_eq!(end.get("grpc-status").expect("grpc-status"), "4", "{r:?}");
    let message = grpcgate::grpc::decode_message(end.get("grpc-message").expect("grpc-message"));
    assert!(message.contains("deadline"), "{message}");
    assert!(took >= Duration::from_millis(195), "{took:?}");
    assert!(
        took < Duration::from_secs(5),
        "route timeout used instead: {took:?}"
    );
    bounded(b[0].stats.wait_cancelled(1)).await;
    wait_settled(&gw, &[("DEADLINE_EXCEEDED", 1)]).await;
}

/// The upstream gets the remaining budget as `grpc-timeout`: never more than the shorter of the
/// route timeout and the client's own.
#[tokio::test]
async fn remaining_budget_is_forwarded_as_grpc_timeout() {
    let mut up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr], r#"timeout = "2s""#)).await;
    let edge = gw.listener_addr("edge").unwrap();
    let body = grpc_frame(&msg(b""));

    let r = bounded(raw_call(
        edge,
        "/echo.Echo/Unary",
        &[("x-behave", b"hang"), ("grpc-timeout", b"150m")],
        body.clone(),
    ))
    .await;
    let seen = bounded(up.seen.recv()).await.unwrap();
    let forwarded =
        grpcgate::grpc::parse_timeout(seen.get("grpc-timeout").expect("grpc-timeout forwarded"))
            .unwrap();
    assert!(
        forwarded <= Duration::from_millis(150) && forwarded > Duration::ZERO,
        "{forwarded:?}"
    );
    assert_eq!(
        r.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "{r:?}"
    );

    // Without a client deadline the route's applies (and is what the upstream is told).
    let r = bounded(raw_call(
        edge,
        "/echo.Echo/Unary",
        &[("x-behave", b"hang")],
        body,
    ))
    .await;
    let seen = bounded(up.seen.recv()).await.unwrap();
    let forwarded =
        grpcgate::grpc::parse_timeout(seen.get("grpc-timeout").expect("grpc-timeout forwarded"))
            .unwrap();
    assert!(
        forwarded <= Duration::from_secs(2) && forwarded > Duration::from_secs(1),
        "{forwarded:?}"
    );
    assert_eq!(
        r.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "{r:?}"
    );
    wait_settled(&gw, &[("DEADLINE_EXCEEDED", 2)]).await;
}

/// A backend that dies while a server stream is running: the client gets UNAVAILABLE with a message
/// (not a hang, not OK), and the next calls fail over to the surviving backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_stream_is_unavailable() {
    let mut b = backends(2).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    // Round robin: the first call goes to b0.
    let mut s = bounded(c.server_stream(EchoRequest {
        count: 1_000_000,
        delay_ms: 2,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let first = bounded(s.message()).await.unwrap().unwrap();
    assert_eq!(first.backend, "b0");
    kill(&mut b[0]);
    let status = bounded(async {
        loop {
            match s.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended OK after the backend died"),
                Err(e) => break e,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&b[0].addr.to_string()),
        "message should name the backend: {status:?}"
    );

    for _ in 0..4 {
        let r = bounded(c.unary(msg(b"after"))).await.unwrap().into_inner();
        assert_eq!(r.backend, "b1");
    }
    let s = wait_settled(&gw, &[("UNAVAILABLE", 1), ("OK", 4)]).await;
    let dead = b[0].addr.to_string();
    assert_eq!(
        sample(
            &s,
            "grpcgate_requests_total",
            &[("endpoint", dead.as_str()), ("grpc_status", "UNAVAILABLE")]
        ),
        1.0
    );
}

/// Non-gRPC answers from an upstream become proper gRPC statuses (the spec's HTTP mapping), and so
/// does a refused stream and a response without grpc-status.
#[tokio::test]
async fn non_grpc_upstream_answers_are_mapped() {
    let up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let mut c = edge_client(&gw).await;
    let cases: &[(&str, Code)] = &[
        ("http-503", Code::Unavailable),
        ("http-502", Code::Unavailable),
        ("http-504", Code::Unavailable),
        ("http-429", Code::Unavailable),
        ("http-401", Code::Unauthenticated),
        ("http-403", Code::PermissionDenied),
        ("http-404", Code::Unimplemented),
        ("http-500", Code::Unknown),
        ("refuse", Code::Unavailable),
        ("no-status", Code::Internal),
    ];
    for (behave, code) in cases {
        let mut req = Request::new(msg(b"x"));
        req.metadata_mut()
            .insert("x-behave", behave.parse().unwrap());
        let s = expect_err(bounded(c.unary(req)).await);
        assert_eq!(s.code(), *code, "{behave}: {s:?}");
        assert!(!s.message().is_empty(), "{behave}: no message");
        if let Some(http) = behave.strip_prefix("http-") {
            assert!(s.message().contains(http), "{behave}: {s:?}");
        }
    }
    wait_settled(
        &gw,
        &[
            ("UNAVAILABLE", 5),
            ("UNAUTHENTICATED", 1),
            ("PERMISSION_DENIED", 1),
            ("UNIMPLEMENTED", 1),
            ("UNKNOWN", 1),
            ("INTERNAL", 1),
        ],
    )
    .await;
}

/// An upstream that answers HTTP 200 but not with gRPC (an HTML page from a misrouted web server) is
/// a non-gRPC response like any other: a trailers-only status from the proxy (UNKNOWN, as the spec maps
/// any status it does not list), not the page's bytes handed to a gRPC client to choke on.
#[tokio::test]
async fn non_grpc_200_answer_is_mapped() {
    let up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let edge = gw.listener_addr("edge").unwrap();
    let r = bounded(raw_call(
        edge,
        "/echo.Echo/Unary",
        &[("x-behave", b"html")],
        grpc_frame(&msg(b"x")),
    ))
    .await;
    assert!(r.body.is_empty(), "the HTML page was forwarded: {r:?}");
    assert_eq!(
        r.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"2"[..]),
        "{r:?}"
    );
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
        "{r:?}"
    );
    let message =
        grpcgate::grpc::decode_message(r.headers.get("grpc-message").expect("grpc-message"));
    assert!(message.contains("grpcgate"), "{message}");
    wait_settled(&gw, &[("UNKNOWN", 1)]).await;
}

// ---------------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------------

/// A client that gives up on a call (RST_STREAM) makes the backend's handler stop: a unary call the
/// backend is still working on, and a server stream after its first message. (Client-streaming and
/// bidi calls with their request stream still open are covered with a raw upstream below: hyper reports
/// a peer's RST_STREAM(CANCEL) to the echo handler as a clean end of the request body, so the echo
/// backend counts such a call as completed, not cancelled, even when talked to directly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_reaches_the_backend() {
    let b = backends(1).await;
    let stats = b[0].stats.clone();
    let gw = gateway_for(&b).await;
    let c = edge_client(&gw).await;

    // Unary, while the backend is still working on it.
    let mut c1 = c.clone();
    let call = tokio::spawn(async move { c1.unary(slow(60_000)).await });
    bounded(stats.wait_started(1)).await;
    call.abort();
    bounded(stats.wait_cancelled(1)).await;

    // Server streaming, after a first message.
    let mut c2 = c.clone();
    let mut s = bounded(c2.server_stream(EchoRequest {
        count: 1_000_000,
        delay_ms: 5,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    bounded(s.message()).await.unwrap().unwrap();
    drop(s);
    bounded(stats.wait_cancelled(2)).await;

    assert_eq!(stats.completed.load(SeqCst), 0);
    wait_settled(&gw, &[("CANCELLED", 2)]).await;
}

/// A client's RST_STREAM on a client-streaming or bidi call whose request stream is still open is
/// passed upstream as RST_STREAM, both before the upstream answered (`hang`) and after it sent headers
/// and a message (`stream`).
#[tokio::test]
async fn client_reset_of_open_request_stream_resets_upstream() {
    let mut up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let edge = gw.listener_addr("edge").unwrap();
    for path in ["/echo.Echo/ClientStream", "/echo.Echo/Bidi"] {
        for behave in ["hang", "stream"] {
            let (resp, mut send) =
                bounded(raw_open(edge, path, &[("x-behave", behave.as_bytes())])).await;
            send.send_data(grpc_frame(&msg(b"ping")), false).unwrap();
            bounded(up.seen.recv()).await.unwrap();
            if behave == "stream" {
                let mut body = bounded(resp).await.unwrap().into_body();
                let first = bounded(body.data()).await.expect("a message").unwrap();
                assert!(!first.is_empty());
                send.send_reset(h2::Reason::CANCEL);
            } else {
                send.send_reset(h2::Reason::CANCEL);
                drop(resp);
            }
            let reason = bounded(up.resets.recv()).await.unwrap();
            assert_eq!(reason, h2::Reason::CANCEL, "{path} {behave}");
        }
    }
    wait_settled(&gw, &[("CANCELLED", 4)]).await;
}

/// Header blocks stay exact while the HPACK dynamic table of the pooled upstream connection churns:
/// 300 calls over 60 paths (grpcgate's h2 indexes `:path`) and 90 values of a custom header, far
/// more than the 4 KiB table holds, so entries are found, inserted and evicted all along. Each call
/// is checked where the upstream decoded it.
#[tokio::test]
async fn headers_survive_hpack_table_churn() {
    let mut up = raw_upstream().await;
    let gw = start(&config_with(&[up.addr], "")).await;
    let edge = gw.listener_addr("edge").unwrap();
    for i in 0..300 {
        let path = format!("/churn.Service{}/MethodWithALongishName{}", i % 60, i % 7);
        let value = format!("value-{}", i % 90);
        let headers: &[(&str, &[u8])] =
            &[("x-behave", b"no-status"), ("x-churn", value.as_bytes())];
        let (resp, mut send) = bounded(raw_open(edge, &path, headers)).await;
        send.send_data(grpc_frame(&msg(b"ping")), true).unwrap();
        let seen = bounded(up.seen.recv()).await.unwrap();
        assert_eq!(seen.get("x-seen-path").unwrap(), path.as_str(), "call {i}");
        assert_eq!(seen.get("x-churn").unwrap(), value.as_str(), "call {i}");
        assert_eq!(
            seen.get("content-type").unwrap(),
            "application/grpc",
            "call {i}"
        );
        assert_eq!(seen.get("te").unwrap(), "trailers", "call {i}");
        let resp = bounded(resp).await.unwrap();
        assert_eq!(resp.status(), 200, "call {i}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Metrics after a mix of outcomes
// ---------------------------------------------------------------------------------------------------

/// A unary call to any path over `ch` (for paths no generated client has).
async fn call_path(ch: &Channel, path: &'static str) -> Result<EchoResponse, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let codec = tonic::codec::ProstCodec::<EchoRequest, EchoResponse>::default();
    g.unary(
        Request::new(msg(b"")),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Successes, backend errors, route deadlines, a client cancel and an unrouted call over one client
/// connection: afterwards no endpoint has anything in flight, the request counters by status are
/// exactly what the clients saw, and the downstream connection gauge follows the client's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_what_clients_saw() {
    let b = backends(2).await;
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "edge"
listen = "127.0.0.1:0"

[[listeners.routes]]
service = "echo.Echo"
method = "ClientStream"
cluster = "echo"
timeout = "100ms"

[[listeners.routes]]
service = "echo.Echo"
cluster = "echo"

[[clusters]]
name = "echo"
balancer = "round_robin"
endpoints = ["{}", "{}"]
"#,
        b[0].addr, b[1].addr
    );
    let gw = start(&text).await;
    let ch = edge_channel(&gw).await;
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_active",
        &[("listener", "edge")],
        1.0,
    )
    .await;

    let mut seen = BTreeMap::<&'static str, u64>::new();
    let mut count = |code: Code| {
        let name = match code {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::NotFound => "NOT_FOUND",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::Unimplemented => "UNIMPLEMENTED",
            other => panic!("unexpected status {other:?}"),
        };
        *seen.entry(name).or_default() += 1;
    };
    let mut c = echo(&ch);
    for i in 0..10u32 {
        let r = bounded(c.unary(EchoRequest {
            fail_code: if i % 3 == 0 { Code::NotFound as i32 } else { 0 },
            ..Default::default()
        }))
        .await;
        count(r.map(|_| Code::Ok).unwrap_or_else(|s| s.code()));
    }
    for _ in 0..2 {
        let mut s = bounded(c.server_stream(EchoRequest {
            count: 5,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        let end = bounded(async {
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Code::Ok,
                    Err(e) => break e.code(),
                }
            }
        })
        .await;
        count(end);
    }
    for _ in 0..2 {
        let r = bounded(c.client_stream(tokio_stream::iter(vec![slow(30_000)]))).await;
        count(expect_err(r).code());
    }
    // A call the client gives up on once the proxy has it in flight to a backend.
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.unary(slow(60_000)).await });
    wait_sample(&gw, "grpcgate_endpoint_in_flight", &[], 1.0).await;
    call.abort();
    count(Code::Cancelled);
    count(expect_err(bounded(call_path(&ch, "/other.Svc/Nope")).await).code());

    let expected: Vec<(&str, u64)> = seen.iter().map(|(k, v)| (*k, *v)).collect();
    // (How the two route deadlines and the cancel split between DEADLINE_EXCEEDED and CANCELLED is
    // checked by the deadline tests; here what matters is that the metrics agree with the clients.)
    let get = |k: &str| seen.get(k).copied().unwrap_or(0);
    assert_eq!(
        (get("OK"), get("NOT_FOUND"), get("UNIMPLEMENTED")),
        (8, 4, 1),
        "{seen:?}"
    );
    assert_eq!(get("DEADLINE_EXCEEDED") + get("CANCELLED"), 3, "{seen:?}");
    let s = wait_settled(&gw, &expected).await;
    // Calls that reached an endpoint are labelled with it; the unrouted one with neither.
    for backend in &b {
        let ep = backend.addr.to_string();
        let on_ep = sample(
            &s,
            "grpcgate_requests_total",
            &[("cluster", "echo"), ("endpoint", ep.as_str())],
        );
        assert!(on_ep >= 7.0, "{ep}: {on_ep}");
    }
    assert_eq!(
        sample(
            &s,
            "grpcgate_requests_total",
            &[
                ("cluster", ""),
                ("endpoint", ""),
                ("grpc_status", "UNIMPLEMENTED")
            ]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "grpcgate_downstream_connections_active",
            &[("listener", "edge")]
        ),
        1.0
    );

    drop(c);
    drop(ch);
    // The client closing its connection takes it off the gauge.
    wait_sample(
        &gw,
        "grpcgate_downstream_connections_active",
        &[("listener", "edge")],
        0.0,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------------
// Flow control
// ---------------------------------------------------------------------------------------------------

/// 256 MiB in 1 MiB messages through a client stream: every byte arrives (the backend counts them),
/// which only works if flow-control credit is returned hop by hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_client_stream_completes() {
    const MESSAGES: usize = 256;
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let chunk = vec![0x5au8; 1 << 20];
    let reqs = tokio_stream::iter((0..MESSAGES).map(move |_| msg(&chunk)));
    let r = bounded(c.client_stream(reqs)).await.unwrap().into_inner();
    assert_eq!(r.seq as usize, MESSAGES);
    assert_eq!(r.total_bytes, (MESSAGES as u64) << 20);
    wait_settled(&gw, &[("OK", 1)]).await;
}

/// 64 MiB back through a server stream in 1 MiB messages, far more than all the flow-control windows on
/// the way: every message arrives intact and in order, so response-direction credit is returned hop by
/// hop too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_server_stream_completes() {
    const MESSAGES: u32 = 64;
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 253) as u8).collect();
    let mut s = bounded(c.server_stream(EchoRequest {
        payload: payload.clone(),
        count: MESSAGES,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    // Before the client reads anything the call shows as in flight.
    wait_sample(&gw, "grpcgate_endpoint_in_flight", &[], 1.0).await;
    let mut n = 0;
    while let Some(m) = bounded(s.message()).await.unwrap() {
        assert_eq!(m.seq, n);
        assert!(m.payload == payload, "message {n} corrupted");
        n += 1;
    }
    assert_eq!(n, MESSAGES);
    wait_settled(&gw, &[("OK", 1)]).await;
}

/// An upstream that allows only 4 concurrent streams per connection gets more connections, not a queue:
/// 20 slow calls at once all run at the same time over 5 upstream connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stream_limit_opens_more_connections() {
    let b = grpcgate::echo::EchoBackend::start_with(
        "127.0.0.1:0".parse().unwrap(),
        "b0",
        Duration::ZERO,
        Some(4),
    )
    .await
    .expect("backend");
    let stats = b.stats.clone();
    let gw = start(&config_text(&[b.addr], "round_robin", "", "")).await;
    let c = edge_client(&gw).await;
    // Warm one connection so the proxy has seen the backend's SETTINGS before the burst.
    bounded(c.clone().unary(msg(b"warm"))).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut c = c.clone();
        calls.spawn(async move { c.unary(slow(1_000)).await });
    }
    // All 20 reach the backend at once (1 + 20 started): none waits behind the 4-stream limit.
    bounded(stats.wait_started(21)).await;
    let pool = &gw.clusters()[0].endpoints[0].pool;
    assert!(
        pool.connections() >= 5,
        "{} upstream connection(s)",
        pool.connections()
    );
    while let Some(r) = bounded(calls.join_next()).await {
        r.expect("task").expect("call");
    }
}

/// Request bodies that end with END_STREAM on their last DATA frame are forwarded the same way, and the
/// connection-level flow-control credit of that last frame still goes back to the client: 48 calls of
/// 1 MiB on one raw h2 connection (6x the proxy's 8 MiB connection window) all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_frame_credit_returns_to_the_connection() {
    let b = backends(1).await;
    let gw = gateway_for(&b).await;
    let addr = gw.listener_addr("edge").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let body = grpc_frame(&msg(&vec![7u8; 1 << 20]));
    for _ in 0..48 {
        let mut client = bounded(client.clone().ready()).await.expect("ready");
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/echo.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).expect("send request");
        // One send_data with end_of_stream: h2 puts END_STREAM on the last DATA frame.
        send.send_data(body.clone(), true).expect("send body");
        let mut resp = bounded(resp).await.expect("response").into_body();
        let mut got = 0;
        while let Some(chunk) = bounded(resp.data()).await {
            let chunk = chunk.expect("data");
            got += chunk.len();
            let _ = resp.flow_control().release_capacity(chunk.len());
        }
        let trailers = bounded(resp.trailers())
            .await
            .expect("trailers")
            .expect("some trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert!(got > 1 << 20, "{got}");
    }
}

/// Each data-plane worker owns its upstream connections: with two workers, two client connections land
/// on different workers and each opens its own connection to the backend; more clients reuse them.
/// Changing `workers` needs a restart, so a reload that changes it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_own_their_upstream_connections() {
    let backends = backends(1).await;
    // config_text asks for two workers.
    let text = config_text(&[backends[0].addr], "round_robin", "", "");
    let gw = start(&text).await;
    assert_eq!(gw.workers(), 2);
    for _ in 0..4 {
        // A fresh channel is a fresh downstream connection; the listener deals them out round-robin.
        let mut c = edge_client(&gw).await;
        for _ in 0..3 {
            bounded(c.unary(msg(b"hi"))).await.expect("call");
        }
    }
    let pool = &gw.clusters()[0].endpoints[0].pool;
    assert_eq!(pool.connections(), 2, "one upstream connection per worker");

    let changed = text.replace("workers = 2", "workers = 3");
    let err = gw
        .reload(parse(&changed))
        .expect_err("workers cannot change on reload");
    assert!(err.contains("workers"), "{err}");
    // Still serving on the old config.
    bounded(edge_client(&gw).await.unary(msg(b"after")))
        .await
        .expect("call after refused reload");
}

/// With `busy_poll` the workers spin instead of sleeping; calls still go through, the gateway still
/// shuts down (the spinning task ends with its worker), and the setting cannot change on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_workers_serve_and_stop() {
    let backends = backends(1).await;
    let text = config_text(&[backends[0].addr], "round_robin", "", "")
        .replace("workers = 2", "workers = 1\nbusy_poll = true");
    let gw = start(&text).await;
    let mut c = edge_client(&gw).await;
    for i in 0..3u8 {
        let r = bounded(c.unary(msg(&[i])))
            .await
            .expect("call")
            .into_inner();
        assert_eq!(r.payload, [i]);
    }
    let changed = text.replace("busy_poll = true", "busy_poll = false");
    let err = gw
        .reload(parse(&changed))
        .expect_err("busy_poll cannot change on reload");
    assert!(err.contains("busy_poll"), "{err}");
    drop(c);
    assert!(
        bounded(gw.shutdown(Duration::from_secs(5))).await,
        "clean shutdown"
    );
}
