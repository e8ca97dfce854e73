//! A DNS server on loopback that answers A queries with the records a test sets, and replicas on
//! 127.0.0.2–4 sharing one port like pods behind a headless Service.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use grpcgate::echo::EchoBackend;
use parking_lot::Mutex;

// ---------------------------------------------------------------------------------------------------
// A DNS server: answers A queries for any name with the records the test sets, AAAA with none.
// ---------------------------------------------------------------------------------------------------

/// How the server answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// The records set (for A; none for other types).
    Answer,
    /// NXDOMAIN.
    NxDomain,
    /// SERVFAIL.
    ServFail,
}

struct DnsState {
    records: Vec<Ipv4Addr>,
    mode: Mode,
}

/// A UDP DNS server on 127.0.0.1, stopped when dropped.
pub struct DnsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<DnsState>>,
    /// Queries received.
    pub queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    /// Starts a server answering A queries with `records`.
    pub async fn start(records: &[Ipv4Addr]) -> DnsServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(Mutex::new(DnsState {
            records: records.to_vec(),
            mode: Mode::Answer,
        }));
        let queries = Arc::new(AtomicU64::new(0));
        let (st, q) = (state.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                q.fetch_add(1, SeqCst);
                let reply = {
                    let s = st.lock();
                    answer(&buf[..n], &s)
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        DnsServer {
            addr,
            state,
            queries,
            task,
        }
    }

    /// Changes the answer from now on.
    pub fn set(&self, records: &[Ipv4Addr], mode: Mode) {
        let mut s = self.state.lock();
        s.records = records.to_vec();
        s.mode = mode;
    }
}

/// The reply to one query (RFC 1035 §4.1): the question echoed, one A record per address.
fn answer(query: &[u8], state: &DnsState) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: QNAME labels, then QTYPE and QCLASS.
    let mut i = 12;
    while i < query.len() && query[i] != 0 {
        i += 1 + query[i] as usize;
    }
    let qend = i + 5;
    if qend > query.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    let rcode = match state.mode {
        Mode::Answer => 0,
        Mode::NxDomain => 3,
        Mode::ServFail => 2,
    };
    let records: &[Ipv4Addr] = if state.mode == Mode::Answer && qtype == 1 {
        &state.records
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]); // id
    out.push(0x84 | (query[2] & 0x01)); // QR, AA, RD copied
    out.push(0x80 | rcode); // RA, rcode
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&(records.len() as u16).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(&query[12..qend]);
    for ip in records {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&1u16.to_be_bytes()); // A
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&1u32.to_be_bytes()); // TTL 1 s
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------------
// Replicas like pods: one port, several loopback addresses.
// ---------------------------------------------------------------------------------------------------

/// Echo backends named `b2`, `b3`, `b4` on 127.0.0.2–4, all on one port.
pub async fn pods() -> (u16, HashMap<Ipv4Addr, EchoBackend>) {
    for _ in 0..20 {
        let first = EchoBackend::start_on("127.0.0.2:0".parse().unwrap(), "b2", Duration::ZERO)
            .await
            .unwrap();
        let port = first.addr.port();
        let mut all = HashMap::new();
        all.insert(Ipv4Addr::new(127, 0, 0, 2), first);
        let mut ok = true;
        for last in [3u8, 4] {
            let ip = Ipv4Addr::new(127, 0, 0, last);
            match EchoBackend::start_on(
                SocketAddr::new(ip.into(), port),
                &format!("b{last}"),
                Duration::ZERO,
            )
            .await
            {
                Ok(b) => {
                    all.insert(ip, b);
                }
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return (port, all);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

/// 127.0.0.`last`.
pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}
