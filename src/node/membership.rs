//! Membership: the member table built from the relay's pushes and snapshots, removed-member
//! records (so an older push or snapshot never revives a member), the index that routes
//! WireGuard receiver indices to members, and the virtual-IP routing table with its
//! deterministic conflict resolution. Beside it, the IPv6 overlay table maps each member's
//! key-derived ULA address (`addressing::overlay_ipv6`) to the member, for the members that
//! own their IPv4 address: it needs no announcement, since every member can derive it.
//!
//! # Algorithm
//! Every entry carries the relay's change counter at which it was set (`learned`); removals
//! leave a tombstone at their counter. A push applies unless a newer tombstone exists; a
//! removal applies unless a newer push exists; a snapshot taken at counter `seq` replaces
//! everything not newer than `seq`. A member missing from a snapshot, or removed by a push,
//! while its direct path still answers is kept for [`STALE_GRACE`] (the relay may just have
//! restarted, or may lie). After any change the routing table is rebuilt.
//!
//! # Who owns an address
//! The first holder keeps its address while it is alive, whatever the keys: each claim is
//! ranked by the relay's change counter at which it began, the same number on every member
//! (the relay hands it out with every entry as `since`, and tells each member its own in the
//! registration acknowledgement). A member that changes its address while alive starts a new
//! claim at the counter of the push that carried the change. Only equal counters fall back
//! to `addressing::owner_rank` (a derived address beats a chosen one, then the smaller key), so
//! grinding keys until one derives a live member's address wins nothing.
//!
//! # Bounds
//! A relay decides what we store, so every map here is capped: at most [`MAX_MEMBERS`] members
//! (further newcomers are refused and counted), [`MAX_TOMBSTONES`] removal records and
//! [`MAX_ANNOUNCEMENT_FLOORS`] remembered announcement timestamps (the oldest go first).
//!
//! # Ghosts
//! The highest announcement timestamp seen per member (its floor) is kept, exported with
//! [`Node::announcement_floors`] and restored at start with
//! [`Node::restore_announcement_floors`]: an announcement older than the floor is a replay and
//! is refused, also by a member that just restarted. When a member is removed its floor moves
//! one past its last announcement, so that exact announcement, replayed by a relay after the
//! member left, is refused too; a member whose presence at the relay begins anew (it expired,
//! or the relay restarted) re-seals its announcement with a fresh timestamp, so a live member
//! is never locked out by this.
//!
//! # Driving contract
//! [`Membership`] is plain data: the node asks it whether a push, removal or snapshot applies
//! ([`Membership::accept_push`], [`Membership::accept_removal`],
//! [`Membership::accept_snapshot`]), creates or drops its peers accordingly, and after every
//! change of the claims calls [`Membership::resolve`], reporting the [`Conflict`]s it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use super::link::PeerLink;
use super::path_selection::PathSelection;
use super::peer::Peer;
use super::{Event, Node};
use crate::addressing;
use crate::keys::{NetworkId, PeerKey};
use crate::wire::{self, Announcement, MemberEntry};

/// A member missing from a relay snapshot while its direct path still answers is kept this
/// long: a restarted relay forgets everyone until they re-register (within
/// [`super::REGISTER_INTERVAL`] plus retries), and a working direct path must not be torn down
/// by that.
pub(super) const STALE_GRACE: Duration = Duration::from_secs(30);
/// Most other members kept: the relay's default cap per network (1024) with room to spare. A
/// relay pushing more is refused beyond this, so it cannot grow our maps without bound.
pub(crate) const MAX_MEMBERS: usize = 4096;
/// Most removal records kept: one per member we could know, so a relay streaming removals of
/// made-up keys cannot grow the map; dropping the oldest only lets an older push revive one.
pub(crate) const MAX_TOMBSTONES: usize = MAX_MEMBERS;
/// Most announcement floors kept (and persisted): a few times [`MAX_MEMBERS`], so members that
/// come and go keep theirs for a long while; the lowest timestamps go first.
pub(crate) const MAX_ANNOUNCEMENT_FLOORS: usize = 4 * MAX_MEMBERS;
/// Receiver indices are 24 bits: boringtun keeps the low 8 bits for its sessions.
const INDEX_MASK: u32 = 0x00FF_FFFF;

