//! The relay's part in a secret rotation (see [`crate::wire::rotation`]): it keeps the sealed
//! handovers of a retired network id blindly, hands each member its own, and admits nobody
//! under that id again.
//!
//! A rotation of network id *N* is uploaded by one registered member of *N* in several
//! [`RelayRequest::Rotate`](crate::wire::RelayRequest::Rotate) requests; the one marked
//! `complete` ends it. Until then the record is *pending*: nothing is enforced, and it lapses
//! after [`PENDING_TTL`] if the upload stops. Once complete:
//! - every member registered under *N* is sent its entry (or `None`) at once and dropped from
//!   *N* without the usual per-member "gone" pushes (they all leave together);
//! - a later registration under *N* is answered with the registrant's entry (or `None`) and
//!   refused, so the old token admits nobody and lists nobody;
//! - the record lives [`ROTATION_RECORD_TTL`], then *N* is an ordinary (empty) id again.
//!
//! The first member to start a rotation of *N* owns it: another member's rotation of the same
//! id is refused while the record lives, so a kicked member cannot overwrite the handovers
//! (see the limit stated in `wire::rotation`). Records are capped at the relay's network cap
//! and entries per record at its per-network member cap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::limits::Limit;
use super::{Link, RelayServer, Requester};
use crate::keys::{NetworkId, PeerKey};
use crate::wire::rotation::ROTATION_RECORD_TTL;
use crate::wire::{RelayReply, RotationEntry};

/// How long an unfinished upload is kept: a member uploads one request per round trip, so a
/// network of thousands finishes in seconds; a minute of silence means it gave up.
pub(super) const PENDING_TTL: Duration = Duration::from_secs(60);

/// One network id's rotation record.
struct Record {
    /// The member uploading it (the only one that may add to it).
    by: PeerKey,
    complete: bool,
    expires: Instant,
    entries: BTreeMap<PeerKey, RotationEntry>,
}

/// Every rotation record the relay holds.
#[derive(Default)]
pub(super) struct Rotations {
    records: BTreeMap<NetworkId, Record>,
    /// Grows whenever the set of complete records changes (what a driver persists).
    version: u64,
}

/// A complete rotation record as a driver persists it across relay restarts, so members that
/// were offline still find their handover after the relay was restarted or upgraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRotation {
    /// The retired network id.
    pub network: NetworkId,
    /// The member that uploaded it.
    pub by: PeerKey,
    /// Wall-clock milliseconds when the record lapses.
    pub expires_unix_ms: u64,
    /// The sealed handovers.
    pub entries: Vec<RotationEntry>,
}

impl Rotations {
    /// Whether `network` was rotated (a complete, live record).
    pub(super) fn is_retired(&self, network: &NetworkId) -> bool {
        self.records.get(network).is_some_and(|r| r.complete)
    }

    /// The member that uploads (or uploaded) `network`'s record.
    pub(super) fn owner(&self, network: &NetworkId) -> Option<PeerKey> {
        self.records.get(network).map(|r| r.by)
    }

    /// `member`'s entry in `network`'s record.
    pub(super) fn entry(&self, network: &NetworkId, member: &PeerKey) -> Option<RotationEntry> {
        self.records
            .get(network)
            .and_then(|r| r.entries.get(member))
            .cloned()
    }

    /// Number of records (pending and complete).
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// Drops records that ran out.
    pub(super) fn expire(&mut self, now: Instant) {
        let before = self.records.values().filter(|r| r.complete).count();
        self.records.retain(|_, r| r.expires > now);
        if self.records.values().filter(|r| r.complete).count() != before {
            self.version += 1;
        }
    }

    /// When the next record runs out.
    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.records.values().map(|r| r.expires).min()
    }
}

impl RelayServer {
    /// Grows whenever the complete rotation records change: a driver that persists them
    /// ([`RelayServer::stored_rotations`]) saves again when this moved.
    pub fn rotations_version(&self) -> u64 {
        self.rotations.version
    }

