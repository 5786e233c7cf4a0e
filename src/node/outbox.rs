//! The node's output queues: datagrams to send, packets for the TUN, events.
//!
//! # Job
//! Every sub-machine writes its output here through a few verbs ([`Outbox::udp`],
//! [`Outbox::for_relay`], [`Outbox::relay_to_peer`], [`Outbox::for_peer`], [`Outbox::tun`],
//! [`Outbox::event`]), so none of them needs to know how relay traffic travels: each relay
//! session sets its [`Outbox::set_relay_transport`] and every datagram bound for that relay
//! follows it. Traffic for a peer through a relay takes the relay the node chose for that peer
//! ([`Outbox::set_peer_relay`]: the one the peer's relayed traffic last came through), or the
//! primary relay ([`Outbox::set_primary`]) when there is no such choice.
//!
//! # No per-packet allocation
//! Payloads are copied from the caller's slice into buffers taken from a free list; the driver
//! drains with [`Outbox::pop_transmit`] / [`Outbox::pop_tun`], which swap the queued buffer with
//! the driver's own reusable `Vec` and keep the driver's old buffer for the next packet. After
//! warm-up the data path allocates nothing.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use super::Event;
use crate::keys::PeerKey;
use crate::wire::Frame;

/// Most spare buffers kept for reuse; a burst larger than this allocates, nothing more.
const SPARE_BUFFERS: usize = 256;

/// Which transport a datagram takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// UDP from our socket `socket` (0 is the main socket; 1..=256 are the extra sockets of a
    /// birthday probe, which the driver opens on first use and closes when
    /// [`super::Node::active_sockets`] no longer lists them) to `dst`.
    Udp {
        /// Which socket sends it.
        socket: u16,
        /// Destination address.
        dst: SocketAddr,
    },
    /// The byte stream (TCP) to relay number `relay`; the driver frames it (see `relay::tcp`).
    Stream {
        /// Which relay's stream (0 is the configured relay).
        relay: usize,
    },
}

/// A datagram the driver must send: the bytes are in the buffer given to
/// [`super::Node::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// How it travels.
    pub transport: Transport,
    /// Its length in bytes (the buffer holds exactly these).
    pub len: usize,
}

/// Queued output of one node.
pub(crate) struct Outbox {
    transmits: VecDeque<(Transport, Vec<u8>)>,
    tun: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    spare: Vec<Vec<u8>>,
    /// How datagrams for each relay travel, by relay number.
    relays: Vec<Transport>,
    /// The relay used for peers without a choice of their own.
    primary: usize,
    /// The relay chosen for a peer (see the module doc).
    peer_relay: BTreeMap<PeerKey, usize>,
    /// A member that carries relayed traffic for a peer while no relay answers (its address
    /// and our socket to it); takes precedence over the relays.
    member_relay: BTreeMap<PeerKey, (SocketAddr, u16)>,
    scratch: Vec<u8>,
}

impl Outbox {
    /// Empty queues; datagrams for relay `n` go over `relays[n]` until told otherwise, and
    /// relay 0 is the primary.
    pub(crate) fn new(relays: Vec<Transport>) -> Self {
        assert!(!relays.is_empty(), "a node has at least one relay");
        Self {
            transmits: VecDeque::new(),
            tun: VecDeque::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
            relays,
            primary: 0,
            peer_relay: BTreeMap::new(),
            member_relay: BTreeMap::new(),
            scratch: Vec::new(),
        }
    }

    /// How datagrams for relay `relay` travel from now on.
    pub(crate) fn set_relay_transport(&mut self, relay: usize, transport: Transport) {
        if let Some(t) = self.relays.get_mut(relay) {
            *t = transport;
        }
    }

    /// Peers without a relay of their own are reached through `relay` from now on.
    pub(crate) fn set_primary(&mut self, relay: usize) {
        if relay < self.relays.len() {
            self.primary = relay;
        }
    }

    /// Peer `peer` is reached through `relay` (`None`: through the primary).
    pub(crate) fn set_peer_relay(&mut self, peer: PeerKey, relay: Option<usize>) {
        match relay {
            Some(r) if r < self.relays.len() && r != self.primary => {
                self.peer_relay.insert(peer, r);
            }
            Some(_) | None => {
                self.peer_relay.remove(&peer);
            }
        }
    }

    /// The relay peer `peer` is reached through.
    pub(crate) fn peer_relay(&self, peer: &PeerKey) -> usize {
        self.peer_relay.get(peer).copied().unwrap_or(self.primary)
    }

    /// Peer `peer`'s relayed traffic goes to the member at `via` (address, our socket), or
    /// (`None`) through the relays again.
    pub(crate) fn set_member_relay(&mut self, peer: PeerKey, via: Option<(SocketAddr, u16)>) {
        match via {
            Some(v) => {
                self.member_relay.insert(peer, v);
            }
            None => {
                self.member_relay.remove(&peer);
            }
        }
    }

    /// The member carrying `peer`'s relayed traffic, if one does.
    pub(crate) fn member_relay(&self, peer: &PeerKey) -> Option<(SocketAddr, u16)> {
        self.member_relay.get(peer).copied()
    }

    /// Relayed traffic goes through the relays again, for every peer.
    pub(crate) fn clear_member_relays(&mut self) {
        self.member_relay.clear();
    }

    /// Forgets every peer's relay choice that is `relay` (it stopped answering).
    pub(crate) fn forget_relay(&mut self, relay: usize) {
        self.peer_relay.retain(|_, r| *r != relay);
    }

    /// Whether anything waits to be drained.
    pub(crate) fn is_empty(&self) -> bool {
        self.transmits.is_empty() && self.tun.is_empty() && self.events.is_empty()
    }

