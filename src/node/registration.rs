//! The node's side of its relay session: turns what the [`RelaySession`] says is due into
//! sealed requests (they carry the node's announcement and timestamps), authenticates what comes
//! back, and routes each reply to the session (acknowledgements) or to membership (pushes,
//! snapshots, removals). Also the stream inputs the driver feeds, and the relay transport the
//! outbox follows.
//!
//! [`RelaySession`]: super::relay_session::RelaySession

use std::net::SocketAddr;
use std::time::Instant;

use super::relay_session::{Ack, StreamKind};
use super::{Event, Handled, Node};
use crate::keys::PeerKey;
use crate::wire::{self, RelayReply, RelayRequest};

impl Node {
    /// Runs the relay session's due work.
    pub(super) fn relay_timers(&mut self, now: Instant) {
        let due = self.relay.handle_timeout(now);
        if due.lost {
            self.out.event(Event::RelayLost);
        }
        if due.register {
            self.register(now);
        }
        if due.sync {
            self.request_sync(now);
        }
        if due.transport_changed {
            self.relay_transport_changed(now);
        }
        self.rotation_timers(now);
    }

    /// Follows a change of the relay transport: the outbox routes relay-bound datagrams the new
    /// way, and the NAT verdict (UDP blocked or not) is re-announced.
    pub(super) fn relay_transport_changed(&mut self, now: Instant) {
        self.out.set_relay_transport(self.relay.transport());
        self.update_nat_verdict(now);
    }

    /// Sends a registration with our current announcement.
    pub(super) fn register(&mut self, now: Instant) {
        let ts = self.next_ts(now);
        self.relay.note_register_sent(now, ts);
        let req = RelayRequest::Register {
            network: self.keys.network_id,
            ts_ms: ts,
            announcement: self.announcement.clone(),
        };
        self.send_to_relay(&req);
    }

    /// Asks the relay for a full member list, unless a request is in flight.
    pub(super) fn request_sync(&mut self, now: Instant) {
        if !self.relay.note_sync_sent(now) {
            return;
        }
        let ts = self.next_ts(now);
        self.send_to_relay(&RelayRequest::Sync {
            network: self.keys.network_id,
            ts_ms: ts,
        });
    }

    /// Seals `req` for the relay and queues it on the relay transport.
    pub(super) fn send_to_relay(&mut self, req: &RelayRequest) {
        let nonce = self.nonce();
        let dgram = self.relay.seal(self.public, req, nonce);
        self.out.for_relay(&dgram);
    }

    /// A sealed reply claiming to come from relay `relay` at `from`.
    pub(super) fn handle_from_relay(
        &mut self,
        now: Instant,
        from: SocketAddr,
        relay: PeerKey,
        sealed: &[u8],
    ) -> Handled {
        let target = self.relay.target();
        if from != target.addr {
            self.drops.unauthenticated += 1;
            return Handled::Data;
        }
        if relay != target.key {
            if self.relay.first_key_mismatch() {
                self.out.event(Event::RelayKeyMismatch {
                    addr: from,
                    expected: target.key,
                    got: relay,
                });
            }
            self.drops.unauthenticated += 1;
            return Handled::Data;
        }
        match wire::open_from_relay(self.relay.session_key(), &relay, sealed) {
            Ok(reply) => {
                self.relay.note_heard(now);
                self.handle_relay_reply(now, reply);
                Handled::Control
            }
            Err(_) => {
                self.drops.unauthenticated += 1;
                Handled::Data
            }
        }
    }

    /// Routes an authenticated reply: acknowledgements to the session, member pushes,
    /// snapshots and removals to membership, errors to the operator.
    pub(super) fn handle_relay_reply(&mut self, now: Instant, reply: RelayReply) {
        match reply {
            RelayReply::RegisterAck {
                echo_ts_ms,
                observed,
                digest,
                since,
                ..
            } => {
                match self.relay.handle_ack(now, echo_ts_ms, observed) {
                    Ack::Ignored => return,
                    Ack::Accepted { news: true } => {
                        self.out.event(Event::RelayRegistered { observed })
                    }
                    Ack::Accepted { news: false } => {}
                }
                self.members.set_own_since(since);
                if self.relay.note_presence(since) {
                    // Members that saw us removed moved our floor past the announcement we
                    // registered with: send a fresh one.
                    self.reseal_announcement(now);
                    self.relay.register_now(now);
                }
                self.resolve_addresses();
                if self.members.digest() != digest {
                    self.request_sync(now);
                }
            }
            RelayReply::Member { tag, entry } => {
                if tag.generation == 0 {
                    self.apply_push(now, tag.seq, entry);
                } else if let Some(snapshot) = self.relay.collect(tag, entry) {
                    self.apply_full_sync(now, tag.seq, snapshot);
                }
            }
            RelayReply::SyncEmpty { seq, .. } => self.apply_full_sync(now, seq, Vec::new()),
            RelayReply::MemberGone { key, seq } => self.apply_removal(now, key, seq),
            RelayReply::Error { message } => {
                if !self.handle_rotation_error(&message) {
                    self.out.event(Event::RelayError { message });
                }
            }
            RelayReply::RotateAck {
                echo_ts_ms,
                complete,
                ..
            } => self.handle_rotate_ack(now, echo_ts_ms, complete),
            RelayReply::Rotated { network, entry } => self.handle_rotated(now, network, entry),
        }
    }

    /// Whether the driver should hold a stream (TCP) to relay `relay` open, or open one. The
    /// driver reports the outcome with [`Node::handle_relay_stream_up`] or
    /// [`Node::handle_relay_stream_down`], and closes the stream once this turns `false`.
    pub fn wants_stream(&self, relay: usize) -> bool {
        relay == 0 && self.relay.wants_stream()
    }

    /// The kind of stream to relay `relay` the driver should hold open, if any: TCP first,
    /// TLS when TCP does not get through (see [`relay_session`](super::relay_session)).
    pub fn wanted_stream(&self, relay: usize) -> Option<StreamKind> {
        self.wants_stream(relay).then(|| self.relay.stream_kind())
    }

    /// The driver's stream of `kind` to relay `relay` is connected.
    pub fn handle_relay_stream_up(&mut self, now: Instant, relay: usize, kind: StreamKind) {
        self.now = self.now.max(now);
        if relay == 0 && self.relay.handle_stream_up(now, kind) {
            self.relay_transport_changed(now);
        }
        self.refresh_timers();
    }

    /// The driver's stream to relay `relay` failed to connect or closed.
    pub fn handle_relay_stream_down(&mut self, now: Instant, relay: usize) {
        self.now = self.now.max(now);
        if relay == 0 && self.relay.handle_stream_down(now) {
            self.relay_transport_changed(now);
        }
        self.refresh_timers();
    }

    /// One datagram that arrived on the stream from relay `relay` (the driver removed the
    /// stream's framing). Treated exactly like a datagram from the relay's UDP address.
    pub fn handle_relay_stream(&mut self, now: Instant, relay: usize, bytes: &[u8]) {
        if relay != 0 || !self.relay.wants_stream() {
            self.drops.unauthenticated += 1;
            return;
        }
        let from = self.relay.target().addr;
        self.handle_datagram(now, 0, from, bytes, true);
    }

    /// The relay's UDP address as the node uses it now.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay.target().addr
    }

    /// Whether relay traffic goes over the stream now.
    pub fn relay_on_stream(&self) -> bool {
        self.relay.on_stream()
    }

    /// The kind of stream relay traffic uses now, if it uses one.
    pub fn relay_stream_kind(&self) -> Option<StreamKind> {
        self.relay.stream_in_use()
    }
}
