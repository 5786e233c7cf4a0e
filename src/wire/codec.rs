//! A tiny bounds-checked binary codec for meshvpn's own messages.
//!
//! [`Writer`] appends big-endian integers, length-prefixed byte strings and socket addresses;
//! [`Reader`] reads them back and returns [`WireError::Truncated`] (never panics) when the input
//! is shorter than it claims. Every meshvpn message type is encoded with these two, so every
//! parser of outside bytes shares one audited set of primitives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::WireError;

/// Appends encoded values to a byte vector.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(128),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A byte string with a u16 length prefix. Callers keep values far below 64 KiB.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.u16(len).raw(&v[..usize::from(len)])
    }

    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub(crate) fn addr(&mut self, a: &SocketAddr) -> &mut Self {
        match a.ip() {
            IpAddr::V4(ip) => self.u8(4).raw(&ip.octets()),
            IpAddr::V6(ip) => self.u8(6).raw(&ip.octets()),
        };
        self.u16(a.port())
    }
}

/// Reads encoded values from a byte slice, failing cleanly on short or malformed input.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    pub(crate) fn str(&mut self) -> Result<String, WireError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed("string is not UTF-8"))
    }

    pub(crate) fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(WireError::Malformed("unknown address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let a: SocketAddr = "198.51.100.7:3478".parse().expect("literal");
        let b: SocketAddr = "[2001:db8::1]:51820".parse().expect("literal");
        let mut w = Writer::new();
        w.u8(1).u16(2).u32(3).u64(4).str("hé").addr(&a).addr(&b);
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u8().ok(), Some(1));
        assert_eq!(r.u16().ok(), Some(2));
        assert_eq!(r.u32().ok(), Some(3));
        assert_eq!(r.u64().ok(), Some(4));
        assert_eq!(r.str().ok().as_deref(), Some("hé"));
        assert_eq!(r.addr().ok(), Some(a));
        assert_eq!(r.addr().ok(), Some(b));
        assert!(r.is_empty());
        for cut in 0..w.buf.len() {
            let mut r = Reader::new(&w.buf[..cut]);
            let all = (|| -> Result<(), WireError> {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.str()?;
                r.addr()?;
                r.addr()?;
                Ok(())
            })();
            assert!(all.is_err(), "cut at {cut} must fail");
        }
    }
}
