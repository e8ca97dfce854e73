//! The access log (`[access_log]`): one JSON line per call, written off the call path.
//!
//! A call fills a [`Record`] (a boxed, fixed-size struct: the client's address, `:authority` and
//! `:path` copied in, numbers, and a reference-counted handle to the names of its listener, cluster
//! and endpoint) and hands it to [`Sender::send`], a `try_send` on a bounded queue: one allocation,
//! one reference count increment and one compare-and-swap per call; no formatting, no lock, no
//! system call. One writer thread formats the lines and writes them in
//! batches. When the queue is full (the disk or the reader of a pipe is slower than the calls) the
//! record is dropped and counted (`grpcgate_access_log_dropped_total`): a slow disk never slows a call.
//!
//! The writer never blocks on the queue: it drains it, writes, and sleeps [`INTERVAL`]. A writer
//! that blocked in `recv` would have to be woken by the calls, with a futex system call on the call
//! path at low rates; this way a line reaches the file within `INTERVAL` plus the write.
//!
//! This module imports nothing of the crate but the config's [`Target`]: the call path names its
//! listener, cluster and endpoint through [`Names`], which the router implements.

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;

/// How long the writer sleeps once the queue is empty.
pub const INTERVAL: Duration = Duration::from_millis(50);
/// Bytes of formatted lines gathered before a write.
const WRITE_AT: usize = 64 * 1024;
/// `:authority` and `:path` bytes a record holds without a second allocation.
const INLINE: usize = 120;
/// The most of `:authority` a line carries; longer values are cut (a valid host is at most 253 bytes).
pub const MAX_AUTHORITY: usize = 256;
/// The most of `:path` a line carries; longer values are cut. Without the cut a client could make
/// every queued record hold its whole header block (up to `max_header_list_size`), and a full queue
/// hold gigabytes; with it a record is at most ~1.5 KiB.
pub const MAX_PATH: usize = 1024;

pub use crate::config::AccessLogTarget as Target;

/// The names a record's numbers refer to: the router of the call's listener implements it, and the
/// record keeps it alive until the line is written.
pub trait Names: Send + Sync {
    /// The listener's name.
    fn listener(&self) -> &str;
    /// The cluster of route number `route`.
    fn cluster(&self, route: usize) -> Option<&str>;
    /// The address of endpoint `endpoint` of route `route`'s cluster.
    fn endpoint(&self, route: usize, endpoint: usize) -> Option<&str>;
}

/// No route, or no endpoint.
const NONE: u32 = u32::MAX;

/// One call, as the call path hands it to the writer: nothing formatted.
pub struct Record {
    names: Option<Arc<dyn Names>>,
    start: Instant,
    duration: Duration,
    client: SocketAddr,
    request_bytes: u64,
    response_bytes: u64,
    route: u32,
    endpoint: u32,
    grpc_status: u8,
    retries: u8,
    has_authority: bool,
    /// `:authority` is `text[..authority_len]`, `:path` the rest.
    authority_len: u32,
    text_len: u32,
    inline: [u8; INLINE],
    /// The text, when longer than `INLINE`.
    long: Option<Box<[u8]>>,
}

/// How a call ended, for [`Record::finish`].
pub struct Outcome {
    /// The route taken, by position in the listener's routes; None: answered without a route.
    pub route: Option<usize>,
    /// The endpoint, by position in the route's cluster; None: none was picked.
    pub endpoint: Option<usize>,
    /// The call's final grpc-status.
    pub grpc_status: u8,
    /// DATA payload bytes forwarded to the upstream (the gRPC length-prefixed messages).
    pub request_bytes: u64,
    /// DATA payload bytes forwarded to the client.
    pub response_bytes: u64,
    /// Times the call was sent again after an upstream refused it unprocessed.
    pub retries: u8,
}

impl Record {
    /// Starts a record when a call arrives: copies its client address, `:authority` and `:path`.
    pub fn start(
        start: Instant,
        client: SocketAddr,
        authority: Option<&[u8]>,
        path: &[u8],
    ) -> Box<Record> {
        let a = authority.unwrap_or_default();
        let a = &a[..a.len().min(MAX_AUTHORITY)];
        let path = &path[..path.len().min(MAX_PATH)];
        let len = a.len() + path.len();
        let mut r = Box::new(Record {
            names: None,
            start,
            duration: Duration::ZERO,
            client,
            request_bytes: 0,
            response_bytes: 0,
            route: NONE,
            endpoint: NONE,
            grpc_status: 0,
            retries: 0,
            has_authority: authority.is_some(),
            authority_len: a.len() as u32,
            text_len: len as u32,
            inline: [0; INLINE],
            long: None,
        });
        if len <= INLINE {
            r.inline[..a.len()].copy_from_slice(a);
            r.inline[a.len()..len].copy_from_slice(path);
        } else {
            let mut v = Vec::with_capacity(len);
            v.extend_from_slice(a);
            v.extend_from_slice(path);
            r.long = Some(v.into_boxed_slice());
        }
        r
    }

