//! Issue 17 item 7: a malformed request (RFC 9113 §8.2.1, §8.1.1: an uppercase or invalid header
//! name, CR/LF/NUL in a value, an unknown pseudo-header) is a stream error. The bad stream gets
//! RST_STREAM(PROTOCOL_ERROR); a call in flight on the same connection completes, and the connection
//! stays open for more calls. Header blocks are hand-built HPACK literals (tests/common/raw_h2.rs).

mod common;
#[path = "common/raw_h2.rs"]
mod raw_h2;

use std::time::Duration;

use grpcgate::echo::EchoBackend;
use grpcgate::pb::echo::EchoResponse;
use prost::Message;
use raw_h2::{frame, literal, literal_indexed, unary_block, Event, RawConn};
use raw_h2::{DATA, END_HEADERS, END_STREAM, HEADERS, PROTOCOL_ERROR};

/// CONTINUATION frame type.
const CONTINUATION: u8 = 0x9;

/// What happened to each stream of interest.
#[derive(Default, Debug)]
struct Outcome {
    /// The good call's response message and whether its trailers (END_STREAM) came.
    good_payload: Option<Vec<u8>>,
    good_ended: bool,
    /// RST_STREAM code the bad stream got.
    bad_reset: Option<u32>,
}

/// Reads events until the good call ended and the bad stream was reset (either may be absent: 0).
/// Panics on GOAWAY, a close, or a reset of the good call.
async fn outcome(conn: &mut RawConn, good: u32, bad: u32) -> Outcome {
    let mut o = Outcome::default();
    conn.until(|e| {
        match e {
            Event::Data {
                stream, payload, ..
            } if *stream == good => {
                let msg = EchoResponse::decode(&payload[5..]).expect("EchoResponse");
                o.good_payload = Some(msg.payload);
            }
            Event::Headers {
                stream,
                end_stream: true,
            } if *stream == good => o.good_ended = true,
            Event::Reset { stream, code } if *stream == bad => o.bad_reset = Some(*code),
            Event::Reset { stream, code } => panic!("stream {stream} reset ({code:#x})"),
            Event::GoAway { code, debug, .. } => panic!("GOAWAY({code:#x}, {debug:?})"),
            Event::Closed => panic!("connection closed"),
            _ => {}
        }
        ((good == 0 || o.good_ended) && (bad == 0 || o.bad_reset.is_some())).then_some(())
    })
    .await;
    o
}

/// A good unary call on `id` asking the backend to wait `delay_ms`, with `extra` header fields.
fn good_call(id: u32, payload: &[u8], delay_ms: u32, extra: &[Vec<u8>]) -> Vec<u8> {
    let mut f = frame(HEADERS, END_HEADERS, id, &unary_block(extra));
    f.extend(frame(
        DATA,
        END_STREAM,
        id,
        &raw_h2::echo_message(payload, delay_ms),
    ));
    f
}

/// Each kind of malformed request on a connection that carries a call in flight: the bad stream is
/// reset with PROTOCOL_ERROR, the call completes, and a later call on the connection works.
#[tokio::test]
async fn malformed_request_is_a_stream_error() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = common::gateway_for(std::slice::from_ref(&backend)).await;
    let addr = gw.listener_addr("edge").unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("uppercase name", unary_block(&[literal(b"X-Upper", b"1")])),
        ("space in name", unary_block(&[literal(b"x bad", b"1")])),
        ("CR in value", unary_block(&[literal(b"x-bad", b"a\rb")])),
        ("LF in value", unary_block(&[literal(b"x-bad", b"a\nb")])),
        ("NUL in value", unary_block(&[literal(b"x-bad", b"a\0b")])),
        ("unknown pseudo-header", {
            let mut b = literal(b":foo", b"bar");
            b.extend(unary_block(&[]));
            b
        }),
    ];
    for (what, block) in cases {
        let mut conn = RawConn::connect(addr).await;
        // Stream 1: a good call the backend answers after 200 ms, in flight when the bad one comes.
        conn.send(good_call(1, b"first", 200, &[]));
        conn.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block));
        let o = outcome(&mut conn, 1, 3).await;
        assert_eq!(o.bad_reset, Some(PROTOCOL_ERROR), "{what}: bad stream");
        assert_eq!(o.good_payload.as_deref(), Some(&b"first"[..]), "{what}");
        // The connection still takes calls.
        conn.send(good_call(5, b"after", 0, &[]));
        let o = outcome(&mut conn, 5, 0).await;
        assert_eq!(o.good_payload.as_deref(), Some(&b"after"[..]), "{what}");
        println!("{what}: RST_STREAM(PROTOCOL_ERROR) on the bad stream; calls before and after OK");
    }
}

