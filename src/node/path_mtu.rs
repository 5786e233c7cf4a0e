//! The node's side of path MTU discovery: runs each peer's [`PathMtu`] search, seals and sends
//! its probes on the peer's current path, acknowledges the peer's probes, and holds every inner
//! packet to the peer's path MTU (see [`super::mtu`] for the packet rewriting and
//! [`super::pmtu`] for the search).
//!
//! On the way to a peer, a packet larger than the path MTU is answered with ICMP
//! "fragmentation needed" (IPv4, DF set), ICMPv6 "Packet Too Big" (IPv6) or fragmented
//! (IPv4, DF clear) instead of being sealed into a
//! datagram the path would drop silently; a TCP SYN or SYN-ACK has its MSS clamped to what
//! fits, both leaving the TUN and, in `inbound`, before it is written into the TUN.
//!
//! [`PathMtu`]: super::pmtu::PathMtu

use std::net::SocketAddr;
use std::time::Instant;

use rand::RngCore;

use super::mtu::{self, TooBig, WIREGUARD_OVERHEAD};
use super::peer::Path;
use super::pmtu::PathKind;
use super::{Node, Timer};
use crate::keys::PeerKey;
use crate::wire::{self, Disco, Frame};

impl Node {
    /// Tells the node the TUN device's MTU: no inner packet is larger, so path MTU discovery
    /// searches up to it. Until this is called the node assumes [`crate::config::DEFAULT_MTU`].
    pub fn set_tun_mtu(&mut self, now: Instant, mtu: u16) {
        self.now = self.now.max(now);
        self.tun_mtu = mtu;
        for p in self.peers.values_mut() {
            p.paths.pmtu.set_ceiling(now, mtu);
        }
        self.refresh_timers();
    }

    /// The path MTU to member `key` (the largest inner packet its path carries as far as is
    /// known), if it is a known member.
    pub fn path_mtu(&self, key: &PeerKey) -> Option<u16> {
        self.peers.get(key).map(|p| p.paths.pmtu.mtu())
    }

    /// The host refused to send `datagram` to `dst` because it is larger than the local
    /// interface or the kernel's cached path MTU allows (`EMSGSIZE`). The peer it was for is
    /// held to a smaller MTU at once and its search continues below that size.
    pub fn handle_send_too_big(&mut self, now: Instant, dst: SocketAddr, datagram: &[u8]) {
        self.now = self.now.max(now);
        let (key, payload_len) = if self.relay_at(dst).is_some() {
            match Frame::parse(datagram) {
                Ok(Frame::RelaySend { to, payload }) => (to, payload.len()),
                _ => return,
            }
        } else {
            match self
                .peers
                .values()
                .find(|p| p.direct().map(|d| d.0) == Some(dst))
            {
                Some(p) => (p.key, datagram.len()),
                None => return,
            }
        };
        let inner = payload_len.saturating_sub(usize::from(WIREGUARD_OVERHEAD));
        if let Some(p) = self.peers.get_mut(&key) {
            let inner = u16::try_from(inner).unwrap_or(u16::MAX);
            p.paths.pmtu.handle_too_big(now, inner);
            tracing::debug!(peer = %p.announcement.name, mtu = p.paths.pmtu.mtu(), "send refused as too large");
        }
        self.refresh_timers();
    }

