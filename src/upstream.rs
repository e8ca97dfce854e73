//! Per-endpoint pool of h2c connections.
//!
//! Calls are multiplexed over a connection until it reaches the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`;
//! then another connection is opened. A connection that dies is dropped from the pool and replaced on
//! demand; failed connects back off exponentially (capped, with jitter) so a dead endpoint costs one
//! fast failure per call instead of a connect attempt per call.
//!
//! A connection belongs to the worker thread that opened it ([`crate::worker`]): its driver task runs
//! there, and only that worker's calls lease it, so a call and its upstream stream never cross threads.
//! Each worker thus has its own set of connections to an endpoint, as in Envoy.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use http::Request;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::worker;

/// Stream flow-control window we give upstream responses and clients' request bodies (per stream).
/// It is what one stalled stream can make the proxy hold, so with a listener's
/// `max_concurrent_streams` it bounds what one client connection can: a client that reads nothing
/// (`SETTINGS_INITIAL_WINDOW_SIZE = 0`) while its server streams fill their upstream windows held
/// 2.4 GB at 1 MiB × 1,024 streams; at 256 KiB × 100 it holds at most 25 MiB of response data (README,
/// "Limits"). 256 KiB still covers a 1 ms round trip at 2 Gbit/s per stream.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// The connection flow-control window for a connection of up to `streams` concurrent streams: a
/// stream window for each (at most HTTP/2's 2^31 - 1). A frame's credit goes back only once the other
/// side took it (see `proxy`), so a stream whose reader stalled keeps up to its window of the
/// connection's; were the connection window smaller than all of them together, a few stalled calls
/// would stop every other call on the connection, other clients' calls too on a shared upstream
/// connection. Memory stays bounded per stream by the stream window, as before.
pub fn connection_window(streams: u32) -> u32 {
    (u64::from(streams) * u64::from(STREAM_WINDOW)).min(i32::MAX as u64) as u32
}
/// More than this many connections to one endpoint (per worker) and new calls queue on the least-loaded
/// one.
const MAX_CONNECTIONS: usize = 64;
/// How many recently reset streams h2 remembers per connection (see the builders).
pub const RESET_STREAM_MEMORY: usize = 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Why no connection could be had.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// The last connect failed and the endpoint is backing off until the next attempt.
    BackingOff {
        last_error: String,
        retry_in: Duration,
    },
    /// This attempt failed.
    Failed(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::BackingOff {
                last_error,
                retry_in,
            } => {
                write!(
                    f,
                    "{last_error} (next connect attempt in {}ms)",
                    retry_in.as_millis()
                )
            }
            ConnectError::Failed(e) => f.write_str(e),
        }
    }
}

struct Conn {
    send: SendRequest<Bytes>,
    /// The worker whose runtime drives this connection (see [`worker::current`]).
    worker: usize,
    /// Streams this proxy has open on the connection.
    active: AtomicUsize,
    /// Set by the connection's driver task when the connection ends.
    closed: Arc<AtomicBool>,
    /// Set once a stream was sent on the connection (see [`Lease::is_fresh`]).
    used: AtomicBool,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    last_error: String,
}

pub use crate::config::Keepalive;

/// The connections to one endpoint.
pub struct Pool {
    address: String,
    connect_timeout: Duration,
    keepalive: Keepalive,
    /// Our own cap on streams per connection; the peer's SETTINGS may lower it.
    max_streams: usize,
    conns: Mutex<Conns>,
    /// Per worker: serialises that worker's connects so a burst of calls opens one connection, not
    /// one each. Only the slow path (no usable connection) takes it.
    connecting: Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
    backoff: Mutex<Backoff>,
}

/// A pool's connections, and per worker the one it last found room on.
#[derive(Default)]
struct Conns {
    list: Vec<Arc<Conn>>,
    /// Indexed by worker: a position in `list`, checked before anything is scanned. A stale one
    /// (the list shrank, the connection filled up) only costs that check.
    last: Vec<usize>,
}

/// Which connections [`Pool::try_lease`] may pick.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LeaseMode {
    /// This worker's, with room for another stream (unless at the connection cap).
    Room,
    /// This worker's, full or not.
    Overflow,
    /// Any worker's, full or not.
    AnyWorker,
}

