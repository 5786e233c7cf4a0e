//! One driver path: the stepping code every driver of a [`Node`] uses — the tokio agent and
//! the deterministic simulator alike — so the two cannot drift apart.
//!
//! # Job
//! [`Step::poll`] drains a node's outputs one at a time into borrowed slices of one reusable
//! buffer (no allocation per packet): datagrams with their transport, TUN packets, events, and
//! the commands to open or close the stream to a relay (and which kind, TCP or TLS), which
//! [`Step`] derives from [`Node::wanted_stream`] by remembering what it last told the driver;
//! a change of kind is a close followed by an open.
//!
//! # Driving contract
//! After every input to the node the driver calls [`Step::poll`] until it returns `None` and
//! executes each [`Output`]: send the datagram, write the packet, log the event, open or close
//! the stream. It reports the stream's fate back with [`Node::handle_relay_stream_up`],
//! [`Node::handle_relay_stream_down`] and feeds what the stream carries to
//! [`Node::handle_relay_stream`]. Then it sleeps until [`Node::poll_timeout`] or the next input.

use std::net::SocketAddr;

use super::{Event, Node, StreamKind, Transport};

/// One thing the driver must do.
#[derive(Debug, PartialEq)]
pub enum Output<'a> {
    /// Send `bytes` from UDP socket `socket` (0 is the main socket) to `dst`.
    Udp {
        /// Which socket.
        socket: u16,
        /// Where to.
        dst: SocketAddr,
        /// The datagram.
        bytes: &'a [u8],
    },
    /// Write one datagram to the stream of relay `relay` (the driver frames it).
    Stream {
        /// Which relay.
        relay: usize,
        /// The datagram.
        bytes: &'a [u8],
    },
    /// Write one IP packet to the TUN device.
    Tun(&'a [u8]),
    /// Something happened worth logging or answering.
    Event(Event),
    /// Open a stream of `kind` to relay `relay` and report the outcome to the node.
    OpenStream {
        /// Which relay.
        relay: usize,
        /// TCP or TLS.
        kind: StreamKind,
    },
    /// Close the stream to relay `relay` (or abandon connecting it).
    CloseStream {
        /// Which relay.
        relay: usize,
    },
}

/// A driver's stepping state: the reusable buffer and which streams it was told to hold.
#[derive(Debug, Default)]
pub struct Step {
    buf: Vec<u8>,
    /// Per relay, the kind of stream the driver was told to hold.
    streams: Vec<Option<StreamKind>>,
}

impl Step {
    /// Fresh state: no stream, an empty buffer that grows to the largest datagram once.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next output of `node`, borrowing this step's buffer; `None` when all is drained.
    pub fn poll<'a>(&'a mut self, node: &mut Node) -> Option<Output<'a>> {
        if self.streams.len() != node.relay_count() {
            self.streams.resize(node.relay_count(), None);
        }
        for relay in 0..self.streams.len() {
            let wanted = node.wanted_stream(relay);
            let held = self.streams[relay];
            if wanted != held {
                if held.is_some() {
                    self.streams[relay] = None;
                    return Some(Output::CloseStream { relay });
                }
                self.streams[relay] = wanted;
                if let Some(kind) = wanted {
                    return Some(Output::OpenStream { relay, kind });
                }
            }
        }
        if let Some(t) = node.poll_transmit(&mut self.buf) {
            let bytes = &self.buf[..t.len];
            return Some(match t.transport {
                Transport::Udp { socket, dst } => Output::Udp { socket, dst, bytes },
                Transport::Stream { relay } => Output::Stream { relay, bytes },
            });
        }
        if let Some(n) = node.poll_tun(&mut self.buf) {
            return Some(Output::Tun(&self.buf[..n]));
        }
        node.poll_event().map(Output::Event)
    }

    /// The next output a data-path thread executes on its own: a datagram for the main UDP
    /// socket, then a packet for the TUN device; `None` once neither is next. It never opens
    /// or closes a stream and leaves events, stream datagrams and the extra sockets' datagrams
    /// (and every datagram queued after one of those, to keep their order) to [`Step::poll`]
    /// of the control loop, whose node then reports output queued in
    /// [`Node::poll_timeout`].
    pub fn poll_data<'a>(&'a mut self, node: &mut Node) -> Option<Output<'a>> {
        if let Some(Transport::Udp { socket: 0, .. }) = node.next_transport() {
            if let Some(t) = node.poll_transmit(&mut self.buf) {
                if let Transport::Udp { socket, dst } = t.transport {
                    return Some(Output::Udp {
                        socket,
                        dst,
                        bytes: &self.buf[..t.len],
                    });
                }
            }
        }
        let n = node.poll_tun(&mut self.buf)?;
        Some(Output::Tun(&self.buf[..n]))
    }

    /// Whether the driver was told to hold the stream to `relay` open.
    pub fn stream_wanted(&self, relay: usize) -> bool {
        self.streams.get(relay).is_some_and(Option::is_some)
    }
}
