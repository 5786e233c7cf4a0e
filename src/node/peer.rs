//! One peer: its WireGuard session, its candidate addresses, and the path packets take to it.
//!
//! # Path state machine
//! ```text
//!            pong from candidate A                 no pong for DIRECT_TIMEOUT
//!  Relayed ───────────────────────────▶ Direct{A} ─────────────────────────────▶ Relayed
//!     ▲  probe every candidate, backoff      │  ping A every DIRECT_PING_INTERVAL     │
//!     └──────────────────────────────────────┴────────────────────────────────────────┘
//! ```
//! Traffic always flows: on the relay until a probe to a candidate address is answered, then on
//! that address. The WireGuard session is independent of the path, so switching loses nothing.
//! Probes are sealed disco pings; the answer (pong) proves the peer is reachable at that address
//! and measures the round trip. A ping received directly from an unknown address makes that
//! address a candidate (peer-reflexive) and is answered with a ping of our own at once, which is
//! what opens both NATs' mappings when both sides probe together; the address becomes a
//! candidate only once a pong from it proves the peer is really there.
//!
//! # Freshness and budgets (what a replaying or lying relay can do)
//! Every disco message carries the sender's wall clock and a random nonce inside its sealed
//! body ([`DiscoStamp`]). A [`ReplayCache`] per peer accepts a stamp only within
//! [`DISCO_WINDOW`] of our clock and only once, so a captured ping, call-me or spray replayed
//! later, from any source, is dropped before it can add candidates or trigger probes. Probes
//! to candidate addresses draw from a per-peer [`ProbeBucket`]: announced addresses, the
//! relay-observed address (only a hint: the relay may lie) and call-me addresses are probed
//! within that budget, never more.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::link::PeerLink;
use super::path_selection::PathSelection;
use crate::keys::PeerKey;
use crate::wire::{Announcement, DiscoStamp, MemberEntry};

/// First interval between probe rounds while relayed; doubles up to [`PROBE_BACKOFF_MAX`].
pub const PROBE_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest interval between probe rounds while relayed: a path that opens later (a NAT
/// mapping appearing, a peer roaming) is found within this time even without new information.
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Ping interval on a direct path. Also the NAT keepalive: well under the 30 s UDP mapping
/// timeouts common in home routers (RFC 4787 asks for at least 2 minutes; many use 30 s).
pub const DIRECT_PING_INTERVAL: Duration = Duration::from_secs(2);
/// A direct path with no pong for this long is abandoned for the relay: three pings lost,
/// so one lost packet never flaps the path.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(6_500);
/// A peer whose session carried no bytes either way for this long is *idle*: its direct path
/// is kept with sparse keepalives at the learned interval below instead of every
/// [`DIRECT_PING_INTERVAL`], and a relayed one is probed and measured rarely. Any byte ends it.
pub const IDLE_AFTER: Duration = Duration::from_secs(15);
/// The first idle keepalive interval on a NATed direct path: under the 30 s that the most
/// forgetful NATs keep an unanswered UDP mapping.
pub const IDLE_KEEPALIVE_START: Duration = Duration::from_secs(25);
/// The longest idle keepalive interval: under the 2 minutes RFC 4787 asks NATs to keep a UDP
/// mapping (and Linux keeps an answered one), with room for a lost keepalive. Between two
/// members without NAT this is the interval from the start (it only checks liveness).
pub const IDLE_KEEPALIVE_MAX: Duration = Duration::from_secs(100);
/// While idle and relayed: the relay RTT is measured this often (it only feeds `status`
/// then; the first byte measures it again at once).
pub const IDLE_RELAYED_INTERVAL: Duration = Duration::from_secs(1800);
/// While idle and relayed, probe rounds back off (doubling on past [`PROBE_BACKOFF_MAX`]) up
/// to this: a pair behind NATs that no round opened rarely gets a direct path by waiting, and
/// its first byte probes again at once.
pub const IDLE_PROBE_MAX: Duration = Duration::from_secs(1800);
/// Outstanding pings older than this are forgotten.
pub const PING_EXPIRY: Duration = Duration::from_secs(5);
/// RTT of the relayed path is measured this often while relayed.
pub const RELAY_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A faster direct candidate replaces the current direct path only if its round trip is below
/// this fraction of the current one: measured RTTs jitter by a few tens of percent, and a
/// 30 % margin keeps two similar paths from flapping on every pong.
pub const SWITCH_RTT_RATIO: f64 = 0.7;
/// Most candidate addresses kept per peer: more than a host announces ([`crate::wire::MAX_ENDPOINTS`])
/// plus its mapped and observed addresses, few enough that a probe round stays small.
pub const MAX_CANDIDATES: usize = 24;
/// A candidate learned from a call-me or a pong expires when nothing vouched for it for this
/// long. A relayed peer sends a call-me with every probe round, at least every
/// [`PROBE_BACKOFF_MAX`], and a direct path is confirmed by a pong every
/// [`DIRECT_PING_INTERVAL`]: four missed rounds mean the address is gone.
pub const CANDIDATE_TTL: Duration = Duration::from_secs(120);
/// A disco message is accepted only if its timestamp lies within this much of our clock, in
/// either direction. Members' clocks are NTP-synchronised to well under a second; a minute
/// tolerates a badly set clock while bounding how long the replay cache must remember.
pub const DISCO_WINDOW: Duration = Duration::from_secs(60);
/// Stamps remembered per peer. Legitimate disco traffic is a few messages per second (a
/// birthday probe's 100 pings per second is the exception, and those mostly never arrive);
/// when the cache is full the oldest stamp is forgotten and becomes the floor below which
/// nothing is accepted, so a full cache refuses rather than forgets a replay.
pub const REPLAY_CACHE_CAP: usize = 1024;
/// Probes to candidate addresses a peer's bucket holds: one probe round to every candidate
/// plus its call-me answer fit at once.
pub const PROBE_BURST: u32 = 2 * MAX_CANDIDATES as u32;
/// Tokens the probe bucket regains per second. The busiest legitimate pattern (the first
/// probe rounds, one per [`PROBE_BACKOFF_MIN`], each answered by a call-me round of the peer
/// to a handful of candidates) stays well below it; a peer flooding call-mes or a relay naming
/// a third party's address gets at most this many probes per second out of us.
pub const PROBE_REFILL_PER_SEC: u32 = 8;

/// Which way packets to a peer go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Path {
    /// Through the relay.
    Relayed,
    /// Straight to `addr` from our socket `socket` (0 is the main socket; others are the
    /// extra sockets of a birthday probe), last confirmed by a pong at `last_pong`.
    Direct {
        addr: SocketAddr,
        socket: u16,
        rtt: Duration,
        last_pong: Instant,
    },
}