    /// Holds one inner packet for `key` to the peer's path MTU, then seals it: too large, it is
    /// answered or fragmented (see the module doc); a SYN has its MSS clamped.
    pub(super) fn send_fitted(&mut self, now: Instant, key: PeerKey, packet: &[u8]) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let path_mtu = p.paths.pmtu.mtu();
        if packet.len() > usize::from(path_mtu) {
            self.too_big(now, key, packet, path_mtu);
        } else if mtu::is_tcp_syn(packet) {
            let mut copy = std::mem::take(&mut self.scratch);
            copy.clear();
            copy.extend_from_slice(packet);
            mtu::clamp_mss_to_mtu(&mut copy, path_mtu);
            self.seal_to_peer(now, key, &copy);
            self.scratch = copy;
        } else {
            self.seal_to_peer(now, key, packet);
        }
    }

    /// A packet for `key` larger than its path MTU `path_mtu`.
    fn too_big(&mut self, now: Instant, key: PeerKey, packet: &[u8], path_mtu: u16) {
        let mut scratch = std::mem::take(&mut self.scratch);
        match mtu::classify_too_big(packet) {
            TooBig::Answer => {
                self.drops.too_big += 1;
                if self.icmp.take(now) && mtu::frag_needed(packet, path_mtu, &mut scratch) {
                    self.out.tun(&scratch);
                }
            }
            TooBig::AnswerIpv6 => {
                self.drops.too_big += 1;
                if self.icmp.take(now) && mtu::packet_too_big(packet, path_mtu, &mut scratch) {
                    self.out.tun(&scratch);
                }
            }
            TooBig::Fragment => {
                mtu::fragment(packet, path_mtu, &mut scratch, |f| {
                    self.seal_to_peer(now, key, f)
                });
            }
            TooBig::Drop => self.drops.too_big += 1,
        }
        self.scratch = scratch;
    }

    /// Runs `key`'s path MTU search when due: follows the path's kind and the TUN MTU, and
    /// sends the probe the search asks for on the current path.
    pub(super) fn pmtu_timers(&mut self, now: Instant, key: PeerKey) {
        let relay_v6 = self.relay_is_ipv6(&key);
        let tun_mtu = self.tun_mtu;
        let rng = &mut self.rng;
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.paths.pmtu.set_ceiling(now, tun_mtu);
        let kind = path_kind(p.paths.path(), relay_v6);
        if p.paths.pmtu.kind() != kind {
            p.paths.pmtu.handle_path_change(now, kind);
        }
        if !p.paths.path_confirmed() || (p.paths.pmtu.is_done() && p.paths.is_idle(now)) {
            return;
        }
        let Some((size, tx)) = p.paths.pmtu.poll_probe(now, || {
            let mut tx = [0u8; 12];
            rng.fill_bytes(&mut tx);
            tx
        }) else {
            return;
        };
        let direct = p.direct();
        let padding = wire::probe_padding(usize::from(size + WIREGUARD_OVERHEAD));
        let msg = Disco::Probe { tx, padding };
        match direct {
            Some((addr, socket)) => {
                let nonce = self.nonce();
                let stamp = self.disco_stamp(now);
                let Some(p) = self.peers.get(&key) else {
                    return;
                };
                let dgram = wire::seal_disco(&p.disco_key, self.public, stamp, &msg, nonce);
                self.out.udp(socket, addr, &dgram);
            }
            None => self.send_disco_via_relay(now, key, &msg),
        }
    }

    /// When `key`'s path MTU search next needs to run (only while its path is confirmed, and
    /// a re-search only while the peer is active: path selection's activity check notices
    /// the end of idleness within a second).
    pub(super) fn pmtu_deadline(now: Instant, p: &super::peer::Peer) -> Option<Instant> {
        let waits = p.paths.pmtu.is_done() && p.paths.is_idle(now);
        (p.paths.path_confirmed() && !waits).then(|| p.paths.pmtu.poll_timeout())
    }

    /// The path to `key` changed to `path`: its MTU search starts again at the new path's base.
    pub(super) fn restart_pmtu(&mut self, now: Instant, key: PeerKey, path: Path) {
        let relay_v6 = self.relay_is_ipv6(&key);
        if let Some(p) = self.peers.get_mut(&key) {
            p.paths
                .pmtu
                .handle_path_change(now, path_kind(path, relay_v6));
            self.timers.arm_earliest(Timer::Paths, now);
        }
    }

    /// A probe from `sender` arrived (from `from` on our socket `socket`, or through the
    /// relay): acknowledge it the way it came.
    pub(super) fn ack_probe(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        socket: u16,
        sender: PeerKey,
        tx: [u8; 12],
    ) {
        let msg = Disco::ProbeAck { tx };
        match from {
            Some(dst) => {
                let nonce = self.nonce();
                let stamp = self.disco_stamp(now);
                let Some(p) = self.peers.get(&sender) else {
                    return;
                };
                let dgram = wire::seal_disco(&p.disco_key, self.public, stamp, &msg, nonce);
                self.out.udp(socket, dst, &dgram);
            }
            None => self.send_disco_via_relay(now, sender, &msg),
        }
    }

    /// `sender` acknowledged our probe `tx`.
    pub(super) fn handle_probe_ack(&mut self, now: Instant, sender: PeerKey, tx: [u8; 12]) {
        if let Some(p) = self.peers.get_mut(&sender) {
            if p.paths.pmtu.handle_ack(now, &tx) {
                tracing::debug!(peer = %p.announcement.name, mtu = p.paths.pmtu.mtu(), "path MTU raised");
            }
        }
    }
}

/// What the overhead of `path` depends on; the relay's address family is `relay_v6`.
fn path_kind(path: Path, relay_v6: bool) -> PathKind {
    match path {
        Path::Direct { addr, .. } => PathKind {
            ipv6: addr.is_ipv6(),
            relayed: false,
        },
        Path::Relayed => PathKind {
            ipv6: relay_v6,
            relayed: true,
        },
    }
}
