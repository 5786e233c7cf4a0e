//! Inbound dispatch: which machine a datagram belongs to. Relay replies go to the relay
//! session and membership, relayed and direct disco messages to path selection, WireGuard
//! datagrams, once the handshake guard admits them, to the peer link found by the initiator's
//! static key (handshake initiations) or our receiver index (everything else). Anything that
//! fits nowhere is counted and dropped.

use std::net::SocketAddr;
use std::time::Instant;

use super::link::{Admission, LinkOutput};
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
                        self.handle_wireguard(now, from, 0, Some(sender), payload);
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
}