/// Two members claim one virtual IP; `owner` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub(crate) ip: Ipv4Addr,
    pub(crate) owner: PeerKey,
    pub(crate) loser: PeerKey,
}

/// The verdict on a decrypted inner packet (cryptokey routing both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inner {
    /// From the sender's own address to ours: deliver it.
    Deliver,
    /// The source is not an address the routing table gives to the sender.
    SpoofedSource,
    /// The destination is not our own address.
    NotForUs,
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
    network: NetworkId,
    /// The network's IPv6 overlay prefix (`addressing::overlay_ipv6_prefix`).
    prefix6: Ipv6Net,
    /// Our own IPv6 overlay address (`addressing::overlay_ipv6`).
    own_ip6: Ipv6Addr,
    entries: BTreeMap<PeerKey, MemberEntry>,
    /// Change counter (relay's) at which each member entry was last set.
    learned: BTreeMap<PeerKey, u64>,
    /// Members removed at a change counter, so an older push or snapshot does not revive them.
    tombstones: BTreeMap<PeerKey, u64>,
    by_ip: BTreeMap<Ipv4Addr, PeerKey>,
    /// The IPv6 overlay routing table: the address derived from each member's key, for the
    /// members that own their IPv4 address (rebuilt with `by_ip`).
    by_ip6: BTreeMap<Ipv6Addr, PeerKey>,
    /// Each claiming member's IPv6 overlay address, derived once (two hashes) when its claim
    /// is first noted rather than at every rebuild.
    overlay6: BTreeMap<PeerKey, Ipv6Addr>,
    by_index: BTreeMap<u32, PeerKey>,
    next_index: u32,
    /// Our own address is claimed by `owner`, who keeps it.
    conflict: Option<(Ipv4Addr, PeerKey)>,
    losers: BTreeSet<PeerKey>,
    /// Each other member's address claim and the change counter at which it began.
    claims: BTreeMap<PeerKey, (Ipv4Addr, u64)>,
    /// When our own claim began (from the relay's acknowledgement); unknown ranks last.
    own_since: Option<u64>,
    /// The highest announcement timestamp seen per member (see the module doc on ghosts).
    floors: BTreeMap<PeerKey, u64>,
    /// Claims whose start is on the counters of a relay no longer followed: the next entry of
    /// the member restarts them on the new relay's counters.
    rebased: BTreeSet<PeerKey>,
}

impl Membership {
    /// An empty table for the member `own` at `own_ip` in `subnet` of network `network`
    /// (whose id gives every member's IPv6 overlay address).
    pub(crate) fn new(own: PeerKey, own_ip: Ipv4Addr, subnet: Ipv4Net, network: NetworkId) -> Self {
        Self {
            own,
            own_ip,
            subnet,
            network,
            prefix6: addressing::overlay_ipv6_prefix(&network),
            own_ip6: addressing::overlay_ipv6(&network, &own),
            by_ip6: BTreeMap::new(),
            overlay6: BTreeMap::new(),
            entries: BTreeMap::new(),
            learned: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            by_index: BTreeMap::new(),
            next_index: 1,
            conflict: None,
            losers: BTreeSet::new(),
            claims: BTreeMap::new(),
            own_since: None,
            floors: BTreeMap::new(),
            rebased: BTreeSet::new(),
        }
    }

    /// The table follows another relay from now on, whose change counters have nothing to
    /// do with the old one's: every entry counts as learned before its first snapshot (which
    /// then replaces it), removal records are dropped, our own claim starts at `own_since`
    /// (the new relay's counter for us, if known yet) and every other claim restarts at the
    /// counter of its member's next entry. Announcement floors stay: timestamps are the
    /// members' own, not a relay's.
    pub(crate) fn rebase(&mut self, own_since: Option<u64>) {
        for learned in self.learned.values_mut() {
            *learned = 0;
        }
        self.tombstones.clear();
        self.own_since = own_since;
        self.rebased = self.claims.keys().copied().collect();
    }

