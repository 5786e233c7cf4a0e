//! Membership: the relay session (registration with backoff, acknowledgements, syncs) and the
//! member table built from the relay's pushes and snapshots (see the [`super`] module doc).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use super::link::PeerLink;

use super::peer::{self, Path, Peer};
use super::{
    Event, Node, SyncCollector, REGISTER_INTERVAL, REGISTER_RETRY_MAX, REGISTER_RETRY_MIN,
    RELAY_LOST_AFTER, SYNC_RETRY,
};

/// A registration not acknowledged within this time counts as unanswered (relay RTTs are far
/// below it).
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// A member missing from a relay snapshot while its direct path still answers is kept this
/// long: a restarted relay forgets everyone until they re-register (within
/// [`REGISTER_INTERVAL`] plus retries), and a working direct path must not be torn down by that.
pub(super) const STALE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
use crate::addressing;
use crate::keys::PeerKey;
use crate::wire::{self, Announcement, MemberEntry, RelayReply, RelayRequest};

impl Node {
    // ----- relay session -------------------------------------------------------------------

    pub(super) fn relay_timers(&mut self, now: Instant) {
        if self.relay.registered
            && self
                .relay
                .last_ack
                .is_none_or(|t| now.saturating_duration_since(t) >= RELAY_LOST_AFTER)
        {
            self.relay.registered = false;
            self.relay.backoff = REGISTER_RETRY_MIN;
            self.out.event(Event::RelayLost);
        }
        // A registration the relay did not answer: retry soon with backoff instead of after a
        // full interval, so a restarted relay learns about us within seconds.
        if !self.relay.unanswered
            && self.relay.pending_ts.is_some()
            && self
                .relay
                .register_sent
                .is_some_and(|t| now.saturating_duration_since(t) >= ACK_TIMEOUT)
        {
            self.relay.unanswered = true;
            self.relay.next_register = now;
        }
        if now >= self.relay.next_register {
            self.register(now);
            self.relay.next_register = if self.relay.registered && !self.relay.unanswered {
                now + REGISTER_INTERVAL
            } else {
                let wait = self.relay.backoff;
                self.relay.backoff = (self.relay.backoff * 2).min(REGISTER_RETRY_MAX);
                now + wait
            };
        }
        if let Some(sent) = self.relay.sync_sent {
            if now.saturating_duration_since(sent) >= SYNC_RETRY {
                self.relay.sync_sent = None;
                self.request_sync(now);
            }
        }
    }

    /// The relay session's next deadline: registration, acknowledgement timeout, relay loss,
    /// sync retry, whichever comes first.
    pub(super) fn relay_deadline(&self) -> Instant {
        let r = &self.relay;
        let mut at = r.next_register;
        if let (true, Some(ack)) = (r.registered, r.last_ack) {
            at = at.min(ack + RELAY_LOST_AFTER);
        }
        if let (false, Some(_), Some(sent)) = (r.unanswered, r.pending_ts, r.register_sent) {
            at = at.min(sent + ACK_TIMEOUT);
        }
        if let Some(sent) = r.sync_sent {
            at = at.min(sent + SYNC_RETRY);
        }
        at
    }

    pub(super) fn register(&mut self, now: Instant) {
        let ts = self.next_ts(now);
        self.relay.pending_ts = Some(ts);
        self.relay.register_sent = Some(now);
        let req = RelayRequest::Register {
            network: self.keys.network_id,
            ts_ms: ts,
            announcement: self.announcement.clone(),
        };
        self.send_to_relay(&req);
    }

    pub(super) fn request_sync(&mut self, now: Instant) {
        if self.relay.sync_sent.is_some() {
            return;
        }
        self.relay.sync_sent = Some(now);
        let ts = self.next_ts(now);
        self.send_to_relay(&RelayRequest::Sync {
            network: self.keys.network_id,
            ts_ms: ts,
        });
    }

    pub(super) fn send_to_relay(&mut self, req: &RelayRequest) {
        let nonce = self.nonce();
        let dgram = wire::seal_to_relay(&self.relay.session, self.public, req, nonce);
        self.out.for_relay(&dgram);
    }

    pub(super) fn handle_relay_reply(&mut self, now: Instant, reply: RelayReply) {
        match reply {
            RelayReply::RegisterAck {
                echo_ts_ms,
                observed,
                digest,
                ..
            } => {
                if self.relay.pending_ts != Some(echo_ts_ms) {
                    return;
                }
                self.relay.pending_ts = None;
                self.relay.unanswered = false;
                self.relay.last_ack = Some(now);
                self.relay.backoff = REGISTER_RETRY_MIN;
                let was = self.relay.registered;
                self.relay.registered = true;
                self.relay.next_register = now + REGISTER_INTERVAL;
                if !was || self.relay.observed != Some(observed) {
                    self.relay.observed = Some(observed);
                    self.out.event(Event::RelayRegistered { observed });
                }
                if wire::membership_digest(self.entries.values()) != digest {
                    self.request_sync(now);
                }
            }
            RelayReply::Member { tag, entry } => {
                if tag.generation == 0 {
                    // A live push; ignore it if a newer removal of the same member arrived first.
                    if self
                        .tombstones
                        .get(&entry.key)
                        .is_some_and(|gone| *gone > tag.seq)
                    {
                        return;
                    }
                    self.tombstones.remove(&entry.key);
                    self.learned.insert(entry.key, tag.seq);
                    self.upsert_member(now, entry);
                    return;
                }
                let collector = self.relay.sync.get_or_insert_with(|| SyncCollector {
                    generation: tag.generation,
                    total: tag.total,
                    entries: BTreeMap::new(),
                });
                if collector.generation != tag.generation {
                    *collector = SyncCollector {
                        generation: tag.generation,
                        total: tag.total,
                        entries: BTreeMap::new(),
                    };
                }
                collector.entries.insert(tag.index, entry);
                if collector.entries.len() >= usize::from(collector.total) {
                    let done = self
                        .relay
                        .sync
                        .take()
                        .map(|c| c.entries)
                        .unwrap_or_default();
                    self.apply_full_sync(now, tag.seq, done.into_values().collect());
                }
            }
            RelayReply::SyncEmpty { seq, .. } => self.apply_full_sync(now, seq, Vec::new()),
            RelayReply::MemberGone { key, seq } => {
                // A re-join that overtook this removal wins.
                if self.learned.get(&key).is_some_and(|l| *l > seq) {
                    return;
                }
                self.tombstones.insert(key, seq);
                self.remove_member(key);
            }
            RelayReply::Error { message } => self.out.event(Event::RelayError { message }),
        }
    }

    /// Applies a snapshot of the member set taken at change counter `seq`. Pushes and removals
    /// newer than the snapshot (delivered before it) are kept; everything else follows it.
    pub(super) fn apply_full_sync(&mut self, now: Instant, seq: u64, entries: Vec<MemberEntry>) {
        self.relay.sync_sent = None;
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
