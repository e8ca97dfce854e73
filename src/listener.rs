//! Downstream side: the accept loop, TLS termination (rustls, ALPN `h2`, optional mTLS), the HTTP/2
//! server connection, and graceful drain (GOAWAY, then wait for in-flight streams).
//!
//! The accept loop runs on a worker thread ([`crate::worker`]) and gives each connection to the next
//! worker, itself included; there the connection runs in its own task and each stream it accepts runs
//! [`proxy::serve_stream`] in a task of its own. A connection that is not HTTP/2 (an HTTP/1.1 client, a failed TLS handshake) gets a clear
//! answer or alert, is logged with the reason and closed, and touches nothing else.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::metrics::ListenerMetrics;
use crate::proxy;
use crate::router::Router;
use crate::upstream;
use crate::worker::{self, Spawner};

pub mod proxy_protocol;

/// The HTTP/2 connection preface every h2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most connection window a client gets, and so most request body bytes one connection's stalled
/// uploads can park in the proxy: 16 streams' worth (see `h2_handshake`).
pub const MAX_CONNECTION_WINDOW: u32 = 16 * upstream::STREAM_WINDOW;
/// How long a connection that was sent GOAWAY (idle) may take to close before it is dropped: a client
/// that never answers the GOAWAY's PING must not keep it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Accept backlog; the kernel caps it at `net.core.somaxconn`. Clients connect in bursts (a deploy, a
/// reconnect storm after a network blip), and tokio's default of 1024 overflowed in our 1,000-client
/// benchmark, which clients see as resets.
const BACKLOG: u32 = 8192;

/// Binds and listens; the socket is registered with a reactor only where its accept loop runs.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// A bound listener, ready to serve.
pub struct Listener {
    pub name: String,
    pub local_addr: SocketAddr,
    tcp: std::net::TcpListener,
    handler: Arc<ConnectionHandler>,
}

/// What every connection of a listener shares.
struct ConnectionHandler {
    name: String,
    /// Swapped by a reload (certificate rotation); each new connection reads the current one.
    tls: ArcSwapOption<TlsAcceptor>,
    max_concurrent_streams: u32,
    /// Swapped by a reload; each new connection reads the current one.
    limits: ArcSwap<Limits>,
    router: ArcSwap<Router>,
    metrics: ListenerMetrics,
    /// Connections open (counted from accept to close), against `max_connections`.
    open: AtomicU32,
}

/// A listener's per-connection limits that a reload may change (for new connections).
struct Limits {
    max_header_list_size: u32,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    max_connections: u32,
    max_connection_age: Option<Duration>,
    max_connection_age_grace: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    proxy_protocol: bool,
    x_forwarded_for: bool,
}

impl Limits {
    fn of(config: &ListenerConfig) -> Limits {
        Limits {
            max_header_list_size: config.max_header_list_size,
            idle_timeout: config.idle_timeout,
            handshake_timeout: config.handshake_timeout,
            max_connections: config.max_connections,
            max_connection_age: config.max_connection_age,
            max_connection_age_grace: config.max_connection_age_grace,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            proxy_protocol: config.proxy_protocol,
            x_forwarded_for: config.x_forwarded_for,
        }
    }
}

/// Applies a reloaded config to a running listener: new routes and TLS settings take effect for new
/// streams and connections; calls in flight finish on what they started with.
#[derive(Clone)]
pub struct ListenerReload(Arc<ConnectionHandler>);

impl ListenerReload {
    /// Swaps in a router over changed clusters (an endpoint set changed); nothing else changes.
    pub fn set_router(&self, router: Router) {
        self.0.router.store(Arc::new(router));
    }

    /// Swaps in the new router, limits and TLS config (built by the `load` module at the edge).
    /// `max_concurrent_streams` keeps its value from start-up.
    pub fn apply(
        &self,
        config: &ListenerConfig,
        router: Router,
        tls: Option<rustls::ServerConfig>,
    ) {
        self.0.limits.store(Arc::new(Limits::of(config)));
        self.0
            .tls
            .store(tls.map(|t| Arc::new(TlsAcceptor::from(Arc::new(t)))));
        self.0.router.store(Arc::new(router));
    }
}