/// Why [`Lease::send`] failed, and the request if nothing of it was sent. Boxed: it is rare, and
/// the call's future would otherwise carry its 264 bytes.
pub type SendFailure = Box<(h2::Error, Option<Request<()>>)>;

/// A stream slot on a pooled connection; dropping it frees the slot.
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    /// Sends a request on the connection, through its one shared handle: a clone would lock the
    /// connection to make and again to drop. It fails, giving the request back, if the connection
    /// can take no new stream (it received GOAWAY or failed); see h2's `send_retryable_request`.
    pub fn send(
        &self,
        request: Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), SendFailure> {
        let sent = self
            .conn
            .send
            .send_retryable_request(request, end_of_stream)
            .map_err(Box::new)?;
        // Loaded first: a store on every call would bounce the line between workers.
        if !self.conn.used.load(Ordering::Relaxed) {
            self.conn.used.store(true, Ordering::Relaxed);
        }
        Ok(sent)
    }

    /// Whether no stream was ever sent on the connection: it was opened just now, not one that
    /// worked and has since gone away.
    pub fn is_fresh(&self) -> bool {
        !self.conn.used.load(Ordering::Relaxed)
    }

    /// Marks the connection unusable (e.g. it refused a new stream after GOAWAY).
    pub fn discard(&self) {
        self.conn.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// An empty pool for `address` (`host:port`); connections open on first use.
    pub fn new(
        address: &str,
        connect_timeout: Duration,
        max_streams: u32,
        keepalive: Keepalive,
    ) -> Pool {
        Pool {
            address: address.to_string(),
            connect_timeout,
            keepalive,
            max_streams: max_streams as usize,
            conns: Mutex::new(Conns::default()),
            connecting: Mutex::new(HashMap::new()),
            backoff: Mutex::new(Backoff::default()),
        }
    }

    /// Open connections (for the admin page and tests).
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .list
            .iter()
            .filter(|c| !c.closed.load(Ordering::Relaxed))
            .count()
    }

    /// A stream slot on a connection with room, opening a connection if none has.
    pub async fn acquire(&self) -> Result<Lease, ConnectError> {
        if let Some(lease) = self.try_lease(LeaseMode::Room) {
            return Ok(lease);
        }
        // Boxed: the connect path's state (TCP connect, h2 handshake) is large, and inline it would
        // make every call's task that much bigger to allocate and move.
        Box::pin(self.acquire_slow()).await
    }

    async fn acquire_slow(&self) -> Result<Lease, ConnectError> {
        // While connects back off, a connection another worker holds beats failing the call: h2's
        // handles work from any thread, the call just crosses threads.
        if let Err(e) = self.check_backoff() {
            return self.try_lease(LeaseMode::AnyWorker).ok_or(e);
        }
        let connecting = self.connect_lock();
        let _connecting = connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(lease) = self.try_lease(LeaseMode::Room) {
            return Ok(lease);
        }
        if let Err(e) = self.check_backoff() {
            return self.try_lease(LeaseMode::AnyWorker).ok_or(e);
        }
        match self.connect().await {
            Ok(conn) => {
                *self.backoff.lock() = Backoff::default();
                conn.active.fetch_add(1, Ordering::Relaxed);
                self.conns.lock().list.push(conn.clone());
                Ok(Lease { conn })
            }
            Err(e) => {
                let mut b = self.backoff.lock();
                b.failures = b.failures.saturating_add(1);
                let exp = BACKOFF_BASE
                    .saturating_mul(1 << (b.failures - 1).min(16))
                    .min(BACKOFF_CAP);
                // Jitter in [exp/2, exp] so endpoints that failed together do not retry together.
                let delay = exp / 2 + exp.mul_f64(fastrand::f64() / 2.0);
                b.until = Some(Instant::now() + delay);
                b.last_error = e.clone();
                drop(b);
                // Under the connection cap a full connection, or another worker's, is still better
                // than failing the call.
                self.try_lease(LeaseMode::Overflow)
                    .or_else(|| self.try_lease(LeaseMode::AnyWorker))
                    .ok_or(ConnectError::Failed(e))
            }
        }
    }

    /// This worker's connect lock: connects to one endpoint are serialised per worker (a burst of
    /// calls opens one connection, not one each), while each worker opens its own in parallel.
    fn connect_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.connecting
            .lock()
            .entry(worker::current())
            .or_default()
            .clone()
    }

    fn check_backoff(&self) -> Result<(), ConnectError> {
        let b = self.backoff.lock();
        match b.until {
            Some(until) if until > Instant::now() => Err(ConnectError::BackingOff {
                last_error: b.last_error.clone(),
                retry_in: until - Instant::now(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `c` takes another stream: under our cap and the peer's.
    fn has_room(&self, c: &Conn) -> bool {
        let active = c.active.load(Ordering::Relaxed);
        // Our own cap first: the peer's limit is read under h2's connection lock.
        active < self.max_streams && active < c.send.current_max_send_streams()
    }

    /// Takes a slot on one of this worker's connections: the one it last leased if that still has
    /// room, else the least-loaded one with room under its stream limit, or, with
    /// [`LeaseMode::Overflow`] or at the connection cap, the least-loaded one even if full (h2 queues
    /// the stream until one finishes). [`LeaseMode::AnyWorker`] also considers other workers'
    /// connections (the fallback when this worker cannot connect).
    ///
    /// A connection thus fills up before the next takes new streams, as in Envoy's pool, and the
    /// common case checks one connection instead of scanning them all: 10,000 concurrent streams
    /// make ~100 connections, and the scan per call cost more than the rest of the call.
    fn try_lease(&self, mode: LeaseMode) -> Option<Lease> {
        let worker = worker::current();
        let mut guard = self.conns.lock();
        let conns = &mut *guard;
        if mode == LeaseMode::Room {
            let last = conns.last.get(worker).and_then(|&i| conns.list.get(i));
            if let Some(c) = last.filter(|c| {
                c.worker == worker && !c.closed.load(Ordering::Relaxed) && self.has_room(c)
            }) {
                c.active.fetch_add(1, Ordering::Relaxed);
                return Some(Lease { conn: c.clone() });
            }
        }
        conns.list.retain(|c| !c.closed.load(Ordering::Relaxed));
        let (mut with_room, mut least_loaded, mut considered) = (None::<usize>, None::<usize>, 0);
        let active = |i: usize| conns.list[i].active.load(Ordering::Relaxed);
        for (i, c) in conns.list.iter().enumerate() {
            if mode != LeaseMode::AnyWorker && c.worker != worker {
                continue;
            }
            considered += 1;
            let has_room = self.has_room(c);
            if has_room && active(i) == 0 {
                // Idle with room: nothing can beat it.
                with_room = Some(i);
                least_loaded = Some(i);
                break;
            }
            let less = |b: usize| active(i) < active(b);
            if has_room && with_room.is_none_or(less) {
                with_room = Some(i);
            }
            if least_loaded.is_none_or(less) {
                least_loaded = Some(i);
            }
        }
        let chosen = if mode != LeaseMode::Room || considered >= MAX_CONNECTIONS {
            least_loaded
        } else {
            with_room
        }?;
        if mode == LeaseMode::Room && worker != worker::NOT_A_WORKER {
            if conns.last.len() <= worker {
                conns.last.resize(worker + 1, 0);
            }
            conns.last[worker] = chosen;
        }
        let conn = conns.list[chosen].clone();
        conn.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { conn })
    }

    async fn connect(&self) -> Result<Arc<Conn>, String> {
        let address = &self.address;
        let max_streams = u32::try_from(self.max_streams).unwrap_or(u32::MAX);
        let closed = Arc::new(AtomicBool::new(false));
        let attempt = async {
            let tcp = TcpStream::connect(address.as_str())
                .await
                .map_err(|e| format!("connect to {address} failed: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let (send, mut connection) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(connection_window(max_streams))
                .enable_push(false)
                // Calls we cancel (client gone, deadline) leave reset streams whose late frames h2 must
                // still recognise; the default memory of 50 is far below a busy proxy's cancel rate.
                .max_concurrent_reset_streams(RESET_STREAM_MEMORY)
                .handshake::<_, Bytes>(tcp)
                .await
                .map_err(|e| format!("HTTP/2 handshake with {address} failed: {e}"))?;
            let ping = connection.ping_pong().expect("ping_pong is taken once");
            let (first_pong, pong) = tokio::sync::oneshot::channel();
            tokio::spawn(drive(
                connection,
                ping,
                self.keepalive,
                first_pong,
                closed.clone(),
                address.clone(),
            ));
            // The peer's SETTINGS come before its PING ACK: once the pong is back, the connection's
            // stream limit is the peer's, and a burst of calls spreads over enough connections
            // instead of queueing on this one. It also proves the peer speaks HTTP/2.
            match pong.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("HTTP/2 handshake with {address} failed: {e}")),
                Err(_) => {
                    return Err(format!(
                        "HTTP/2 handshake with {address} failed: connection closed"
                    ))
                }
            }
            Ok::<_, String>(send)
        };
        let send = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| {
                format!(
                    "connect to {address} timed out after {}ms",
                    self.connect_timeout.as_millis()
                )
            })??;
        tracing::debug!(endpoint = %address, "upstream connection established");
        Ok(Arc::new(Conn {
            send,
            worker: worker::current(),
            active: AtomicUsize::new(0),
            closed,
            used: AtomicBool::new(false),
        }))
    }
}

/// Drives one upstream connection to its end and keeps it alive: the handshake's PING (its answer
/// goes to `first_pong`), then a PING every `keepalive.interval`; a peer that leaves one unanswered
/// for `keepalive.timeout` is taken for dead and the connection is dropped (its streams fail, and
/// `closed` takes it out of the pool). h2 answers the peer's own PINGs itself.
///
/// PINGs go out whether or not calls are in flight: an idle pooled connection to a backend that
/// vanished would otherwise hold the next call until its deadline. A grpc-go backend with its default
/// enforcement (pings no more often than every 5 minutes, none without calls) answers an idle
/// connection's third PING with `GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings")`: the connection leaves
/// the pool and the next call opens another, which is why the default interval is 5 minutes.
async fn drive(
    mut connection: h2::client::Connection<TcpStream, Bytes>,
    mut ping: h2::PingPong,
    keepalive: Keepalive,
    first_pong: tokio::sync::oneshot::Sender<Result<(), h2::Error>>,
    closed: Arc<AtomicBool>,
    address: String,
) {
    use std::future::poll_fn;
    let mut first_pong = Some(first_pong);
    // The first PING is the handshake's; then one every interval.
    let mut ping_out = ping.send_ping(h2::Ping::opaque()).is_ok();
    let timer = tokio::time::sleep(keepalive.timeout.max(Duration::from_secs(1)));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %address, error = %e, "upstream connection ended");
                    if let Some(tx) = first_pong.take() {
                        let _ = tx.send(Err(e));
                    }
                }
                break;
            }
            r = poll_fn(|cx| ping.poll_pong(cx)), if ping_out => {
                ping_out = false;
                match r {
                    Ok(_) => {
                        if let Some(tx) = first_pong.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(tx) = first_pong.take() {
                            let _ = tx.send(Err(e));
                        }
                        // The connection's own error shows when it is polled next.
                    }
                }
                timer.as_mut().reset(Instant::now() + keepalive.interval);
            }
            _ = &mut timer => {
                if ping_out {
                    if first_pong.is_some() {
                        // The connect timeout, not this, bounds the handshake.
                        timer.as_mut().reset(Instant::now() + keepalive.timeout);
                        continue;
                    }
                    tracing::info!(
                        endpoint = %address,
                        timeout_ms = keepalive.timeout.as_millis() as u64,
                        "upstream connection did not answer a PING in time; closing it"
                    );
                    break;
                }
                ping_out = ping.send_ping(h2::Ping::opaque()).is_ok();
                timer.as_mut().reset(Instant::now() + if ping_out {
                    keepalive.timeout
                } else {
                    keepalive.interval
                });
            }
        }
    }
    closed.store(true, Ordering::Relaxed);
}
