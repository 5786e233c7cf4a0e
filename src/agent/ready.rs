//! Whether the agent is *ready*: registered with its relay and holding the relay's member list,
//! so the peers `meshvpn status` lists are the network's. `meshvpn wait` polls for it.
//!
//! # Algorithm
//! The node reports whether it is registered ([`crate::node::Node::is_registered`]) but not
//! whether its member table matches the relay's, so the agent infers the second from what it
//! can see, sampled once per loop turn with [`Readiness::observe`]:
//! - a member of a network with others gets them in the relay's full sync right after its
//!   registration (the acknowledgement's digest differs from its empty table), all in one
//!   snapshot: once it knows one peer, it knows the sync;
//! - a member alone gets no sync (the digests match): it is ready once it has stayed
//!   registered for [`SYNC_SETTLE`] with no peer arriving.

use std::time::{Duration, Instant};

use crate::node::relay_session::{ACK_TIMEOUT, SYNC_RETRY};

/// How long a registered member that knows no peer waits before counting as synced: one sync
/// request lost and repeated ([`SYNC_RETRY`]), plus the time a relay gets to answer
/// ([`ACK_TIMEOUT`]). A member with peers is ready at once.
pub(super) const SYNC_SETTLE: Duration = SYNC_RETRY.saturating_add(ACK_TIMEOUT);

/// Tracks since when the node has been registered.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    registered_since: Option<Instant>,
}

impl Readiness {
    /// Records the node's state at `now` (call once per loop turn, after its outputs).
    pub(super) fn observe(&mut self, now: Instant, registered: bool) {
        match (registered, self.registered_since) {
            (true, None) => self.registered_since = Some(now),
            (false, _) => self.registered_since = None,
            (true, Some(_)) => {}
        }
    }

    /// Whether the agent is ready at `now`, knowing `peers` peers.
    pub(super) fn is_ready(&self, now: Instant, peers: usize) -> bool {
        self.registered_since
            .is_some_and(|since| peers > 0 || now.saturating_duration_since(since) >= SYNC_SETTLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_with_peers_at_once_alone_after_the_settle_time_and_never_unregistered() {
        let t0 = Instant::now();
        let mut r = Readiness::default();
        r.observe(t0, false);
        assert!(!r.is_ready(t0 + SYNC_SETTLE * 2, 3), "not registered");
        r.observe(t0, true);
        assert!(r.is_ready(t0, 1), "peers known: the sync arrived");
        assert!(
            !r.is_ready(t0 + SYNC_SETTLE / 2, 0),
            "alone, still settling"
        );
        r.observe(t0 + SYNC_SETTLE / 2, true);
        assert!(r.is_ready(t0 + SYNC_SETTLE, 0), "alone and settled");
        r.observe(t0 + SYNC_SETTLE * 2, false);
        assert!(!r.is_ready(t0 + SYNC_SETTLE * 3, 2), "relay lost");
        r.observe(t0 + SYNC_SETTLE * 3, true);
        assert!(!r.is_ready(t0 + SYNC_SETTLE * 3, 0), "settles again");
    }
}