    /// The complete rotation records, for the driver to persist.
    pub fn stored_rotations(&self, now: Instant) -> Vec<StoredRotation> {
        let unix_ms = self.clock.unix_ms(now);
        self.rotations
            .records
            .iter()
            .filter(|(_, r)| r.complete)
            .map(|(network, r)| StoredRotation {
                network: *network,
                by: r.by,
                expires_unix_ms: unix_ms
                    + r.expires.saturating_duration_since(now).as_millis() as u64,
                entries: r.entries.values().cloned().collect(),
            })
            .collect()
    }

    /// Restores records a previous run persisted (call at start, with the relay's clock
    /// already set); lapsed ones and any beyond the caps are skipped.
    pub fn with_stored_rotations(mut self, stored: Vec<StoredRotation>, now: Instant) -> Self {
        let unix_ms = self.clock.unix_ms(now);
        for s in stored {
            if s.expires_unix_ms <= unix_ms || self.rotations.len() >= self.config.max_networks {
                continue;
            }
            let left = Duration::from_millis(s.expires_unix_ms - unix_ms).min(ROTATION_RECORD_TTL);
            let entries: BTreeMap<PeerKey, RotationEntry> = s
                .entries
                .into_iter()
                .take(self.config.max_members_per_network)
                .map(|e| (e.recipient, e))
                .collect();
            self.rotations.records.insert(
                s.network,
                Record {
                    by: s.by,
                    complete: true,
                    expires: now + left,
                    entries,
                },
            );
        }
        self
    }

    /// A rotation request from `sender`, a registered member of `network`.
    pub(super) fn rotate(
        &mut self,
        now: Instant,
        req: &Requester,
        complete: bool,
        entries: Vec<RotationEntry>,
    ) {
        let &Requester {
            from,
            sender,
            network,
            session,
            ts,
        } = req;
        let cap_entries = self.config.max_members_per_network;
        let refusal = match self.rotations.records.get(&network) {
            Some(r) if r.by != sender => Some((
                Limit::RotationCap,
                "this network's secret was already rotated by another member",
            )),
            Some(r) if r.entries.len() + entries.len() > cap_entries => Some((
                Limit::RotationCap,
                "rotation has more entries than the network may have members",
            )),
            Some(_) => None,
            None if self.rotations.len() >= self.config.max_networks => {
                Some((Limit::RotationCap, "relay is full (rotation records)"))
            }
            None => None,
        };
        if let Some((limit, message)) = refusal {
            self.refuse(now, from, &session, limit, message);
            return;
        }
        let record = self
            .rotations
            .records
            .entry(network)
            .or_insert_with(|| Record {
                by: sender,
                complete: false,
                expires: now + PENDING_TTL,
                entries: BTreeMap::new(),
            });
        if !record.complete {
            for e in entries {
                record.entries.insert(e.recipient, e);
            }
            record.expires = now + PENDING_TTL;
        }
        let stored = record.entries.len() as u32;
        let finishing = complete && !record.complete;
        if complete {
            record.complete = true;
            record.expires = now + ROTATION_RECORD_TTL;
        }
        let complete = record.complete;
        self.counters.rotation_requests += 1;
        self.reply(
            from,
            &session,
            RelayReply::RotateAck {
                echo_ts_ms: ts,
                stored,
                complete,
            },
        );
        if finishing {
            self.rotations.version += 1;
            tracing::info!(%network, by = %sender.short(), entries = stored, "network secret rotated; retiring its id");
            self.counters.rotations += 1;
            self.retire(network, sender);
        }
    }

    /// Hands every member of `network` but the rotating one (`by`, which holds the new secret)
    /// its entry, and drops them all from it.
    fn retire(&mut self, network: NetworkId, by: PeerKey) {
        let Some(members) = self.networks.remove(&network) else {
            return;
        };
        for (key, m) in members {
            if key != by {
                let entry = self.rotations.entry(&network, &key);
                self.reply(m.link, &m.session, RelayReply::Rotated { network, entry });
            }
            if self.member_network.get(&key) == Some(&network) {
                self.member_network.remove(&key);
            }
            if self.by_link.get(&m.link) == Some(&key) {
                self.by_link.remove(&m.link);
            }
        }
    }