/// The HPACK state survives a malformed block: fields of the bad request that went into the dynamic
/// table (the malformed one and a good one after it) are there for the next requests. A request
/// using the good entry works; one using the malformed entry is malformed too. A malformed block
/// split over HEADERS and CONTINUATION is handled the same way.
#[tokio::test]
async fn malformed_request_keeps_hpack_in_sync() {
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = common::gateway_for(std::slice::from_ref(&backend)).await;
    let mut conn = RawConn::connect(gw.listener_addr("edge").unwrap()).await;

    // Stream 1, malformed: table after it: 62 = x-after: 1, 63 = X-Bad: v.
    let bad = unary_block(&[
        literal_indexed(b"X-Bad", b"v"),
        literal_indexed(b"x-after", b"1"),
    ]);
    conn.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, &bad));
    let o = outcome(&mut conn, 0, 1).await;
    assert_eq!(o.bad_reset, Some(PROTOCOL_ERROR));

    // Stream 3 refers to x-after by index: decoded as sent, a good call.
    conn.send(good_call(3, b"indexed", 0, &[raw_h2::indexed(62)]));
    let o = outcome(&mut conn, 3, 0).await;
    assert_eq!(o.good_payload.as_deref(), Some(&b"indexed"[..]));

    // Stream 5 refers to the malformed entry: malformed again. Stream 7, in flight, is fine.
    conn.send(good_call(7, b"beside", 100, &[]));
    conn.send(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        5,
        &unary_block(&[raw_h2::indexed(63)]),
    ));
    let o = outcome(&mut conn, 7, 5).await;
    assert_eq!(o.bad_reset, Some(PROTOCOL_ERROR));
    assert_eq!(o.good_payload.as_deref(), Some(&b"beside"[..]));

    // Stream 9: the malformed field in HEADERS, the rest of the block (with a field that goes into
    // the table) in CONTINUATION. Stream 11 then uses that new entry.
    let mut first = unary_block(&[]);
    first.extend(literal(b"x-upper-NAME", b"1"));
    conn.send(frame(HEADERS, END_STREAM, 9, &first));
    conn.send(frame(
        CONTINUATION,
        END_HEADERS,
        9,
        &literal_indexed(b"x-cont", b"2"),
    ));
    let o = outcome(&mut conn, 0, 9).await;
    assert_eq!(o.bad_reset, Some(PROTOCOL_ERROR));
    conn.send(good_call(11, b"continued", 0, &[raw_h2::indexed(62)]));
    let o = outcome(&mut conn, 11, 0).await;
    assert_eq!(o.good_payload.as_deref(), Some(&b"continued"[..]));
}

/// A client that sends nothing but malformed requests is still stopped: every one costs a reset h2
/// sends on its own, and after h2's `max_local_error_reset_streams` (1,024 per connection) the
/// connection gets GOAWAY(ENHANCE_YOUR_CALM). None reaches the backend.
#[tokio::test]
async fn flood_of_malformed_requests_is_cut_off() {
    const REQUESTS: u32 = 1_100;
    let backend = EchoBackend::start("b0", Duration::ZERO).await.unwrap();
    let gw = common::gateway_for(std::slice::from_ref(&backend)).await;
    let mut conn = RawConn::connect(gw.listener_addr("edge").unwrap()).await;
    let block = unary_block(&[literal(b"X-Upper", b"1")]);
    let mut flood = Vec::new();
    for n in 0..REQUESTS {
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * n + 1, &block));
    }
    conn.send(flood);
    let mut resets = 0;
    let ((code, debug), _) = conn
        .until(|e| match e {
            Event::Reset { code, .. } => {
                assert_eq!(*code, PROTOCOL_ERROR);
                resets += 1;
                None
            }
            Event::GoAway { code, debug, .. } => Some((*code, debug.clone())),
            _ => None,
        })
        .await;
    println!(
        "{REQUESTS} malformed requests: {resets} RST_STREAM, then GOAWAY({code:#x}, {debug:?})"
    );
    // h2 counts 1,024 resets; those still queued when the GOAWAY goes out are not written (when the
    // whole flood is read in one go, none are).
    assert!(resets <= 1_024, "{resets} resets");
    assert_eq!(
        (code, debug.as_str()),
        (raw_h2::ENHANCE_YOUR_CALM, "too_many_internal_resets")
    );
    assert_eq!(
        backend
            .stats
            .started
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
