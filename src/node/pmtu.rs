//! Path MTU discovery for one peer (datagram packetization-layer PMTUD, RFC 8899): the largest
//! inner packet that reaches the peer on the current path, found with padded, authenticated
//! probes that do not depend on ICMP reaching us.
//!
//! # Algorithm
//! Sizes are inner packet sizes (what the TUN hands us); a probe for size `s` is a sealed
//! disco message exactly as large as a WireGuard data message carrying `s` bytes, sent on the
//! peer's current path (directly, or relay-framed like the data), and confirmed only by the
//! peer's authenticated acknowledgement.
//! ```text
//!          path confirmed          ack for s: lo = s            no candidate in (lo, hi]
//!  (new) ───────────────▶ Searching{lo, hi} ◀──────┐  ──────────────────────────────▶ Done
//!    ▲  path change          │ MAX_PROBES lost: hi = s − 1 ───┘                          │
//!    └───────────────────────┴──────────────── REPROBE_INTERVAL, path change ◀───────────┘
//! ```
//! - The **base** is what a [`BASE_UNDERLAY_MTU`] underlay leaves after the path's overhead; it
//!   is assumed to work (every IPv6 path and practically every IPv4 path carries 1280) and is
//!   what the peer's packets are held to until a probe confirms more.
//! - The search tries the **ceiling** (the TUN MTU) first, the common case on a 1500-byte
//!   underlay, then bisects over the sizes that common underlay MTUs leave ([`PLATEAUS`]: PPPoE
//!   1492, DS-Lite 1460, 1400, … in 20-byte steps down to 1300), so it takes a handful of
//!   probes instead of one per byte; an odd underlay MTU costs at most 20 bytes.
//! - Each size gets [`MAX_PROBES`] tries [`PROBE_TIMEOUT`] apart before it counts as too big, so
//!   ordinary loss does not shrink the MTU.
//! - Every acknowledged size is used at once; when a search ends its result is the MTU (which
//!   lets a periodic re-search lower it if the path shrank). A search starts again after every
//!   path change and every [`REPROBE_INTERVAL`]; the periodic one waits while the peer is
//!   idle (the node checks [`PathMtu::is_done`]) and runs as soon as traffic resumes.
//! - A send the host refuses as too large (`EMSGSIZE`) lowers the upper bound and the MTU at
//!   once ([`PathMtu::handle_too_big`]).
//!
//! # Driving contract
//! Plain data: the node calls [`PathMtu::poll_probe`] when [`PathMtu::poll_timeout`] passes
//! (while the path is confirmed), sends a probe of the size it returns with the transaction id
//! it drew, and feeds acknowledgements to [`PathMtu::handle_ack`] and path changes to
//! [`PathMtu::handle_path_change`]. [`PathMtu::mtu`] is the size packets are held to.

use std::time::{Duration, Instant};

use super::mtu::path_overhead;

/// The underlay MTU assumed to work on every path: the IPv6 minimum (RFC 8200), which IPv4
/// paths in practice carry too (RFC 8899's BASE_PLPMTU is derived the same way).
pub(crate) const BASE_UNDERLAY_MTU: u16 = 1280;
/// How long a probe may take to be acknowledged. Round trips between members, relayed ones
/// included, are well under 300 ms; a second leaves room for a slow relay without making a
/// search that meets two or three too-large sizes take long.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Tries per size before it counts as too large (RFC 8899's MAX_PROBES): one lost probe must
/// not shrink the MTU.
pub(crate) const MAX_PROBES: u8 = 3;
/// A finished search runs again after this long, to notice a path that grew or shrank without
/// a path change (RFC 8899's PMTU_RAISE_TIMER is 600 s).
pub(crate) const REPROBE_INTERVAL: Duration = Duration::from_secs(600);
/// Underlay MTUs worth trying, largest first: jumbo frames, FDDI, Ethernet, PPPoE (1492),
/// DS-Lite (1460) and tunnels in 20-byte steps down to just above the base.
const PLATEAUS: [u16; 19] = [
    9000, 8192, 4352, 2002, 1500, 1492, 1480, 1472, 1460, 1450, 1440, 1420, 1400, 1380, 1360, 1340,
    1320, 1300, 1280,
];
/// The smallest MTU a refused send can push a peer to (the IPv4 minimum datagram size).
const MIN_MTU: u16 = 576;