    /// Answers a registration under a retired id with the registrant's entry; `true` if it
    /// did (the registration is refused).
    pub(super) fn refuse_retired(
        &mut self,
        from: Link,
        sender: PeerKey,
        network: NetworkId,
        session: &[u8; 32],
    ) -> bool {
        if !self.rotations.is_retired(&network) {
            return false;
        }
        let entry = self.rotations.entry(&network, &sender);
        self.counters.retired_registrations += 1;
        self.reply(from, session, RelayReply::Rotated { network, entry });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{relay, ts, Client, T0_MS};
    use super::*;
    use crate::keys::NetworkSecret;
    use crate::wire::rotation::Handover;
    use crate::wire::RelayRequest;
    use rand::SeedableRng;

    fn rotate(
        relay: &RelayServer,
        c: &Client,
        now: Instant,
        complete: bool,
        entries: Vec<RotationEntry>,
    ) -> RelayRequest {
        RelayRequest::Rotate {
            network: c.keys.network_id,
            ts_ms: ts(relay, now),
            complete,
            entries,
        }
    }

    fn tick(now: &mut Instant) -> Instant {
        *now += Duration::from_millis(1);
        *now
    }

    #[test]
    fn a_completed_rotation_hands_each_member_its_entry_and_admits_nobody_under_the_old_id() {
        let mut now = Instant::now();
        let mut relay = relay(now, 3);
        let old = NetworkSecret([3; 32]);
        let (mut a, mut b, mut c) = (
            Client::new(10, 1000, &old),
            Client::new(11, 1001, &old),
            Client::new(12, 1002, &old),
        );
        for m in [&mut a, &mut b, &mut c] {
            let req = m.register(&relay, tick(&mut now));
            m.send(&mut relay, now, &req);
        }
        for m in [&mut a, &mut b, &mut c] {
            m.drain(&mut relay, now);
        }
        assert_eq!(relay.member_count(), 3);

        // a rotates without c: one part with b's entry, then the completing part.
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let new = NetworkSecret([4; 32]);
        let handover = Handover {
            secret: new.clone(),
            rotated_at_ms: ts(&relay, now),
        };
        let entry = RotationEntry::seal(&a.keys, b.secret.public(), &handover, &mut rng);
        let req = rotate(&relay, &a, tick(&mut now), false, vec![entry]);
        let replies = a.send(&mut relay, now, &req);
        assert!(
            matches!(
                replies[..],
                [RelayReply::RotateAck {
                    stored: 1,
                    complete: false,
                    ..
                }]
            ),
            "{replies:?}"
        );
        // Nothing is enforced or pushed while the upload is pending.
        assert!(b.drain(&mut relay, now).is_empty());
        assert_eq!(relay.member_count(), 3);
        let req = rotate(&relay, &a, tick(&mut now), true, Vec::new());
        let replies = a.send(&mut relay, now, &req);
        assert!(
            matches!(
                replies[..],
                [RelayReply::RotateAck {
                    stored: 1,
                    complete: true,
                    ..
                }]
            ),
            "{replies:?}"
        );
        // Say that acknowledgement was lost: a repeats the last part, no longer registered
        // under the retired id, and is answered again; nothing else changes.
        let req = rotate(&relay, &a, tick(&mut now), true, Vec::new());
        let again = a.send(&mut relay, now, &req);
        assert!(
            matches!(again[..], [RelayReply::RotateAck { complete: true, .. }]),
            "{again:?}"
        );
        assert_eq!(relay.counters().rotations, 1);

        // b gets its entry at once and it opens to the new secret; c is told it was left out.
        let to_b = b.drain(&mut relay, now);
        let [RelayReply::Rotated { entry: Some(e), .. }] = &to_b[..] else {
            panic!("b expected its entry: {to_b:?}");
        };
        assert_eq!(e.open(&b.keys, &b.secret).expect("opens").secret, new);
        let to_c = c.drain(&mut relay, now);
        assert!(
            matches!(to_c[..], [RelayReply::Rotated { entry: None, .. }]),
            "{to_c:?}"
        );
        // Everyone is out of the old id, with no per-member "gone" storm.
        assert_eq!(relay.member_count(), 0);
        assert_eq!(relay.network_count(), 0);
        assert!(a.drain(&mut relay, now).is_empty());

        // c (kicked) and a newcomer with the old token are answered and admitted nowhere.
        let req = c.register(&relay, tick(&mut now));
        let replies = c.send(&mut relay, now, &req);
        assert!(
            matches!(replies[..], [RelayReply::Rotated { entry: None, .. }]),
            "{replies:?}"
        );
        let mut d = Client::new(13, 1003, &old);
        let req = d.register(&relay, tick(&mut now));
        let replies = d.send(&mut relay, now, &req);
        assert!(
            matches!(replies[..], [RelayReply::Rotated { entry: None, .. }]),
            "{replies:?}"
        );
        // An offline member coming back with the old secret finds its entry.
        let req = b.register(&relay, tick(&mut now));
        let replies = b.send(&mut relay, now, &req);
        assert!(
            matches!(replies[..], [RelayReply::Rotated { entry: Some(_), .. }]),
            "{replies:?}"
        );
        assert_eq!(relay.member_count(), 0);
        assert_eq!(relay.counters().retired_registrations, 3);
        assert_eq!(relay.counters().rotations, 1);

        // Under the new secret a member registers as usual.
        let mut b2 = Client::new(11, 1001, &new);
        let req = b2.register(&relay, tick(&mut now));
        let replies = b2.send(&mut relay, now, &req);
        assert!(
            matches!(replies.first(), Some(RelayReply::RegisterAck { .. })),
            "{replies:?}"
        );

        // The record is kept for its lifetime, then the old id is an ordinary one again.
        now += ROTATION_RECORD_TTL + Duration::from_secs(1);
        relay.handle_timeout(now);
        assert_eq!(relay.rotations.len(), 0);
        let req = d.register(&relay, tick(&mut now));
        let replies = d.send(&mut relay, now, &req);
        assert!(
            matches!(replies.first(), Some(RelayReply::RegisterAck { .. })),
            "{replies:?}"
        );
    }

    #[test]
    fn complete_records_survive_a_relay_restart_through_the_driver_store() {
        let mut now = Instant::now();
        let start = now;
        let mut relay1 = relay(now, 8);
        // A relay process started at `at` on the same wall clock as relay1.
        let restarted = |at: Instant, seed: u64| {
            RelayServer::new(
                crate::keys::NodeSecret::from_bytes([1; 32]),
                seed,
                crate::relay::server::UnixClock {
                    at,
                    unix_ms: T0_MS + (at - start).as_millis() as u64,
                },
            )
        };
        let old = NetworkSecret([3; 32]);
        let (mut a, mut b) = (Client::new(10, 1000, &old), Client::new(11, 1001, &old));
        for m in [&mut a, &mut b] {
            let req = m.register(&relay1, tick(&mut now));
            m.send(&mut relay1, now, &req);
        }
        let v0 = relay1.rotations_version();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let handover = Handover {
            secret: NetworkSecret([4; 32]),
            rotated_at_ms: ts(&relay1, now),
        };
        let entry = RotationEntry::seal(&a.keys, b.secret.public(), &handover, &mut rng);
        let req = rotate(&relay1, &a, tick(&mut now), false, vec![entry]);
        a.send(&mut relay1, now, &req);
        assert_eq!(
            relay1.rotations_version(),
            v0,
            "a pending record is not persisted"
        );
        assert!(relay1.stored_rotations(now).is_empty());
        let req = rotate(&relay1, &a, tick(&mut now), true, Vec::new());
        a.send(&mut relay1, now, &req);
        assert_ne!(relay1.rotations_version(), v0);
        let stored = relay1.stored_rotations(now);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].entries.len(), 1);

