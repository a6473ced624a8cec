//! The PROXY protocol, version 2 (haproxy's `send-proxy-v2`, AWS NLB's proxy protocol v2): a
//! balancer that terminates TCP says, in a binary header before the first TLS byte, where the
//! connection really came from. With `issuer.spec.proxy_protocol: true` every connection must start
//! with one; the address in it is the agent's (for the per-address join limit and `tbotctl get bot`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature every v2 header starts with.
const SIGNATURE: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
/// The most header (addresses and TLVs) we read after the fixed 16 bytes.
const MAX_BODY: usize = 1024;

/// What is wrong with a connection's PROXY header, for the log.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection ended before a PROXY header: {0}")]
    Ended(std::io::Error),
    #[error("the connection does not start with a PROXY protocol v2 header")]
    NotProxy,
    #[error("PROXY protocol version {0}; only version 2 is read")]
    Version(u8),
    #[error("a PROXY header of {0} bytes; at most {MAX_BODY} are read")]
    TooLong(usize),
    #[error("the PROXY header is truncated: {0}")]
    Truncated(std::io::Error),
    #[error("PROXY command {0} is neither LOCAL nor PROXY")]
    Command(u8),
    #[error("PROXY address family {family} with {length} bytes of addresses; only TCP over IPv4 and IPv6 are read")]
    Family { family: u8, length: usize },
}

/// Reads a PROXY v2 header from `io`: the source address it carries, or `None` for a `LOCAL`
/// connection (the balancer's own health check) and an `UNSPEC` family.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut fixed = [0u8; 16];
    io.read_exact(&mut fixed).await.map_err(ProxyError::Ended)?;
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::NotProxy);
    }
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    let length = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if length > MAX_BODY {
        return Err(ProxyError::TooLong(length));
    }
    let mut body = vec![0u8; length];
    io.read_exact(&mut body).await.map_err(ProxyError::Truncated)?;
    match command {
        0 => return Ok(None),
        1 => {}
        other => return Err(ProxyError::Command(other)),
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match fixed[13] >> 4 {
        0 => Ok(None),
        1 if length >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        2 if length >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port(32))))
        }
        family => Err(ProxyError::Family { family, length }),
    }
}

impl crate::error::Explain for ProxyError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        "turn on `send-proxy-v2` (haproxy) or the proxy protocol v2 (AWS NLB) on the balancer, or turn off `issuer.spec.proxy_protocol`".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    async fn read(bytes: &[u8]) -> Result<Option<SocketAddr>, String> {
        let mut io = bytes;
        read_header(&mut io).await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn addresses_local_connections_and_bad_headers() {
        // TCP over IPv4: 10.1.2.3:40000 → 10.0.0.1:3025.
        let v4 = [10, 1, 2, 3, 10, 0, 0, 1, 0x9c, 0x40, 0x0b, 0xd1];
        assert_eq!(
            read(&header(1, 0x11, &v4)).await.unwrap(),
            Some("10.1.2.3:40000".parse().unwrap())
        );
        // With a TLV after the addresses, which is skipped.
        let mut with_tlv = v4.to_vec();
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        assert_eq!(
            read(&header(1, 0x11, &with_tlv)).await.unwrap(),
            Some("10.1.2.3:40000".parse().unwrap())
        );
        let mut v6 = vec![0u8; 36];
        v6[15] = 1;
        v6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            read(&header(1, 0x21, &v6)).await.unwrap(),
            Some("[::1]:443".parse().unwrap())
        );
        assert_eq!(
            read(&header(0, 0x00, &[])).await.unwrap(),
            None,
            "LOCAL: a health check"
        );
        let tls = read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00")
            .await
            .unwrap_err();
        assert!(tls.contains("does not start with a PROXY protocol v2 header"), "{tls}");
        let short = read(&header(1, 0x11, &v4)[..20]).await.unwrap_err();
        assert!(short.contains("truncated"), "{short}");
        let unix = read(&header(1, 0x31, &[0u8; 216])).await.unwrap_err();
        assert!(unix.contains("family 3"), "{unix}");
    }
}
