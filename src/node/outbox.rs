//! The node's output queues: datagrams to send, packets for the TUN, events.
//!
//! # Job
//! Every sub-machine writes its output here through a few verbs ([`Outbox::udp`],
//! [`Outbox::for_relay`], [`Outbox::relay_to_peer`], [`Outbox::for_peer`], [`Outbox::tun`],
//! [`Outbox::event`]), so none of them needs to know how relay traffic travels: the relay
//! session sets [`Outbox::set_relay_transport`] and every relay-bound datagram follows it.
//!
//! # No per-packet allocation
//! Payloads are copied from the caller's slice into buffers taken from a free list; the driver
//! drains with [`Outbox::pop_transmit`] / [`Outbox::pop_tun`], which swap the queued buffer with
//! the driver's own reusable `Vec` and keep the driver's old buffer for the next packet. After
//! warm-up the data path allocates nothing.

use std::collections::VecDeque;
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
    relay: Transport,
    scratch: Vec<u8>,
}

impl Outbox {
    /// Empty queues; relay-bound datagrams go over `relay` until told otherwise.
    pub(crate) fn new(relay: Transport) -> Self {
        Self {
            transmits: VecDeque::new(),
            tun: VecDeque::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
            relay,
            scratch: Vec::new(),
        }
    }

    /// How relay-bound datagrams travel from now on.
    pub(crate) fn set_relay_transport(&mut self, relay: Transport) {
        self.relay = relay;
    }

    /// Whether anything waits to be drained.
    pub(crate) fn is_empty(&self) -> bool {
        self.transmits.is_empty() && self.tun.is_empty() && self.events.is_empty()
    }

    /// Queues `bytes` for UDP to `dst` from socket `socket`.
    pub(crate) fn udp(&mut self, socket: u16, dst: SocketAddr, bytes: &[u8]) {
        self.push(Transport::Udp { socket, dst }, bytes);
    }

    /// Queues a datagram for the relay itself (control requests).
    pub(crate) fn for_relay(&mut self, bytes: &[u8]) {
        self.push(self.relay, bytes);
    }

    /// Queues `payload` for peer `to` through the relay (wrapped in a relay frame).
    pub(crate) fn relay_to_peer(&mut self, to: PeerKey, payload: &[u8]) {
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        Frame::RelaySend { to, payload }.encode_into(&mut frame);
        self.push(self.relay, &frame);
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
        let mut out = Outbox::new(Transport::Udp {
            socket: 0,
            dst: relay,
        });
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
        out.set_relay_transport(Transport::Stream { relay: 0 });
        out.for_relay(b"two");
        let mut second = Vec::new();
        let t = out.pop_transmit(&mut second).expect("queued");
        assert_eq!(t.transport, Transport::Stream { relay: 0 });
        assert_eq!(second, b"two");
        assert!(second.capacity() >= 2048, "the recycled buffer was reused");
        assert!(out.pop_transmit(&mut buf).is_none());
        assert!(out.is_empty());
    }
}