    /// The digest the relay compares with its own to tell whether we are in sync.
    pub(crate) fn digest(&self) -> [u8; 8] {
        wire::membership_digest(self.entries.values())
    }

    /// The member that owns virtual IP `ip` (cryptokey routing), never ourselves.
    pub(crate) fn route(&self, ip: Ipv4Addr) -> Option<PeerKey> {
        self.by_ip.get(&ip).copied()
    }

    /// The member that owns IPv6 overlay address `ip` (its key derives it, and it owns its
    /// IPv4 address), never ourselves.
    pub(crate) fn route6(&self, ip: Ipv6Addr) -> Option<PeerKey> {
        self.by_ip6.get(&ip).copied()
    }

    /// The member that owns `ip`, of either family.
    pub(crate) fn route_ip(&self, ip: IpAddr) -> Option<PeerKey> {
        match ip {
            IpAddr::V4(v4) => self.route(v4),
            IpAddr::V6(v6) => self.route6(v6),
        }
    }

    /// Member `key`'s IPv6 overlay address, if it claims an address (is a member we route).
    pub(crate) fn overlay_ipv6_of(&self, key: &PeerKey) -> Option<Ipv6Addr> {
        self.overlay6.get(key).copied()
    }

    /// Our own IPv6 overlay address.
    pub(crate) fn own_ipv6(&self) -> Ipv6Addr {
        self.own_ip6
    }

