//! The node's side of a secret rotation (see [`crate::wire::rotation`]).
//!
//! # Rotating (`meshvpn rotate` / `kick`)
//! [`Node::start_rotation`] seals the new secret to every recipient the driver names, splits
//! the entries into [`ENTRIES_PER_REQUEST`]-sized parts and uploads them to the relay one at a
//! time, each acknowledged before the next leaves (the last part carries `complete`, so the
//! relay never retires the old id with entries missing). A part that is not acknowledged
//! within [`ROTATE_RETRY`] is sent again with a fresh timestamp; the upload gives up after
//! [`ROTATE_GIVE_UP`] with [`Event::RotationFailed`] and nothing changes. When the last part is
//! acknowledged the node emits [`Event::SecretRotated`] with the request id: the driver writes
//! the new secret and restarts the node on it.
//!
//! # Being handed a secret
//! A [`RelayReply::Rotated`](crate::wire::RelayReply::Rotated) comes when the relay retires
//! the id this node registers under. An entry that opens under the network keys the node holds
//! (so it was made by a holder of the same secret, for this node) gives
//! [`Event::SecretRotated`] without a request id; no entry, or one that does not open, gives
//! [`Event::LeftOutOfRotation`] once: the node changes nothing (a relay could claim either)
//! and keeps trying to register, which the relay keeps refusing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Event, Node};
use crate::keys::{NetworkId, NetworkSecret, PeerKey};
use crate::wire::rotation::{Handover, ENTRIES_PER_REQUEST};
use crate::wire::{RelayRequest, RotationEntry};

/// A part of an upload unacknowledged this long is sent again: a relay answers within one
/// round trip (well under a second even across continents), so one second means it was lost.
pub const ROTATE_RETRY: Duration = Duration::from_secs(1);
/// An upload that has not finished this long after it started is abandoned: long enough for
/// a few lost parts and a relay re-registration, short enough for a person waiting on
/// `meshvpn rotate`.
pub const ROTATE_GIVE_UP: Duration = Duration::from_secs(15);

/// An upload in progress.
struct Upload {
    request: u64,
    secret: NetworkSecret,
    parts: VecDeque<Vec<RotationEntry>>,
    /// Timestamp and send time of the part in flight.
    in_flight: Option<(u64, Instant)>,
    give_up: Instant,
}

/// What the node knows of rotations.
#[derive(Default)]
pub(super) struct RotationState {
    upload: Option<Upload>,
    /// A handover or a left-out notice was already reported (the relay repeats it at every
    /// registration attempt).
    reported: bool,
    /// The relay said this node's network id was retired without an entry for it.
    left_out: bool,
}

impl RotationState {
    /// When the upload next needs the node.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.upload.as_ref().map(|u| match u.in_flight {
            Some((_, sent)) => (sent + ROTATE_RETRY).min(u.give_up),
            None => u.give_up,
        })
    }

    /// Whether this node is uploading a rotation.
    pub(super) fn uploading(&self) -> bool {
        self.upload.is_some()
    }
}

/// Why a rotation cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationRefused {
    /// Another rotation of this node is being uploaded.
    #[error("a rotation is already being uploaded")]
    Busy,
    /// The relay has not acknowledged a registration: it would refuse the upload.
    #[error("not registered with the relay (the upload needs it); try again once `meshvpn status` shows the relay")]
    NotRegistered,
    /// This member holds a secret that was already rotated without it.
    #[error("this member was left out of a rotation of this network (its secret is an old one); ask a member for a current token (`meshvpn invite`)")]
    LeftOut,
}

impl Node {
    /// Starts uploading a rotation to `secret`, sealed for each of `recipients` (the node's
    /// own key is skipped); the outcome is [`Event::SecretRotated`] or
    /// [`Event::RotationFailed`] carrying `request`.
    pub fn start_rotation(
        &mut self,
        now: Instant,
        secret: NetworkSecret,
        recipients: &[PeerKey],
        request: u64,
    ) -> Result<(), RotationRefused> {
        self.now = self.now.max(now);
        if self.rotation.left_out {
            return Err(RotationRefused::LeftOut);
        }
        if self.rotation.uploading() {
            return Err(RotationRefused::Busy);
        }
        if !self.relays[self.primary].is_registered() {
            return Err(RotationRefused::NotRegistered);
        }
        let handover = Handover {
            secret: secret.clone(),
            rotated_at_ms: self.next_ts(now),
        };
        let mut recipients: Vec<PeerKey> = recipients
            .iter()
            .copied()
            .filter(|k| *k != self.public)
            .collect();
        recipients.sort();
        recipients.dedup();
        let entries: Vec<RotationEntry> = recipients
            .into_iter()
            .map(|k| RotationEntry::seal(&self.keys, k, &handover, &mut self.rng))
            .collect();
        let mut parts: VecDeque<Vec<RotationEntry>> = entries
            .chunks(ENTRIES_PER_REQUEST)
            .map(<[RotationEntry]>::to_vec)
            .collect();
        if parts.is_empty() {
            parts.push_back(Vec::new());
        }
        self.rotation.upload = Some(Upload {
            request,
            secret,
            parts,
            in_flight: None,
            give_up: now + ROTATE_GIVE_UP,
        });
        self.send_rotation_part(now);
        self.refresh_timers();
        Ok(())
    }

