//! The PROXY protocol (HAProxy's spec, versions 1 and 2) as a load balancer such as an AWS NLB sends
//! it: a header before the client's first byte naming the client's address.
//!
//! Parsed by hand rather than with a crate: the parsing is short, and the reading is the part that
//! matters here. The header is read exactly, never a byte past its end, because what follows it (a
//! TLS ClientHello, the HTTP/2 preface) belongs to the next layer, which reads the socket itself. A
//! v2 header says its length; a v1 line does not, so it is read a byte at a time after its first 16
//! bytes (v1 is the legacy text form; an NLB sends v2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the spec's figure).
const V1_MAX: usize = 107;
/// Longest v2 address block and TLVs we accept (an NLB's TLVs are a few dozen bytes).
const V2_MAX_LEN: usize = 4096;
/// The shortest v1 line ("PROXY UNKNOWN\r\n").
const V1_MIN: usize = 15;

/// Reads one PROXY header from `io` and returns the client address it carries: None for a v2 LOCAL
/// header (a health check from the balancer itself), v1 `UNKNOWN` and v2 families other than TCP
/// over IPv4/IPv6, for which the spec says to use the connection's own addresses. Err: no valid
/// header (the connection must be closed).
pub async fn read_header<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<Option<SocketAddr>, String> {
    // V1_MIN bytes can be read whole: both forms are at least that long.
    let mut start = [0u8; 16];
    read_exact(io, &mut start[..V1_MIN]).await?;
    if start.starts_with(b"PROXY ") {
        let mut line = Vec::with_capacity(V1_MAX);
        line.extend_from_slice(&start[..V1_MIN]);
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err("PROXY v1 line longer than 107 bytes".into());
            }
            let mut b = [0u8; 1];
            read_exact(io, &mut b).await?;
            line.push(b[0]);
        }
        return parse_v1(&line);
    }
    if start[..12] != V2_SIGNATURE {
        return Err("no PROXY protocol header".into());
    }
    read_exact(io, &mut start[V1_MIN..]).await?;
    let len = usize::from(u16::from_be_bytes([start[14], start[15]]));
    if len > V2_MAX_LEN {
        return Err(format!("PROXY v2 header of {len} bytes is too long"));
    }
    let mut rest = vec![0u8; len];
    read_exact(io, &mut rest).await?;
    parse_v2(start[12], start[13], &rest)
}

async fn read_exact<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut [u8]) -> Result<(), String> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err("closed before the end of the PROXY protocol header".into())
        }
        Err(e) => Err(format!("read failed: {e}")),
    }
}

/// Parses a v1 line ("PROXY TCP4 src dst sport dport\r\n").
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, String> {
    let bad = || "invalid PROXY v1 line".to_string();
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix("\r\n").ok_or_else(bad)?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(bad());
    }
    let family = parts.next().ok_or_else(bad)?;
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored.
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(bad());
    };
    let (src, _dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            src.parse::<Ipv4Addr>().map_err(|_| bad())?.into(),
            dst.parse::<Ipv4Addr>().map_err(|_| bad())?.into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>().map_err(|_| bad())?.into(),
            dst.parse::<Ipv6Addr>().map_err(|_| bad())?.into(),
        ),
        _ => return Err(bad()),
    };
    let port = |p: &str| {
        // No sign, no leading zeros (the spec), in range.
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        p.parse::<u16>().map_err(|_| bad())
    };
    let sport = port(sport)?;
    port(dport)?;
    Ok(Some(SocketAddr::new(src, sport)))
}

