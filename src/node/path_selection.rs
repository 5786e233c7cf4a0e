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
//! # Driving contract
//! Plain data, no I/O: the node calls [`PathSelection::handle_timeout`] at
//! [`PathSelection::poll_timeout`] and sends the [`Probe`]s it lists (sealing them is the
//! node's job, which records each ping with [`PathSelection::record_ping`]); it feeds pongs to
//! [`PathSelection::handle_pong`], direct pings to [`PathSelection::handle_ping_from`] and
//! call-mes to [`PathSelection::handle_call_me`]. Each returns the new path when it changed.
//! Birthday probing (hard NAT pairs) rides on the same peer state, see [`super::birthday`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::birthday::Birthday;
use super::peer::{
    Path, PendingPing, DIRECT_PING_INTERVAL, DIRECT_TIMEOUT, MAX_CANDIDATES, PING_EXPIRY,
    PROBE_BACKOFF_MAX, PROBE_BACKOFF_MIN, RELAY_PING_INTERVAL, SWITCH_RTT_RATIO,
};

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
    candidates: BTreeSet<SocketAddr>,
    outstanding: BTreeMap<[u8; 12], PendingPing>,
    next_probe: Instant,
    backoff: Duration,
    next_relay_ping: Instant,
    relay_rtt: Option<Duration>,
    /// Since when the path has been relayed (for starting a birthday probe).
    relayed_since: Instant,
    /// Birthday probing with this peer.
    pub(crate) birthday: Birthday,
}

impl PathSelection {
    /// Relayed, probing at once.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            path: Path::Relayed,
            candidates: BTreeSet::new(),
            outstanding: BTreeMap::new(),
            next_probe: now,
            backoff: PROBE_BACKOFF_MIN,
            next_relay_ping: now,
            relay_rtt: None,
            relayed_since: now,
            birthday: Birthday::default(),
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

    /// Whether the direct path still answers (a pong within [`DIRECT_TIMEOUT`]).
    pub(crate) fn direct_alive(&self, now: Instant) -> bool {
        match self.path {
            Path::Direct { last_pong, .. } => {
                now.saturating_duration_since(last_pong) < DIRECT_TIMEOUT
            }
            Path::Relayed => false,
        }
    }

    /// Adds candidate addresses (announced, observed, from a call-me); returns whether any
    /// was new. Unusable addresses are skipped; at most [`MAX_CANDIDATES`] are kept.
    pub(crate) fn add_candidates(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> bool {
        let before = self.candidates.len();
        for a in addrs {
            if self.candidates.len() < MAX_CANDIDATES && usable_candidate(&a) {
                self.candidates.insert(a);
            }
        }
        self.candidates.len() != before
    }

    /// Starts probing again soon (new information about the peer).
    pub(crate) fn reset_backoff(&mut self, now: Instant) {
        self.backoff = PROBE_BACKOFF_MIN;
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
        match self.path {
            Path::Direct { last_pong, .. } => self.next_probe.min(last_pong + DIRECT_TIMEOUT),
            Path::Relayed => self.next_probe.min(self.next_relay_ping),
        }
    }

    /// Runs what is due: falls back to the relay if the direct path went silent, and lists the
    /// probes to send. Returns the new path if it changed.
    pub(crate) fn handle_timeout(&mut self, now: Instant, probes: &mut Vec<Probe>) -> Option<Path> {
        self.outstanding
            .retain(|_, ping| now.saturating_duration_since(ping.sent) < PING_EXPIRY);
        let mut changed = None;
        if let Path::Direct {
            addr,
            socket,
            last_pong,
            ..
        } = self.path
        {
            if now.saturating_duration_since(last_pong) >= DIRECT_TIMEOUT {
                self.path = Path::Relayed;
                self.relayed_since = now;
                self.backoff = PROBE_BACKOFF_MIN;
                self.next_probe = now;
                changed = Some(self.path);
            } else if now >= self.next_probe {
                self.next_probe = now + DIRECT_PING_INTERVAL;
                probes.push(Probe::Ping {
                    addr: Some(addr),
                    socket,
                });
            }
        }
        if self.is_relayed() {
            if now >= self.next_probe {
                probes.extend(self.candidates.iter().map(|c| Probe::Ping {
                    addr: Some(*c),
                    socket: 0,
                }));
                // Ask the peer (through the relay) to probe us at the same moment, so both
                // NATs open their mappings towards each other together.
                probes.push(Probe::CallMe);
                self.next_probe = now + self.backoff;
                self.backoff = (self.backoff * 2).min(PROBE_BACKOFF_MAX);
            }
            if now >= self.next_relay_ping {
                self.next_relay_ping = now + RELAY_PING_INTERVAL;
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
            (Some(addr), Some(src))
                if addr == src
                    && ping.socket == socket
                    && self.should_switch(now, addr, socket, rtt) =>
            {
                let moved = self.direct() != Some((addr, socket));
                self.path = Path::Direct {
                    addr,
                    socket,
                    rtt,
                    last_pong: now,
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

    /// A ping came directly from `from` on our socket `socket`: the address becomes a
    /// candidate (peer-reflexive). Returns the address to ping back at once, which is what
    /// opens both NATs when both sides probe together.
    pub(crate) fn handle_ping_from(&mut self, from: SocketAddr, socket: u16) -> Option<SocketAddr> {
        let new =
            socket == 0 && self.candidates.len() < MAX_CANDIDATES && self.candidates.insert(from);
        (self.is_relayed() || new).then_some(from)
    }

    /// The peer asks to be probed at `endpoints`: returns the addresses to ping now (every
    /// candidate while relayed, without touching the backoff and without a call-me of our own).
    pub(crate) fn handle_call_me(&mut self, endpoints: Vec<SocketAddr>) -> Vec<SocketAddr> {
        for e in endpoints {
            if self.candidates.len() < MAX_CANDIDATES {
                self.candidates.insert(e);
            }
        }
        if self.is_relayed() {
            self.candidates.iter().copied().collect()
        } else {
            Vec::new()
        }
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
                (current == addr && current_socket == socket)
                    || now.saturating_duration_since(last_pong) > DIRECT_PING_INTERVAL * 2
                    || rtt.as_secs_f64() < current_rtt.as_secs_f64() * SWITCH_RTT_RATIO
            }
        }
    }
}

/// Addresses worth probing: not unspecified, not multicast, port non-zero.
fn usable_candidate(a: &SocketAddr) -> bool {
    a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn probes_while_relayed_then_a_pong_makes_the_path_direct() {
        let t0 = Instant::now();
        let mut p = PathSelection::new(t0);
        let (a, b) = (addr("198.51.100.7:4000"), addr("192.168.1.7:4000"));
        assert!(p.add_candidates([a, b, addr("0.0.0.0:1")]));
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
}