impl Listener {
    /// Binds the listener's address. `tls` is its rustls config, None for plaintext: built at the
    /// edge (the `load` module) from the files `config.tls` names, so the listener never reads a file.
    pub async fn bind(
        config: &ListenerConfig,
        router: Router,
        metrics: ListenerMetrics,
        tls: Option<rustls::ServerConfig>,
    ) -> io::Result<Listener> {
        let tcp = bind(config.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "listener \"{}\": cannot bind {}: {e}",
                    config.name, config.listen
                ),
            )
        })?;
        let tls = tls.map(|t| TlsAcceptor::from(Arc::new(t)));
        Ok(Listener {
            name: config.name.clone(),
            local_addr: tcp.local_addr()?,
            tcp,
            handler: Arc::new(ConnectionHandler {
                name: config.name.clone(),
                tls: ArcSwapOption::from(tls.map(Arc::new)),
                max_concurrent_streams: config.max_concurrent_streams,
                limits: ArcSwap::from_pointee(Limits::of(config)),
                router: ArcSwap::from_pointee(router),
                metrics,
                open: AtomicU32::new(0),
            }),
        })
    }

    /// A handle to reconfigure this listener while it runs.
    pub fn reloader(&self) -> ListenerReload {
        ListenerReload(self.handler.clone())
    }

    /// Accepts connections until `shutdown` fires; connection tasks go on `tracker` so the caller can
    /// wait for them to drain. Runs on a worker: a connection that stays on this worker is served
    /// where it was accepted, with no hop between threads and no move between reactors.
    pub async fn serve(self, workers: Spawner, shutdown: CancellationToken, tracker: TaskTracker) {
        let Listener {
            name, tcp, handler, ..
        } = self;
        let tcp = match TcpListener::from_std(tcp) {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::error!(listener = %name, error = %e, "cannot register the listening socket");
                return;
            }
        };
        let mut accept_failing = false;
        loop {
            let accepted = tokio::select! {
                // Shutdown first: once the drain started, no new connection may slip through.
                biased;
                _ = shutdown.cancelled() => break,
                r = tcp.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => {
                    if accept_failing {
                        accept_failing = false;
                        tracing::info!(listener = %name, "accepting connections again");
                    }
                    x
                }
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning, and say so once, not
                    // 20 times a second.
                    if !accept_failing {
                        accept_failing = true;
                        tracing::warn!(listener = %name, error = %e, "accept failed; retrying every 50ms");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the limit: closed at once, before any byte is read or a task is spawned. A
            // load balancer in front sends the client elsewhere on its next attempt.
            let max = handler.limits.load().max_connections;
            if handler.open.fetch_add(1, Ordering::Relaxed) >= max {
                handler.open.fetch_sub(1, Ordering::Relaxed);
                handler.metrics.rejected.inc();
                tracing::debug!(listener = %name, %peer, max, "max_connections reached; connection closed");
                drop(tcp);
                continue;
            }
            let open = OpenGuard(handler.clone());
            let _ = tcp.set_nodelay(true);
            let conn = handler.clone();
            let shutdown = shutdown.clone();
            // Tracked now, not when a worker first polls it, so a drain that starts in between waits.
            let target = workers.next_worker();
            if target == worker::current() {
                tokio::spawn(tracker.track_future(conn.run(tcp, peer, shutdown, open)));
                continue;
            }
            // Move the socket to the other worker's reactor: the connection and its calls run there.
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(listener = %name, %peer, error = %e, "could not hand the connection to a worker");
                    continue;
                }
            };
            let task = tracker.track_future(async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => conn.run(tcp, peer, shutdown, open).await,
                    Err(e) => {
                        tracing::warn!(listener = %conn.name, %peer, error = %e, "could not register the connection");
                    }
                }
            });
            workers.spawn_on(target, task);
        }
        // Close the socket now, so new clients are refused during the drain instead of queueing.
        drop(tcp);
        tracing::info!(listener = %name, "stopped accepting");
    }
}

/// Counts a connection as open (for `max_connections`) from its accept until dropped.
struct OpenGuard(Arc<ConnectionHandler>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ended, for the log and `grpcgate_downstream_connections_closed_total{reason}`.
struct Closed {
    reason: &'static str,
    detail: String,
}

impl Closed {
    fn new(reason: &'static str, detail: impl Into<String>) -> Closed {
        Closed {
            reason,
            detail: detail.into(),
        }
    }
}

/// The x-forwarded-for value a connection's calls carry: the client's IP address (no port, as Envoy
/// and HAProxy write it).
///
/// Left indexable in HPACK (not `set_sensitive`). One client's calls repeat it, so once indexed in an
/// upstream connection's dynamic table it costs one byte per call instead of a ~25-byte literal (its
/// name is not in HPACK's static table). The cost: upstream connections carry many clients' calls,
/// and the table (4 KiB, first in first out) holds some 60 of these 60-byte entries besides a call's
/// usual fields. With more clients than that interleaving on one upstream connection each value is
/// inserted again and pushes out older entries, the usual fields included, which are then sent once
/// more as literals: a few bytes per call more than a never-indexed literal would cost. Fewer, busy
/// clients (the common case for long-lived gRPC channels) gain far more than that. No secret is at
/// stake: a client cannot observe the compressed size of another client's headers upstream.
fn forwarded_for(client: SocketAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&client.ip().to_canonical().to_string()).ok()
}

