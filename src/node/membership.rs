//! Membership: the member table built from the relay's pushes and snapshots, removed-member
//! records (so an older push or snapshot never revives a member), and the virtual-IP routing
//! table with its deterministic conflict resolution (see the [`super`] module doc).
//!
//! # Algorithm
//! Every entry carries the relay's change counter at which it was set (`learned`); removals
//! leave a tombstone at their counter. A push applies unless a newer tombstone exists; a
//! removal applies unless a newer push exists; a snapshot taken at counter `seq` replaces
//! everything not newer than `seq`. A member missing from a snapshot while its direct path still
//! answers is kept for [`STALE_GRACE`] (the relay may just have restarted). After any change
//! the routing table is rebuilt: each virtual IP goes to the claimant ranked first by
//! `addressing::owner_rank`, the same on every member, so all members agree without talking.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use super::link::PeerLink;
use super::peer::{self, Path, Peer};
use super::{Event, Node};

/// A member missing from a relay snapshot while its direct path still answers is kept this
/// long: a restarted relay forgets everyone until they re-register (within
/// [`super::REGISTER_INTERVAL`] plus retries), and a working direct path must not be torn down by that.
pub(super) const STALE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
use crate::addressing;
use crate::keys::PeerKey;
use crate::wire::{Announcement, MemberEntry};

impl Node {
    /// A live push of `entry` at change counter `seq`; ignored if a newer removal of the same
    /// member arrived first.
    pub(super) fn apply_push(&mut self, now: Instant, seq: u64, entry: MemberEntry) {
        if self
            .tombstones
            .get(&entry.key)
            .is_some_and(|gone| *gone > seq)
        {
            return;
        }
        self.tombstones.remove(&entry.key);
        self.learned.insert(entry.key, seq);
        self.upsert_member(now, entry);
    }

    /// A removal of `key` at change counter `seq`; a re-join that overtook it wins.
    pub(super) fn apply_removal(&mut self, key: PeerKey, seq: u64) {
        if self.learned.get(&key).is_some_and(|l| *l > seq) {
            return;
        }
        self.tombstones.insert(key, seq);
        self.remove_member(key);
    }

    /// Applies a snapshot of the member set taken at change counter `seq`. Pushes and removals
    /// newer than the snapshot (delivered before it) are kept; everything else follows it.
    pub(super) fn apply_full_sync(&mut self, now: Instant, seq: u64, entries: Vec<MemberEntry>) {
        self.relay.sync_done();
        let keep: Vec<PeerKey> = entries.iter().map(|e| e.key).collect();
        let gone: Vec<PeerKey> = self
            .entries
            .keys()
            .filter(|k| !keep.contains(k) && self.learned.get(*k).is_none_or(|l| *l <= seq))
            .copied()
            .collect();
        for key in gone {
            self.tombstones.insert(key, seq);
            let direct_alive = self.peers.get(&key).is_some_and(|p| match p.path {
                Path::Direct { last_pong, .. } => {
                    now.saturating_duration_since(last_pong) < peer::DIRECT_TIMEOUT
                }
                Path::Relayed => false,
            });
            if direct_alive {
                // Keep the peer (and its session and path) for a grace period; the relay may
                // just have restarted and not heard from it yet.
                self.entries.remove(&key);
                self.learned.remove(&key);
                if let Some(p) = self.peers.get_mut(&key) {
                    p.stale_since.get_or_insert(now);
                }
            } else {
                self.remove_member(key);
            }
        }
        for entry in entries {
            let newer_removal = self.tombstones.get(&entry.key).is_some_and(|t| *t > seq);
            let newer_push = self.learned.get(&entry.key).is_some_and(|l| *l > seq);
            if newer_removal || newer_push {
                continue;
            }
            self.learned.insert(entry.key, seq);
            self.upsert_member(now, entry);
        }
        self.tombstones.retain(|_, t| *t > seq);
    }

    // ----- membership ----------------------------------------------------------------------

    pub(super) fn upsert_member(&mut self, now: Instant, entry: MemberEntry) {
        if entry.key == self.public {
            return;
        }
        self.entries.insert(entry.key, entry.clone());
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
                peer.reset_backoff(now);
            }
            self.resolve_addresses();
            return;
        }
        let index = self.next_index;
        self.next_index = (self.next_index + 1) & 0x00FF_FFFF;
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
            path: Path::Relayed,
            candidates: Default::default(),
            outstanding: BTreeMap::new(),
            next_probe: now,
            backoff: peer::PROBE_BACKOFF_MIN,
            next_relay_ping: now,
            relay_rtt: None,
            ip_conflict: false,
            relayed_since: now,
            stale_since: None,
            birthday: Default::default(),
        };
        peer.refresh_candidates();
        self.out.event(Event::PeerJoined {
            key: peer.key,
            name: peer.announcement.name.clone(),
            virtual_ip: peer.virtual_ip(),
        });
        self.by_index.insert(index, peer.key);
        self.peers.insert(peer.key, peer);
        self.resolve_addresses();
    }

    pub(super) fn remove_member(&mut self, key: PeerKey) {
        self.entries.remove(&key);
        self.learned.remove(&key);
        if let Some(peer) = self.peers.remove(&key) {
            self.by_index.remove(&peer.link.index());
            self.out.event(Event::PeerLeft {
                key,
                name: peer.announcement.name,
            });
            self.resolve_addresses();
        }
    }

    /// Rebuilds the virtual-IP routing table, resolving clashes the same way on every member.
    pub(super) fn resolve_addresses(&mut self) {
        let subnet = self.cfg.subnet;
        let mut claims: BTreeMap<Ipv4Addr, Vec<PeerKey>> = BTreeMap::new();
        claims
            .entry(self.cfg.virtual_ip)
            .or_default()
            .push(self.public);
        for p in self.peers.values() {
            claims.entry(p.virtual_ip()).or_default().push(p.key);
        }
        self.by_ip.clear();
        let previous_conflict = self.ip_conflict;
        self.ip_conflict = None;
        for p in self.peers.values_mut() {
            p.ip_conflict = false;
        }
        for (ip, mut keys) in claims {
            keys.sort_by_key(|k| addressing::owner_rank(&subnet, k, ip));
            let owner = keys[0];
            if owner != self.public {
                self.by_ip.insert(ip, owner);
            }
            for loser in keys.iter().skip(1) {
                if *loser == self.public {
                    self.ip_conflict = Some((ip, owner));
                } else if let Some(p) = self.peers.get_mut(loser) {
                    p.ip_conflict = true;
                }
                if previous_conflict.is_none() || *loser != self.public {
                    self.out.event(Event::VirtualIpConflict {
                        ip,
                        owner,
                        loser: *loser,
                        we_lost: *loser == self.public,
                    });
                }
            }
        }
    }
}