/// A ping in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingPing {
    /// Where it went (`None`: through the relay).
    pub(crate) addr: Option<SocketAddr>,
    /// Which of our sockets sent it.
    pub(crate) socket: u16,
    pub(crate) sent: Instant,
    /// Set for pings asked for by the operator (`meshvpn ping`): reported as an event.
    pub(crate) request: Option<u64>,
}

/// Everything the node keeps about one other member.
pub(crate) struct Peer {
    pub(crate) key: PeerKey,
    pub(crate) entry: MemberEntry,
    pub(crate) announcement: Announcement,
    /// The WireGuard session (the only owner of boringtun's `Tunn`).
    pub(crate) link: PeerLink,
    pub(crate) disco_key: [u8; 32],
    /// Path selection for this peer (its path, candidates, probes, birthday probing).
    pub(crate) paths: PathSelection,
    /// Set when the relay's member list stopped listing this peer while its direct path
    /// still answered (see `membership::STALE_GRACE`).
    pub(crate) stale_since: Option<Instant>,
    /// Limits the forwards this peer may ask us to pass on (see `helping`).
    pub(crate) forwards: ProbeBucket,
    /// Limits the datagrams this peer may have us carry to another member (see `helping`).
    pub(crate) carry: super::helping::CarryBucket,
}

/// Why a disco message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stale {
    /// Its timestamp is further than [`DISCO_WINDOW`] from our clock.
    OutsideWindow,
    /// Seen before, or older than what a full cache still remembers.
    Replayed,
}

/// The disco stamps accepted from one peer within the window (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct ReplayCache {
    seen: BTreeSet<DiscoStamp>,
    /// Stamps at or below this timestamp were forgotten by a full cache: refused.
    floor_ms: u64,
}

impl ReplayCache {
    /// Accepts `stamp` once, if it lies within [`DISCO_WINDOW`] of `wall_ms` (our clock).
    pub(crate) fn check(&mut self, stamp: DiscoStamp, wall_ms: u64) -> Result<(), Stale> {
        let window = DISCO_WINDOW.as_millis() as u64;
        if stamp.ts_ms.abs_diff(wall_ms) > window {
            return Err(Stale::OutsideWindow);
        }
        // Stamps older than the window are refused by the check above: forget them.
        let oldest = wall_ms.saturating_sub(window);
        while self.seen.first().is_some_and(|s| s.ts_ms < oldest) {
            self.seen.pop_first();
        }
        if stamp.ts_ms <= self.floor_ms || self.seen.contains(&stamp) {
            return Err(Stale::Replayed);
        }
        if self.seen.len() >= REPLAY_CACHE_CAP {
            if let Some(evicted) = self.seen.pop_first() {
                self.floor_ms = self.floor_ms.max(evicted.ts_ms);
            }
            if stamp.ts_ms <= self.floor_ms {
                return Err(Stale::Replayed);
            }
        }
        self.seen.insert(stamp);
        Ok(())
    }