impl ConnectionHandler {
    /// Serves one accepted connection to its end, counted in the listener's connection gauge.
    async fn run(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
        open: OpenGuard,
    ) {
        self.metrics.active.inc();
        self.metrics.accepted.inc();
        match self.serve_connection(tcp, peer, shutdown).await {
            Ok(()) => self.metrics.closed("client"),
            Err(closed) => {
                self.metrics.closed(closed.reason);
                let reason = closed.detail;
                // A client going away mid-connection, and the lifecycle's own closes, are routine:
                // one line each would flood the log under churn. Handshake failures and non-HTTP/2
                // clients are worth an operator's eye.
                if matches!(closed.reason, "client" | "age" | "idle" | "drain") {
                    tracing::debug!(listener = %self.name, %peer, %reason, "connection closed")
                } else {
                    tracing::info!(listener = %self.name, %peer, %reason, "connection closed")
                }
            }
        }
        // The slot first: once the gauge shows the connection gone, a new one is taken.
        drop(open);
        self.metrics.active.dec();
    }

    async fn serve_connection(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), Closed> {
        // Each branch is boxed at its own size: inline, every connection's task would be as large as
        // the largest (TLS) state, and a task is copied whole into its allocation when spawned, so
        // an idle plaintext connection would hold pages of TLS state it never uses.
        let limits = self.limits.load_full();
        // One deadline for the PROXY header, the TLS handshake and the preface together.
        let handshake_by = tokio::time::Instant::now() + limits.handshake_timeout;
        // A PROXY header without a client address: v2 LOCAL, what an NLB's own health checks send.
        let mut from_balancer = false;
        let client = if limits.proxy_protocol {
            // Read before anything else, exactly (never into the ClientHello or the preface).
            match tokio::time::timeout_at(handshake_by, proxy_protocol::read_header(&mut tcp)).await
            {
                Err(_) => {
                    return Err(Closed::new(
                        "handshake",
                        format!(
                            "no PROXY protocol header within {}ms",
                            limits.handshake_timeout.as_millis()
                        ),
                    ))
                }
                Ok(Err(e)) => {
                    self.metrics.proxy_protocol_rejected.inc();
                    return Err(Closed::new("proxy_protocol", e));
                }
                // LOCAL (the balancer's own health check) and unknown families: the socket's peer.
                Ok(Ok(client)) => {
                    from_balancer = client.is_none();
                    client.unwrap_or(peer)
                }
            }
        } else {
            peer
        };
        let served = match self.tls.load_full() {
            None => Box::pin(self.serve_h2(tcp, client, &limits, handshake_by, shutdown)).await,
            Some(acceptor) => {
                match tokio::time::timeout_at(handshake_by, acceptor.accept(tcp)).await {
                    Err(_) => Err(Closed::new("handshake", "TLS handshake timed out")),
                    Ok(Err(e)) => Err(Closed::new(
                        "handshake",
                        format!("TLS handshake failed: {e}"),
                    )),
                    Ok(Ok(tls)) => {
                        Box::pin(self.serve_h2(tls, client, &limits, handshake_by, shutdown)).await
                    }
                }
            }
        };
        match served {
            // A TCP health check behind the PROXY header: it connects and closes, every few seconds
            // from every balancer node. Routine, not a failed handshake worth an info line.
            Err(closed) if from_balancer && closed.reason == "handshake" => Err(Closed::new(
                "client",
                format!("{} (PROXY LOCAL: a balancer health check)", closed.detail),
            )),
            served => served,
        }
    }

