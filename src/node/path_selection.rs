//! Path selection for one peer: which way packets to it go, and the probing that finds and
//! keeps a direct path (see [`super::peer`] for the state machine and its constants).
//!
//! # Algorithm
//! While relayed, every candidate address is pinged in rounds that back off from
//! [`PROBE_BACKOFF_MIN`] to [`PROBE_BACKOFF_MAX`], each round with a call-me through the relay
//! so the peer probes us at the same moment; the relayed path's RTT is measured every
//! [`RELAY_PING_INTERVAL`]. The first pong from a candidate (on the socket the ping left from)
//! makes the path direct. A direct path is pinged every [`DIRECT_PING_INTERVAL`] (the NAT
//! keepalive) and falls back to the relay after [`DIRECT_TIMEOUT`] without a pong. A pong from
//! another direct candidate replaces the current one only if its RTT is below
//! [`SWITCH_RTT_RATIO`] of the current one, or the current one has missed two pings.
//!
//! # Quiet when idle
//! A peer whose session moved no bytes for [`IDLE_AFTER`] is idle. Its direct path is then
//! pinged only every *keepalive interval*, learned per peer: it starts at
//! [`IDLE_KEEPALIVE_START`] (or [`IDLE_KEEPALIVE_MAX`] when neither side is behind a NAT) and
//! grows by half after every idle keepalive that was answered, up to a ceiling; a keepalive
//! that goes unanswered (the path falls back to the relay) lowers the ceiling to the last
//! interval that worked. So the keepalives come as often as the NATs on that path need, not
//! more. The interval is also held to what our own NAT is known to keep, as the relay session
//! learned it: a too-long guess there costs one registration, here a direct path. A ping from the peer on the idle direct path counts as a keepalive of ours (its ping
//! and our pong refresh both NATs), so an idle pair settles on one side pinging. A relayed
//! idle peer's RTT is measured every [`IDLE_RELAYED_INTERVAL`]; its probe rounds keep backing
//! off, doubling past [`PROBE_BACKOFF_MAX`], to [`IDLE_PROBE_MAX`].
//! The first byte after idleness makes the peer active again: a direct path is pinged at once
//! (and abandoned within [`DIRECT_TIMEOUT`] if it died meanwhile), a relayed one is probed
//! again from the shortest backoff.
//!
//! # Driving contract
//! Plain data, no I/O: the node calls [`PathSelection::handle_timeout`] at
//! [`PathSelection::poll_timeout`] and sends the [`Probe`]s it lists (sealing them is the
//! node's job, which records each ping with [`PathSelection::record_ping`]); it feeds pongs to
//! [`PathSelection::handle_pong`], direct pings to [`PathSelection::handle_ping_from`] and
//! call-mes to [`PathSelection::handle_call_me`]. Each returns the new path when it changed.
//! Every disco message is first checked against [`PathSelection::replay`] (freshness).
//!
//! # Candidates and budgets
//! Candidates come from two places. The peer's announcement and the relay-observed address
//! are replaced whole whenever the member entry changes ([`PathSelection::set_announced`]).
//! Addresses from call-mes, and peer-reflexive addresses (a ping arrived from an address we
//! did not know, we pinged it back, and an authenticated pong came from it), are *learned*:
//! each expires after [`CANDIDATE_TTL`] unless a call-me or pong vouches for it again, and
//! when [`MAX_CANDIDATES`] are held the least recently vouched makes room. A ping from an
//! unknown address adds nothing by itself: it is answered and pinged back, within budget.
//! Every probe to a candidate (probe rounds, call-me answers, ping-backs) takes a token from
//! the peer's [`ProbeBucket`]; keepalives on the confirmed direct path and pings through the
//! relay do not.
//! Birthday probing (hard NAT pairs) rides on the same peer state, see [`super::birthday`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::birthday::Birthday;
use super::peer::{
    Path, PendingPing, ProbeBucket, ReplayCache, CANDIDATE_TTL, DIRECT_PING_INTERVAL,
    DIRECT_TIMEOUT, IDLE_AFTER, IDLE_KEEPALIVE_MAX, IDLE_KEEPALIVE_START, IDLE_PROBE_MAX,
    IDLE_RELAYED_INTERVAL, MAX_CANDIDATES, PING_EXPIRY, PROBE_BACKOFF_MAX, PROBE_BACKOFF_MIN,
    RELAY_PING_INTERVAL, SWITCH_RTT_RATIO,
};
use super::pmtu::{PathKind, PathMtu};

/// How often a peer's byte counters are looked at: by the node's once-a-second tick, for
/// every peer whose path selection has not run for this long (a local look, nothing is sent).
const ACTIVITY_CHECK: Duration = Duration::from_secs(1);
/// How long an idle keepalive waits for its pong before the path counts as lost: what
/// [`DIRECT_TIMEOUT`] leaves after the active ping interval, so idle and active paths fail
/// alike once a ping goes out.
const ANSWER_WINDOW: Duration = Duration::from_millis(4_500);

