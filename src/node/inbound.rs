//! Inbound dispatch: which machine a datagram belongs to. Relay replies go to the relay
//! session and membership, relayed and direct disco messages to path selection, WireGuard
//! datagrams to the peer link found by the initiator's static key (handshake initiations) or
//! our receiver index (everything else). Anything that fits nowhere is counted and dropped.

use std::net::SocketAddr;
use std::time::Instant;

use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn};

use super::link::LinkOutput;
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
                if from != self.relay.target().addr {
                    self.drops.unauthenticated += 1;
                    return Handled::Data;
                }
                self.relay.note_heard(now);
                match wire::classify(payload) {
                    DatagramKind::WireGuard => {
                        self.handle_wireguard(from, 0, Some(sender), payload);
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
            Frame::CookieReply { echo, cookie } if from == self.relay.target().addr => {
                let nonce = self.nonce();
                if let Some(dgram) =
                    self.relay
                        .handle_cookie_reply(echo, cookie, self.public, nonce)
                {
                    self.out.for_relay(&dgram);
                }
            }
            Frame::KeyRequest
            | Frame::KeyResponse { .. }
            | Frame::ToRelay { .. }
            | Frame::CookieReply { .. }
            | Frame::RelaySend { .. } => self.drops.malformed += 1,
        }
        Handled::Control
    }

    /// A WireGuard message from `from` on our socket `socket`, relayed on behalf of
    /// `via_relay` if set. The data path: nothing here allocates.
    pub(super) fn handle_wireguard(
        &mut self,
        from: SocketAddr,
        socket: u16,
        via_relay: Option<PeerKey>,
        bytes: &[u8],
    ) {
        let key = match via_relay {
            Some(k) => Some(k),
            None => self.wireguard_sender(bytes),
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
        p.link.decapsulate(
            from.ip(),
            bytes,
            vip,
            &mut self.buf,
            &mut self.drops,
            |o| match o {
                // Answer the way the message came, so handshakes complete before a path exists.
                LinkOutput::Reply(b) => match via_relay {
                    Some(k) => out.relay_to_peer(k, b),
                    None => out.udp(socket, from, b),
                },
                LinkOutput::Send(b) => out.for_peer(direct, key, b),
                LinkOutput::Tun(b) => out.tun(b),
            },
        );
        if let Some(at) = p.link.poll_timeout() {
            self.timers.arm_earliest(Timer::Handshake, at);
        }
    }

    /// Finds the peer a direct WireGuard message belongs to: the initiator's static key for a
    /// handshake initiation, the receiver index for everything else.
    fn wireguard_sender(&self, bytes: &[u8]) -> Option<PeerKey> {
        match Tunn::parse_incoming_packet(bytes).ok()? {
            Packet::HandshakeInit(init) => {
                let secret = self.cfg.secret.to_static();
                let public = x25519_dalek::PublicKey::from(&secret);
                let half = parse_handshake_anon(&secret, &public, &init).ok()?;
                let key = PeerKey(half.peer_static_public);
                self.peers.contains_key(&key).then_some(key)
            }
            Packet::HandshakeResponse(p) => self.members.by_index(p.receiver_idx >> 8),
            Packet::PacketCookieReply(p) => self.members.by_index(p.receiver_idx >> 8),
            Packet::PacketData(p) => self.members.by_index(p.receiver_idx >> 8),
        }
    }
}
