//! Membership: the member table built from the relay's pushes and snapshots, removed-member
//! records (so an older push or snapshot never revives a member), the index that routes
//! WireGuard receiver indices to members, and the virtual-IP routing table with its
//! deterministic conflict resolution.
//!
//! # Algorithm
//! Every entry carries the relay's change counter at which it was set (`learned`); removals
//! leave a tombstone at their counter. A push applies unless a newer tombstone exists; a
//! removal applies unless a newer push exists; a snapshot taken at counter `seq` replaces
//! everything not newer than `seq`. A member missing from a snapshot while its direct path still
//! answers is kept for [`STALE_GRACE`] (the relay may just have restarted). After any change
//! the routing table is rebuilt: each virtual IP goes to the claimant ranked first by
//! `addressing::owner_rank` (a derived address beats a chosen one, then the smaller key), the
//! same on every member, so all members agree without talking.
//!
//! # Driving contract
//! [`Membership`] is plain data: the node asks it whether a push, removal or snapshot applies
//! ([`Membership::accept_push`], [`Membership::accept_removal`],
//! [`Membership::accept_snapshot`]), creates or drops its peers accordingly, and after every
//! change of the claims calls [`Membership::resolve`], reporting the [`Conflict`]s it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::link::PeerLink;
use super::path_selection::PathSelection;
use super::peer::Peer;
use super::{Event, Node};
use crate::addressing;
use crate::keys::PeerKey;
use crate::wire::{self, Announcement, MemberEntry};

/// A member missing from a relay snapshot while its direct path still answers is kept this
/// long: a restarted relay forgets everyone until they re-register (within
/// [`super::REGISTER_INTERVAL`] plus retries), and a working direct path must not be torn down
/// by that.
pub(super) const STALE_GRACE: Duration = Duration::from_secs(30);
/// Receiver indices are 24 bits: boringtun keeps the low 8 bits for its sessions.
const INDEX_MASK: u32 = 0x00FF_FFFF;

/// Two members claim one virtual IP; `owner` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub(crate) ip: Ipv4Addr,
    pub(crate) owner: PeerKey,
    pub(crate) loser: PeerKey,
}

/// What a snapshot changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Members the snapshot no longer lists (and nothing newer revived).
    pub(crate) gone: Vec<PeerKey>,
    /// Entries to apply (nothing newer overrides them).
    pub(crate) apply: Vec<MemberEntry>,
}

/// The member table, its history, and the routing tables derived from it.
pub(crate) struct Membership {
    own: PeerKey,
    own_ip: Ipv4Addr,
    subnet: Ipv4Net,
    entries: BTreeMap<PeerKey, MemberEntry>,
    /// Change counter (relay's) at which each member entry was last set.
    learned: BTreeMap<PeerKey, u64>,
    /// Members removed at a change counter, so an older push or snapshot does not revive them.
    tombstones: BTreeMap<PeerKey, u64>,
    by_ip: BTreeMap<Ipv4Addr, PeerKey>,
    by_index: BTreeMap<u32, PeerKey>,
    next_index: u32,
    /// Our own address is claimed by `owner`, who keeps it.
    conflict: Option<(Ipv4Addr, PeerKey)>,
    losers: BTreeSet<PeerKey>,
}

impl Membership {
    /// An empty table for the member `own` at `own_ip` in `subnet`.
    pub(crate) fn new(own: PeerKey, own_ip: Ipv4Addr, subnet: Ipv4Net) -> Self {
        Self {
            own,
            own_ip,
            subnet,
            entries: BTreeMap::new(),
            learned: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            by_index: BTreeMap::new(),
            next_index: 1,
            conflict: None,
            losers: BTreeSet::new(),
        }
    }

    /// The digest the relay compares with its own to tell whether we are in sync.
    pub(crate) fn digest(&self) -> [u8; 8] {
        wire::membership_digest(self.entries.values())
    }

    /// The member that owns virtual IP `ip` (cryptokey routing), never ourselves.
    pub(crate) fn route(&self, ip: Ipv4Addr) -> Option<PeerKey> {
        self.by_ip.get(&ip).copied()
    }

