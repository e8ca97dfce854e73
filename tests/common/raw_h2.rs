//! A hand-built HTTP/2 client for hostile-client tests: frames are written exactly as given (any
//! stream ids, any order, any header bytes), and every frame the server sends back is reported.
//! Header blocks are plain HPACK literals (no Huffman, no dynamic table unless a test builds one).
//! Include with `#[path = "common/raw_h2.rs"] mod raw_h2;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

pub const PROTOCOL_ERROR: u32 = 0x1;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame the server sent.
#[derive(Debug, Clone)]
pub enum Event {
    Headers {
        stream: u32,
        end_stream: bool,
    },
    Data {
        stream: u32,
        payload: Vec<u8>,
        end_stream: bool,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: String,
    },
    /// The server closed the connection (or it failed).
    Closed,
}

/// One frame: 9-byte head and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(
        len < 1 << 14,
        "frame payload over the default max frame size"
    );
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() < 127, "long HPACK strings not supported here");
    out.push(s.len() as u8); // H bit clear: no Huffman
    out.extend_from_slice(s);
}

/// HPACK literal header field without indexing, new name (RFC 7541 §6.2.2).
pub fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_string(&mut out, name);
    hpack_string(&mut out, value);
    out
}

/// HPACK literal header field with incremental indexing, new name (RFC 7541 §6.2.1): the field
/// goes into the decoder's dynamic table.
pub fn literal_indexed(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x40];
    hpack_string(&mut out, name);
    hpack_string(&mut out, value);
    out
}

/// HPACK indexed header field (RFC 7541 §6.1), index < 127.
pub fn indexed(index: u8) -> Vec<u8> {
    assert!(index < 127);
    vec![0x80 | index]
}

/// The header block of a gRPC unary call to echo.Echo/Unary, all literals, followed by `extra`.
pub fn unary_block(extra: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/echo.Echo/Unary"),
        (":authority", "raw.test"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        b.extend(literal(n.as_bytes(), v.as_bytes()));
    }
    for e in extra {
        b.extend_from_slice(e);
    }
    b
}

/// A length-prefixed gRPC message holding an `EchoRequest`.
pub fn echo_message(payload: &[u8], delay_ms: u32) -> Vec<u8> {
    let req = grpcgate::pb::echo::EchoRequest {
        payload: payload.to_vec(),
        delay_ms,
        ..Default::default()
    };
    let body = req.encode_to_vec();
    let mut m = vec![0u8];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend(body);
    m
}

/// Frames of a whole unary call on `stream`: HEADERS, then one DATA with END_STREAM.
pub fn unary_call(stream: u32, payload: &[u8], delay_ms: u32) -> Vec<u8> {
    let mut f = frame(HEADERS, END_HEADERS, stream, &unary_block(&[]));
    f.extend(frame(
        DATA,
        END_STREAM,
        stream,
        &echo_message(payload, delay_ms),
    ));
    f
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// A raw client connection: `send` writes bytes as they are (in one `write_all`), `events` yields
/// what the server sends. SETTINGS and PING are acknowledged by the reader.
pub struct RawConn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl RawConn {
    /// Connects, writes the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let sock = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        sock.set_nodelay(true).unwrap();
        let (mut rd, mut wr) = sock.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                if wr.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let ack_tx = tx.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 9];
            loop {
                if rd.read_exact(&mut head).await.is_err() {
                    let _ = ev_tx.send(Event::Closed);
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if rd.read_exact(&mut payload).await.is_err() {
                    let _ = ev_tx.send(Event::Closed);
                    return;
                }
                let ev = match kind {
                    HEADERS => Some(Event::Headers {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                    }),
                    DATA => Some(Event::Data {
                        stream,
                        payload,
                        end_stream: flags & END_STREAM != 0,
                    }),
                    RST_STREAM => Some(Event::Reset {
                        stream,
                        code: u32::from_be_bytes(payload[..4].try_into().unwrap()),
                    }),
                    GOAWAY => Some(Event::GoAway {
                        last_stream: u32::from_be_bytes(payload[..4].try_into().unwrap())
                            & 0x7fff_ffff,
                        code: u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                        debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                    }),
                    SETTINGS if flags & ACK == 0 => {
                        let _ = ack_tx.send(frame(SETTINGS, ACK, 0, &[]));
                        None
                    }
                    PING if flags & ACK == 0 => {
                        let _ = ack_tx.send(frame(PING, ACK, 0, &payload));
                        None
                    }
                    _ => None,
                };
                if let Some(ev) = ev {
                    if ev_tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        });
        let mut first = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        first.extend(frame(SETTINGS, 0, 0, &[]));
        tx.send(first).unwrap();
        RawConn { tx, events }
    }

    /// Writes `bytes` in one `write_all`. Ignored once the connection is gone.
    pub fn send(&self, bytes: Vec<u8>) {
        let _ = self.tx.send(bytes);
    }

    /// The next event, waiting at most 20 s.
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("no frame from the server within 20 s")
            .unwrap_or(Event::Closed)
    }

    /// Reads events until `pick` returns `Some`, with one 20 s bound for the whole wait.
    pub async fn until<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> (T, Vec<Event>) {
        let mut seen = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let ev = self.events.recv().await.unwrap_or(Event::Closed);
                if let Some(t) = pick(&ev) {
                    seen.push(ev);
                    return t;
                }
                if matches!(ev, Event::Closed) {
                    panic!("connection closed; frames seen: {seen:?}");
                }
                seen.push(ev);
            }
        })
        .await;
        match r {
            Ok(t) => (t, seen),
            Err(_) => panic!("timed out after 20 s; frames seen: {seen:?}"),
        }
    }
}