    /// The network's IPv6 overlay prefix (a /64).
    pub(crate) fn ipv6_prefix(&self) -> Ipv6Net {
        self.prefix6
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

    /// Whether the table is full and `key` is not in it (a newcomer would be refused).
    pub(crate) fn is_full_for(&self, key: &PeerKey) -> bool {
        !self.learned.contains_key(key) && self.learned.len() >= MAX_MEMBERS
    }

    /// Whether a live push of `key` at `seq` applies (no newer removal, and room for a
    /// newcomer); records it if so.
    pub(crate) fn accept_push(&mut self, key: PeerKey, seq: u64) -> bool {
        if self.tombstones.get(&key).is_some_and(|gone| *gone > seq) {
            return false;
        }
        if self.is_full_for(&key) {
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
        self.tombstone(key, seq);
        true
    }

    /// Records that `key` was removed at `seq`, dropping the oldest record beyond the cap.
    fn tombstone(&mut self, key: PeerKey, seq: u64) {
        self.tombstones.insert(key, seq);
        evict_lowest(&mut self.tombstones, MAX_TOMBSTONES);
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
            self.tombstone(*key, seq);
            self.forget(*key);
        }
        let mut apply = Vec::new();
        for entry in entries {
            let newer_removal = self.tombstones.get(&entry.key).is_some_and(|t| *t > seq);
            let newer_push = self.learned.get(&entry.key).is_some_and(|l| *l > seq);
            let full = self.is_full_for(&entry.key);
            if !(newer_removal || newer_push || full) {
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
        self.claims.remove(&key);
        self.overlay6.remove(&key);
        self.rebased.remove(&key);
    }

    /// Records our own claim's start, as the relay first acknowledged it: the other members
    /// keep the start they first learned for a claim too (a restarted relay counts anew).
    pub(crate) fn set_own_since(&mut self, since: u64) {
        self.own_since.get_or_insert(since);
    }

    /// Records that `key` claims `ip`, present since counter `since` (the relay's entry). A
    /// claim already known keeps its start; a new address starts a new claim at the counter of
    /// the push that carried it.
    pub(crate) fn note_claim(&mut self, key: PeerKey, ip: Ipv4Addr, since: u64) {
        let rebased = self.rebased.remove(&key);
        let start = match self.claims.get(&key) {
            _ if rebased => since,
            Some((known, start)) if *known == ip => *start,
            Some(_) => self.learned.get(&key).copied().unwrap_or(since).max(since),
            None => since,
        };
        self.claims.insert(key, (ip, start));
        let network = &self.network;
        self.overlay6
            .entry(key)
            .or_insert_with(|| addressing::overlay_ipv6(network, &key));
    }

    /// Whether an announcement of `key` with timestamp `ts_ms` is not older than the newest
    /// one seen (a replay otherwise); raises the floor if so.
    pub(crate) fn accept_announcement(&mut self, key: PeerKey, ts_ms: u64) -> bool {
        let floor = self.floors.entry(key).or_insert(0);
        if ts_ms < *floor {
            return false;
        }
        *floor = ts_ms;
        self.trim_floors();
        true
    }

    /// A member was removed: its last announcement no longer admits it (the floor moves past
    /// it), so a relay replaying that announcement later, to us or to us restarted, is
    /// refused. A member that is in fact alive re-seals its announcement when its presence at
    /// the relay starts anew, which is what removed it here (see `Node::handle_relay_reply`).
    pub(crate) fn retire_floor(&mut self, key: PeerKey) {
        if let Some(floor) = self.floors.get_mut(&key) {
            *floor = floor.saturating_add(1);
        }
    }

    /// The highest announcement timestamp seen per member.
    pub(crate) fn floors(&self) -> &BTreeMap<PeerKey, u64> {
        &self.floors
    }

    /// Raises the floors to those remembered from an earlier run.
    pub(crate) fn restore_floors(&mut self, floors: impl IntoIterator<Item = (PeerKey, u64)>) {
        for (key, ts) in floors {
            let floor = self.floors.entry(key).or_insert(0);
            *floor = (*floor).max(ts);
            self.trim_floors();
        }
    }

    /// Drops the lowest floors beyond [`MAX_ANNOUNCEMENT_FLOORS`].
    fn trim_floors(&mut self) {
        evict_lowest(&mut self.floors, MAX_ANNOUNCEMENT_FLOORS);
    }

    /// Where `ip` stands among inner packets from member `from`: its source must be an
    /// address the routing table gives to `from` (its IPv4 address, or for IPv6 the overlay
    /// address its key derives), its destination our own address of the same family.
    pub(crate) fn check_inner(&self, from: PeerKey, source: IpAddr, destination: IpAddr) -> Inner {
        let ours = match (source, destination) {
            (IpAddr::V4(_), IpAddr::V4(dst)) => dst == self.own_ip,
            (IpAddr::V6(_), IpAddr::V6(dst)) => dst == self.own_ip6,
            (IpAddr::V4(_) | IpAddr::V6(_), _) => false,
        };
        if self.route_ip(source) != Some(from) {
            Inner::SpoofedSource
        } else if !ours {
            Inner::NotForUs
        } else {
            Inner::Deliver
        }
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

    /// Rebuilds the routing table from every other member's claim (recorded with
    /// [`Membership::note_claim`]), resolving clashes the same way on every member: the
    /// earliest claim wins, equal starts go by `addressing::owner_rank`. Returns the clashes
    /// worth reporting: all between others, and ours only when it is new.
    pub(crate) fn resolve(&mut self) -> Vec<Conflict> {
        let mut by_ip: BTreeMap<Ipv4Addr, Vec<(u64, PeerKey)>> = BTreeMap::new();
        by_ip
            .entry(self.own_ip)
            .or_default()
            .push((self.own_since.unwrap_or(u64::MAX), self.own));
        for (key, (ip, since)) in &self.claims {
            by_ip.entry(*ip).or_default().push((*since, *key));
        }
        self.by_ip.clear();
        self.by_ip6.clear();
        self.losers.clear();
        let previous = self.conflict.take();
        let mut report = Vec::new();
        for (ip, mut claimants) in by_ip {
            claimants
                .sort_by_key(|(since, k)| (*since, addressing::owner_rank(&self.subnet, k, ip)));
            let keys: Vec<PeerKey> = claimants.into_iter().map(|(_, k)| k).collect();
            let owner = keys[0];
            if owner != self.own {
                self.by_ip.insert(ip, owner);
                // Only a member that owns its IPv4 address routes over IPv6 too: a loser
                // keeps its session but gets no traffic, of either family.
                if let Some(ip6) = self.overlay6.get(&owner) {
                    self.by_ip6.insert(*ip6, owner);
                }
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

/// Once `map` holds more than `cap` entries, drops the lowest-valued eighth of `cap` (ties by
/// key), so eviction costs a sort only once every `cap / 8` insertions.
fn evict_lowest(map: &mut BTreeMap<PeerKey, u64>, cap: usize) {
    if map.len() <= cap {
        return;
    }
    let mut order: Vec<(u64, PeerKey)> = map.iter().map(|(k, v)| (*v, *k)).collect();
    order.sort_unstable();
    let excess = map.len() - cap + cap / 8;
    for (_, key) in order.into_iter().take(excess) {
        map.remove(&key);
    }
}

impl Node {
    // ----- routing relay replies into the member table and the peers ----------------------

    /// A live push of `entry` at change counter `seq`; ignored if a newer removal of the same
    /// member arrived first.
    pub(super) fn apply_push(&mut self, now: Instant, seq: u64, entry: MemberEntry) {
        if self.members.is_full_for(&entry.key) {
            self.drops.members_full += 1;
            return;
        }
        if self.members.accept_push(entry.key, seq) {
            self.upsert_member(now, entry);
        }
    }

    /// A removal of `key` at change counter `seq`; a re-join that overtook it wins. A peer
    /// whose direct path still answers is kept for [`STALE_GRACE`] (the relay may lie).
    pub(super) fn apply_removal(&mut self, now: Instant, key: PeerKey, seq: u64) {
        if !self.members.accept_removal(key, seq) {
            return;
        }
        match self.peers.get_mut(&key) {
            Some(p) if p.paths.direct_alive(now) => {
                p.stale_since.get_or_insert(now);
            }
            Some(_) | None => self.remove_member(key),
        }
    }

    /// Applies a snapshot of the member set taken at change counter `seq`. Pushes and removals
    /// newer than the snapshot (delivered before it) are kept; everything else follows it.
    pub(super) fn apply_full_sync(&mut self, now: Instant, seq: u64, entries: Vec<MemberEntry>) {
        self.relays[self.primary].sync_done();
        self.synced = true;
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

    /// The highest announcement timestamp seen per member, for the driver to persist (see the
    /// module doc on ghosts).
    pub fn announcement_floors(&self) -> Vec<(PeerKey, u64)> {
        self.members
            .floors()
            .iter()
            .map(|(k, ts)| (*k, *ts))
            .collect()
    }

    /// Restores the floors persisted by an earlier run (call before the first input); an
    /// announcement older than its floor is refused as a replay.
    pub fn restore_announcement_floors(
        &mut self,
        floors: impl IntoIterator<Item = (PeerKey, u64)>,
    ) {
        self.members.restore_floors(floors);
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
        if !self.members.accept_announcement(entry.key, ann.ts_ms) {
            tracing::debug!(member = %entry.key.short(), "ignoring an announcement older than one already seen");
            self.drops.stale_announcement += 1;
            return;
        }
        let since = entry.since;
        if let Some(peer) = self.peers.get_mut(&entry.key) {
            peer.stale_since = None;
            let endpoints_changed = ann.endpoints != peer.announcement.endpoints
                || entry.observed != peer.entry.observed;
            let entry_key = entry.key;
            peer.entry = entry;
            peer.announcement = ann;
            if endpoints_changed {
                peer.refresh_candidates();
                peer.paths.reset_backoff(now);
            }
            let ip = peer.virtual_ip();
            self.members.note_claim(entry_key, ip, since);
            self.resolve_addresses();
            return;
        }
        let index = self.members.allocate_index(entry.key);
        let link = PeerLink::new(
            self.cfg.secret.to_static(),
            entry.key,
            self.keys.preshared_key,
            index,
            &self.guard,
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
            forwards: super::peer::ProbeBucket::new(now),
            carry: super::helping::CarryBucket::new(now),
        };
        peer.refresh_candidates();
        self.members.note_claim(peer.key, peer.virtual_ip(), since);
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
        self.members.retire_floor(key);
        if let Some(peer) = self.peers.remove(&key) {
            self.members.release_index(peer.link.index());
            self.drops.handshake_pending += peer.link.held_packets() as u64;
            self.out.event(Event::PeerLeft {
                key,
                name: peer.announcement.name,
            });
            self.resolve_addresses();
        }
    }

    /// Rebuilds the virtual-IP routing table from every member's claim and reports new clashes;
    /// packets held for an address that now has a member go to it.
    pub(super) fn resolve_addresses(&mut self) {
        for c in self.members.resolve() {
            self.out.event(Event::VirtualIpConflict {
                ip: c.ip,
                owner: c.owner,
                loser: c.loser,
                we_lost: c.loser == self.public,
            });
        }
        self.release_unrouted();
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

    fn network() -> NetworkId {
        NetworkId([7; 32])
    }

    fn entry(key: PeerKey) -> MemberEntry {
        MemberEntry {
            key,
            observed: "198.51.100.1:4000".parse().expect("literal"),
            announcement: Vec::new(),
            since: 0,
        }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("literal")
    }

    #[test]
    fn the_first_holder_keeps_its_address_whatever_the_keys() {
        let k = keys(4);
        let derived = addressing::derive_virtual_ip(&subnet(), &k[2], 0).expect("derives");
        // k[1] holds `derived` by hand since counter 3; k[2] (whose key derives it) and k[3]
        // (a smaller or larger key, chosen) arrive later.
        let mut m = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        m.set_own_since(1);
        m.note_claim(k[1], derived, 3);
        m.note_claim(k[2], derived, 9);
        m.note_claim(k[3], derived, 12);
        let report = m.resolve();
        assert_eq!(m.route(derived), Some(k[1]), "first holder keeps it");
        assert!(m.is_conflicted(&k[2]) && m.is_conflicted(&k[3]));
        assert_eq!(report.len(), 2);
        assert!(report.iter().all(|c| c.owner == k[1]));

        // The same claims seen by a member that learned them in another order agree.
        let mut other = Membership::new(k[3], derived, subnet(), network());
        other.set_own_since(12);
        other.note_claim(k[2], derived, 9);
        other.note_claim(k[1], derived, 3);
        other.resolve();
        assert_eq!(other.route(derived), Some(k[1]));
        assert_eq!(
            other.conflict(),
            Some((derived, k[1])),
            "the late claimant lost"
        );

        // Once the holder is gone, the next claim in line takes the address.
        m.forget(k[1]);
        m.resolve();
        assert_eq!(m.route(derived), Some(k[2]));
    }

    #[test]
    fn we_keep_our_address_against_a_newcomer_and_hear_of_a_loss_once() {
        let k = keys(3);
        let ours = ip("10.77.3.3");
        let mut m = Membership::new(k[0], ours, subnet(), network());
        m.set_own_since(4);
        m.note_claim(k[1], ours, 8);
        let report = m.resolve();
        assert_eq!(m.conflict(), None);
        assert_eq!(
            m.route(ours),
            None,
            "our own address is never routed to a peer"
        );
        assert_eq!(
            report,
            vec![Conflict {
                ip: ours,
                owner: k[0],
                loser: k[1]
            }]
        );

        // A member we did not know to be older: we lost, reported once.
        let mut late = Membership::new(k[2], ours, subnet(), network());
        late.set_own_since(20);
        late.note_claim(k[0], ours, 4);
        assert_eq!(late.resolve().len(), 1);
        assert_eq!(late.conflict(), Some((ours, k[0])));
        assert!(late.resolve().is_empty(), "our loss is reported once");

        // Until the relay told us when our claim began, we rank last.
        let mut fresh = Membership::new(k[2], ours, subnet(), network());
        fresh.note_claim(k[1], ours, 8);
        fresh.resolve();
        assert_eq!(fresh.route(ours), Some(k[1]));
    }

    #[test]
    fn equal_starts_fall_back_to_the_derived_claim_then_the_smaller_key() {
        let k = keys(3);
        let derived = addressing::derive_virtual_ip(&subnet(), &k[2], 0).expect("derives");
        let mut m = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        m.set_own_since(1);
        m.note_claim(k[1], derived, 5);
        m.note_claim(k[2], derived, 5);
        m.resolve();
        assert_eq!(m.route(derived), Some(k[2]));
        let chosen = ip("10.77.200.1");
        m.note_claim(k[1], chosen, 5);
        m.note_claim(k[2], chosen, 5);
        m.resolve();
        assert_eq!(m.route(chosen), Some(k[1].min(k[2])));
    }

    #[test]
    fn a_live_member_moving_onto_an_address_starts_a_new_claim() {
        let k = keys(3);
        let target = ip("10.77.9.9");
        let mut m = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        m.set_own_since(1);
        // k[1], present since 2, holds 10.77.1.1; k[2] takes 10.77.9.9 at 6.
        assert!(m.accept_push(k[1], 2));
        m.note_claim(k[1], ip("10.77.1.1"), 2);
        m.note_claim(k[2], target, 6);
        // At 10 k[1] moves onto k[2]'s address: its old presence counts for nothing.
        assert!(m.accept_push(k[1], 10));
        m.note_claim(k[1], target, 2);
        m.resolve();
        assert_eq!(m.route(target), Some(k[2]));
        assert!(m.is_conflicted(&k[1]));
    }

    #[test]
    fn inner_packets_need_the_routed_source_and_our_destination() {
        let k = keys(3);
        let ours = ip("10.77.0.1");
        let mut m = Membership::new(k[0], ours, subnet(), network());
        m.set_own_since(1);
        m.note_claim(k[1], ip("10.77.0.2"), 2);
        m.note_claim(k[2], ip("10.77.0.2"), 3);
        m.resolve();
        let check = |k, s: Ipv4Addr, d: Ipv4Addr| m.check_inner(k, s.into(), d.into());
        assert_eq!(check(k[1], ip("10.77.0.2"), ours), Inner::Deliver);
        assert_eq!(
            check(k[2], ip("10.77.0.2"), ours),
            Inner::SpoofedSource,
            "the loser of a clash may not send with the owner's address"
        );
        assert_eq!(check(k[1], ip("10.77.5.5"), ours), Inner::SpoofedSource);
        assert_eq!(check(k[1], ours, ours), Inner::SpoofedSource);
        assert_eq!(
            check(k[1], ip("10.77.0.2"), ip("10.77.0.2")),
            Inner::NotForUs
        );
        assert_eq!(
            check(k[1], ip("10.77.0.2"), ip("192.0.2.1")),
            Inner::NotForUs
        );
    }

    #[test]
    fn ipv6_routes_follow_the_ipv4_owner_and_inner_ipv6_needs_the_derived_addresses() {
        let k = keys(3);
        let ours = ip("10.77.0.1");
        let mut m = Membership::new(k[0], ours, subnet(), network());
        m.set_own_since(1);
        // k[1] owns 10.77.0.2; k[2] claims it later and loses.
        m.note_claim(k[1], ip("10.77.0.2"), 2);
        m.note_claim(k[2], ip("10.77.0.2"), 3);
        m.resolve();
        let a1 = addressing::overlay_ipv6(&network(), &k[1]);
        let a2 = addressing::overlay_ipv6(&network(), &k[2]);
        let own6 = addressing::overlay_ipv6(&network(), &k[0]);
        assert_eq!(m.own_ipv6(), own6);
        assert_eq!(m.route6(a1), Some(k[1]));
        assert_eq!(
            m.route6(a2),
            None,
            "a member without its IPv4 address gets no route"
        );
        assert_eq!(
            m.route6(own6),
            None,
            "our own address is never routed to a peer"
        );
        assert_eq!(m.overlay_ipv6_of(&k[2]), Some(a2));
        let v6 = IpAddr::V6;
        assert_eq!(m.check_inner(k[1], v6(a1), v6(own6)), Inner::Deliver);
        assert_eq!(
            m.check_inner(k[2], v6(a2), v6(own6)),
            Inner::SpoofedSource,
            "the loser of the IPv4 clash may not send over IPv6 either"
        );
        assert_eq!(m.check_inner(k[1], v6(a2), v6(own6)), Inner::SpoofedSource);
        let other: Ipv6Addr = "fd00::1".parse().expect("literal");
        assert_eq!(
            m.check_inner(k[1], v6(other), v6(own6)),
            Inner::SpoofedSource
        );
        assert_eq!(m.check_inner(k[1], v6(a1), v6(a1)), Inner::NotForUs);
        assert_eq!(
            m.check_inner(k[1], v6(a1), IpAddr::V4(ours)),
            Inner::NotForUs,
            "families do not mix"
        );
        // Once the owner leaves, the next claimant routes over both families.
        m.forget(k[1]);
        m.resolve();
        assert_eq!(m.route6(a1), None);
        assert_eq!(m.route6(a2), Some(k[2]));
        assert_eq!(m.route_ip(IpAddr::V6(a2)), Some(k[2]));
    }

    #[test]
    fn member_tables_stay_bounded() {
        let k = keys(1);
        let mut m = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        let key = |i: usize| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            PeerKey(b)
        };
        for i in 0..MAX_MEMBERS {
            assert!(m.accept_push(key(i), i as u64 + 1));
        }
        assert!(m.is_full_for(&key(MAX_MEMBERS)));
        assert!(
            !m.accept_push(key(MAX_MEMBERS), 1_000_000),
            "a newcomer beyond the cap"
        );
        assert!(
            m.accept_push(key(0), 1_000_001),
            "a known member still updates"
        );
        let snap = m.accept_snapshot(2_000_000, vec![entry(key(MAX_MEMBERS + 1))]);
        assert!(snap.apply.len() <= 1);
        for i in 0..3 * MAX_TOMBSTONES {
            m.accept_removal(key(10_000 + i), 3_000_000 + i as u64);
        }
        assert!(m.tombstones.len() <= MAX_TOMBSTONES);
        assert!(
            m.tombstones
                .contains_key(&key(10_000 + 3 * MAX_TOMBSTONES - 1)),
            "the newest removals are kept"
        );
        for i in 0..2 * MAX_ANNOUNCEMENT_FLOORS {
            m.accept_announcement(key(i), i as u64);
        }
        assert!(m.floors().len() <= MAX_ANNOUNCEMENT_FLOORS);
        assert!(m
            .floors()
            .contains_key(&key(2 * MAX_ANNOUNCEMENT_FLOORS - 1)));
    }

    #[test]
    fn announcements_older_than_the_floor_are_refused_also_after_a_restart() {
        let k = keys(2);
        let mut m = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        assert!(m.accept_announcement(k[1], 100));
        assert!(
            m.accept_announcement(k[1], 100),
            "the same announcement again"
        );
        assert!(m.accept_announcement(k[1], 150));
        assert!(
            !m.accept_announcement(k[1], 120),
            "an older one is a replay"
        );
        let saved: Vec<_> = m.floors().iter().map(|(k, t)| (*k, *t)).collect();

        let mut restarted = Membership::new(k[0], ip("10.77.0.1"), subnet(), network());
        restarted.restore_floors(saved);
        assert!(!restarted.accept_announcement(k[1], 100));
        assert!(restarted.accept_announcement(k[1], 151));
    }

    #[test]
    fn pushes_removals_and_snapshots_respect_change_counters() {
        let k = keys(4);
        let mut m = Membership::new(
            k[0],
            "10.77.0.1".parse().expect("literal"),
            subnet(),
            network(),
        );
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