/// The learned idle keepalive interval of a direct path.
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval: Duration,
    /// Highest interval allowed: lowered to the last good one when a longer one failed.
    ceiling: Duration,
    /// When the idle keepalive in flight left (its answer proves `interval` works).
    idle_ping_sent: Option<Instant>,
    /// The longest interval our own NAT is known to allow (see `PathSelection::set_nat_cap`).
    nat_cap: Duration,
    /// Whether our keepalives lead: the peer's do not stand in for them (see
    /// `PathSelection::set_leads`).
    leads: bool,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: IDLE_KEEPALIVE_START,
            ceiling: IDLE_KEEPALIVE_MAX,
            idle_ping_sent: None,
            nat_cap: IDLE_KEEPALIVE_MAX,
            leads: false,
        }
    }
}

/// What a timer run wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// A ping to `addr` from our socket `socket` (`addr` `None`: through the relay).
    Ping {
        addr: Option<SocketAddr>,
        socket: u16,
    },
    /// A call-me through the relay.
    CallMe,
}

/// What a pong told us.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pong {
    /// The ping it answers (its destination and the operator's request, if any).
    pub(crate) ping: PendingPing,
    /// The measured round trip.
    pub(crate) rtt: Duration,
    /// The new path, if the pong changed it.
    pub(crate) changed: Option<Path>,
}

/// One peer's path and the probing state around it.
#[derive(Debug)]
pub(crate) struct PathSelection {
    path: Path,
    /// The peer's announced addresses and its relay-observed address.
    announced: BTreeSet<SocketAddr>,
    /// Addresses learned from call-mes and confirmed pongs, with when each was last vouched for.
    learned: BTreeMap<SocketAddr, Instant>,
    /// Limits probes to candidate addresses.
    bucket: ProbeBucket,
    /// Probes the bucket refused (for tests and debugging).
    suppressed: u64,
    /// An address the peer began a new WireGuard handshake from (it restarted or moved):
    /// a confirmed pong from there takes the path even while the old one still looks alive.
    roam: Option<(SocketAddr, u16)>,
    /// Disco stamps accepted from this peer.
    pub(crate) replay: ReplayCache,
    outstanding: BTreeMap<[u8; 12], PendingPing>,
    next_probe: Instant,
    backoff: Duration,
    next_relay_ping: Instant,
    relay_rtt: Option<Duration>,
    /// Since when the path has been relayed (for starting a birthday probe).
    relayed_since: Instant,
    /// Birthday probing with this peer.
    pub(crate) birthday: Birthday,
    /// The direct path counts as alive until then (a pong moves it on).
    alive_until: Instant,
    /// The session's byte counters at the last look, and when they last moved.
    counts: (u64, u64),
    last_active: Instant,
    /// When the timers last ran (the next look at the counters is due after it).
    last_check: Instant,
    keepalive: Keepalive,
    /// The path MTU on the current path and its search (the node restarts it on every path
    /// change, see `paths`).
    pub(crate) pmtu: PathMtu,
}

