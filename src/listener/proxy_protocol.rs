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
}