/// Parses a v2 header's version/command and family bytes and its address block (`rest`).
fn parse_v2(ver_cmd: u8, family: u8, rest: &[u8]) -> Result<Option<SocketAddr>, String> {
    if ver_cmd >> 4 != 2 {
        return Err(format!("PROXY v2 header with version {}", ver_cmd >> 4));
    }
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (a health check); no address to take.
        0 => return Ok(None),
        1 => {}
        c => return Err(format!("PROXY v2 header with command {c}")),
    }
    match family {
        // TCP over IPv4: source, destination addresses, source, destination ports.
        0x11 => {
            let a = rest
                .get(..12)
                .ok_or("PROXY v2 TCP4 address block too short")?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[8], a[9]]),
            )))
        }
        0x21 => {
            let a = rest
                .get(..36)
                .ok_or("PROXY v2 TCP6 address block too short")?;
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&a[..16]).expect("16 bytes"));
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            )))
        }
        // UNSPEC, UDP, UNIX: the spec says to accept the connection and use its real addresses.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let mut io = bytes;
        let r = read_header(&mut io).await;
        (r, io.to_vec())
    }

    fn v2(cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(family);
        v.extend_from_slice(&(block.len() as u16).to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    #[tokio::test]
    async fn v1_forms_and_nothing_read_past_the_header() {
        let (r, rest) = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nPRI *").await;
        assert_eq!(r.unwrap(), Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(rest, b"PRI *");
        let (r, rest) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 443\r\n\x16\x03").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:1".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03");
        // The shortest line: exactly 15 bytes, the next byte untouched.
        let (r, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"X");
        let (r, _) = read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").await;
        assert_eq!(r.unwrap(), None);
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n"[..],
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 070000 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n\r\n",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 1 2\r\n",
        ] {
            assert!(
                read(bad).await.0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Over 107 bytes without CRLF: refused after reading 107.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        let (r, rest) = read(&long).await;
        assert!(r.is_err());
        assert_eq!(rest.len(), long.len() - V1_MAX);
        // Cut short.
        assert!(read(b"PROXY TCP4 192.0.2.7").await.0.is_err());
    }

    #[tokio::test]
    async fn v2_forms_and_nothing_read_past_the_header() {
        let mut block = vec![192, 0, 2, 7, 198, 51, 100, 1];
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&443u16.to_be_bytes());
        // A TLV after the addresses (an NLB's VPC endpoint id) is skipped.
        block.extend_from_slice(&[0xea, 0, 3, b'v', b'p', b'c']);
        let mut bytes = v2(1, 0x11, &block);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r.unwrap(), Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");

        let mut block: Vec<u8> = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0x9c, 0x40, 1, 0xbb]);
        let (r, _) = read(&v2(1, 0x21, &block)).await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));

        // LOCAL (a health check), with and without an address block.
        let (r, rest) = read(&[v2(0, 0x00, &[]), b"PRI".to_vec()].concat()).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"PRI");
        assert_eq!(read(&v2(0, 0x11, &[0; 12])).await.0.unwrap(), None);
        // UNIX: accepted, the socket's address used.
        assert_eq!(read(&v2(1, 0x31, &[0; 216])).await.0.unwrap(), None);

        // Wrong version, unknown command, short block, too long, cut short.
        let mut wrong = v2(1, 0x11, &[0; 12]);
        wrong[12] = 0x11;
        assert!(read(&wrong).await.0.is_err());
        assert!(read(&v2(2, 0x11, &[0; 12])).await.0.is_err());
        assert!(read(&v2(1, 0x11, &[0; 11])).await.0.is_err());
        assert!(read(&v2(1, 0x21, &[0; 35])).await.0.is_err());
        assert!(read(&v2(1, 0x11, &[0; 5000])).await.0.is_err());
        assert!(read(&v2(1, 0x11, &[0; 12])[..20]).await.0.is_err());
    }

    #[tokio::test]
    async fn no_header_is_refused() {
        assert!(read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.0.is_err());
        assert!(
            read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh")
                .await
                .0
                .is_err()
        );
        assert!(read(b"GET / HTTP/1.1\r\n\r\n").await.0.is_err());
        assert!(read(b"").await.0.is_err());
    }

    /// Property tests: the header parser against arbitrary bytes, headers built here, and headers
    /// cut short, read in chunks of any size from a socket that may have more to come.
    mod properties {
        use super::*;
        use futures_util::FutureExt;
        use proptest::prelude::*;
        use std::pin::Pin;
        use std::task::{Context, Poll};
        use tokio::io::ReadBuf;

        /// A socket that hands out `data` at most `chunk` bytes per read, then either ends (`eof`) or
        /// has nothing yet (Pending: more may arrive).
        struct Feed {
            data: Vec<u8>,
            pos: usize,
            chunk: usize,
            eof: bool,
        }

        impl AsyncRead for Feed {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                let this = &mut *self;
                if this.pos == this.data.len() {
                    return if this.eof {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
                let n = this
                    .chunk
                    .min(buf.remaining())
                    .min(this.data.len() - this.pos);
                buf.put_slice(&this.data[this.pos..this.pos + n]);
                this.pos += n;
                Poll::Ready(Ok(()))
            }
        }

        /// Reads a header from `data` in one poll: None if the reader is still waiting for bytes;
        /// else the result and the bytes left unread.
        #[allow(clippy::type_complexity)]
        fn poll_once(
            data: &[u8],
            chunk: usize,
            eof: bool,
        ) -> Option<(Result<Option<SocketAddr>, String>, Vec<u8>)> {
            let mut feed = Feed {
                data: data.to_vec(),
                pos: 0,
                chunk,
                eof,
            };
            let r = read_header(&mut feed).now_or_never()?;
            Some((r, feed.data[feed.pos..].to_vec()))
        }

        fn v1_line(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }

        fn v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
            let (family, mut block) = match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()),
                (IpAddr::V6(s), IpAddr::V6(d)) => (0x21, [s.octets(), d.octets()].concat()),
                _ => unreachable!("same family"),
            };
            block.extend_from_slice(&src.port().to_be_bytes());
            block.extend_from_slice(&dst.port().to_be_bytes());
            block.extend_from_slice(tlvs);
            v2(1, family, &block)
        }

        /// Source and destination of one family.
        fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
            prop_oneof![
                (
                    any::<[u8; 4]>(),
                    any::<u16>(),
                    any::<[u8; 4]>(),
                    any::<u16>()
                )
                    .prop_map(|(s, sp, d, dp)| (
                        SocketAddr::new(Ipv4Addr::from(s).into(), sp),
                        SocketAddr::new(Ipv4Addr::from(d).into(), dp)
                    )),
                (
                    any::<[u8; 16]>(),
                    any::<u16>(),
                    any::<[u8; 16]>(),
                    any::<u16>()
                )
                    .prop_map(|(s, sp, d, dp)| (
                        SocketAddr::new(Ipv6Addr::from(s).into(), sp),
                        SocketAddr::new(Ipv6Addr::from(d).into(), dp)
                    )),
            ]
        }

        /// A valid header (v1 or v2, TLVs of any bytes in v2) and the client address it carries.
        fn header() -> impl Strategy<Value = (Vec<u8>, SocketAddr)> {
            (
                addr_pair(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..64),
            )
                .prop_map(|((src, dst), v1, tlvs)| {
                    let bytes = if v1 {
                        v1_line(src, dst)
                    } else {
                        v2_header(src, dst, &tlvs)
                    };
                    (bytes, src)
                })
        }

        /// Bytes that start like a header more often than chance would.
        fn noise() -> impl Strategy<Value = Vec<u8>> {
            let starts: Vec<Vec<u8>> = vec![
                Vec::new(),
                b"PROXY ".to_vec(),
                b"PROXY TCP4 ".to_vec(),
                b"PROXY TCP6 ".to_vec(),
                b"PROXY UNKNOWN".to_vec(),
                V2_SIGNATURE.to_vec(),
                [&V2_SIGNATURE[..], &[0x21, 0x11]].concat(),
                [&V2_SIGNATURE[..], &[0x21, 0x21, 0x00]].concat(),
            ];
            (
                proptest::sample::select(starts),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(start, tail)| [start, tail].concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 3000,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// Arbitrary bytes, ended or not, in chunks of any size: no panic; a header accepted ends
            /// where v1's CRLF or v2's length says, so what follows is left for the next layer.
            #[test]
            fn never_panics_and_never_reads_past_a_header(bytes in noise(), chunk in 1usize..40, eof in any::<bool>()) {
                if let Some((Ok(_), rest)) = poll_once(&bytes, chunk, eof) {
                    let used = &bytes[..bytes.len() - rest.len()];
                    let v1_end = used.starts_with(b"PROXY ") && used.ends_with(b"\r\n")
                        && !used[..used.len() - 2].windows(2).any(|w| w == b"\r\n");
                    let v2_end = used.starts_with(&V2_SIGNATURE)
                        && used.len() == 16 + usize::from(u16::from_be_bytes([used[14], used[15]]));
                    prop_assert!(v1_end || v2_end, "accepted {used:?}");
                }
            }

            /// Headers built here give back their source address, whatever follows them and however
            /// the socket splits them, and nothing after them is read.
            #[test]
            fn built_headers_round_trip(
                (bytes, src) in header(),
                after in proptest::collection::vec(any::<u8>(), 0..32),
                chunk in 1usize..200,
            ) {
                let data = [bytes.clone(), after.clone()].concat();
                let (r, rest) = poll_once(&data, chunk, true).expect("a whole header needs no more bytes");
                prop_assert_eq!(r, Ok(Some(src)));
                prop_assert_eq!(rest, after);
            }

            /// A header cut short: with the socket still open the reader waits for more; once the
            /// peer has closed, it fails cleanly.
            #[test]
            fn truncated_headers_wait_or_fail((bytes, _) in header(), cut in any::<proptest::sample::Index>(), chunk in 1usize..200) {
                let cut = cut.index(bytes.len());
                prop_assert!(poll_once(&bytes[..cut], chunk, false).is_none(), "decided on {cut} of {} bytes", bytes.len());
                let (r, rest) = poll_once(&bytes[..cut], chunk, true).expect("ended");
                prop_assert!(r.is_err());
                prop_assert!(rest.is_empty());
            }
        }
    }
}