    /// The member our receiver index `index` belongs to.
    pub(crate) fn by_index(&self, index: u32) -> Option<PeerKey> {
        self.by_index.get(&index).copied()
    }

    /// Our own address conflict: the address and the member that keeps it.
    pub(crate) fn conflict(&self) -> Option<(Ipv4Addr, PeerKey)> {
        self.conflict
    }

    /// Whether `key` lost its virtual IP to another member.
    pub(crate) fn is_conflicted(&self, key: &PeerKey) -> bool {
        self.losers.contains(key)
    }

    /// Whether a live push of `key` at `seq` applies (no newer removal); records it if so.
    pub(crate) fn accept_push(&mut self, key: PeerKey, seq: u64) -> bool {
        if self.tombstones.get(&key).is_some_and(|gone| *gone > seq) {
            return false;
        }
        self.tombstones.remove(&key);
        self.learned.insert(key, seq);
        true
    }

    /// Whether a removal of `key` at `seq` applies (no newer push); records it if so.
    pub(crate) fn accept_removal(&mut self, key: PeerKey, seq: u64) -> bool {
        if self.learned.get(&key).is_some_and(|l| *l > seq) {
            return false;
        }
        self.tombstones.insert(key, seq);
        true
    }

    /// Takes a snapshot of the member set at change counter `seq`: pushes and removals newer
    /// than it (delivered before it) are kept; everything else follows it.
    pub(crate) fn accept_snapshot(&mut self, seq: u64, entries: Vec<MemberEntry>) -> Snapshot {
        let listed: BTreeSet<PeerKey> = entries.iter().map(|e| e.key).collect();
        let gone: Vec<PeerKey> = self
            .entries
            .keys()
            .filter(|k| !listed.contains(k) && self.learned.get(*k).is_none_or(|l| *l <= seq))
            .copied()
            .collect();
        for key in &gone {
            self.tombstones.insert(*key, seq);
            self.forget(*key);
        }
        let mut apply = Vec::new();
        for entry in entries {
            let newer_removal = self.tombstones.get(&entry.key).is_some_and(|t| *t > seq);
            let newer_push = self.learned.get(&entry.key).is_some_and(|l| *l > seq);
            if !(newer_removal || newer_push) {
                self.learned.insert(entry.key, seq);
                apply.push(entry);
            }
        }
        self.tombstones.retain(|_, t| *t > seq);
        Snapshot { gone, apply }
    }

    /// Stores the relay's entry for a member (what the digest covers).
    pub(crate) fn record(&mut self, entry: MemberEntry) {
        self.entries.insert(entry.key, entry);
    }

    /// Forgets a member's entry (it left, or a snapshot no longer lists it).
    pub(crate) fn forget(&mut self, key: PeerKey) {
        self.entries.remove(&key);
        self.learned.remove(&key);
    }

    /// A fresh receiver index for `key`.
    pub(crate) fn allocate_index(&mut self, key: PeerKey) -> u32 {
        let index = self.next_index;
        self.next_index = (self.next_index + 1) & INDEX_MASK;
        self.by_index.insert(index, key);
        index
    }

    /// Frees a receiver index.
    pub(crate) fn release_index(&mut self, index: u32) {
        self.by_index.remove(&index);
    }

    /// Rebuilds the routing table from every other member's claim, resolving clashes the same
    /// way on every member. Returns the clashes worth reporting: all between others, and ours
    /// only when it is new.
    pub(crate) fn resolve(
        &mut self,
        claims: impl IntoIterator<Item = (PeerKey, Ipv4Addr)>,
    ) -> Vec<Conflict> {
        let mut by_ip: BTreeMap<Ipv4Addr, Vec<PeerKey>> = BTreeMap::new();
        by_ip.entry(self.own_ip).or_default().push(self.own);
        for (key, ip) in claims {
            by_ip.entry(ip).or_default().push(key);
        }
        self.by_ip.clear();
        self.losers.clear();
        let previous = self.conflict.take();
        let mut report = Vec::new();
        for (ip, mut keys) in by_ip {
            keys.sort_by_key(|k| addressing::owner_rank(&self.subnet, k, ip));
            let owner = keys[0];
            if owner != self.own {
                self.by_ip.insert(ip, owner);
            }
            for &loser in &keys[1..] {
                if loser == self.own {
                    self.conflict = Some((ip, owner));
                } else {
                    self.losers.insert(loser);
                }
                if previous.is_none() || loser != self.own {
                    report.push(Conflict { ip, owner, loser });
                }
            }
        }
        report
    }
}