impl PathSelection {
    /// Relayed, probing at once.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            path: Path::Relayed,
            announced: BTreeSet::new(),
            learned: BTreeMap::new(),
            bucket: ProbeBucket::new(now),
            suppressed: 0,
            roam: None,
            replay: ReplayCache::default(),
            outstanding: BTreeMap::new(),
            next_probe: now,
            backoff: PROBE_BACKOFF_MIN,
            next_relay_ping: now,
            relay_rtt: None,
            relayed_since: now,
            birthday: Birthday::default(),
            alive_until: now,
            counts: (0, 0),
            last_active: now,
            last_check: now,
            keepalive: Keepalive::default(),
            pmtu: PathMtu::new(
                now,
                crate::config::DEFAULT_MTU,
                PathKind {
                    ipv6: false,
                    relayed: true,
                },
            ),
        }
    }

    /// Whether the current path is known to carry packets to the peer (a direct path always
    /// is: only a pong makes one; the relayed path once a ping through it was answered), so a
    /// lost MTU probe on it means the probe was too large.
    pub(crate) fn path_confirmed(&self) -> bool {
        match self.path {
            Path::Direct { .. } => true,
            Path::Relayed => self.relay_rtt.is_some(),
        }
    }

    /// Tells path selection the session's activity counters (see `PeerLink::activity`);
    /// moving counters mean the peer is active. Going from idle to active re-checks the path at once.
    pub(crate) fn note_activity(&mut self, now: Instant, counts: (u64, u64)) {
        if counts == self.counts {
            return;
        }
        self.counts = counts;
        let was_idle = self.is_idle(now);
        self.last_active = now;
        if was_idle {
            self.next_probe = now;
            if self.is_relayed() {
                self.backoff = PROBE_BACKOFF_MIN;
                self.next_relay_ping = now;
            } else {
                self.alive_until = self.alive_until.min(now + DIRECT_TIMEOUT);
                self.keepalive.idle_ping_sent = None;
            }
        }
    }

    /// Whether no byte moved for [`IDLE_AFTER`].
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_active) >= IDLE_AFTER
    }

    /// The interval the idle keepalive uses now: the learned one, held to what our NAT is
    /// known to keep (see [`Self::set_nat_cap`]).
    fn idle_interval(&self) -> Duration {
        self.keepalive.interval.min(self.keepalive.nat_cap)
    }

    /// Makes our idle keepalives the leading ones (the peer's then do not defer ours; ours
    /// defer the peer's). The two sides of a path must disagree; the node picks by key.
    pub(crate) fn set_leads(&mut self, leads: bool) {
        self.keepalive.leads = leads;
    }

    /// Holds the idle keepalive interval to `cap`, how long our NAT is known to keep an idle
    /// mapping (learned on the relay session, where a too-long guess costs one registration
    /// rather than a direct path).
    pub(crate) fn set_nat_cap(&mut self, cap: Duration) {
        self.keepalive.nat_cap = cap.max(IDLE_KEEPALIVE_START);
    }

    /// Starts the idle keepalive interval at its maximum when neither side is behind a NAT
    /// (the keepalive then only checks liveness).
    pub(crate) fn set_no_nat(&mut self, no_nat: bool) {
        if no_nat && self.keepalive.ceiling == IDLE_KEEPALIVE_MAX {
            self.keepalive.interval = IDLE_KEEPALIVE_MAX;
        }
    }

    /// The current path.
    pub(crate) fn path(&self) -> Path {
        self.path
    }

    /// Whether packets go through the relay.
    pub(crate) fn is_relayed(&self) -> bool {
        matches!(self.path, Path::Relayed)
    }

    /// Since when the path has been relayed.
    pub(crate) fn relayed_since(&self) -> Instant {
        self.relayed_since
    }

    /// When the next probe round is due.
    pub(crate) fn next_probe(&self) -> Instant {
        self.next_probe
    }

    /// The direct address and our socket for it, if the path is direct.
    pub(crate) fn direct(&self) -> Option<(SocketAddr, u16)> {
        match self.path {
            Path::Direct { addr, socket, .. } => Some((addr, socket)),
            Path::Relayed => None,
        }
    }

    /// RTT on the current path.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.path {
            Path::Direct { rtt, .. } => Some(rtt),
            Path::Relayed => self.relay_rtt,
        }
    }

    /// Whether the direct path still answers (a pong within [`DIRECT_TIMEOUT`], or within the
    /// keepalive interval while idle).
    pub(crate) fn direct_alive(&self, now: Instant) -> bool {
        match self.path {
            Path::Direct { .. } => now < self.alive_until,
            Path::Relayed => false,
        }
    }

    /// Replaces the announced candidates (the peer's announcement and its relay-observed
    /// address); returns whether any was new. Unusable addresses are skipped; together with
    /// the learned ones at most [`MAX_CANDIDATES`] are kept.
    pub(crate) fn set_announced(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> bool {
        let mut next = BTreeSet::new();
        for a in addrs {
            if next.len() < MAX_CANDIDATES && usable_candidate(&a) {
                next.insert(a);
            }
        }
        let new = next.iter().any(|a| !self.announced.contains(a));
        self.announced = next;
        self.learned.retain(|a, _| !self.announced.contains(a));
        while self.candidate_count() > MAX_CANDIDATES && self.evict_learned() {}
        new
    }

    /// Every candidate address, in order.
    pub(crate) fn candidates(&self) -> BTreeSet<SocketAddr> {
        self.announced
            .iter()
            .chain(self.learned.keys())
            .copied()
            .collect()
    }

    /// Probes the bucket refused so far.
    #[cfg(test)]
    pub(crate) fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Starts probing again soon (new information about the peer): a round at once and,
    /// while active, the shortest backoff again. An idle peer gets the one round and keeps
    /// its long backoff: a peer behind a symmetric NAT announces a new mapping now and then,
    /// and each must not start a burst of rounds nobody is waiting for.
    pub(crate) fn reset_backoff(&mut self, now: Instant) {
        if !self.is_idle(now) {
            self.backoff = PROBE_BACKOFF_MIN;
        }
        if self.is_relayed() {
            self.next_probe = now;
        }
    }

    /// Remembers a ping sent with transaction id `tx`.
    pub(crate) fn record_ping(&mut self, tx: [u8; 12], ping: PendingPing) {
        self.outstanding.insert(tx, ping);
    }

    /// Marks the ping `tx` as asked for by the operator (reported when answered).
    pub(crate) fn set_request(&mut self, tx: &[u8; 12], request: u64) {
        if let Some(ping) = self.outstanding.get_mut(tx) {
            ping.request = Some(request);
        }
    }

    /// When path selection next needs to act.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let at = match self.path {
            Path::Direct { .. } => self.next_probe.min(self.alive_until),
            Path::Relayed => self.next_probe.min(self.next_relay_ping),
        };
        // Learned candidates expire even while nothing else is due.
        let direct = self.direct().map(|(a, _)| a);
        let expiry = self
            .learned
            .iter()
            .filter(|(a, _)| Some(**a) != direct)
            .map(|(_, v)| *v + CANDIDATE_TTL)
            .min();
        expiry.map_or(at, |e| at.min(e))
    }

    /// Whether the byte counters are due for a look ([`Self::note_activity`], then
    /// [`Self::handle_timeout`]), to notice idleness and its end: the node's tick asks once a
    /// second, so a look shares the wake-up of the rest of the node's housekeeping.
    pub(crate) fn activity_check_due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_check) >= ACTIVITY_CHECK
    }

    /// Runs what is due: falls back to the relay if the direct path went silent, and lists the
    /// probes to send. Returns the new path if it changed.
    pub(crate) fn handle_timeout(&mut self, now: Instant, probes: &mut Vec<Probe>) -> Option<Path> {
        self.last_check = now;
        let idle = self.is_idle(now);
        self.outstanding
            .retain(|_, ping| now.saturating_duration_since(ping.sent) < PING_EXPIRY);
        let direct = self.direct().map(|(a, _)| a);
        self.learned.retain(|a, vouched| {
            Some(*a) == direct || now.saturating_duration_since(*vouched) < CANDIDATE_TTL
        });
        let mut changed = None;
        if let Path::Direct { addr, socket, .. } = self.path {
            if now >= self.alive_until {
                if self.keepalive.idle_ping_sent.take().is_some() {
                    // An idle keepalive went unanswered: that interval is too long for the
                    // NATs on this path; the last one that worked becomes the ceiling.
                    let good = (self.idle_interval() * 2 / 3).max(IDLE_KEEPALIVE_START);
                    self.keepalive.ceiling = good;
                    self.keepalive.interval = good;
                }
                self.path = Path::Relayed;
                self.relayed_since = now;
                self.backoff = PROBE_BACKOFF_MIN;
                self.next_probe = now;
                changed = Some(self.path);
            } else if now >= self.next_probe {
                if idle {
                    self.next_probe = now + self.idle_interval();
                    self.keepalive.idle_ping_sent = Some(now);
                    self.alive_until = self.alive_until.max(now + ANSWER_WINDOW);
                } else {
                    self.next_probe = now + DIRECT_PING_INTERVAL;
                }
                probes.push(Probe::Ping {
                    addr: Some(addr),
                    socket,
                });
            }
        }
        if self.is_relayed() {
            if now >= self.next_probe {
                for c in self.candidates() {
                    if self.take_token(now) {
                        probes.push(Probe::Ping {
                            addr: Some(c),
                            socket: 0,
                        });
                    }
                }
                // Ask the peer (through the relay) to probe us at the same moment, so both
                // NATs open their mappings towards each other together.
                probes.push(Probe::CallMe);
                let cap = if idle {
                    // Idle rounds keep backing off past the active cap: between two NATs
                    // no round opened, the next one likely will not either, and the first
                    // byte probes again at once.
                    IDLE_PROBE_MAX
                } else {
                    PROBE_BACKOFF_MAX
                };
                self.next_probe = now + self.backoff;
                self.backoff = (self.backoff * 2).min(cap);
            }
            if now >= self.next_relay_ping {
                self.next_relay_ping = now
                    + if idle {
                        IDLE_RELAYED_INTERVAL
                    } else {
                        RELAY_PING_INTERVAL
                    };
                probes.push(Probe::Ping {
                    addr: None,
                    socket: 0,
                });
            }
        }
        changed
    }

    /// Whether the last keepalive on the direct path went unanswered (a hint that our network
    /// changed).
    pub(crate) fn missed_pong(&self, now: Instant) -> bool {
        match self.path {
            Path::Direct { last_pong, .. } if self.is_idle(now) => self
                .keepalive
                .idle_ping_sent
                .is_some_and(|sent| last_pong < sent),
            Path::Direct { last_pong, .. } => {
                now.saturating_duration_since(last_pong) > DIRECT_PING_INTERVAL
            }
            Path::Relayed => false,
        }
    }

    /// A pong for `tx` arrived from `from` (`None`: through the relay) on our socket `socket`.
    /// `None` if it answers no ping of ours (unknown, expired, or replayed).
    pub(crate) fn handle_pong(
        &mut self,
        now: Instant,
        tx: [u8; 12],
        from: Option<SocketAddr>,
        socket: u16,
    ) -> Option<Pong> {
        let ping = self.outstanding.remove(&tx)?;
        if now.saturating_duration_since(ping.sent) >= PING_EXPIRY {
            return None;
        }
        let rtt = now.saturating_duration_since(ping.sent);
        let mut changed = None;
        match (ping.addr, from) {
            (None, None) => self.relay_rtt = Some(rtt),
            (Some(addr), Some(src)) if addr == src && ping.socket == socket => {
                // An authenticated pong from the address we pinged: the peer is there.
                self.vouch(now, addr);
                if !self.should_switch(now, addr, socket, rtt) {
                    return Some(Pong {
                        ping,
                        rtt,
                        changed: None,
                    });
                }
                let moved = self.direct() != Some((addr, socket));
                self.roam = None;
                self.path = Path::Direct {
                    addr,
                    socket,
                    rtt,
                    last_pong: now,
                };
                self.alive_until = if self.is_idle(now) && !moved {
                    if let Some(sent) = self.keepalive.idle_ping_sent.take() {
                        if ping.sent >= sent {
                            // The keepalive after a full idle interval was answered: the
                            // NATs keep the mapping that long; try a longer one next.
                            self.keepalive.interval =
                                (self.idle_interval() * 3 / 2).min(self.keepalive.ceiling);
                        }
                    }
                    now + self.idle_interval() + ANSWER_WINDOW
                } else {
                    now + DIRECT_TIMEOUT
                };
                if moved {
                    self.next_probe = now + DIRECT_PING_INTERVAL;
                    self.birthday.finish(now, true);
                    changed = Some(self.path);
                }
            }
            _ => {}
        }
        Some(Pong { ping, rtt, changed })
    }

    /// A ping came directly from `from` on our socket `socket`. Returns the address to ping
    /// back at once (which is what opens both NATs when both sides probe together) if the
    /// budget allows: while relayed, or when `from` is not a candidate yet. The address
    /// becomes a candidate only when that ping-back is answered (see [`Self::handle_pong`]).
    /// The peer began a new handshake from `addr` on our socket `socket`: if that is not the
    /// current path, it is remembered as the peer's new address; returns whether to ping it
    /// now (so its pong can move the path at once).
    pub(crate) fn handle_roam(&mut self, addr: SocketAddr, socket: u16) -> bool {
        if self.direct() == Some((addr, socket)) || self.roam == Some((addr, socket)) {
            return false;
        }
        self.roam = Some((addr, socket));
        true
    }

    pub(crate) fn handle_ping_from(
        &mut self,
        now: Instant,
        from: SocketAddr,
        socket: u16,
    ) -> Option<SocketAddr> {
        if self.direct() == Some((from, socket)) && self.is_idle(now) && !self.keepalive.leads {
            // The peer's idle keepalive on our direct path: its ping and our pong refresh the
            // NATs on both sides, so our own keepalive waits a full interval and an eighth
            // more (the peer's next one, at the same interval, comes first; at a shorter one,
            // ours), and the path lives until that keepalive of ours could have been answered.
            // Idle pairs so settle on one side pinging, the one with the shorter interval. One
            // side leads (the node picks the smaller key) and never defers, so two that became
            // idle together and ping in step fall out of step.
            let next = now + self.idle_interval() * 9 / 8;
            self.next_probe = self.next_probe.max(next);
            self.alive_until = self.alive_until.max(next + ANSWER_WINDOW);
        }
        let known = self.announced.contains(&from) || self.learned.contains_key(&from);
        let wanted = self.is_relayed() || (socket == 0 && !known);
        (wanted && self.take_token(now)).then_some(from)
    }

    /// The peer asks to be probed at `endpoints`: they become learned candidates, and while
    /// relayed every candidate the budget allows is returned to ping now (without touching the
    /// backoff and without a call-me of our own).
    pub(crate) fn handle_call_me(
        &mut self,
        now: Instant,
        endpoints: Vec<SocketAddr>,
    ) -> Vec<SocketAddr> {
        for e in endpoints {
            if usable_candidate(&e) && !self.announced.contains(&e) {
                self.vouch(now, e);
            }
        }
        if !self.is_relayed() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for c in self.candidates() {
            if self.take_token(now) {
                out.push(c);
            }
        }
        out
    }

    /// Counts a candidate as vouched for at `now` (from a call-me or an authenticated pong),
    /// adding it as learned unless it is announced; evicts the least recently vouched learned
    /// candidate when that would exceed [`MAX_CANDIDATES`].
    fn vouch(&mut self, now: Instant, addr: SocketAddr) {
        if self.announced.contains(&addr) {
            return;
        }
        if !self.learned.contains_key(&addr)
            && self.candidate_count() >= MAX_CANDIDATES
            && !self.evict_learned()
        {
            return;
        }
        self.learned.insert(addr, now);
    }

    /// Forgets the least recently vouched learned candidate other than the direct path.
    fn evict_learned(&mut self) -> bool {
        let direct = self.direct().map(|(a, _)| a);
        let oldest = self
            .learned
            .iter()
            .filter(|(a, _)| Some(**a) != direct)
            .min_by_key(|(a, v)| (**v, **a))
            .map(|(a, _)| *a);
        oldest.is_some_and(|a| self.learned.remove(&a).is_some())
    }

    fn candidate_count(&self) -> usize {
        self.announced.len() + self.learned.len()
    }

    /// Takes a probe token; counts a refusal.
    fn take_token(&mut self, now: Instant) -> bool {
        let ok = self.bucket.take(now);
        if !ok {
            self.suppressed += 1;
        }
        ok
    }

    /// Whether a confirmed pong from `addr` on `socket` with `rtt` should become the path.
    fn should_switch(&self, now: Instant, addr: SocketAddr, socket: u16, rtt: Duration) -> bool {
        match self.path {
            Path::Relayed => true,
            Path::Direct {
                addr: current,
                socket: current_socket,
                rtt: current_rtt,
                last_pong,
            } => {
                let current_failing = if self.is_idle(now) {
                    self.missed_pong(now)
                } else {
                    now.saturating_duration_since(last_pong) > DIRECT_PING_INTERVAL * 2
                };
                (current == addr && current_socket == socket)
                    || current_failing
                    || self.roam == Some((addr, socket))
                    || rtt.as_secs_f64() < current_rtt.as_secs_f64() * SWITCH_RTT_RATIO
            }
        }
    }
}