        // A new process (same clock), restored from the store: b, offline meanwhile, comes
        // back and finds its entry; the old id still admits nobody.
        now += Duration::from_secs(3600);
        let mut relay2 = restarted(now, 9).with_stored_rotations(stored.clone(), now);
        let mut b = Client::new(11, 1001, &old);
        let req = b.register(&relay2, tick(&mut now));
        let replies = b.send(&mut relay2, now, &req);
        assert!(
            matches!(&replies[..], [RelayReply::Rotated { entry: Some(e), .. }] if e.open(&b.keys, &b.secret).is_ok()),
            "{replies:?}"
        );
        assert_eq!(relay2.member_count(), 0);
        // A record that lapsed while the relay was down is not restored.
        let later = now + ROTATION_RECORD_TTL;
        let relay3 = restarted(later, 10).with_stored_rotations(stored, later);
        assert_eq!(relay3.rotations.len(), 0);
    }

    #[test]
    fn only_the_first_rotating_member_adds_to_a_record_and_a_stalled_upload_lapses() {
        let mut now = Instant::now();
        let mut relay = relay(now, 5);
        let old = NetworkSecret([3; 32]);
        let (mut a, mut c) = (Client::new(10, 1000, &old), Client::new(12, 1002, &old));
        for m in [&mut a, &mut c] {
            let req = m.register(&relay, tick(&mut now));
            m.send(&mut relay, now, &req);
        }
        a.drain(&mut relay, now);
        c.drain(&mut relay, now);
        let req = rotate(&relay, &a, tick(&mut now), false, Vec::new());
        a.send(&mut relay, now, &req);
        // c (say, a member about to be kicked) cannot take the record over or complete it.
        let req = rotate(&relay, &c, tick(&mut now), true, Vec::new());
        let replies = c.send(&mut relay, now, &req);
        assert!(
            matches!(&replies[..], [RelayReply::Error { message }] if message.contains("another member")),
            "{replies:?}"
        );
        assert_eq!(relay.counters().rotation_cap_reached, 1);
        assert!(!relay.rotations.is_retired(&a.keys.network_id));
        // a stops; the pending record lapses and nothing was enforced.
        now += PENDING_TTL + Duration::from_secs(1);
        relay.handle_timeout(now);
        assert_eq!(relay.rotations.len(), 0);
        for m in [&mut a, &mut c] {
            let req = m.register(&relay, tick(&mut now));
            let replies = m.send(&mut relay, now, &req);
            assert!(
                replies
                    .iter()
                    .any(|r| matches!(r, RelayReply::RegisterAck { .. })),
                "{replies:?}"
            );
        }
    }

    #[test]
    fn records_are_capped_and_a_request_from_a_non_member_is_dropped() {
        let mut now = Instant::now();
        let mut relay = relay(now, 6).with_config(crate::relay::server::ServerConfig {
            max_networks: 1,
            ..Default::default()
        });
        let (n1, n2) = (NetworkSecret([3; 32]), NetworkSecret([5; 32]));
        let (mut a, mut x) = (Client::new(10, 1000, &n1), Client::new(20, 2000, &n2));
        let req = a.register(&relay, tick(&mut now));
        a.send(&mut relay, now, &req);
        let req = rotate(&relay, &a, tick(&mut now), true, Vec::new());
        let replies = a.send(&mut relay, now, &req);
        assert!(matches!(
            replies[..],
            [RelayReply::RotateAck { complete: true, .. }]
        ));
        // x never registered: its rotation is not even looked at.
        let req = rotate(&relay, &x, tick(&mut now), true, Vec::new());
        assert!(x.send(&mut relay, now, &req).is_empty());
        assert_eq!(relay.rotations.len(), 1);
        // Registered in another network, x meets the record cap.
        let req = x.register(&relay, tick(&mut now));
        x.send(&mut relay, now, &req);
        let req = rotate(&relay, &x, tick(&mut now), true, Vec::new());
        let replies = x.send(&mut relay, now, &req);
        assert!(
            matches!(&replies[..], [RelayReply::Error { message }] if message.contains("rotation records")),
            "{replies:?}"
        );
        assert_eq!(relay.rotations.len(), 1);
    }
}
