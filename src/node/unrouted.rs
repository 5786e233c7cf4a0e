//! Packets for a virtual IP of the subnet (or an address of the IPv6 overlay prefix) that no
//! member has yet.
//!
//! # Job
//! A member that has just started is pushed to every other member by the relay within a
//! round trip of its registration, and a process on this host may address it a moment
//! earlier (a connection retried in a loop, a service that waits for its peer). Such a
//! packet, for an address inside the subnet (not the network or broadcast address, not our
//! own) with no route, is held here instead of dropped, and goes out the moment a member
//! with that address appears in the routing table (every rebuild of the table, in
//! `resolve_addresses`, releases what now has a route). The hold is bounded by
//! [`UNROUTED_PACKETS`], [`UNROUTED_BYTES`], [`UNROUTED_PER_DESTINATION`] and
//! [`UNROUTED_MAX_AGE`]; whatever it drops, and every packet for an address outside the
//! subnet, counts as `no_route`.
//!
//! Security is unchanged: a released packet takes the same way as any other (routing by the
//! routing table, which resolves address conflicts, then the member's peer link), and only
//! packets from our own TUN device are ever held.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::hold::{HoldLimits, HoldQueue};
use super::{Node, Timer};
use crate::addressing;

/// Packets held in all for addresses without a member: a few connections' first packets to
/// one or two members that are starting; a sweep across the subnet (a port scanner) only
/// cycles through the oldest.
pub const UNROUTED_PACKETS: usize = 32;
/// Bytes held in all for addresses without a member: 32 first packets are small (SYNs, DNS,
/// pings); this keeps a few full-size ones and bounds the node's memory for the hold.
pub const UNROUTED_BYTES: usize = 32 * 1024;
/// Packets held for one address: a connection attempt and its first retry, or a ping or two,
/// so one busy sender cannot push every other destination out of the hold.
pub const UNROUTED_PER_DESTINATION: usize = 4;
/// A packet held this long for an address without a member is dropped: a member that is
/// starting is pushed by the relay well within it, and by then the sender's own retry (TCP's
/// first SYN retransmission after 1 s, ping's next echo) has replaced the packet.
pub const UNROUTED_MAX_AGE: Duration = Duration::from_secs(3);

/// The node's empty hold for addresses without a member.
pub(super) fn queue() -> HoldQueue {
    HoldQueue::new(HoldLimits {
        packets: UNROUTED_PACKETS,
        bytes: UNROUTED_BYTES,
        per_destination: UNROUTED_PER_DESTINATION,
        max_age: UNROUTED_MAX_AGE,
    })
}

impl Node {
    /// A packet from the TUN for `dst`, which no member has: held if `dst` could still get
    /// one (a usable address of the subnet, or an address of the IPv6 overlay prefix, not
    /// ours), else counted as `no_route`.
    pub(super) fn hold_unrouted(&mut self, now: Instant, dst: IpAddr, packet: &[u8]) {
        let could_join = match dst {
            IpAddr::V4(v4) => {
                addressing::is_usable(&self.cfg.subnet, v4) && v4 != self.cfg.virtual_ip
            }
            IpAddr::V6(v6) => {
                let prefix = self.members.ipv6_prefix();
                // The subnet-router anycast address (interface ID 0) is never a member's.
                prefix.contains(&v6) && v6 != prefix.network() && v6 != self.members.own_ipv6()
            }
        };
        if !could_join {
            self.drops.no_route += 1;
            return;
        }
        self.drops.no_route += self.unrouted.expire(now);
        self.drops.no_route += self.unrouted.push(now, dst, packet);
        if let Some(at) = self.unrouted.next_expiry() {
            self.timers.arm_earliest(Timer::Unrouted, at);
        }
    }

    /// Sends the held packets whose address now has a member, oldest first.
    pub(super) fn release_unrouted(&mut self) {
        if self.unrouted.is_empty() {
            return;
        }
        let now = self.now;
        self.drops.no_route += self.unrouted.expire(now);
        loop {
            let members = &self.members;
            let Some(held) = self
                .unrouted
                .pop_where(|dst| members.route_ip(dst).is_some())
            else {
                break;
            };
            if let Some(key) = self.members.route_ip(held.dst) {
                self.send_to_peer(now, key, &held.packet);
            }
            self.unrouted.recycle(held.packet);
        }
    }

