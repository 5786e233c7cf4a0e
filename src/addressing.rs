//! Virtual addressing: deriving a member's virtual IPv4 from its public key, and resolving clashes.
//!
//! A member's address is derived from its public key inside the network's subnet (BLAKE2s of a
//! label, the key and a counter, reduced to a host number that is neither the network nor the
//! broadcast address), unless the member was given one with `--ip`. Because a derived address is
//! a function of the key, every member can check it; a static one cannot be checked.
//!
//! Two members claiming one address are resolved the same way on every member: the first
//! holder keeps it while alive (ranked by the relay's change counter at which each claim began,
//! see the node's membership module), so no choice of key takes a live member's address. Only
//! claims that began at the same counter go by [`owner_rank`]: a derived address beats a static
//! claim, and between equals the lower public key wins. The loser keeps its session but gets no
//! route, and is told so clearly.

use std::net::{Ipv4Addr, Ipv6Addr};

use blake2::{Blake2s256, Digest};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::keys::{NetworkId, PeerKey};

/// How many counter values a derived address may use (the first that is free is taken at join).
pub const DERIVATION_ATTEMPTS: u8 = 8;

/// The network's IPv6 overlay prefix: a unique local /64 (RFC 4193) whose 40-bit global ID is
/// drawn from the network id, so every member computes the same one and two networks almost
/// surely differ. The subnet ID is 0.
pub fn overlay_ipv6_prefix(network: &NetworkId) -> Ipv6Net {
    let mut h = Blake2s256::new();
    h.update(b"meshvpn v1 ula prefix");
    h.update(network.0);
    let d = h.finalize();
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&d[..5]);
    Ipv6Net::new(Ipv6Addr::from(octets), 64).expect("64 is a valid IPv6 prefix length")
}

/// Member `key`'s IPv6 overlay address: the network's [`overlay_ipv6_prefix`] and a 64-bit
/// interface ID drawn from the key, so it is a function of the key that every member can check
/// (like a derived IPv4 address) and needs no announcement. The all-zero interface ID (the
/// subnet-router anycast address) is never used.
pub fn overlay_ipv6(network: &NetworkId, key: &PeerKey) -> Ipv6Addr {
    let mut h = Blake2s256::new();
    h.update(b"meshvpn v1 ula interface id");
    h.update(key.0);
    let d = h.finalize();
    let mut octets = overlay_ipv6_prefix(network).network().octets();
    octets[8..].copy_from_slice(&d[..8]);
    if octets[8..].iter().all(|b| *b == 0) {
        octets[15] = 1;
    }
    Ipv6Addr::from(octets)
}

/// The `n`-th address derived from `key` in `subnet`. `None` for subnets too small to hold
/// members (narrower than /30).
pub fn derive_virtual_ip(subnet: &Ipv4Net, key: &PeerKey, n: u8) -> Option<Ipv4Addr> {
    let host_bits = 32 - u32::from(subnet.prefix_len());
    if host_bits < 2 {
        return None;
    }
    let usable = (1u64 << host_bits) - 2;
    let mut h = Blake2s256::new();
    h.update(b"meshvpn v1 virtual ip");
    h.update(key.0);
    h.update([n]);
    let d = h.finalize();
    let x = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let host = (x % usable) as u32 + 1;
    Some(Ipv4Addr::from(u32::from(subnet.network()) | host))
}

/// Whether `ip` is one of the addresses derivable from `key` (so the claim is verifiable).
pub fn is_derived(subnet: &Ipv4Net, key: &PeerKey, ip: Ipv4Addr) -> bool {
    (0..DERIVATION_ATTEMPTS).any(|n| derive_virtual_ip(subnet, key, n) == Some(ip))
}

/// Whether `ip` is a usable member address in `subnet` (inside it, not network or broadcast).
pub fn is_usable(subnet: &Ipv4Net, ip: Ipv4Addr) -> bool {
    subnet.contains(&ip) && ip != subnet.network() && ip != subnet.broadcast()
}

/// Rank of a claim on an address among claims that began at the same change counter; the
/// smallest rank owns it.
pub fn owner_rank(subnet: &Ipv4Net, key: &PeerKey, ip: Ipv4Addr) -> (bool, PeerKey) {
    (!is_derived(subnet, key, ip), *key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_addresses_are_usable_and_stable() {
        let subnet: Ipv4Net = "10.20.0.0/16".parse().expect("lit");
        for b in 0..=255u8 {
            let key = PeerKey([b; 32]);
            let ip = derive_virtual_ip(&subnet, &key, 0).expect("fits");
            assert!(is_usable(&subnet, ip), "{ip}");
            assert_eq!(Some(ip), derive_virtual_ip(&subnet, &key, 0));
            assert!(is_derived(&subnet, &key, ip));
        }
        let tiny: Ipv4Net = "10.0.0.0/30".parse().expect("lit");
        let ip = derive_virtual_ip(&tiny, &PeerKey([1; 32]), 0).expect("fits");
        assert!(ip == Ipv4Addr::new(10, 0, 0, 1) || ip == Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            derive_virtual_ip(&"10.0.0.0/31".parse().expect("lit"), &PeerKey([1; 32]), 0),
            None
        );
    }

    #[test]
    fn derived_claim_beats_static_claim() {
        let subnet: Ipv4Net = "10.20.0.0/16".parse().expect("lit");
        let a = PeerKey([9; 32]);
        let b = PeerKey([1; 32]);
        let ip = derive_virtual_ip(&subnet, &a, 0).expect("fits");
        // b has the lower key but its claim on a's derived address is static.
        assert!(owner_rank(&subnet, &a, ip) < owner_rank(&subnet, &b, ip));
        let other = Ipv4Addr::new(10, 20, 99, 99);
        assert!(owner_rank(&subnet, &b, other) < owner_rank(&subnet, &a, other));
    }

    #[test]
    fn overlay_ipv6_is_a_ula_of_the_network_and_a_function_of_the_key() {
        let (n1, n2) = (NetworkId([1; 32]), NetworkId([2; 32]));
        let (k1, k2) = (PeerKey([3; 32]), PeerKey([4; 32]));
        let p1 = overlay_ipv6_prefix(&n1);
        assert_eq!(p1.prefix_len(), 64);
        assert_eq!(p1.network().octets()[0], 0xfd, "unique local (fd00::/8)");
        assert_ne!(
            p1,
            overlay_ipv6_prefix(&n2),
            "networks get their own prefix"
        );
        let a = overlay_ipv6(&n1, &k1);
        assert!(p1.contains(&a));
        assert_eq!(a, overlay_ipv6(&n1, &k1), "deterministic");
        assert_ne!(a, overlay_ipv6(&n1, &k2), "keys get their own address");
        assert_eq!(
            a.octets()[8..],
            overlay_ipv6(&n2, &k1).octets()[8..],
            "interface ID is the key's"
        );
    }
}
