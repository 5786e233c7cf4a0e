//! The node's side of its relay session: turns what the [`RelaySession`] says is due into
//! sealed requests (they carry the node's announcement and timestamps), authenticates what comes
//! back, and routes each reply to the session (acknowledgements) or to membership (pushes,
//! snapshots, removals). Also the stream inputs the driver feeds, and the relay transport the
//! outbox follows.
//!
//! [`RelaySession`]: super::relay_session::RelaySession

use std::net::SocketAddr;
use std::time::Instant;

use super::relay_session::{Ack, Registration, StreamKind};
use super::{Event, Handled, Node};
use crate::keys::PeerKey;
use crate::wire::{self, NatKind, RelayReply, RelayRequest};

impl Node {
    /// Runs every relay session's due work, then looks at the primary choice again.
    pub(super) fn relay_timers(&mut self, now: Instant) {
        let (quiet, no_nat) = (self.quiet(now), self.nat == NatKind::Public);
        for relay in 0..self.relays.len() {
            self.relays[relay].set_quiet(now, quiet);
            self.relays[relay].set_no_nat(no_nat);
            let due = self.relays[relay].handle_timeout(now);
            if due.lost {
                self.out.event(Event::RelayLost { relay });
            }
            if let Some(kind) = due.register {
                self.register(now, relay, kind);
            }
            if due.sync && relay == self.primary {
                self.request_sync(now);
            }
            if due.transport_changed {
                self.relay_transport_changed(now, relay);
            }
        }
        self.update_primary(now);
        self.update_member_relays(now);
        self.rotation_timers(now);
    }

    /// Follows a change of relay `relay`'s transport: the outbox routes datagrams for it the
    /// new way, and for the primary the NAT verdict (UDP blocked or not) is re-announced.
    pub(super) fn relay_transport_changed(&mut self, now: Instant, relay: usize) {
        self.out
            .set_relay_transport(relay, self.relays[relay].transport());
        if relay == self.primary {
            self.update_nat_verdict(now);
        }
    }

    /// Sends relay `relay` a registration with our current announcement, or a refresh.
    pub(super) fn register(&mut self, now: Instant, relay: usize, kind: Registration) {
        let ts = self.next_ts(now);
        self.relays[relay].note_register_sent(now, ts, kind);
        let network = self.keys.network_id;
        let req = match kind {
            Registration::Full => RelayRequest::Register {
                network,
                ts_ms: ts,
                announcement: self.announcement.clone(),
            },
            Registration::Refresh { answer_after } => RelayRequest::Refresh {
                network,
                ts_ms: ts,
                answer_after_ms: u32::try_from(answer_after.as_millis())
                    .unwrap_or(u32::MAX)
                    .min(wire::MAX_ANSWER_AFTER_MS),
            },
        };
        self.send_to_relay_n(relay, &req);
    }

    /// Asks the primary relay for a full member list, unless a request is in flight.
    pub(super) fn request_sync(&mut self, now: Instant) {
        if !self.relays[self.primary].note_sync_sent(now) {
            return;
        }
        let ts = self.next_ts(now);
        self.send_to_relay(&RelayRequest::Sync {
            network: self.keys.network_id,
            ts_ms: ts,
        });
    }

    /// Seals `req` for the primary relay and queues it on that relay's transport.
    pub(super) fn send_to_relay(&mut self, req: &RelayRequest) {
        self.send_to_relay_n(self.primary, req);
    }

    /// A sealed reply claiming to come from relay `relay` at `from`.
    pub(super) fn handle_from_relay(
        &mut self,
        now: Instant,
        from: SocketAddr,
        relay: PeerKey,
        sealed: &[u8],
    ) -> Handled {
        let Some(n) = self.relay_at(from) else {
            self.drops.unauthenticated += 1;
            return Handled::Data;
        };
        let target = self.relays[n].target();
        if relay != target.key {
            if self.relays[n].first_key_mismatch() {
                self.out.event(Event::RelayKeyMismatch {
                    addr: from,
                    expected: target.key,
                    got: relay,
                });
            }
            self.drops.unauthenticated += 1;
            return Handled::Data;
        }
        match wire::open_from_relay(self.relays[n].session_key(), &relay, sealed) {
            Ok(reply) => {
                self.relays[n].note_heard(now);
                self.handle_relay_reply(now, n, reply);
                Handled::Control
            }
            Err(_) => {
                self.drops.unauthenticated += 1;
                Handled::Data
            }
        }
    }

