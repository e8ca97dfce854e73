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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, TlsConfig};
use crate::proxy;
use crate::router::Router;
use crate::upstream;
use crate::worker::{self, Spawner};

/// The HTTP/2 connection preface every h2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most connection window a client gets (64 streams' worth): see `handshake`.
const MAX_CONNECTION_WINDOW: u32 = 64 * upstream::STREAM_WINDOW;
/// How long a new connection may take to finish TLS and send the preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the rustls server config for a listener: ALPN `h2`, client certificates required when
/// `client_ca` is set.
pub fn server_tls_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if tls.client_ca_certs.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in &tls.client_ca_certs {
            roots
                .add(c.clone())
                .map_err(|e| format!("bad client CA certificate: {e}"))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder
        .with_single_cert(tls.cert_chain.clone(), tls.private_key.clone_key())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

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
    router: ArcSwap<Router>,
    connections: IntGauge,
}

/// Applies a reloaded config to a running listener: new routes and TLS settings take effect for new
/// streams and connections; calls in flight finish on what they started with.
#[derive(Clone)]
pub struct ListenerReload(Arc<ConnectionHandler>);

impl ListenerReload {
    /// Swaps in the new router and TLS config (built with [`server_tls_config`]).
    pub fn apply(&self, router: Router, tls: Option<rustls::ServerConfig>) {
        self.0
            .tls
            .store(tls.map(|t| Arc::new(TlsAcceptor::from(Arc::new(t)))));
        self.0.router.store(Arc::new(router));
    }
}

impl Listener {
    /// Binds the listener's address.
    pub async fn bind(
        config: &ListenerConfig,
        router: Router,
        connections: IntGauge,
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
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(Arc::new(
                server_tls_config(t).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ))),
            None => None,
        };
        Ok(Listener {
            name: config.name.clone(),
            local_addr: tcp.local_addr()?,
            tcp,
            handler: Arc::new(ConnectionHandler {
                name: config.name.clone(),
                tls: ArcSwapOption::from(tls.map(Arc::new)),
                max_concurrent_streams: config.max_concurrent_streams,
                router: ArcSwap::from_pointee(router),
                connections,
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
        loop {
            let accepted = tokio::select! {
                // Shutdown first: once the drain started, no new connection may slip through.
                biased;
                _ = shutdown.cancelled() => break,
                r = tcp.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let conn = handler.clone();
            let shutdown = shutdown.clone();
            // Tracked now, not when a worker first polls it, so a drain that starts in between waits.
            let target = workers.next_worker();
            if target == worker::current() {
                tokio::spawn(tracker.track_future(conn.run(tcp, peer, shutdown)));
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
                    Ok(tcp) => conn.run(tcp, peer, shutdown).await,
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

impl ConnectionHandler {
    /// Serves one accepted connection to its end, counted in the listener's connection gauge.
    async fn run(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
        self.connections.inc();
        match self.serve_connection(tcp, peer, shutdown).await {
            Ok(()) => {}
            // A client going away mid-connection is routine: one line each would flood the log under
            // churn. Handshake failures and non-HTTP/2 clients are worth an operator's eye.
            Err(reason) if reason.starts_with("connection error") => {
                tracing::debug!(listener = %self.name, %peer, %reason, "connection closed")
            }
            Err(reason) => {
                tracing::info!(listener = %self.name, %peer, %reason, "connection closed")
            }
        }
        self.connections.dec();
    }

    async fn serve_connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        // Each branch is boxed at its own size: inline, every connection's task would be as large as
        // the largest (TLS) state, and a task is copied whole into its allocation when spawned, so
        // an idle plaintext connection would hold pages of TLS state it never uses.
        match self.tls.load_full() {
            None => Box::pin(self.serve_h2(tcp, peer, shutdown)).await,
            Some(acceptor) => Box::pin(self.serve_tls(&acceptor, tcp, peer, shutdown)).await,
        }
    }

    async fn serve_tls(
        &self,
        acceptor: &TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        self.serve_h2(tls, peer, shutdown).await
    }

    async fn serve_h2<IO>(
        &self,
        io: IO,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), String>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The handshake's state (preface check, h2's Handshake) is large and short-lived: boxed apart,
        // the future that lives as long as the connection holds little more than h2's connection.
        let mut conn = Box::pin(self.h2_handshake(io)).await?;
        tracing::debug!(listener = %self.name, %peer, "connection established");
        let mut draining = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = shutdown.cancelled(), if !draining => {
                    // GOAWAY; accept() keeps driving the connection until every open stream is done.
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
            };
            match next {
                Some(Ok((req, respond))) => {
                    let router = self.router.load_full();
                    // Boxed: the task then holds a pointer, and tokio moves the task state several times
                    // per call (spawn, completion); moving a pointer is cheaper than ~3 KB of future.
                    tokio::spawn(Box::pin(proxy::serve_stream(router, req, respond)));
                }
                Some(Err(e)) => {
                    if e.is_io() || e.is_go_away() {
                        return Err(format!("connection error: {e}"));
                    }
                    // A stream-level error was already answered with RST_STREAM by h2; keep going.
                    tracing::debug!(listener = %self.name, %peer, error = %e, "stream error");
                }
                None => return Ok(()),
            }
        }
    }

    /// Checks the client preface (answering HTTP/1.x with a 505) and runs h2's server handshake.
    async fn h2_handshake<IO>(
        &self,
        mut io: IO,
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
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_preface).await {
            Err(_) => return Err("no HTTP/2 preface within 10s".into()),
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
        h2::server::Builder::new()
            .initial_window_size(upstream::STREAM_WINDOW)
            // Capped: a client decides how many streams it fills, so an uncapped window would let one
            // connection park a GiB of request bodies (1,024 streams × 1 MiB) in front of slow backends.
            // Stalled uploads beyond 64 hold up only that client's own connection.
            .initial_connection_window_size(
                upstream::connection_window(self.max_concurrent_streams).min(MAX_CONNECTION_WINDOW),
            )
            .max_concurrent_streams(self.max_concurrent_streams)
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
            .handshake::<_, Bytes>(io)
            .await
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