    /// Drops the held packets that waited too long (the [`Timer::Unrouted`] deadline).
    pub(super) fn expire_unrouted(&mut self, now: Instant) {
        self.drops.no_route += self.unrouted.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NodeConfig, RelayTarget};
    use super::*;
    use crate::keys::{NetworkSecret, NodeSecret};
    use crate::wire::MemberEntry;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Two members of one network: 10.77.0.1 and 10.77.0.2.
    fn pair(now: Instant) -> (Node, Node) {
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        let relay = NodeSecret::generate(&mut rng).public();
        let network = NetworkSecret::generate(&mut rng);
        let mut member = |last: u8| {
            let cfg = NodeConfig {
                secret: NodeSecret::generate(&mut rng),
                network_secret: network.clone(),
                network_name: "test".into(),
                name: format!("m{last}"),
                virtual_ip: Ipv4Addr::new(10, 77, 0, last),
                subnet: "10.77.0.0/16".parse().expect("literal"),
                relays: vec![RelayTarget {
                    key: relay,
                    addr: "203.0.113.1:3478".parse().expect("literal"),
                    tls: false,
                }],
                stun_servers: Vec::new(),
                seed: u64::from(last),
                relay_for_peers: true,
            };
            Node::new(cfg, now, 1_700_000_000_000)
        };
        (member(1), member(2))
    }

    /// `n` as the relay would push it to the other members.
    fn entry(n: &Node) -> MemberEntry {
        MemberEntry {
            key: n.public,
            observed: "198.51.100.2:40000".parse().expect("literal"),
            announcement: n.announcement.clone(),
            since: 1,
        }
    }