    /// Completes the record when the call has ended.
    pub fn finish(&mut self, names: Arc<dyn Names>, duration: Duration, outcome: &Outcome) {
        let id = |i: Option<usize>| i.map_or(NONE, |i| i.min(NONE as usize - 1) as u32);
        self.names = Some(names);
        self.duration = duration;
        self.route = id(outcome.route);
        self.endpoint = id(outcome.endpoint);
        self.grpc_status = outcome.grpc_status;
        self.request_bytes = outcome.request_bytes;
        self.response_bytes = outcome.response_bytes;
        self.retries = outcome.retries;
    }

    fn text(&self) -> &[u8] {
        match &self.long {
            Some(t) => t,
            None => &self.inline[..self.text_len as usize],
        }
    }

    fn authority(&self) -> Option<&[u8]> {
        self.has_authority
            .then(|| &self.text()[..self.authority_len as usize])
    }

    fn path(&self) -> &[u8] {
        &self.text()[self.authority_len as usize..]
    }

    /// Appends the record's JSON line; `now` pairs the wall clock with the monotonic one, to date
    /// the call's start.
    fn write_line(&self, now: (SystemTime, Instant), out: &mut Vec<u8>) {
        // The call's start on the wall clock, from how long ago it was on the monotonic one (records
        // that arrived during this batch started after `now`).
        let time = match now.1.checked_duration_since(self.start) {
            Some(ago) => now.0.checked_sub(ago).unwrap_or(UNIX_EPOCH),
            None => now.0 + self.start.duration_since(now.1),
        };
        let names = self.names.as_deref();
        let route = (self.route != NONE).then_some(self.route as usize);
        let cluster = route.and_then(|r| names?.cluster(r));
        let endpoint = match (route, self.endpoint) {
            (Some(r), e) if e != NONE => names.and_then(|n| n.endpoint(r, e as usize)),
            _ => None,
        };
        out.extend_from_slice(b"{\"time\":\"");
        rfc3339_millis(time, out);
        out.extend_from_slice(b"\",\"listener\":");
        json_str(names.map_or("", |n| n.listener()).as_bytes(), out);
        // Written as x-forwarded-for writes it (an IPv4-mapped IPv6 address as IPv4).
        let _ = write!(
            out,
            ",\"client\":\"{}\",\"client_port\":{},\"authority\":",
            self.client.ip().to_canonical(),
            self.client.port()
        );
        json_opt(self.authority(), out);
        out.extend_from_slice(b",\"path\":");
        json_str(self.path(), out);
        out.extend_from_slice(b",\"cluster\":");
        json_opt(cluster.map(str::as_bytes), out);
        out.extend_from_slice(b",\"endpoint\":");
        json_opt(endpoint.map(str::as_bytes), out);
        let _ = writeln!(
            out,
            ",\"grpc_status\":{},\"duration_us\":{},\"request_bytes\":{},\"response_bytes\":{},\"retries\":{}}}",
            self.grpc_status,
            self.duration.as_micros(),
            self.request_bytes,
            self.response_bytes,
            self.retries
        );
    }
}

/// The call path's handle: a bounded queue to the writer and the counter of records it dropped.
#[derive(Clone)]
pub struct Sender {
    tx: SyncSender<Box<Record>>,
    dropped: IntCounter,
}

impl Sender {
    /// Queues a record for the writer, or drops and counts it if the queue is full. Never waits.
    pub fn send(&self, record: Box<Record>) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// A running writer.
pub struct AccessLog {
    target: Target,
    sender: Sender,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Opens the log's destination: a file in append mode, created if missing. Not blocking
/// on a named pipe without a reader: that fails at once ("no such device or address"), and writes
/// to a pipe then block the writer thread alone.
pub fn open(target: &Target) -> io::Result<Output> {
    let path = match target {
        Target::Stdout => return Ok(Output::Stdout(io::stdout())),
        Target::File(p) => p,
    };
    Ok(Output::File(open_append(path)?))
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Writes block (on the writer thread): a full pipe is waited for, not spun on.
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// An opened destination, ready for [`AccessLog::start`].
pub enum Output {
    /// `path = "-"`.
    Stdout(io::Stdout),
    /// A file (or named pipe) opened for appending.
    File(File),
}

impl Output {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(buf)?;
                s.flush()
            }
            Output::File(f) => f.write_all(buf),
        }
    }
}