    /// Queues `bytes` for UDP to `dst` from socket `socket`.
    pub(crate) fn udp(&mut self, socket: u16, dst: SocketAddr, bytes: &[u8]) {
        self.push(Transport::Udp { socket, dst }, bytes);
    }

    /// Queues a datagram for relay `relay` itself (control requests).
    pub(crate) fn for_relay(&mut self, relay: usize, bytes: &[u8]) {
        let transport = self.relays[relay.min(self.relays.len() - 1)];
        self.push(transport, bytes);
    }

    /// Queues `payload` for peer `to` through its relay (wrapped in a relay frame).
    pub(crate) fn relay_to_peer(&mut self, to: PeerKey, payload: &[u8]) {
        let transport = match self.member_relay.get(&to) {
            Some(&(dst, socket)) => Transport::Udp { socket, dst },
            None => self.relays[self.peer_relay(&to)],
        };
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        Frame::RelaySend { to, payload }.encode_into(&mut frame);
        self.push(transport, &frame);
        self.scratch = frame;
    }

    /// Queues `payload` for peer `to` on its current path: `direct` (address and our socket)
    /// or, if `None`, the relay.
    pub(crate) fn for_peer(
        &mut self,
        direct: Option<(SocketAddr, u16)>,
        to: PeerKey,
        bytes: &[u8],
    ) {
        match direct {
            Some((dst, socket)) => self.udp(socket, dst, bytes),
            None => self.relay_to_peer(to, bytes),
        }
    }

    /// Queues a packet for the TUN device.
    pub(crate) fn tun(&mut self, packet: &[u8]) {
        let buf = self.buffer(packet);
        self.tun.push_back(buf);
    }

    /// Queues an event.
    pub(crate) fn event(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// Swaps the next datagram into `out` (its old contents are kept for reuse).
    pub(crate) fn pop_transmit(&mut self, out: &mut Vec<u8>) -> Option<Transmit> {
        let (transport, mut buf) = self.transmits.pop_front()?;
        std::mem::swap(out, &mut buf);
        self.recycle(buf);
        Some(Transmit {
            transport,
            len: out.len(),
        })
    }

    /// How the next datagram leaves, without taking it.
    pub(crate) fn next_transport(&self) -> Option<Transport> {
        self.transmits.front().map(|(t, _)| *t)
    }

    /// Swaps the next TUN packet into `out`; returns its length.
    pub(crate) fn pop_tun(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        let mut buf = self.tun.pop_front()?;
        std::mem::swap(out, &mut buf);
        self.recycle(buf);
        Some(out.len())
    }

    /// The next event.
    pub(crate) fn pop_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn push(&mut self, transport: Transport, bytes: &[u8]) {
        let buf = self.buffer(bytes);
        self.transmits.push_back((transport, buf));
    }

    fn buffer(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        buf
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_swapped_not_allocated_and_relay_traffic_follows_the_transport() {
        let relay: SocketAddr = "203.0.113.1:3478".parse().expect("literal");
        let peer: SocketAddr = "198.51.100.7:4000".parse().expect("literal");
        let mut out = Outbox::new(vec![Transport::Udp {
            socket: 0,
            dst: relay,
        }]);
        let mut buf = Vec::with_capacity(2048);
        out.udp(0, peer, b"one");
        let t = out.pop_transmit(&mut buf).expect("queued");
        assert_eq!(&buf[..t.len], b"one");
        assert_eq!(
            t.transport,
            Transport::Udp {
                socket: 0,
                dst: peer
            }
        );
        // The driver's 2048-byte buffer went to the free list and carries the next datagram.
        out.set_relay_transport(0, Transport::Stream { relay: 0 });
        out.for_relay(0, b"two");
        let mut second = Vec::new();
        let t = out.pop_transmit(&mut second).expect("queued");
        assert_eq!(t.transport, Transport::Stream { relay: 0 });
        assert_eq!(second, b"two");
        assert!(second.capacity() >= 2048, "the recycled buffer was reused");
        assert!(out.pop_transmit(&mut buf).is_none());
        assert!(out.is_empty());
    }

    #[test]
    fn peers_follow_their_own_relay_or_the_primary() {
        let r0: SocketAddr = "203.0.113.1:3478".parse().expect("literal");
        let r1: SocketAddr = "203.0.113.2:3478".parse().expect("literal");
        let udp = |dst| Transport::Udp { socket: 0, dst };
        let mut out = Outbox::new(vec![udp(r0), udp(r1)]);
        let (a, b) = (PeerKey([1; 32]), PeerKey([2; 32]));
        let mut buf = Vec::new();
        let mut next = |out: &mut Outbox| out.pop_transmit(&mut buf).expect("queued").transport;
        out.relay_to_peer(a, b"x");
        assert_eq!(next(&mut out), udp(r0), "no choice: the primary");
        out.set_peer_relay(a, Some(1));
        out.relay_to_peer(a, b"x");
        out.relay_to_peer(b, b"x");
        assert_eq!(next(&mut out), udp(r1), "a's own relay");
        assert_eq!(next(&mut out), udp(r0), "b still on the primary");
        out.set_primary(1);
        out.relay_to_peer(b, b"x");
        assert_eq!(next(&mut out), udp(r1), "the new primary");
        out.set_primary(0);
        out.forget_relay(1);
        out.relay_to_peer(a, b"x");
        assert_eq!(next(&mut out), udp(r0), "a's relay was forgotten");
        out.set_relay_transport(1, Transport::Stream { relay: 1 });
        out.for_relay(1, b"reg");
        assert_eq!(next(&mut out), Transport::Stream { relay: 1 });
    }
}