/// What the overhead of a path depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathKind {
    /// The underlay is IPv6 (a 40-byte header instead of 20).
    pub(crate) ipv6: bool,
    /// The path goes through the relay (its frame adds to every packet).
    pub(crate) relayed: bool,
}

impl PathKind {
    /// Bytes between an inner packet and the underlay MTU on this path.
    pub(crate) fn overhead(self) -> u16 {
        path_overhead(self.ipv6, self.relayed)
    }
}

/// One peer's path MTU and the search for it (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct PathMtu {
    kind: PathKind,
    /// The TUN MTU: no inner packet is larger.
    ceiling: u16,
    /// The size packets to the peer are held to now.
    mtu: u16,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// `lo` is confirmed, nothing above `hi` fits; the next probe goes out at `next_at`
    /// unless one is in flight.
    Searching {
        lo: u16,
        hi: u16,
        probe: Option<InFlight>,
        next_at: Instant,
    },
    /// The search ended; the next starts at `next_search`.
    Done { next_search: Instant },
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    tx: [u8; 12],
    size: u16,
    sent: Instant,
    attempts: u8,
}

impl PathMtu {
    /// A peer on a path of `kind`, the TUN MTU being `ceiling`: at the base, searching as soon
    /// as the path is confirmed.
    pub(crate) fn new(now: Instant, ceiling: u16, kind: PathKind) -> Self {
        let mut p = Self {
            kind,
            ceiling,
            mtu: ceiling,
            state: State::Done { next_search: now },
        };
        p.restart(now);
        p
    }