    /// Routes an authenticated reply of relay `relay`: acknowledgements to its session; member
    /// pushes, snapshots and removals to membership when it is the primary (the others' are
    /// ignored, see the `relays` module); rotation handovers from any relay (they are sealed
    /// by a member); errors to the operator.
    pub(super) fn handle_relay_reply(&mut self, now: Instant, relay: usize, reply: RelayReply) {
        let primary = relay == self.primary;
        match reply {
            RelayReply::RegisterAck {
                echo_ts_ms,
                observed,
                digest,
                since,
                ..
            } => {
                match self.relays[relay].handle_ack(now, echo_ts_ms, observed) {
                    Ack::Ignored => return,
                    Ack::Accepted { news: true } => {
                        self.out.event(Event::RelayRegistered { relay, observed })
                    }
                    Ack::Accepted { news: false } => {}
                }
                if self.relays[relay].note_presence(since) {
                    // Members that saw us removed there moved our floor past the announcement
                    // we registered with: send a fresh one, everywhere.
                    self.reseal_announcement(now);
                    self.register_everywhere(now);
                }
                self.update_primary(now);
                if relay != self.primary {
                    return;
                }
                self.members.set_own_since(since);
                self.resolve_addresses();
                self.synced = self.members.digest() == digest;
                if !self.synced {
                    self.request_sync(now);
                }
            }
            RelayReply::Member { tag, entry } if primary => {
                if tag.generation == 0 {
                    self.apply_push(now, tag.seq, entry);
                } else if let Some(snapshot) = self.relays[relay].collect(tag, entry) {
                    self.apply_full_sync(now, tag.seq, snapshot);
                }
            }
            RelayReply::SyncEmpty { seq, .. } if primary => {
                self.apply_full_sync(now, seq, Vec::new())
            }
            RelayReply::MemberGone { key, seq } if primary => self.apply_removal(now, key, seq),
            RelayReply::Unregistered { echo_ts_ms } => {
                if self.relays[relay].handle_unregistered(now, echo_ts_ms) {
                    tracing::debug!(relay, "the relay does not hold us; registering again");
                }
            }
            RelayReply::Member { .. }
            | RelayReply::SyncEmpty { .. }
            | RelayReply::MemberGone { .. } => {}
            RelayReply::Error { message } => {
                if !self.handle_rotation_error(&message) {
                    self.out.event(Event::RelayError { relay, message });
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
        self.relays.get(relay).is_some_and(|r| r.wants_stream())
    }

    /// The kind of stream to relay `relay` the driver should hold open, if any: TCP first,
    /// TLS when TCP does not get through (see [`relay_session`](super::relay_session)).
    pub fn wanted_stream(&self, relay: usize) -> Option<StreamKind> {
        self.wants_stream(relay)
            .then(|| self.relays[relay].stream_kind())
    }

    /// The driver's stream of `kind` to relay `relay` is connected.
    pub fn handle_relay_stream_up(&mut self, now: Instant, relay: usize, kind: StreamKind) {
        self.now = self.now.max(now);
        if self
            .relays
            .get_mut(relay)
            .is_some_and(|r| r.handle_stream_up(now, kind))
        {
            self.relay_transport_changed(now, relay);
        }
        self.refresh_timers();
    }

    /// The driver's stream to relay `relay` failed to connect or closed.
    pub fn handle_relay_stream_down(&mut self, now: Instant, relay: usize) {
        self.now = self.now.max(now);
        if self
            .relays
            .get_mut(relay)
            .is_some_and(|r| r.handle_stream_down(now))
        {
            self.relay_transport_changed(now, relay);
        }
        self.refresh_timers();
    }

    /// One datagram that arrived on the stream from relay `relay` (the driver removed the
    /// stream's framing). Treated exactly like a datagram from the relay's UDP address.
    pub fn handle_relay_stream(&mut self, now: Instant, relay: usize, bytes: &[u8]) {
        let Some(from) = self
            .relays
            .get(relay)
            .filter(|r| r.wants_stream())
            .map(|r| r.target().addr)
        else {
            self.drops.unauthenticated += 1;
            return;
        };
        self.handle_datagram(now, 0, from, bytes, true);
    }

    /// Relay `relay`'s UDP address as the node uses it now.
    pub fn relay_addr(&self, relay: usize) -> Option<SocketAddr> {
        self.relays.get(relay).map(|r| r.target().addr)
    }

    /// Whether the primary relay's traffic goes over the stream now.
    pub fn relay_on_stream(&self) -> bool {
        self.relays[self.primary].on_stream()
    }

    /// The kind of stream traffic for relay `relay` uses now, if it uses one.
    pub fn relay_stream_kind(&self, relay: usize) -> Option<StreamKind> {
        self.relays.get(relay).and_then(|r| r.stream_in_use())
    }

    /// The relay a relayed packet for member `key` takes now.
    pub fn relay_for_peer(&self, key: &PeerKey) -> usize {
        self.out.peer_relay(key)
    }
}
