//! Several relays: which one the member table follows, and which one carries a relayed peer.
//!
//! # Job
//! A member registers with every relay in its token (one [`RelaySession`] each), so every
//! relay can forward to it and every relay lists it. Two choices follow from that:
//!
//! - **The primary relay** is the one whose member table (pushes, snapshots, removals and the
//!   change counters that rank address claims) this node follows. It is the first relay in
//!   token order that answers. The primary is left once it has *failed* (registrations
//!   unanswered for [`FAILOVER_AFTER`](super::relay_session::FAILOVER_AFTER), or the registration lost); a relay earlier in the
//!   token becomes primary again only after answering for [`FAILBACK_AFTER`]. Every member
//!   applies the same rule to the same relays, so members converge on one primary and rank
//!   address claims by the same counters. On a change the member table is rebased onto the new
//!   relay's counters and a full snapshot is asked for; members missing from it keep their
//!   working direct paths for the usual grace.
//! - **The relay of a relayed peer** is the one the peer's relayed traffic last came through,
//!   as long as that relay answers us; otherwise the primary. So two members whose primaries
//!   differ (one cannot reach a relay the other still uses) meet on a relay both are on: the
//!   first authenticated relayed packet of either tells the other where to answer.
//!
//! When a relay stops answering (one registration unanswered), peers relayed through it move
//! to the primary, or to the first relay that answers if it was the primary, at once; their
//! WireGuard sessions are unaffected, the relay only carries ciphertext. The member table
//! moves only once the relay has failed. With no relay answering at all, members help each
//! other (see `helping`).
//!
//! [`RelaySession`]: super::relay_session::RelaySession

use std::net::SocketAddr;
use std::time::Instant;

use super::relay_session::FAILBACK_AFTER;
use super::{Event, Node};
use crate::wire::RelayRequest;

impl Node {
    /// How many relays this node registers with.
    pub fn relay_count(&self) -> usize {
        self.relays.len()
    }

    /// The relay whose member table this node follows now.
    pub fn primary_relay(&self) -> usize {
        self.primary
    }

    /// The relay number whose address is `addr`.
    pub(super) fn relay_at(&self, addr: SocketAddr) -> Option<usize> {
        self.relays.iter().position(|r| r.target().addr == addr)
    }

    /// Registers with every relay at once (our announcement changed).
    pub(super) fn register_everywhere(&mut self, now: Instant) {
        for r in &mut self.relays {
            r.register_now(now);
        }
    }

    /// Seals `req` for relay `relay` and queues it on that relay's transport.
    pub(super) fn send_to_relay_n(&mut self, relay: usize, req: &RelayRequest) {
        let nonce = self.nonce();
        let public = self.public;
        let Some(session) = self.relays.get_mut(relay) else {
            return;
        };
        let dgram = session.seal(public, req, nonce);
        self.out.for_relay(relay, &dgram);
    }

    /// When the primary choice may change next without any input: the primary failing, or an
    /// earlier relay having answered long enough to be taken back. Only deadlines still ahead
    /// count.
    pub(super) fn primary_deadline(&self) -> Option<Instant> {
        let failing = self.relays[self.primary].failing_at();
        let failback = self.relays[..self.primary]
            .iter()
            .filter_map(|r| r.answering_since())
            .map(|t| t + FAILBACK_AFTER)
            .min();
        // A deadline already passed was acted on (or nothing better was there to move to).
        [failing, failback]
            .into_iter()
            .flatten()
            .filter(|at| *at > self.now)
            .min()
    }

    /// Applies the primary rule (see the module doc) at `now`.
    pub(super) fn update_primary(&mut self, now: Instant) {
        let current = &self.relays[self.primary];
        let pick = if current.failed(now) {
            // The first relay that answers at all, else stay (nothing better is known).
            self.relays.iter().position(|r| r.answering())
        } else {
            // Back to an earlier relay only once it has answered for a while.
            self.relays[..self.primary].iter().position(|r| {
                r.answering_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= FAILBACK_AFTER)
            })
        };
        match pick {
            Some(to) if to != self.primary => self.switch_primary(now, to),
            Some(_) | None => {}
        }
        self.update_data_relay();
    }

    /// Relayed traffic without a relay of its own takes the primary while it answers, else
    /// the first relay that does; traffic relayed through a relay that stopped answering moves
    /// there too. This does not wait for [`FAILOVER_AFTER`](super::relay_session::FAILOVER_AFTER):
    /// a relayed packet is cheap to send another way, and the peer answers the way it came.
    fn update_data_relay(&mut self) {
        let data = if self.relays[self.primary].answering() {
            self.primary
        } else {
            self.relays
                .iter()
                .position(|r| r.answering())
                .unwrap_or(self.primary)
        };
        self.out.set_primary(data);
        for (n, r) in self.relays.iter().enumerate() {
            if !r.answering() {
                self.out.forget_relay(n);
            }
        }
    }

    /// Follows relay `to`'s member table from now on.
    fn switch_primary(&mut self, now: Instant, to: usize) {
        let from = std::mem::replace(&mut self.primary, to);
        tracing::info!(
            from = %self.relays[from].target().addr,
            to = %self.relays[to].target().addr,
            "following another relay's member table"
        );
        self.relays[from].sync_done();
        self.synced = false;
        self.members.rebase(self.relays[to].presence_since());
        self.out.event(Event::PrimaryRelay { relay: to, from });
        self.update_nat_verdict(now);
        self.request_sync(now);
    }

    /// Whether the relay that carries member `key`'s relayed traffic is reached over IPv6.
    pub(super) fn relay_is_ipv6(&self, key: &crate::keys::PeerKey) -> bool {
        self.relays[self.out.peer_relay(key)]
            .target()
            .addr
            .is_ipv6()
    }
}