/// Addresses worth probing: not unspecified, not multicast, port non-zero.
pub(super) fn usable_candidate(a: &SocketAddr) -> bool {
    a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::peer::{PROBE_BURST, PROBE_REFILL_PER_SEC};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    /// Sends a ping to `to` at `sent` and answers it at `sent + rtt`; returns the pong.
    fn ping_pong(
        p: &mut PathSelection,
        tx: u8,
        to: SocketAddr,
        sent: Instant,
        rtt: Duration,
    ) -> Pong {
        let ping = PendingPing {
            addr: Some(to),
            socket: 0,
            sent,
            request: None,
        };
        p.record_ping([tx; 12], ping);
        p.handle_pong(sent + rtt, [tx; 12], Some(to), 0)
            .expect("answers our ping")
    }

    /// Runs `p`'s timers every 100 ms from `from` until `until`, answering every direct ping
    /// after `rtt` when `answer` says so; returns the times pings left and the new path, if any.
    fn run_direct(
        p: &mut PathSelection,
        from: Instant,
        until: Instant,
        answer: bool,
        tx: &mut u8,
    ) -> (Vec<Instant>, Option<Path>) {
        let mut sent = Vec::new();
        let mut now = from;
        let mut probes = Vec::new();
        while now < until {
            now += Duration::from_millis(100);
            probes.clear();
            if let Some(path) = p.handle_timeout(now, &mut probes) {
                return (sent, Some(path));
            }
            for probe in &probes {
                if let Probe::Ping {
                    addr: Some(a),
                    socket,
                } = *probe
                {
                    sent.push(now);
                    *tx = tx.wrapping_add(1);
                    let ping = PendingPing {
                        addr: Some(a),
                        socket,
                        sent: now,
                        request: None,
                    };
                    p.record_ping([*tx; 12], ping);
                    if answer {
                        p.handle_pong(now + Duration::from_millis(20), [*tx; 12], Some(a), socket);
                    }
                }
            }
        }
        (sent, None)
    }

    /// Runs `p`'s timers every second from `from` until `until`; the times probe rounds (a
    /// call-me) and relay pings left.
    fn run_relayed(
        p: &mut PathSelection,
        from: Instant,
        until: Instant,
    ) -> (Vec<Instant>, Vec<Instant>) {
        let (mut rounds, mut relay_pings) = (Vec::new(), Vec::new());
        let mut now = from;
        let mut probes = Vec::new();
        while now < until {
            now += Duration::from_secs(1);
            probes.clear();
            assert_eq!(p.handle_timeout(now, &mut probes), None, "stays relayed");
            for probe in &probes {
                match probe {
                    Probe::CallMe => rounds.push(now),
                    Probe::Ping { addr: None, .. } => relay_pings.push(now),
                    Probe::Ping { .. } => {}
                }
            }
        }
        (rounds, relay_pings)
    }

    #[test]
    fn an_idle_relayed_peer_probes_ever_more_rarely_and_at_once_when_active_again() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        p.set_announced([addr("198.51.100.7:4000")]);
        p.note_activity(t0, (1, 1));
        // Three idle hours: past the active cap the gaps go on doubling, then every 30 min.
        let end = t0 + Duration::from_secs(3 * 3600);
        let (rounds, relay_pings) = run_relayed(&mut p, t0, end);
        let gaps: Vec<u64> = rounds
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .skip_while(|g| *g <= PROBE_BACKOFF_MAX.as_secs())
            .collect();
        let cap = IDLE_PROBE_MAX.as_secs();
        let settled = gaps
            .iter()
            .position(|g| *g == cap)
            .expect("reaches the cap");
        assert!(settled >= 4, "{gaps:?}");
        for w in gaps[..=settled].windows(2) {
            assert!(w[1] == 2 * w[0] || w[1] == cap, "doubling: {gaps:?}");
        }
        assert!(gaps[settled..].iter().all(|g| *g == cap), "{gaps:?}");
        assert!(
            rounds.len() <= 20,
            "{} rounds in three idle hours",
            rounds.len()
        );
        // The relay RTT is still measured every 30 minutes.
        let last = *relay_pings.last().expect("relay pings");
        let before = relay_pings[relay_pings.len() - 2];
        assert_eq!((last - before).as_secs(), IDLE_RELAYED_INTERVAL.as_secs());
        // News about an idle peer (a new mapping announced) is probed once, at once, and the
        // long backoff stays.
        p.reset_backoff(end);
        let news = end + IDLE_PROBE_MAX / 2;
        let (rounds, _) = run_relayed(&mut p, end, news);
        assert_eq!(rounds, vec![end + Duration::from_secs(1)], "one round");
        let end = news;
        // A byte ends it: a round at once, then the active backoff again.
        p.note_activity(end, (2, 2));
        let (rounds, _) = run_relayed(&mut p, end, end + Duration::from_secs(10));
        assert_eq!(rounds.first(), Some(&(end + Duration::from_secs(1))));
        assert!(rounds.len() >= 2, "{rounds:?}");
    }

    #[test]
    fn an_idle_direct_path_learns_a_sparse_keepalive_and_backs_off_after_a_miss() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let a = addr("198.51.100.7:4000");
        ping_pong(&mut p, 1, a, t0, Duration::from_millis(20));
        assert!(p.direct().is_some());
        let mut tx = 1;
        // Active (counters move every second) for 10 s: pings every 2 s.
        let mut now = t0;
        let mut active = Vec::new();
        for i in 1..=10u64 {
            p.note_activity(now, (i, i));
            let (sent, changed) =
                run_direct(&mut p, now, now + Duration::from_secs(1), true, &mut tx);
            assert_eq!(changed, None);
            active.extend(sent);
            now += Duration::from_secs(1);
        }
        assert!((4..=6).contains(&active.len()), "{active:?}");
        // Idle for 20 minutes: keepalives at 25 s, then 37.5, 56, 84, then 100 s.
        let (sent, changed) =
            run_direct(&mut p, now, now + Duration::from_secs(1200), true, &mut tx);
        assert_eq!(changed, None, "the idle path stays direct");
        // The first 15 s are not idle yet (pings every 2 s).
        let gaps: Vec<u64> = sent.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert!(gaps.len() <= 25, "{gaps:?}");
        let gaps: Vec<u64> = gaps.into_iter().skip_while(|g| *g <= 2).collect();
        assert_eq!(&gaps[..5], &[25, 37, 56, 84, 100], "{gaps:?}");
        assert!(gaps[5..].iter().all(|g| *g == 100), "{gaps:?}");
        let now = *sent.last().expect("sent") + Duration::from_millis(200);
        // The NAT forgets sooner now: the next keepalive goes unanswered, the path falls back,
        // and the ceiling drops to the last interval that worked.
        let (_, changed) = run_direct(&mut p, now, now + Duration::from_secs(200), false, &mut tx);
        assert_eq!(changed, Some(Path::Relayed));
        assert_eq!(p.keepalive.ceiling, Duration::from_secs(100) * 2 / 3);
        assert_eq!(p.keepalive.interval, p.keepalive.ceiling);
    }

    #[test]
    fn the_peers_idle_keepalives_stand_in_for_ours() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let a = addr("198.51.100.7:4000");
        ping_pong(&mut p, 1, a, t0, Duration::from_millis(20));
        let mut tx = 1;
        // Idle from the start: our own keepalives would go out 25 s apart.
        let (_, changed) = run_direct(&mut p, t0, t0 + IDLE_AFTER, true, &mut tx);
        assert_eq!(changed, None);
        // The peer pings us on the path every 20 s for 10 minutes: we send nothing of our own,
        // and the path stays direct without a pong of ours being answered.
        let mut now = t0 + IDLE_AFTER;
        let mut ours = Vec::new();
        for _ in 0..30 {
            assert_eq!(p.handle_ping_from(now, a, 0), None, "no ping-back");
            let (sent, changed) =
                run_direct(&mut p, now, now + Duration::from_secs(20), false, &mut tx);
            assert_eq!(changed, None, "the path stays direct");
            ours.extend(sent);
            now += Duration::from_secs(20);
        }
        assert!(ours.is_empty(), "our keepalives: {ours:?}");
        // The peer stops: ours resume within an interval, and unanswered they end the path.
        let (sent, changed) =
            run_direct(&mut p, now, now + Duration::from_secs(60), false, &mut tx);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(changed, Some(Path::Relayed));
        // The leading side keeps its own keepalives whatever the peer sends.
        let mut l = PathSelection::new(t0);
        l.set_leads(true);
        ping_pong(&mut l, 1, a, t0, Duration::from_millis(20));
        run_direct(&mut l, t0, t0 + IDLE_AFTER, true, &mut tx);
        let mut now = t0 + IDLE_AFTER;
        let mut sent = Vec::new();
        for _ in 0..6 {
            l.handle_ping_from(now, a, 0);
            let (s, _) = run_direct(&mut l, now, now + Duration::from_secs(20), true, &mut tx);
            sent.extend(s);
            now += Duration::from_secs(20);
        }
        assert!(sent.len() >= 3, "the leader keeps pinging: {sent:?}");
        // A ping from another address of the peer is no keepalive of this path.
        let mut q = PathSelection::new(t0);
        ping_pong(&mut q, 1, a, t0, Duration::from_millis(20));
        run_direct(&mut q, t0, t0 + IDLE_AFTER, true, &mut tx);
        q.handle_ping_from(t0 + IDLE_AFTER, addr("198.51.100.7:4001"), 0);
        let (sent, _) = run_direct(
            &mut q,
            t0 + IDLE_AFTER,
            t0 + IDLE_AFTER + Duration::from_secs(30),
            true,
            &mut tx,
        );
        assert!(!sent.is_empty(), "our own keepalive still goes out");
    }

    #[test]
    fn probes_while_relayed_then_a_pong_makes_the_path_direct() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let (a, b) = (addr("198.51.100.7:4000"), addr("192.168.1.7:4000"));
        assert!(p.set_announced([a, b, addr("0.0.0.0:1")]));
        let mut probes = Vec::new();
        assert_eq!(p.handle_timeout(t0, &mut probes), None);
        assert_eq!(
            probes.len(),
            4,
            "two candidates, a call-me, a relay ping: {probes:?}"
        );
        assert!(probes.contains(&Probe::CallMe));
        assert_eq!(p.poll_timeout(), t0 + PROBE_BACKOFF_MIN, "backs off");

        let pong = ping_pong(&mut p, 1, a, t0, Duration::from_millis(30));
        assert!(matches!(pong.changed, Some(Path::Direct { addr, .. }) if addr == a));
        assert_eq!(p.direct(), Some((a, 0)));
        // A pong from the wrong address or for an unknown ping changes nothing.
        assert!(p.handle_pong(t0, [9; 12], Some(a), 0).is_none());
    }

    #[test]
    fn switching_needs_a_clearly_faster_path_and_silence_falls_back_to_the_relay() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let (slow, similar, fast) = (
            addr("198.51.100.7:4000"),
            addr("198.51.100.8:4000"),
            addr("198.51.100.9:4000"),
        );
        ping_pong(&mut p, 1, slow, t0, Duration::from_millis(100));
        assert_eq!(p.direct(), Some((slow, 0)));
        // 80 ms is not below 70 % of 100 ms: no flapping between similar paths.
        let t1 = t0 + Duration::from_millis(500);
        let pong = ping_pong(&mut p, 2, similar, t1, Duration::from_millis(80));
        assert_eq!(pong.changed, None);
        assert_eq!(p.direct(), Some((slow, 0)));
        // 60 ms is: the faster path wins.
        let pong = ping_pong(&mut p, 3, fast, t1, Duration::from_millis(60));
        assert!(pong.changed.is_some());
        assert_eq!(p.direct(), Some((fast, 0)));

        // The direct path goes silent: keepalives, a missed pong, then the relay.
        let last_pong = t1 + Duration::from_millis(60);
        let mut probes = Vec::new();
        let mut fell_back = None;
        for _ in 0..20 {
            let now = p.poll_timeout();
            if let Some(path) = p.handle_timeout(now, &mut probes) {
                fell_back = Some((now, path));
                break;
            }
        }
        let (at, path) = fell_back.expect("falls back");
        assert_eq!(path, Path::Relayed);
        assert_eq!(at, last_pong + DIRECT_TIMEOUT);
        assert!(p.is_relayed() && p.relayed_since() == at);
        assert!(
            probes
                .iter()
                .filter(|p| matches!(p, Probe::Ping { addr: Some(a), .. } if *a == fast))
                .count()
                >= 3
        );
        assert!(!p.missed_pong(at), "relayed now");
        // Relayed again: a probe round with a call-me went out at once, the next backs off.
        assert_eq!(
            probes.last(),
            Some(&Probe::Ping {
                addr: None,
                socket: 0
            })
        );
        assert!(probes.contains(&Probe::CallMe));
        assert_eq!(p.next_probe(), at + PROBE_BACKOFF_MIN);
    }

    #[test]
    fn a_ping_from_a_new_address_adds_it_only_after_an_authenticated_pong() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let announced = addr("198.51.100.7:4000");
        p.set_announced([announced]);
        let stranger = addr("192.0.2.66:5555");
        // Relayed: the ping is answered with a ping back, but the address is no candidate yet.
        assert_eq!(p.handle_ping_from(t0, stranger, 0), Some(stranger));
        assert_eq!(p.candidates(), [announced].into());
        // A pong for a ping we never sent to it (forged or replayed) adds nothing.
        assert!(p.handle_pong(t0, [7; 12], Some(stranger), 0).is_none());
        assert!(!p.candidates().contains(&stranger));
        // A pong answering our ping-back, from that address: now it is a candidate (and the path).
        let pong = ping_pong(&mut p, 8, stranger, t0, Duration::from_millis(20));
        assert!(pong.changed.is_some());
        assert!(p.candidates().contains(&stranger));
    }

    #[test]
    fn learned_candidates_expire_and_are_capped() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        p.set_announced([addr("198.51.100.7:4000")]);
        let many: Vec<SocketAddr> = (0..40u16)
            .map(|i| SocketAddr::new("192.0.2.1".parse().expect("literal"), 1000 + i))
            .collect();
        for chunk in many.chunks(crate::wire::MAX_ENDPOINTS) {
            p.handle_call_me(t0, chunk.to_vec());
        }
        assert_eq!(p.candidates().len(), MAX_CANDIDATES, "capped");
        // The last call-me's addresses are kept: the least recently vouched made room.
        assert!(p.candidates().contains(&many[39]));
        // One learned address keeps being vouched for; the rest are not.
        let kept = many[39];
        let mut now = t0;
        let mut probes = Vec::new();
        while now < t0 + CANDIDATE_TTL + Duration::from_secs(1) {
            now += Duration::from_secs(10);
            p.handle_call_me(now, vec![kept]);
            p.handle_timeout(now, &mut probes);
        }
        assert_eq!(
            p.candidates(),
            [addr("198.51.100.7:4000"), kept].into(),
            "announced and re-vouched stay, the rest expired"
        );
        // The expiry is a deadline of its own.
        assert!(p.poll_timeout() <= now + CANDIDATE_TTL);
        // A new announcement replaces the announced candidates.
        assert!(p.set_announced([addr("198.51.100.8:4000")]));
        assert!(!p.candidates().contains(&addr("198.51.100.7:4000")));
    }

    #[test]
    fn call_me_bursts_and_probe_rounds_draw_from_one_bucket() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let candidates: Vec<SocketAddr> = (0..MAX_CANDIDATES as u16)
            .map(|i| SocketAddr::new("192.0.2.1".parse().expect("literal"), 2000 + i))
            .collect();
        p.set_announced(candidates.clone());
        // A peer (or anyone able to make it) sending call-mes as fast as it can, for 10 s.
        let mut sent = 0usize;
        let mut now = t0;
        let mut probes = Vec::new();
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            sent += p.handle_call_me(now, Vec::new()).len();
            probes.clear();
            p.handle_timeout(now, &mut probes);
            sent += probes
                .iter()
                .filter(|p| matches!(p, Probe::Ping { addr: Some(_), .. }))
                .count();
        }
        let elapsed_ms = (now - t0).as_millis() as usize;
        let budget = PROBE_BURST as usize + PROBE_REFILL_PER_SEC as usize * elapsed_ms / 1000;
        assert!(sent <= budget, "{sent} probes, budget {budget}");
        assert!(
            sent + 10 >= budget,
            "the budget is used: {sent} of {budget}"
        );
        assert!(p.suppressed() > 0);
    }
}
