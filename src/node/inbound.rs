//! Inbound dispatch: which machine a datagram belongs to. Relay replies go to the relay
//! session and membership, relayed and direct disco messages to path selection, WireGuard
//! datagrams, once the handshake guard admits them, to the peer link found by the initiator's
//! static key (handshake initiations) or our receiver index (everything else). Anything that
//! fits nowhere is counted and dropped. A decrypted packet, IPv4 or IPv6, is delivered only
//! from the sender's own address (for IPv6, the overlay address its key derives) to ours.
//! Decrypted TCP SYNs have their MSS clamped to the peer's path MTU on the way into the TUN
//! (see `mtu`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use super::link::{Admission, LinkOutput};
use super::membership::Inner;
use super::mtu;
use super::{Handled, Node, Timer};
use crate::keys::PeerKey;
use crate::wire::{self, DatagramKind, Frame};

impl Node {
    /// A meshvpn frame from `from` on our socket `socket`: relay replies, relayed payloads
    /// (WireGuard or disco), direct disco messages. Returns whether control state changed.
    pub(super) fn handle_frame(
        &mut self,
        now: Instant,
        from: SocketAddr,
        socket: u16,
        bytes: &[u8],
    ) -> Handled {
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::trace!(%e, %from, "dropping frame");
                self.drops.malformed += 1;
                return Handled::Data;
            }
        };
        match frame {
            Frame::FromRelay { relay, sealed } => {
                return self.handle_from_relay(now, from, relay, sealed)
            }
            Frame::RelayRecv {
                from: sender,
                payload,
            } => {
                match self.relay_at(from) {
                    Some(relay) => self.relays[relay].note_heard(now),
                    // A member carrying it for us (see `helping`): only from a live path.
                    None if self.member_at(now, from).is_some() => {}
                    None => {
                        self.drops.unauthenticated += 1;
                        return Handled::Data;
                    }
                }
                match wire::classify(payload) {
                    DatagramKind::WireGuard => {
                        self.handle_wireguard(now, from, socket, Some(sender), payload);
                        return Handled::Data;
                    }
                    DatagramKind::Meshvpn => match Frame::parse(payload) {
                        Ok(Frame::Disco {
                            sender: inner,
                            sealed,
                        }) if inner == sender => self.handle_disco(now, None, 0, sender, sealed),
                        _ => self.drops.malformed += 1,
                    },
                    DatagramKind::Stun | DatagramKind::Unknown => self.drops.malformed += 1,
                }
            }
            Frame::Disco { sender, sealed } => {
                self.handle_disco(now, Some(from), socket, sender, sealed)
            }
            Frame::CookieReply { echo, cookie } if self.relay_at(from).is_some() => {
                let nonce = self.nonce();
                let relay = self.relay_at(from).unwrap_or(self.primary);
                if let Some(dgram) =
                    self.relays[relay].handle_cookie_reply(echo, cookie, self.public, nonce)
                {
                    self.out.for_relay(relay, &dgram);
                }
            }
            Frame::KeyRequest
            | Frame::KeyResponse { .. }
            | Frame::ToRelay { .. }
            | Frame::CookieReply { .. } => self.drops.malformed += 1,
            Frame::RelaySend { to, payload } => {
                self.handle_relay_for_peer(now, from, to, payload);
                return Handled::Data;
            }
        }
        Handled::Control
    }

    /// A WireGuard message from `from` on our socket `socket`, relayed on behalf of
    /// `via_relay` if set. The handshake guard sees it first (mac1, cookies under load, the
    /// key-agreement budget); a cookie reply goes back the way the message came. The data
    /// path: nothing here allocates.
    pub(super) fn handle_wireguard(
        &mut self,
        now: Instant,
        from: SocketAddr,
        socket: u16,
        via_relay: Option<PeerKey>,
        bytes: &[u8],
    ) {
        let identify = via_relay.is_none();
        // The relay a relayed message came through (its sender is answered through it).
        let relay_index = via_relay.and_then(|_| self.relay_at(from));
        let admission = self.guard.admit(
            now,
            from.ip(),
            bytes,
            identify,
            &mut self.buf,
            &mut self.drops,
        );
        let key = match admission {
            Admission::Cookie(cookie) => {
                match via_relay {
                    Some(k) => self.out.relay_to_peer(k, cookie),
                    None => self.out.udp(socket, from, cookie),
                }
                return;
            }
            Admission::Dropped => return,
            Admission::Initiation { initiator } => via_relay.or(initiator),
            Admission::Index(index) => via_relay.or_else(|| self.members.by_index(index)),
        };
        let Some(key) = key else {
            self.drops.wireguard += 1;
            return;
        };
        let Some(p) = self.peers.get_mut(&key) else {
            self.drops.wireguard += 1;
            return;
        };
        let (vip, direct, out) = (p.virtual_ip(), p.direct(), &mut self.out);
        // A SYN or SYN-ACK from the peer is clamped to our path MTU towards it, so the host
        // behind our TUN never sends it a segment the path cannot carry.
        let path_mtu = p.paths.pmtu.mtu();
        let scratch = &mut self.scratch;
        let members = &self.members;
        let mut refused = Inner::Deliver;
        // Whether the message proved to come from the peer (it decrypted, or was a handshake
        // boringtun answered): only then may it move the peer onto the relay it came through.
        let mut authentic = false;
        let mut initiated = false;
        p.link.decapsulate(
            now,
            from.ip(),
            bytes,
            vip,
            &mut self.buf,
            &mut self.drops,
            |o| match o {
                // Answer the way the message came, so handshakes complete before a path exists.
                LinkOutput::Reply(b) => {
                    authentic = true;
                    initiated = true;
                    if via_relay.is_some() {
                        // The reply takes the relay (or member) the initiation came through.
                        match relay_index {
                            Some(r) => out.set_peer_relay(key, Some(r)),
                            None => out.set_member_relay(key, Some((from, socket))),
                        }
                        out.relay_to_peer(key, b)
                    } else {
                        out.udp(socket, from, b)
                    }
                }
                LinkOutput::Send(b) => out.for_peer(direct, key, b),
                // Cryptokey routing both ways: the routing table, not the announcement, must
                // give the source to this peer, and only our own address is delivered.
                LinkOutput::Tun(b) => {
                    authentic = true;
                    match inner_addresses(b) {
                        Some((src, dst)) => match members.check_inner(key, src, dst) {
                            Inner::Deliver if mtu::is_tcp_syn(b) => {
                                scratch.clear();
                                scratch.extend_from_slice(b);
                                mtu::clamp_mss_to_mtu(scratch, path_mtu);
                                out.tun(scratch);
                            }
                            Inner::Deliver => out.tun(b),
                            verdict @ (Inner::SpoofedSource | Inner::NotForUs) => refused = verdict,
                        },
                        None => refused = Inner::SpoofedSource,
                    }
                }
            },
        );
        // A new handshake straight from an address that is not the path: the peer restarted
        // or moved (WireGuard roaming). Ping it there; its pong moves the path at once.
        let roamed = initiated && via_relay.is_none() && p.paths.handle_roam(from, socket);
        if authentic && via_relay.is_some() {
            match relay_index {
                Some(r) => {
                    if out.peer_relay(&key) != r {
                        out.set_peer_relay(key, Some(r));
                    }
                }
                // Carried by a member: answer through the same member.
                None => {
                    if out.member_relay(&key) != Some((from, socket)) {
                        out.set_member_relay(key, Some((from, socket)));
                    }
                }
            }
        }
        match refused {
            Inner::Deliver => {}
            Inner::SpoofedSource => self.drops.spoofed_source += 1,
            Inner::NotForUs => self.drops.wrong_destination += 1,
        }
        if let Some(at) = p.link.poll_timeout() {
            self.timers.arm_earliest(Timer::Handshake, at);
        }
        if roamed {
            self.send_ping(now, key, Some(from), socket);
        }
    }
}