    /// Retries or abandons the upload when due.
    pub(super) fn rotation_timers(&mut self, now: Instant) {
        let Some(u) = &self.rotation.upload else {
            return;
        };
        if now >= u.give_up {
            self.fail_rotation("the relay did not acknowledge the rotation in time; nothing changed (is the relay reachable?)".into());
        } else if u
            .in_flight
            .is_none_or(|(_, sent)| now >= sent + ROTATE_RETRY)
        {
            self.send_rotation_part(now);
        }
    }

    /// The relay acknowledged the rotation request with timestamp `echo_ts_ms`.
    pub(super) fn handle_rotate_ack(&mut self, now: Instant, echo_ts_ms: u64, complete: bool) {
        let Some(u) = &mut self.rotation.upload else {
            return;
        };
        if u.in_flight.map(|(ts, _)| ts) != Some(echo_ts_ms) {
            return;
        }
        u.in_flight = None;
        u.parts.pop_front();
        if u.parts.is_empty() {
            if complete {
                let (request, secret) = (u.request, u.secret.clone());
                self.rotation.upload = None;
                self.out.event(Event::SecretRotated {
                    secret,
                    request: Some(request),
                });
            } else {
                self.fail_rotation("the relay did not complete the rotation".into());
            }
        } else {
            self.send_rotation_part(now);
        }
    }

    /// The relay refused a request while an upload runs: the upload fails with its message.
    /// Returns whether an upload was running.
    pub(super) fn handle_rotation_error(&mut self, message: &str) -> bool {
        if !self.rotation.uploading() {
            return false;
        }
        self.fail_rotation(format!("the relay refused the rotation: {message}"));
        true
    }

    /// The relay says network id `network` was retired; ignored unless it is the one this
    /// node uses (a reply to a request of the node this one replaced may still arrive).
    pub(super) fn handle_rotated(
        &mut self,
        now: Instant,
        network: NetworkId,
        entry: Option<RotationEntry>,
    ) {
        if network != self.keys.network_id || self.rotation.uploading() || self.rotation.reported {
            return;
        }
        self.rotation.reported = true;
        match entry.map(|e| e.open(&self.keys, &self.cfg.secret)) {
            Some(Ok(handover)) => self.out.event(Event::SecretRotated {
                secret: handover.secret,
                request: None,
            }),
            Some(Err(_)) => {
                self.drops.unauthenticated += 1;
                self.left_out(now);
            }
            None => self.left_out(now),
        }
    }

    /// Left out of a rotation: every member of the retired id is gone from it, so each is
    /// treated as a removal (a live direct path keeps its peer for the usual grace period, so a
    /// relay cannot cut direct sessions at once by claiming a rotation).
    fn left_out(&mut self, now: Instant) {
        self.rotation.left_out = true;
        self.out.event(Event::LeftOutOfRotation);
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            match self.peers.get_mut(&key) {
                Some(p) if p.paths.direct_alive(now) => {
                    p.stale_since.get_or_insert(now);
                }
                Some(_) | None => self.remove_member(key),
            }
        }
    }

    /// Sends the first part not yet acknowledged.
    fn send_rotation_part(&mut self, now: Instant) {
        let ts = self.next_ts(now);
        let network = self.keys.network_id;
        let Some(u) = &mut self.rotation.upload else {
            return;
        };
        let Some(part) = u.parts.front() else {
            return;
        };
        let req = RelayRequest::Rotate {
            network,
            ts_ms: ts,
            complete: u.parts.len() == 1,
            entries: part.clone(),
        };
        u.in_flight = Some((ts, now));
        self.send_to_relay(&req);
    }

    fn fail_rotation(&mut self, reason: String) {
        if let Some(u) = self.rotation.upload.take() {
            self.out.event(Event::RotationFailed {
                request: u.request,
                reason,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::test_support;

    #[test]
    fn an_unregistered_node_refuses_to_start_and_nothing_is_sent() {
        let t0 = Instant::now();
        let mut n = test_support::node(21, t0);
        let secret = NetworkSecret([5; 32]);
        assert_eq!(
            n.start_rotation(t0, secret, &[], 1),
            Err(RotationRefused::NotRegistered)
        );
        assert!(!n.rotation.uploading());
    }

    #[test]
    fn a_left_out_notice_is_reported_once_and_changes_nothing() {
        let t0 = Instant::now();
        let mut n = test_support::node(22, t0);
        let network = n.keys.network_id;
        // A notice about another network id (a request of an earlier node) is ignored.
        n.handle_rotated(t0, NetworkId([9; 32]), None);
        n.handle_rotated(t0, network, None);
        n.handle_rotated(t0, network, None);
        let events: Vec<Event> = std::iter::from_fn(|| n.poll_event()).collect();
        assert_eq!(events, vec![Event::LeftOutOfRotation]);
        assert_eq!(
            n.start_rotation(t0, NetworkSecret([5; 32]), &[], 1),
            Err(RotationRefused::LeftOut)
        );
    }
}