impl Node {
    // ----- routing relay replies into the member table and the peers ----------------------

    /// A live push of `entry` at change counter `seq`; ignored if a newer removal of the same
    /// member arrived first.
    pub(super) fn apply_push(&mut self, now: Instant, seq: u64, entry: MemberEntry) {
        if self.members.accept_push(entry.key, seq) {
            self.upsert_member(now, entry);
        }
    }

    /// A removal of `key` at change counter `seq`; a re-join that overtook it wins.
    pub(super) fn apply_removal(&mut self, key: PeerKey, seq: u64) {
        if self.members.accept_removal(key, seq) {
            self.remove_member(key);
        }
    }

    /// Applies a snapshot of the member set taken at change counter `seq`. Pushes and removals
    /// newer than the snapshot (delivered before it) are kept; everything else follows it.
    pub(super) fn apply_full_sync(&mut self, now: Instant, seq: u64, entries: Vec<MemberEntry>) {
        self.relay.sync_done();
        let snapshot = self.members.accept_snapshot(seq, entries);
        for key in snapshot.gone {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            if p.paths.direct_alive(now) {
                // Keep the peer (and its session and path) for a grace period; the relay may
                // just have restarted and not heard from it yet.
                p.stale_since.get_or_insert(now);
            } else {
                self.remove_member(key);
            }
        }
        for entry in snapshot.apply {
            self.upsert_member(now, entry);
        }
    }

    // ----- membership ----------------------------------------------------------------------