/// Source and destination of an IPv4 or IPv6 packet; `None` for a truncated header or
/// another version.
fn inner_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 => {
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Transport, HANDSHAKE_LOAD_THRESHOLD};
    use super::*;
    use crate::keys::NodeSecret;
    use boringtun::noise::{Tunn, TunnResult};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn node(now: Instant) -> Node {
        super::super::test_support::node(12, now)
    }

    #[test]
    fn initiations_under_load_are_answered_with_cookies_to_their_sender_and_no_key_agreement() {
        let now = Instant::now();
        let mut n = node(now);
        let mut buf = Vec::new();
        n.handle_timeout(now);
        while n.poll_transmit(&mut buf).is_some() {}
        // Someone who knows the member's public key, from one address.
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let sender = NodeSecret::generate(&mut rng);
        let mut tunn = Tunn::new(
            sender.to_static(),
            n.public.to_public(),
            None,
            None,
            1,
            None,
        );
        let from: SocketAddr = "198.51.100.9:40000".parse().expect("literal");
        let mut scratch = vec![0u8; 256];
        let total = HANDSHAKE_LOAD_THRESHOLD + 50;
        let mut cookies = 0;
        for _ in 0..total {
            let TunnResult::WriteToNetwork(init) =
                tunn.format_handshake_initiation(&mut scratch, true)
            else {
                panic!("an initiation");
            };
            n.handle_udp(now, from, init);
            while let Some(t) = n.poll_transmit(&mut buf) {
                assert_eq!(
                    t.transport,
                    Transport::Udp {
                        socket: 0,
                        dst: from
                    }
                );
                assert_eq!((buf.len(), buf[0]), (64, 3), "a cookie reply");
                cookies += 1;
            }
        }
        assert_eq!(cookies, 50);
        assert_eq!(n.guard.key_agreements(), HANDSHAKE_LOAD_THRESHOLD);
        assert_eq!(n.drops.handshake_cookie, 50);
        // Not a member: every initiation that reached key agreement is refused.
        assert_eq!(n.drops.wireguard, HANDSHAKE_LOAD_THRESHOLD);

        // The count restarts each second of node time (the timer runs while peers exist; here
        // the guard is reset directly): the next initiation is admitted again.
        n.guard.handle_reset();
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut scratch, true)
        else {
            panic!("an initiation");
        };
        n.handle_udp(now, from, init);
        assert!(
            n.poll_transmit(&mut buf).is_none(),
            "no cookie after the reset"
        );
        assert_eq!(n.guard.key_agreements(), HANDSHAKE_LOAD_THRESHOLD + 1);
    }
}
