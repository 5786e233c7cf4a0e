//! Socket addresses on dual-stack sockets: IPv4 peers appear as IPv4-mapped IPv6 addresses
//! (`[::ffff:a.b.c.d]:port`) on an `[::]` socket. Everything above the socket speaks plain IPv4
//! for them, so addresses are unmapped on receive and mapped again on send.

use std::net::{IpAddr, SocketAddr};

/// An IPv4-mapped IPv6 address as the IPv4 address it is; anything else unchanged.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), a.port()))
            .unwrap_or(a),
        IpAddr::V4(_) => a,
    }
}

/// The destination as a socket needs it: IPv4 becomes IPv4-mapped on a dual-stack socket.
pub fn for_socket(dst: SocketAddr, dual_stack: bool) -> SocketAddr {
    match dst {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        SocketAddr::V4(_) | SocketAddr::V6(_) => dst,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_unmap_round_trip() {
        let v4: SocketAddr = "198.51.100.7:3478".parse().expect("lit");
        let mapped = for_socket(v4, true);
        assert_eq!(mapped.to_string(), "[::ffff:198.51.100.7]:3478");
        assert_eq!(unmap(mapped), v4);
        assert_eq!(for_socket(v4, false), v4);
        let v6: SocketAddr = "[fd00::1]:9".parse().expect("lit");
        assert_eq!(unmap(v6), v6);
        assert_eq!(for_socket(v6, true), v6);
    }
}