impl AccessLog {
    /// Starts the writer thread on an opened destination, with a queue of `queue` records. `lines`
    /// counts the lines written,
    /// `dropped` the records dropped (queue full, or the write failed).
    pub fn start(
        target: Target,
        output: Output,
        queue: usize,
        lines: IntCounter,
        dropped: IntCounter,
    ) -> io::Result<AccessLog> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            output,
            lines,
            dropped: dropped.clone(),
            stop: stop.clone(),
            failing: false,
        };
        let thread = std::thread::Builder::new()
            .name("grpcgate-access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog {
            target,
            sender: Sender { tx, dropped },
            stop,
            thread: Some(thread),
        })
    }

    /// Where this writer writes.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A handle for the call path.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Writes what is queued and stops the writer, waiting up to `timeout` for it (a write stuck on
    /// a full pipe is abandoned). Records sent after this are dropped. Blocks: call it off the async
    /// threads.
    pub fn close(mut self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return true;
        };
        thread.thread().unpark();
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
        true
    }
}

/// The writer thread's state.
struct Writer {
    rx: Receiver<Box<Record>>,
    output: Output,
    lines: IntCounter,
    dropped: IntCounter,
    stop: Arc<AtomicBool>,
    /// Whether the last write failed (logged once until one succeeds).
    failing: bool,
}

impl Writer {
    /// Drains the queue, formats and writes, sleeps; until stopped or every sender is gone.
    fn run(mut self) {
        let mut buf = Vec::with_capacity(WRITE_AT + 4096);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let now = (SystemTime::now(), Instant::now());
            let mut pending = 0;
            let mut gone = false;
            loop {
                match self.rx.try_recv() {
                    Ok(record) => {
                        record.write_line(now, &mut buf);
                        pending += 1;
                        // Dropped here, with the names it kept alive.
                        drop(record);
                        if buf.len() >= WRITE_AT {
                            self.write(&mut buf, pending);
                            pending = 0;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            self.write(&mut buf, pending);
            if stopping || gone {
                return;
            }
            std::thread::park_timeout(INTERVAL);
        }
    }

    /// Writes whole lines (one `write` for a file in append mode, so two writers of one file, as
    /// during a reload, never interleave within a line).
    fn write(&mut self, buf: &mut Vec<u8>, lines: u64) {
        if buf.is_empty() {
            return;
        }
        match self.output.write_all(buf) {
            Ok(()) => {
                self.lines.inc_by(lines);
                if self.failing {
                    self.failing = false;
                    tracing::info!("access log writes work again");
                }
            }
            Err(e) => {
                self.dropped.inc_by(lines);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %e, "access log write failed; lines are dropped until a write works");
                }
            }
        }
        buf.clear();
    }
}

/// Writes `bytes` as a JSON string: `"` and `\` escaped, control characters (and DEL) as escapes,
/// valid UTF-8 as it is, and each byte of invalid UTF-8 as U+FFFD (as Go's encoding/json and Rust's
/// `from_utf8_lossy` do), so every line is valid JSON whatever a client sent.
pub fn json_str(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut rest = bytes;
    while !rest.is_empty() {
        let (valid, invalid) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                // `valid_up_to` marks a valid prefix: this cannot fail.
                let v = std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default();
                (v, e.error_len().unwrap_or(rest.len() - e.valid_up_to()))
            }
        };
        escape_valid(valid, out);
        if invalid > 0 {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
        rest = &rest[valid.len() + invalid..];
    }
    out.push(b'"');
}

fn escape_valid(s: &str, out: &mut Vec<u8>) {
    let b = s.as_bytes();
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[from..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{c:04x}");
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&b[from..]);
}