    fn packet_to(dst: Ipv4Addr, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&dst.octets());
        p[27] = tag;
        p
    }

    fn drain(n: &mut Node) {
        let mut buf = Vec::new();
        while n.poll_transmit(&mut buf).is_some() {}
    }

    #[test]
    fn a_packet_for_a_member_not_yet_known_goes_out_when_it_joins() {
        let now = Instant::now();
        let (mut a, b) = pair(now);
        a.handle_timeout(now);
        drain(&mut a);
        let b_ip = b.virtual_ip();
        for tag in 0..3 {
            a.handle_tun_packet(now, &packet_to(b_ip, tag));
        }
        assert_eq!(a.unrouted.len(), 3);
        assert_eq!(a.drops.no_route, 0);
        assert_eq!(a.timers.get(Timer::Unrouted), Some(now + UNROUTED_MAX_AGE));
        let joined = now + Duration::from_secs(1);
        a.now = joined;
        a.upsert_member(joined, entry(&b));
        assert!(a.unrouted.is_empty(), "released to the new member");
        let peer = a.peers.get(&b.public).expect("b joined");
        assert_eq!(peer.link.held_packets(), 3, "now waiting for the handshake");
        let mut buf = Vec::new();
        let mut initiations = 0;
        while a.poll_transmit(&mut buf).is_some() {
            // Relayed: the initiation travels inside a relay frame.
            initiations += usize::from(buf.len() > 148);
        }
        assert!(initiations >= 1, "the released packet started a handshake");
        assert_eq!(a.drops.no_route, 0);
    }

    #[test]
    fn the_hold_is_bounded_per_address_in_time_and_to_the_subnet() {
        let now = Instant::now();
        let (mut a, b) = pair(now);
        // Outside the subnet, the subnet's broadcast address and our own: never held.
        for dst in [
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(10, 77, 255, 255),
            a.virtual_ip(),
        ] {
            a.handle_tun_packet(now, &packet_to(dst, 0));
        }
        assert_eq!((a.unrouted.len(), a.drops.no_route), (0, 3));
        // One address gets its share; the oldest of its packets make room.
        let b_ip = b.virtual_ip();
        for tag in 0..(UNROUTED_PER_DESTINATION as u8 + 2) {
            a.handle_tun_packet(now, &packet_to(b_ip, tag));
        }
        assert_eq!(a.unrouted.len(), UNROUTED_PER_DESTINATION);
        assert_eq!(a.drops.no_route, 5);
        // In all: many addresses, the oldest go.
        for last in 10..(10 + UNROUTED_PACKETS as u8) {
            a.handle_tun_packet(now, &packet_to(Ipv4Addr::new(10, 77, 1, last), 0));
        }
        assert_eq!(a.unrouted.len(), UNROUTED_PACKETS);
        let dropped = 5 + UNROUTED_PER_DESTINATION as u64;
        assert_eq!(a.drops.no_route, dropped, "b's packets were the oldest");
        // Nobody joins in time: the timer drops them all.
        let late = now + UNROUTED_MAX_AGE;
        a.handle_timeout(late);
        assert!(a.unrouted.is_empty());
        assert_eq!(a.drops.no_route, dropped + UNROUTED_PACKETS as u64);
        assert_eq!(a.timers.get(Timer::Unrouted), None);
        // A packet held, then b joining after its expiry: nothing is sent for it.
        a.handle_tun_packet(late, &packet_to(b_ip, 9));
        let later = late + UNROUTED_MAX_AGE;
        a.now = later;
        a.upsert_member(later, entry(&b));
        let peer = a.peers.get(&b.public).expect("b joined");
        assert_eq!(peer.link.held_packets(), 0);
        assert_eq!(a.drops.no_route, dropped + UNROUTED_PACKETS as u64 + 1);
    }

    /// An IPv6 packet from `src` to `dst` (ICMPv6 echo request, 8 bytes of payload).
    fn packet6(src: Ipv6Addr, dst: Ipv6Addr, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&8u16.to_be_bytes());
        p[6] = 58;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40] = 128;
        p[47] = tag;
        p
    }

    #[test]
    fn ipv6_goes_to_the_member_whose_key_derives_the_destination_and_link_chatter_is_no_error() {
        let now = Instant::now();
        let (mut a, b) = pair(now);
        a.handle_timeout(now);
        drain(&mut a);
        let (a6, b6) = (a.overlay_ipv6(), b.overlay_ipv6());
        assert_eq!(
            b6,
            crate::addressing::overlay_ipv6(&b.keys.network_id, &b.public)
        );
        assert_ne!(a6, b6);
        // Router and neighbour solicitations, MLD, link-local: silently stay on this host.
        for dst in ["ff02::2", "ff02::1:ff00:1", "ff02::16", "fe80::1", "::"] {
            let dst: Ipv6Addr = dst.parse().expect("literal");
            a.handle_tun_packet(now, &packet6(a6, dst, 0));
        }
        assert_eq!((a.unrouted.len(), a.drops.no_route), (0, 0));
        // Outside the overlay prefix, our own address, the subnet-router anycast address, a
        // truncated header: no route.
        let prefix = crate::addressing::overlay_ipv6_prefix(&a.keys.network_id);
        for dst in [
            "2001:db8::1".parse().expect("literal"),
            a6,
            prefix.network(),
        ] {
            a.handle_tun_packet(now, &packet6(a6, dst, 0));
        }
        a.handle_tun_packet(now, &packet6(a6, b6, 0)[..30]);
        assert_eq!((a.unrouted.len(), a.drops.no_route), (0, 4));
        // b's address before b is known: held, and released to b's link when it joins.
        a.handle_tun_packet(now, &packet6(a6, b6, 1));
        assert_eq!(a.unrouted.len(), 1);
        a.upsert_member(now, entry(&b));
        assert!(a.unrouted.is_empty());
        assert_eq!(a.members.route6(b6), Some(b.public));
        assert_eq!(a.find_peer(&b6.to_string()), Some(b.public));
        let peer = a.peers.get(&b.public).expect("b joined");
        assert_eq!(peer.link.held_packets(), 1, "waiting for the handshake");
        a.handle_tun_packet(now, &packet6(a6, b6, 2));
        let peer = a.peers.get(&b.public).expect("b joined");
        assert_eq!(peer.link.held_packets(), 2, "routed straight to b");
        assert_eq!(a.drops.no_route, 4);
    }
}
