//! Raw HTTP/2 clients and measurements for the hostile-client tests (issue 17).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use grpcgate::pb::echo::EchoRequest;
use prost::Message;

use super::{bounded, client, WAIT};

/// One gRPC length-prefixed message.
pub fn grpc_frame(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(body.len() as u32);
    b.put_slice(&body);
    b.freeze()
}

/// A raw h2 client connection to `addr`, built with `builder`.
pub async fn raw_client(
    addr: SocketAddr,
    builder: h2::client::Builder,
) -> h2::client::SendRequest<Bytes> {
    let tcp = bounded(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (client, conn) = bounded(builder.handshake::<_, Bytes>(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A gRPC request head for `path` with extra headers.
pub fn request(addr: SocketAddr, path: &str, headers: &[(&str, &[u8])]) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    req.body(()).unwrap()
}

/// What a raw call ended with: the HTTP status, and the grpc-status and grpc-message from the trailers
/// (or from a trailers-only head).
#[derive(Debug)]
pub struct Outcome {
    pub http: u16,
    pub grpc_status: Option<String>,
    pub grpc_message: String,
}

/// Sends one unary call on `client` and reads it to the end. Err: the stream or connection failed.
pub async fn unary(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    msg: &EchoRequest,
) -> Result<Outcome, h2::Error> {
    let mut ready = bounded(client.clone().ready()).await?;
    let (resp, mut send) = ready.send_request(req, false)?;
    let _ = send.send_data(grpc_frame(msg), true);
    let resp = bounded(resp).await?;
    let (head, mut body) = resp.into_parts();
    let mut trailers = None;
    if !body.is_end_stream() {
        while let Some(chunk) = bounded(body.data()).await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        trailers = bounded(body.trailers()).await?;
    }
    let get = |name: &str| {
        trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .or_else(|| head.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    Ok(Outcome {
        http: head.status.as_u16(),
        grpc_status: get("grpc-status"),
        grpc_message: get("grpc-message").unwrap_or_default(),
    })
}

/// A steady well-behaved client: one unary call every 20 ms on its own connection until `stop`
/// fires; returns (calls, failures).
pub fn steady_client(
    addr: SocketAddr,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let mut client = client(addr).await;
        let mut calls = 0;
        let mut failures = Vec::new();
        while !*stop.borrow() {
            let req = tonic::Request::new(EchoRequest {
                payload: b"steady".to_vec(),
                ..Default::default()
            });
            match tokio::time::timeout(WAIT, client.unary(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                Err(_) => failures.push("timed out".into()),
            }
            calls += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (calls, failures)
    })
}

/// Resident memory of this process (the gateway runs in it), from /proc/self/status.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// User + system CPU time of this process so far.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}