    /// Stamps remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.seen.len()
    }
}

/// A token bucket on `now` limiting probes to one peer's candidate addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeBucket {
    /// Tokens in thousandths, so that refill is exact at millisecond resolution.
    milli_tokens: u64,
    last: Instant,
}

impl ProbeBucket {
    /// A full bucket at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            milli_tokens: u64::from(PROBE_BURST) * 1000,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_millis() as u64;
        self.last = self.last.max(now);
        let cap = u64::from(PROBE_BURST) * 1000;
        self.milli_tokens =
            (self.milli_tokens + elapsed.saturating_mul(u64::from(PROBE_REFILL_PER_SEC))).min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

impl Peer {
    pub(crate) fn virtual_ip(&self) -> Ipv4Addr {
        self.announcement.virtual_ip
    }

    /// Sets the peer's announced endpoints and relay-observed address as its announced
    /// candidates, keeping learned ones (call-mes, confirmed pongs). Returns whether anything
    /// new appeared.
    pub(crate) fn refresh_candidates(&mut self) -> bool {
        let announced = self.announcement.endpoints.iter().copied();
        self.paths
            .set_announced(announced.chain([self.entry.observed]))
    }

    /// The direct address and our socket for it, if the path is direct.
    pub(crate) fn direct(&self) -> Option<(SocketAddr, u16)> {
        self.paths.direct()
    }

    /// The direct path (address, our socket) while it still answers at `now`.
    pub(crate) fn live_direct(&self, now: Instant) -> Option<(SocketAddr, u16)> {
        self.direct().filter(|_| self.paths.direct_alive(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn stamp(ts_ms: u64, nonce: u64) -> DiscoStamp {
        DiscoStamp { ts_ms, nonce }
    }

    #[test]
    fn replay_cache_accepts_each_stamp_once_within_the_window() {
        let mut c = ReplayCache::default();
        assert_eq!(c.check(stamp(T, 1), T), Ok(()));
        assert_eq!(c.check(stamp(T, 1), T + 10), Err(Stale::Replayed));
        assert_eq!(c.check(stamp(T, 2), T + 10), Ok(()), "another nonce");
        let window = DISCO_WINDOW.as_millis() as u64;
        assert_eq!(
            c.check(stamp(T + window, 3), T),
            Ok(()),
            "edge of the window"
        );
        assert_eq!(
            c.check(stamp(T + window + 1, 4), T),
            Err(Stale::OutsideWindow),
            "from the future"
        );
        assert_eq!(
            c.check(stamp(T - window - 1, 5), T),
            Err(Stale::OutsideWindow),
            "too old"
        );
        // Once the window has moved past a stamp it is forgotten, and refused by the window.
        let later = T + 3 * window;
        assert_eq!(c.check(stamp(later, 6), later), Ok(()));
        assert_eq!(c.len(), 1, "old stamps pruned");
        assert_eq!(c.check(stamp(T, 1), later), Err(Stale::OutsideWindow));
    }

    #[test]
    fn a_full_replay_cache_refuses_what_it_forgot() {
        let mut c = ReplayCache::default();
        for i in 0..REPLAY_CACHE_CAP as u64 {
            assert_eq!(c.check(stamp(T + i, i), T), Ok(()));
        }
        assert_eq!(c.len(), REPLAY_CACHE_CAP);
        // One more evicts the oldest, whose replay is still refused.
        assert_eq!(c.check(stamp(T + 5_000, 9_999), T), Ok(()));
        assert_eq!(c.len(), REPLAY_CACHE_CAP, "bounded");
        assert_eq!(c.check(stamp(T, 0), T), Err(Stale::Replayed));
        // Fresh stamps above the floor still pass.
        assert_eq!(c.check(stamp(T + 6_000, 1), T), Ok(()));
    }

    #[test]
    fn probe_bucket_allows_a_burst_then_its_refill_rate() {
        let t0 = Instant::now();
        let mut b = ProbeBucket::new(t0);
        let burst = (0..1000).take_while(|_| b.take(t0)).count();
        assert_eq!(burst, PROBE_BURST as usize);
        assert!(!b.take(t0));
        // Ten seconds of refill, taken at once: exactly the rate, never above the burst.
        let t1 = t0 + Duration::from_secs(10);
        let n = (0..1000).take_while(|_| b.take(t1)).count();
        assert_eq!(n, (PROBE_REFILL_PER_SEC * 10).min(PROBE_BURST) as usize);
        // Steady state: one token every 1/rate seconds.
        let step = Duration::from_millis(1000 / u64::from(PROBE_REFILL_PER_SEC));
        let mut now = t1;
        let mut got = 0;
        for _ in 0..80 {
            now += step;
            got += usize::from(b.take(now)) + usize::from(b.take(now));
        }
        assert_eq!(got, 80, "one per step, not two");
    }
}