fn json_opt(bytes: Option<&[u8]>, out: &mut Vec<u8>) {
    match bytes {
        Some(b) => json_str(b, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// `2026-12-05T14:30:07.123Z`: RFC 3339, UTC, milliseconds.
pub fn rfc3339_millis(t: SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one client sends cannot make a queued record big: authority and path are cut.
    #[test]
    fn long_authority_and_path_are_cut() {
        let client = "127.0.0.1:1".parse().unwrap();
        let (a, p) = (vec![b'a'; 4000], vec![b'/'; 16 * 1024]);
        let r = Record::start(Instant::now(), client, Some(&a), &p);
        assert_eq!(r.text().len(), MAX_AUTHORITY + MAX_PATH);
        let r = Record::start(Instant::now(), client, Some(b"h"), b"/s/M");
        assert_eq!(r.text(), b"h/s/M");
    }

    fn esc(b: &[u8]) -> String {
        let mut out = Vec::new();
        json_str(b, &mut out);
        String::from_utf8(out).expect("escaped output is UTF-8")
    }

    #[test]
    fn escapes_json_strings() {
        let table: &[(&[u8], &str)] = &[
            (b"/echo.Echo/Unary", r#""/echo.Echo/Unary""#),
            (b"", r#""""#),
            (b"a\"b", r#""a\"b""#),
            (b"a\\b", r#""a\\b""#),
            (b"\n\r\t", r#""\n\r\t""#),
            (b"\x00\x01\x1f\x7f", r#""\u0000\u0001\u001f\u007f""#),
            ("é€😀".as_bytes(), "\"é€😀\""),
            (b"a\xffb", "\"a\u{FFFD}b\""),
            // A truncated multi-byte sequence at the end, and a lone continuation byte.
            (b"x\xe2\x82", "\"x\u{FFFD}\""),
            (b"\x80", "\"\u{FFFD}\""),
            (b"</script>\"\\", r#""</script>\"\\""#),
        ];
        for (input, want) in table {
            assert_eq!(esc(input), *want, "input {input:?}");
        }
    }

    /// Property: for any bytes, the output parses as a JSON string equal to the lossy UTF-8 reading
    /// of the input.
    #[test]
    fn escaping_round_trips_for_random_bytes() {
        let mut rng = fastrand::Rng::with_seed(22);
        let alphabet: &[u8] =
            b"\"\\/\n\r\t\x00\x01\x1f\x7f aZ\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\x80\xff\xfe";
        for _ in 0..20_000 {
            let len = rng.usize(0..24);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.bool() {
                        alphabet[rng.usize(..alphabet.len())]
                    } else {
                        rng.u8(..)
                    }
                })
                .collect();
            let out = esc(&input);
            let parsed: String =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{input:?} -> {out}: {e}"));
            assert_eq!(
                parsed,
                String::from_utf8_lossy(&input),
                "{input:?} -> {out}"
            );
            assert!(
                !out.bytes().any(|b| b < 0x20 || b == 0x7f),
                "raw control byte in {out:?}"
            );
        }
    }

    #[test]
    fn formats_rfc3339_with_milliseconds() {
        let at = |secs: u64, ms: u64| {
            let mut out = Vec::new();
            rfc3339_millis(
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms),
                &mut out,
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 120), "2100-01-01T00:00:00.120Z");
        assert_eq!(at(1_796_481_007, 123), "2026-12-05T14:30:07.123Z");
    }

    struct TestNames;
    impl Names for TestNames {
        fn listener(&self) -> &str {
            "edge\"1"
        }
        fn cluster(&self, route: usize) -> Option<&str> {
            (route == 0).then_some("echo")
        }
        fn endpoint(&self, _: usize, e: usize) -> Option<&str> {
            (e == 1).then_some("10.0.0.2:50051")
        }
    }

    fn line(r: &Record) -> serde_json::Value {
        let mut out = Vec::new();
        let start = r.start + Duration::from_millis(10);
        r.write_line(
            (UNIX_EPOCH + Duration::from_secs(1_796_481_007), start),
            &mut out,
        );
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        serde_json::from_slice(&out).expect("a JSON line")
    }

    #[test]
    fn a_record_is_one_json_line() {
        let client: SocketAddr = "[::ffff:192.0.2.7]:4711".parse().unwrap();
        let long_path = format!("/svc.S/{}", "m".repeat(300));
        for (authority, path) in [
            (Some(&b"gw.example:443"[..]), "/echo.Echo/Unary"),
            (None, long_path.as_str()),
        ] {
            let mut r = Record::start(Instant::now(), client, authority, path.as_bytes());
            r.finish(
                Arc::new(TestNames),
                Duration::from_micros(1234),
                &Outcome {
                    route: Some(0),
                    endpoint: Some(1),
                    grpc_status: 14,
                    request_bytes: 69,
                    response_bytes: 1 << 40,
                    retries: 2,
                },
            );
            let v = line(&r);
            assert_eq!(v["time"], "2026-12-05T14:30:06.990Z");
            assert_eq!(v["listener"], "edge\"1");
            assert_eq!(v["client"], "192.0.2.7");
            assert_eq!(v["client_port"], 4711);
            match authority {
                Some(_) => assert_eq!(v["authority"], "gw.example:443"),
                None => assert!(v["authority"].is_null()),
            }
            assert_eq!(v["path"], path);
            assert_eq!(v["cluster"], "echo");
            assert_eq!(v["endpoint"], "10.0.0.2:50051");
            assert_eq!(v["grpc_status"], 14);
            assert_eq!(v["duration_us"], 1234);
            assert_eq!(v["request_bytes"], 69);
            assert_eq!(v["response_bytes"], 1u64 << 40);
            assert_eq!(v["retries"], 2);
        }
        // Answered by the proxy: no route, no endpoint.
        let mut r = Record::start(Instant::now(), client, None, b"/x.Y/Z");
        r.finish(
            Arc::new(TestNames),
            Duration::ZERO,
            &Outcome {
                route: None,
                endpoint: None,
                grpc_status: 12,
                request_bytes: 0,
                response_bytes: 0,
                retries: 0,
            },
        );
        let v = line(&r);
        assert!(v["cluster"].is_null() && v["endpoint"].is_null(), "{v}");
    }
}