    /// The largest inner packet the peer's path carries, as far as is known now.
    pub(crate) fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether a search has ended and none is under way (only the periodic re-search is
    /// pending). An idle peer's re-search waits until it is active again: probing a path
    /// nothing uses costs full-size datagrams and tells nothing anyone needs now.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// The base on the current path (never above the ceiling).
    pub(crate) fn base(&self) -> u16 {
        BASE_UNDERLAY_MTU
            .saturating_sub(self.kind.overhead())
            .min(self.ceiling)
    }

    /// The kind of path the MTU is for.
    pub(crate) fn kind(&self) -> PathKind {
        self.kind
    }

    /// Whether a search is running.
    #[cfg(test)]
    pub(crate) fn is_searching(&self) -> bool {
        matches!(self.state, State::Searching { .. })
    }

    /// The path changed: back to the base of the new path, searching again.
    pub(crate) fn handle_path_change(&mut self, now: Instant, kind: PathKind) {
        self.kind = kind;
        self.restart(now);
    }

    /// The TUN MTU changed.
    pub(crate) fn set_ceiling(&mut self, now: Instant, ceiling: u16) {
        if ceiling != self.ceiling {
            self.ceiling = ceiling;
            self.restart(now);
        }
    }

    /// When [`Self::poll_probe`] next has something to do.
    pub(crate) fn poll_timeout(&self) -> Instant {
        match self.state {
            State::Searching { probe: Some(p), .. } => p.sent + PROBE_TIMEOUT,
            State::Searching { next_at, .. } => next_at,
            State::Done { next_search } => next_search,
        }
    }

    /// Runs what is due at `now`: a lost probe is retried or its size ruled out, a finished
    /// search restarts after [`REPROBE_INTERVAL`]. Returns the inner size to probe now and the
    /// transaction id (drawn from `tx`) it goes out with.
    pub(crate) fn poll_probe(
        &mut self,
        now: Instant,
        tx: impl FnOnce() -> [u8; 12],
    ) -> Option<(u16, [u8; 12])> {
        if let State::Done { next_search } = self.state {
            if now < next_search {
                return None;
            }
            self.state = State::Searching {
                lo: self.base(),
                hi: self.ceiling,
                probe: None,
                next_at: now,
            };
        }
        let State::Searching {
            lo,
            mut hi,
            probe,
            next_at,
        } = self.state
        else {
            return None;
        };
        let (size, attempts) = match probe {
            Some(p) if now < p.sent + PROBE_TIMEOUT => return None,
            Some(p) if p.attempts < MAX_PROBES => (p.size, p.attempts + 1),
            Some(p) => {
                hi = p.size - 1;
                match self.next_size(lo, hi) {
                    Some(s) => (s, 1),
                    None => return self.finish(now, lo),
                }
            }
            None if now < next_at => return None,
            None => match self.next_size(lo, hi) {
                Some(s) => (s, 1),
                None => return self.finish(now, lo),
            },
        };
        let tx = tx();
        self.state = State::Searching {
            lo,
            hi,
            probe: Some(InFlight {
                tx,
                size,
                sent: now,
                attempts,
            }),
            next_at: now,
        };
        Some((size, tx))
    }

    /// The peer acknowledged the probe `tx`: its size fits. Returns whether the MTU changed.
    pub(crate) fn handle_ack(&mut self, now: Instant, tx: &[u8; 12]) -> bool {
        let State::Searching {
            probe: Some(p), hi, ..
        } = self.state
        else {
            return false;
        };
        if p.tx != *tx {
            return false;
        }
        let before = self.mtu;
        self.mtu = self.mtu.max(p.size);
        self.state = State::Searching {
            lo: p.size,
            hi,
            probe: None,
            next_at: now,
        };
        if self.next_size(p.size, hi).is_none() {
            self.finish(now, p.size);
        }
        self.mtu != before
    }

    /// The host refused to send a datagram carrying `inner` bytes to this peer as too large
    /// (`EMSGSIZE`): nothing that large fits, from now on and in this search.
    pub(crate) fn handle_too_big(&mut self, now: Instant, inner: u16) {
        let fits = inner.saturating_sub(1).max(MIN_MTU);
        self.mtu = self.mtu.min(fits);
        let (lo, hi) = match self.state {
            State::Searching { lo, hi, .. } => (lo.min(fits), hi.min(fits)),
            State::Done { .. } => (self.mtu, fits),
        };
        self.state = State::Searching {
            lo,
            hi,
            probe: None,
            next_at: now,
        };
    }

    /// Back to the base, a new search due at `now`.
    fn restart(&mut self, now: Instant) {
        self.mtu = self.base();
        self.state = State::Searching {
            lo: self.mtu,
            hi: self.ceiling,
            probe: None,
            next_at: now,
        };
    }

    /// The search ended with `lo` as the result.
    fn finish(&mut self, now: Instant, lo: u16) -> Option<(u16, [u8; 12])> {
        self.mtu = lo;
        self.state = State::Done {
            next_search: now + REPROBE_INTERVAL,
        };
        None
    }

    /// The next size to try in `(lo, hi]`: the ceiling while nothing has failed, then the
    /// middle of the plateau sizes left.
    fn next_size(&self, lo: u16, hi: u16) -> Option<u16> {
        if lo >= hi {
            return None;
        }
        if hi == self.ceiling {
            return Some(hi);
        }
        let overhead = self.kind.overhead();
        let mut sizes: Vec<u16> = PLATEAUS
            .iter()
            .map(|u| u.saturating_sub(overhead))
            .filter(|s| *s > lo && *s <= hi)
            .collect();
        sizes.sort_unstable();
        sizes.get(sizes.len().saturating_sub(1) / 2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECT: PathKind = PathKind {
        ipv6: false,
        relayed: false,
    };
    const RELAYED: PathKind = PathKind {
        ipv6: false,
        relayed: true,
    };

    /// Runs a search against a path whose underlay carries `underlay` bytes, losing every
    /// probe whose `lose` returns true; returns the MTU found, the time it took and the probes
    /// sent.
    fn converge(
        p: &mut PathMtu,
        t0: Instant,
        underlay: u16,
        mut lose: impl FnMut(u32) -> bool,
    ) -> (u16, Duration, u32) {
        let mut now = t0;
        let mut sent = 0u32;
        for _ in 0..200 {
            if sent > 0 && !p.is_searching() {
                break;
            }
            now = p.poll_timeout().max(now);
            let tx = [sent as u8; 12];
            let Some((size, _)) = p.poll_probe(now, || tx) else {
                if p.is_searching() {
                    continue;
                }
                break;
            };
            sent += 1;
            let fits = size + p.kind.overhead() <= underlay;
            if fits && !lose(sent) {
                let ack_at = now + Duration::from_millis(40);
                assert!(p.handle_ack(ack_at, &tx) || p.mtu() >= size);
                now = ack_at;
            }
        }
        (p.mtu(), now - t0, sent)
    }

    #[test]
    fn base_and_overhead_per_path() {
        let t0 = Instant::now();
        let p = PathMtu::new(t0, 1380, DIRECT);
        assert_eq!(p.base(), 1220);
        assert_eq!(p.mtu(), 1220, "held to the base until confirmed");
        let r = PathMtu::new(t0, 1380, RELAYED);
        assert_eq!(r.base(), 1184);
        let v6 = PathMtu::new(
            t0,
            1380,
            PathKind {
                ipv6: true,
                relayed: true,
            },
        );
        assert_eq!(v6.base(), 1164);
        // A TUN MTU below the base: nothing to search.
        let mut small = PathMtu::new(t0, 1000, DIRECT);
        assert_eq!(small.mtu(), 1000);
        assert_eq!(small.poll_probe(t0, || [0; 12]), None);
        assert!(!small.is_searching());
    }

    #[test]
    fn a_clean_1500_path_is_confirmed_with_one_probe() {
        let t0 = Instant::now();
        let mut p = PathMtu::new(t0, 1380, DIRECT);
        let (mtu, took, sent) = converge(&mut p, t0, 1500, |_| false);
        assert_eq!((mtu, sent), (1380, 1));
        assert!(took < Duration::from_millis(100));
        assert_eq!(
            p.poll_timeout(),
            t0 + Duration::from_millis(40) + REPROBE_INTERVAL
        );
    }

    #[test]
    fn common_underlays_converge_to_what_they_carry() {
        for (underlay, kind, want) in [
            (1280, DIRECT, 1220),
            (1400, DIRECT, 1340),
            (1460, DIRECT, 1380),
            (1400, RELAYED, 1304),
            (1280, RELAYED, 1184),
            (1440, RELAYED, 1344),
        ] {
            let t0 = Instant::now();
            let mut p = PathMtu::new(t0, 1380, kind);
            let (mtu, took, sent) = converge(&mut p, t0, underlay, |_| false);
            println!("{underlay} {kind:?}: {mtu} after {sent} probes, {took:?}");
            assert_eq!(mtu, want, "{underlay} {kind:?}");
            assert!(mtu + kind.overhead() <= underlay);
            assert!(sent <= 16, "{sent} probes");
            assert!(took < Duration::from_secs(20), "{took:?}");
        }
    }

    #[test]
    fn one_lost_probe_does_not_shrink_the_mtu() {
        let t0 = Instant::now();
        let mut p = PathMtu::new(t0, 1380, DIRECT);
        let (mtu, _, sent) = converge(&mut p, t0, 1500, |n| n == 1);
        assert_eq!((mtu, sent), (1380, 2));
    }

    #[test]
    fn acks_for_other_probes_are_ignored() {
        let t0 = Instant::now();
        let mut p = PathMtu::new(t0, 1380, DIRECT);
        assert_eq!(p.poll_probe(t0, || [7; 12]), Some((1380, [7; 12])));
        assert!(!p.handle_ack(t0, &[8; 12]));
        assert_eq!(p.mtu(), 1220);
        assert!(p.handle_ack(t0, &[7; 12]));
        assert_eq!(p.mtu(), 1380);
        assert!(!p.handle_ack(t0, &[7; 12]), "only once");
    }

    #[test]
    fn a_path_change_restarts_at_the_new_base_and_a_finished_search_reprobes() {
        let t0 = Instant::now();
        let mut p = PathMtu::new(t0, 1380, DIRECT);
        converge(&mut p, t0, 1500, |_| false);
        assert_eq!(p.mtu(), 1380);
        let t1 = t0 + Duration::from_secs(5);
        p.handle_path_change(t1, RELAYED);
        assert_eq!(p.mtu(), 1184);
        assert_eq!(p.poll_timeout(), t1);
        let (mtu, _, _) = converge(&mut p, t1, 1400, |_| false);
        assert_eq!(mtu, 1304);
        // The path shrinks without a path change: the periodic search finds it.
        let t2 = p.poll_timeout();
        assert!(t2 >= t1 + REPROBE_INTERVAL);
        let (mtu, _, _) = converge(&mut p, t2, 1280, |_| false);
        assert_eq!(mtu, 1184);
    }

    #[test]
    fn a_refused_send_lowers_the_mtu_at_once() {
        let t0 = Instant::now();
        let mut p = PathMtu::new(t0, 1380, DIRECT);
        converge(&mut p, t0, 1500, |_| false);
        let t1 = t0 + Duration::from_secs(1);
        p.handle_too_big(t1, 1300);
        assert_eq!(p.mtu(), 1299);
        assert!(p.is_searching());
        let (mtu, _, _) = converge(&mut p, t1, 1500, |_| false);
        assert!((1280..1300).contains(&mtu), "{mtu}");
    }
}
