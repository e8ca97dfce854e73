//! The admin HTTP/1.1 server: `/metrics` (Prometheus text), `/healthz` (alive) and `/ready` (should get
//! traffic: not draining and every cluster has a healthy endpoint).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// How long a connection may take to send a complete request head, counted from when the connection
/// opens or, on a keep-alive connection, from the end of the previous response. A slowloris client
/// (a partial request, then silence or a byte now and then) is closed after this, and so is an idle
/// keep-alive connection: hyper (1.12) restarts this one timer whenever a connection goes idle and
/// has no separate idle timeout. Admin requests are a few hundred bytes from scrapers and probes on a
/// nearby network, so 10 s is generous; a Prometheus scraper whose interval is longer just reconnects.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest any admin connection lives, however busy. The header timeout does not cover a client
/// that keeps a connection busy without ever going idle for 10 s, reads its responses very slowly or
/// trickles a request body; this bounds all of them. At this age the connection is closed gracefully
/// (at once if idle, after the response being written otherwise) and [`CLOSE_GRACE`] later for good.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// How long a connection that reached [`MAX_CONNECTION_AGE`] may take to finish its response (the
/// answers are built in memory, so only a client not reading can make this last).
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Admin connections served at the same time; one more is closed as soon as it is accepted. Scrapers
/// and probes need a handful, so 64 leaves room while keeping a flood of idle connections from using
/// up the process's file descriptors (which the data plane needs) or memory (hyper buffers up to
/// ~400 KB per connection). The price: a client that keeps reopening silent connections can hold
/// every slot and keep the admin server (not the data plane) unavailable for as long as it does so;
/// each connection it holds is closed after [`HEADER_READ_TIMEOUT`].
pub const MAX_CONNECTIONS: usize = 64;

/// The pause after a failed `accept` before the next try. A failure is usually EMFILE/ENFILE (out of
/// file descriptors), which leaves the pending connection in the backlog: the listener stays readable
/// and retrying at once would spin a core until a descriptor frees up. The data-plane listener uses
/// the same 50 ms.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the admin address and serves it until `shutdown` fires; returns the bound address.
///
/// Connections are bounded by [`HEADER_READ_TIMEOUT`], [`MAX_CONNECTION_AGE`] and
/// [`MAX_CONNECTIONS`]; accept errors are retried every [`ACCEPT_ERROR_BACKOFF`].
pub async fn spawn(
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin: cannot bind {addr}: {e}")))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "admin listening");
    tokio::spawn(accept_loop(listener, shared, shutdown));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Each condition is logged when it starts, not on every connection or retry: under a flood or
    // while out of descriptors that would be thousands of lines a second.
    let mut accept_failing = false;
    let mut at_capacity = false;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if !accept_failing {
                    accept_failing = true;
                    tracing::warn!(
                        error = %e,
                        retry_ms = ACCEPT_ERROR_BACKOFF.as_millis() as u64,
                        "admin: accept failed; retrying until it succeeds (logged once)"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        if accept_failing {
            accept_failing = false;
            tracing::info!("admin: accepting connections again");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !at_capacity {
                at_capacity = true;
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "admin: connection limit reached; closing new connections at once until one ends"
                );
            }
            drop(tcp);
            continue;
        };
        at_capacity = false;
        tokio::spawn(serve_connection(tcp, builder.clone(), shared.clone(), slot));
    }
}

/// Serves one connection until the client closes it or a bound closes it; holds its `slot` until then.
async fn serve_connection(
    tcp: TcpStream,
    builder: http1::Builder,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &req)) }
    });
    let mut tcp = tcp;
    if !skip_proxy_header(&mut tcp).await {
        return;
    }
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    // Errors (a header timeout, a malformed request, a reset) concern that one client only.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// Reads and drops a PROXY protocol header (v1 or v2) if the connection starts with one; false if it
/// starts with a broken one or sends nothing in time (close it). An NLB with PROXY protocol enabled
/// on its target group sends the header on its health-check connections too, and those go to this
/// server's `/ready`; scrapers and probes send none. Neither signature can begin an HTTP/1 request.
async fn skip_proxy_header(tcp: &mut TcpStream) -> bool {
    const V1: &[u8] = b"PROXY ";
    const V2: &[u8] = b"\r\n\r\n\0\r";
    let skip = async {
        let mut start = [0u8; 6];
        loop {
            let n = tcp.peek(&mut start).await.ok()?;
            let seen = &start[..n];
            if n == 0 || !(V1.starts_with(seen) || V2.starts_with(seen)) {
                return Some(());
            }
            if n == start.len() {
                break;
            }
            // Part of a signature: `peek` returns at once while bytes are buffered, so wait a
            // little for the rest rather than spin (bounded by the header timeout).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        crate::listener::proxy_protocol::read_header(tcp)
            .await
            .ok()
            .map(|_| ())
    };
    matches!(
        tokio::time::timeout(HEADER_READ_TIMEOUT, skip).await,
        Ok(Some(()))
    )
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/clusters" => text(StatusCode::OK, "application/json", clusters_json(shared)),
        "/ready" => {
            if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
            } else if let Some(c) = shared.clusters().iter().find(|c| !c.has_available()) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("cluster \"{}\" has no healthy endpoint\n", c.name),
                )
            } else {
                text(StatusCode::OK, PLAIN, "ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /healthz, /ready or /clusters\n",
        ),
    }
}

/// `GET /clusters`: every cluster, its balancer, where its endpoints come from, and each endpoint's
/// state as the balancer sees it now. `healthy` means "may receive calls" (healthy and not ejected),
/// as the `grpcgate_endpoint_healthy` gauge does; `weight` is the weight in use (below the configured
/// one while the endpoint is in slow start); `computed_share`, for `weighted_round_robin`, is the
/// share of calls the schedule built from the load reports gives the endpoint (null for the others).
fn clusters_json(shared: &Shared) -> String {
    let clusters: Vec<serde_json::Value> = shared
        .clusters()
        .iter()
        .map(|c| {
            let shares = c.computed_shares();
            let endpoints: Vec<serde_json::Value> = c
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let share = shares.as_ref().and_then(|s| s.get(i)).copied();
                    serde_json::json!({
                        "computed_share": share,
                        "address": e.address,
                        "healthy": e.is_available(),
                        "ejected": e.is_ejected(),
                        "in_flight": e.in_flight(),
                        "weight": f64::from(e.weight()) / 100.0,
                        "connections": e.pool.connections(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": c.name,
                "balancer": c.balancer_kind.name(),
                "source": if c.from_dns { "dns" } else { "static" },
                "endpoints": endpoints,
            })
        })
        .collect();
    let mut body = serde_json::json!({ "clusters": clusters }).to_string();
    body.push('\n');
    body
}