    async fn serve_h2<IO>(
        &self,
        io: IO,
        client: SocketAddr,
        limits: &Limits,
        handshake_by: tokio::time::Instant,
        shutdown: CancellationToken,
    ) -> Result<(), Closed>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The handshake's state (preface check, h2's Handshake) is large and short-lived: boxed apart,
        // the future that lives as long as the connection holds little more than h2's connection.
        let mut conn = Box::pin(self.h2_handshake(io, limits, handshake_by))
            .await
            .map_err(|e| Closed::new("handshake", e))?;
        tracing::debug!(listener = %self.name, %client, "connection established");
        let forwarded_for = if limits.x_forwarded_for {
            forwarded_for(client)
        } else {
            None
        };
        let mut draining = false;
        // Idle check: when it fires with no stream open the connection is sent GOAWAY; with streams
        // open it is set again. So a connection closes between one and two idle timeouts after its
        // last stream ended (a stream's end wakes nothing here). Streams accepted do not reset it:
        // no timer work per call.
        let idle = tokio::time::sleep(limits.idle_timeout);
        tokio::pin!(idle);
        let mut idle_closing = false;
        // Connection age: at the age (±10 %, so that a fleet's clients do not all reconnect at once)
        // a graceful GOAWAY; at the age plus the grace, the close. Not polled when unset.
        let with_age = limits.max_connection_age.is_some();
        let age = tokio::time::sleep(match limits.max_connection_age {
            Some(age) => age.mul_f64(0.9 + fastrand::f64() * 0.2),
            None => Duration::from_secs(86_400 * 365),
        });
        tokio::pin!(age);
        let mut aged = false;
        // Keepalive: a PING every interval; a peer that has not answered one within the timeout is
        // gone (a NAT or load balancer forgot the flow, the host died without a FIN) and is closed.
        // The PINGs also keep an idle flow alive in a balancer that forgets idle flows.
        let mut ping = conn.ping_pong();
        let keepalive = tokio::time::sleep(limits.keepalive_interval);
        tokio::pin!(keepalive);
        let mut ping_out = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = shutdown.cancelled(), if !draining => {
                    // GOAWAY; accept() keeps driving the connection until every open stream is done.
                    draining = true;
                    self.metrics.goaways.inc();
                    conn.graceful_shutdown();
                    continue;
                }
                _ = &mut age, if with_age => {
                    if aged {
                        return Err(Closed::new("age", "closed: max_connection_age_grace expired with calls in flight"));
                    }
                    aged = true;
                    tracing::debug!(listener = %self.name, %client, "max_connection_age reached; GOAWAY");
                    if !draining {
                        draining = true;
                        self.metrics.goaways.inc();
                        // Two-step: GOAWAY(2^31-1) and a PING, then, once the PING is answered,
                        // GOAWAY(last stream processed); accept() drives the streams in flight to
                        // their end and then returns None.
                        conn.graceful_shutdown();
                    }
                    age.as_mut().reset(tokio::time::Instant::now() + limits.max_connection_age_grace);
                    continue;
                }
                r = std::future::poll_fn(|cx| match ping.as_mut() {
                    Some(p) => p.poll_pong(cx),
                    None => std::task::Poll::Pending,
                }), if ping_out => {
                    ping_out = false;
                    if r.is_ok() {
                        keepalive.as_mut().reset(tokio::time::Instant::now() + limits.keepalive_interval);
                    }
                    // An error is the connection's: accept() returns it next.
                    continue;
                }
                _ = &mut keepalive => {
                    if ping_out {
                        return Err(Closed::new("keepalive", format!(
                            "closed: PING not answered within {}ms",
                            limits.keepalive_timeout.as_millis()
                        )));
                    }
                    if let Some(p) = ping.as_mut() {
                        if p.send_ping(h2::Ping::opaque()).is_ok() {
                            ping_out = true;
                        }
                    }
                    keepalive.as_mut().reset(tokio::time::Instant::now() + if ping_out {
                        limits.keepalive_timeout
                    } else {
                        limits.keepalive_interval
                    });
                    continue;
                }
                _ = &mut idle => {
                    if idle_closing {
                        return Err(Closed::new("idle", "closed: GOAWAY (idle) not answered in time"));
                    }
                    if conn.has_streams() {
                        idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                    } else {
                        tracing::debug!(listener = %self.name, %client, "idle; closing");
                        idle_closing = true;
                        if !draining {
                            draining = true;
                            self.metrics.goaways.inc();
                            conn.graceful_shutdown();
                        }
                        // A peer that never answers GOAWAY's PING (or sends half a header block
                        // and stops) must not hold the connection: dropped after a short grace.
                        idle.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                    continue;
                }
            };
            match next {
                Some(Ok((req, respond))) => {
                    let router = self.router.load_full();
                    // Boxed: the task then holds a pointer, and tokio moves the task state several times
                    // per call (spawn, completion); moving a pointer is cheaper than ~3 KB of future.
                    tokio::spawn(Box::pin(proxy::serve_stream(
                        router,
                        req,
                        respond,
                        forwarded_for.as_ref(),
                        client,
                    )));
                }
                Some(Err(e)) => {
                    if e.is_io() || e.is_go_away() {
                        let reason = if e.is_io() || e.is_remote() {
                            "client"
                        } else if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                            // Rapid resets, HPACK bombs, floods: h2's defences closed it.
                            "abuse"
                        } else {
                            "error"
                        };
                        return Err(Closed::new(reason, format!("connection error: {e}")));
                    }
                    // A stream-level error was already answered with RST_STREAM by h2; keep going.
                    tracing::debug!(listener = %self.name, %client, error = %e, "stream error");
                }
                None if aged => return Err(Closed::new("age", "closed: max_connection_age")),
                None if idle_closing => return Err(Closed::new("idle", "closed: idle_timeout")),
                None if draining => return Err(Closed::new("drain", "closed: drain")),
                None => return Ok(()),
            }
        }
    }

    /// Checks the client preface (answering HTTP/1.x with a 505) and runs h2's server handshake.
    async fn h2_handshake<IO>(
        &self,
        mut io: IO,
        limits: &Limits,
        handshake_by: tokio::time::Instant,
    ) -> Result<h2::server::Connection<Prefixed<IO>, Bytes>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Read the preface ourselves so an HTTP/1.1 client gets an HTTP/1.1 answer, not a silent close.
        let mut prefix = [0u8; PREFACE.len()];
        let mut n = 0;
        let read_preface = async {
            while n < PREFACE.len() {
                let m = io
                    .read(&mut prefix[n..])
                    .await
                    .map_err(|e| format!("read failed: {e}"))?;
                if m == 0 {
                    return Err("closed before sending the HTTP/2 preface".to_string());
                }
                if prefix[n..n + m] != PREFACE[n..n + m] {
                    n += m;
                    return Err("not HTTP/2".to_string());
                }
                n += m;
            }
            Ok(())
        };
        match tokio::time::timeout_at(handshake_by, read_preface).await {
            Err(_) => {
                return Err(format!(
                    "no HTTP/2 preface within {}ms",
                    limits.handshake_timeout.as_millis()
                ))
            }
            Ok(Err(e)) if e == "not HTTP/2" => {
                let what = if prefix[..n].windows(5).any(|w| w == b"HTTP/") {
                    "an HTTP/1.x request"
                } else {
                    "not HTTP/2"
                };
                const BODY: &str = "grpcgate serves gRPC over HTTP/2 only (TLS with ALPN h2, or h2c with prior knowledge)\n";
                let resp = format!(
                    "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(resp.as_bytes()))
                    .await;
                let _ = io.shutdown().await;
                // Read what the client still sends before closing: closing with unread data makes
                // the kernel send RST, which can destroy the 505 before the client reads it.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut sink = [0u8; 1024];
                    while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return Err(format!("{what}; answered 505"));
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        let io = Prefixed {
            prefix: PREFACE,
            pos: 0,
            io,
        };
        let handshake = h2::server::Builder::new()
            .initial_window_size(upstream::STREAM_WINDOW)
            // Capped: a client decides how many streams it fills, so an uncapped window would let one
            // connection park a stream window of request bodies per stream in front of slow backends.
            // Stalled uploads beyond 16 hold up only that client's own connection.
            .initial_connection_window_size(
                upstream::connection_window(self.max_concurrent_streams).min(MAX_CONNECTION_WINDOW),
            )
            .max_concurrent_streams(self.max_concurrent_streams)
            // Bounds the decoded headers of a request (the HPACK bomb: a 4 KB block that decodes
            // to 16 MB) and of a header block still arriving in CONTINUATION frames.
            .max_header_list_size(limits.max_header_list_size)
            .max_concurrent_reset_streams(crate::upstream::RESET_STREAM_MEMORY)
            // Rapid reset (CVE-2023-44487) and clients that cancel a lot: a connection on which more
            // than half of the streams (counting at least 500) were reset by the client within 1 s and
            // before the response started gets GOAWAY(ENHANCE_YOUR_CALM). A client cancelling every
            // other call keeps its connection; one that only resets is cut off after 251 streams.
            .premature_reset_limit(500, 0.5)
            // h2's default of 20 streams reset before we accepted them killed cancel-heavy clients
            // (a burst of RST_STREAM landing before the accept loop runs). The rule above catches
            // attackers; this only bounds the memory of reset streams waiting to be accepted.
            .max_pending_accept_reset_streams(
                (self.max_concurrent_streams as usize)
                    .saturating_mul(4)
                    .max(1000),
            )
            .handshake::<_, Bytes>(io);
        tokio::time::timeout_at(handshake_by, handshake)
            .await
            .map_err(|_| "HTTP/2 handshake timed out".to_string())?
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))
    }
}

/// An I/O stream whose first bytes (already read to check the preface) are replayed before the rest.
struct Prefixed<IO> {
    prefix: &'static [u8],
    pos: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