    pub(super) fn upsert_member(&mut self, now: Instant, entry: MemberEntry) {
        if entry.key == self.public {
            return;
        }
        self.members.record(entry.clone());
        let ann = match Announcement::open(
            &self.keys.control_key,
            &self.keys.network_id,
            entry.key,
            &entry.announcement,
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%e, member = %entry.key.short(), "ignoring announcement that does not open");
                self.drops.unauthenticated += 1;
                return;
            }
        };
        if !addressing::is_usable(&self.cfg.subnet, ann.virtual_ip) {
            tracing::warn!(member = %entry.key.short(), ip = %ann.virtual_ip, "member announces an address outside the subnet; ignoring it");
            return;
        }
        if let Some(peer) = self.peers.get_mut(&entry.key) {
            peer.stale_since = None;
            if ann.ts_ms < peer.announcement.ts_ms {
                return;
            }
            let endpoints_changed = ann.endpoints != peer.announcement.endpoints
                || entry.observed != peer.entry.observed;
            peer.entry = entry;
            peer.announcement = ann;
            if endpoints_changed {
                peer.refresh_candidates();
                peer.paths.reset_backoff(now);
            }
            self.resolve_addresses();
            return;
        }
        let index = self.members.allocate_index(entry.key);
        let link = PeerLink::new(
            self.cfg.secret.to_static(),
            entry.key,
            self.keys.preshared_key,
            index,
        );
        let disco_key = self
            .cfg
            .secret
            .disco_key(&entry.key, &self.keys.control_key);
        let mut peer = Peer {
            key: entry.key,
            entry,
            announcement: ann,
            link,
            disco_key,
            paths: PathSelection::new(now),
            stale_since: None,
        };
        peer.refresh_candidates();
        self.out.event(Event::PeerJoined {
            key: peer.key,
            name: peer.announcement.name.clone(),
            virtual_ip: peer.virtual_ip(),
        });
        self.peers.insert(peer.key, peer);
        self.resolve_addresses();
    }

    pub(super) fn remove_member(&mut self, key: PeerKey) {
        self.members.forget(key);
        if let Some(peer) = self.peers.remove(&key) {
            self.members.release_index(peer.link.index());
            self.out.event(Event::PeerLeft {
                key,
                name: peer.announcement.name,
            });
            self.resolve_addresses();
        }
    }

    /// Rebuilds the virtual-IP routing table from every member's claim and reports new clashes.
    pub(super) fn resolve_addresses(&mut self) {
        let claims = self.peers.values().map(|p| (p.key, p.virtual_ip()));
        for c in self.members.resolve(claims) {
            self.out.event(Event::VirtualIpConflict {
                ip: c.ip,
                owner: c.owner,
                loser: c.loser,
                we_lost: c.loser == self.public,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeSecret;
    use rand::SeedableRng;

    fn keys(n: usize) -> Vec<PeerKey> {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        (0..n)
            .map(|_| NodeSecret::generate(&mut rng).public())
            .collect()
    }

    fn subnet() -> Ipv4Net {
        "10.77.0.0/16".parse().expect("literal")
    }

    fn entry(key: PeerKey) -> MemberEntry {
        MemberEntry {
            key,
            observed: "198.51.100.1:4000".parse().expect("literal"),
            announcement: Vec::new(),
        }
    }

    #[test]
    fn a_clash_goes_to_the_derived_address_everywhere_and_we_hear_of_ours_once() {
        let k = keys(3);
        let derived = addressing::derive_virtual_ip(&subnet(), &k[1], 0).expect("derives");
        // k[0] (us) chose k[1]'s derived address by hand; k[2] too.
        let mut us = Membership::new(k[0], derived, subnet());
        let claims = [(k[1], derived), (k[2], derived)];
        let report = us.resolve(claims);
        assert_eq!(us.route(derived), Some(k[1]), "the derived claim wins");
        assert_eq!(us.conflict(), Some((derived, k[1])));
        assert!(us.is_conflicted(&k[2]) && !us.is_conflicted(&k[1]));
        assert_eq!(report.len(), 2, "both losers reported: {report:?}");
        assert!(report.iter().all(|c| c.owner == k[1]));
        // Nothing changed: our own loss is not reported again, the others' is.
        let again = us.resolve(claims);
        assert_eq!(
            again,
            vec![Conflict {
                ip: derived,
                owner: k[1],
                loser: k[2]
            }]
        );

        // The same claims seen from k[2] give the same owner.
        let mut other = Membership::new(k[2], derived, subnet());
        other.resolve([(k[0], derived), (k[1], derived)]);
        assert_eq!(other.route(derived), Some(k[1]));

        // Without a derived claimant the smaller key wins.
        let chosen = "10.77.200.1".parse().expect("literal");
        let mut m = Membership::new(k[0], "10.77.0.9".parse().expect("literal"), subnet());
        m.resolve([(k[1], chosen), (k[2], chosen)]);
        assert_eq!(m.route(chosen), Some(k[1].min(k[2])));
    }

    #[test]
    fn pushes_removals_and_snapshots_respect_change_counters() {
        let k = keys(4);
        let mut m = Membership::new(k[0], "10.77.0.1".parse().expect("literal"), subnet());
        assert!(m.accept_push(k[1], 5));
        m.record(entry(k[1]));
        assert!(
            !m.accept_removal(k[1], 4),
            "an older removal loses to a newer push"
        );
        assert!(m.accept_removal(k[2], 9));
        assert!(
            !m.accept_push(k[2], 8),
            "an older push does not revive a removed member"
        );
        assert!(
            m.accept_push(k[2], 10),
            "a re-join after the removal counts"
        );
        m.record(entry(k[2]));
        assert!(m.accept_push(k[3], 3));
        m.record(entry(k[3]));

        // A snapshot at 7 lists k[1] only: k[3] (learned at 3) is gone, k[2] (learned at 10)
        // is newer than the snapshot and stays.
        let snap = m.accept_snapshot(7, vec![entry(k[1])]);
        assert_eq!(snap.gone, vec![k[3]]);
        assert_eq!(snap.apply, vec![entry(k[1])]);
        assert!(
            m.accept_push(k[3], 8),
            "a push newer than the snapshot brings it back"
        );
        let index = m.allocate_index(k[1]);
        assert_eq!(m.by_index(index), Some(k[1]));
        m.release_index(index);
        assert_eq!(m.by_index(index), None);
    }
}
