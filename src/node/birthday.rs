//! Birthday probing: a direct path between an endpoint-independent NAT with port-restricted
//! filtering (a home router) and an endpoint-dependent ("symmetric") NAT.
//!
//! Ordinary punching fails for that pair: the symmetric side shows each destination a new,
//! unpredictable port, and the home router lets in only what comes from exactly an address and
//! port it sent to. So both sides guess together:
//!
//! 1. The *hard* (symmetric) side opens [`SPRAY_SOCKETS`] extra sockets and pings the easy
//!    side's reflexive address from each: its NAT now holds that many mappings, each accepting
//!    packets from exactly the easy side's address. It tells the easy side, through the relay,
//!    to start ([`Disco::Spray`]).
//! 2. The *easy* side pings random ports of the hard side's public IP from its main socket, at
//!    most [`PROBES_PER_TICK`] per [`BURST_INTERVAL`] (100 per second) and [`PROBE_BUDGET`] in all.
//!    Each ping hits one of the mappings with probability 256/64512; the chance that 2,000
//!    pings all miss is (1 − 1/252)^2000 ≈ 0.04 %.
//! 3. A ping that lands is answered from the extra socket that owns the mapping; the easy side
//!    has just sent to that exact port, so its NAT lets the answer in. Both sides then have a
//!    confirmed direct path, the hard side on that extra socket.
//!
//! An attempt lasts at most [`ATTEMPT_DURATION`]; a failed one is retried with backoff from
//! [`RETRY_MIN`] up to [`RETRY_MAX`]. Two symmetric NATs are not attempted: both sides would
//! have to guess, and the odds per probe become far too small.
//!
//! # Not a weapon for a lying relay
//! The addresses sprayed come from the relay (what it observed of the other member), and a
//! spray is far above the probe budget of ordinary punching. So the easy side sprays only the
//! address the hard side vouches for in its authenticated [`Disco::Spray`] (its reflexive
//! address from its own STUN checks) *and* the relay observed: a relay naming a third party's
//! address to the easy side gets no spray sent there. The hard side's one ping per extra socket
//! goes to the relay's view of the easy side ([`SPRAY_SOCKETS`] datagrams per attempt). A node runs at most one attempt at a time (either side),
//! so what any one relay can provoke is bounded by one attempt's budget per backoff period.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use super::peer::Peer;
use super::Node;
use crate::keys::PeerKey;
use crate::wire::{Disco, NatKind};

/// Extra sockets the hard side opens (NAT mappings to be hit).
pub const SPRAY_SOCKETS: u16 = 256;
/// Pings the easy side sends per [`BURST_INTERVAL`]: 100 per second keeps the burst small for
/// any router on the way.
pub const PROBES_PER_TICK: u32 = 25;
/// Time between two bursts of the easy side: short enough that the budget is spent within
/// the attempt, long enough that each burst is small.
pub const BURST_INTERVAL: Duration = Duration::from_millis(250);
/// Most pings the easy side sends in one attempt.
pub const PROBE_BUDGET: u32 = 2_000;
/// How long an attempt may last: the budget at the rate above takes 20 s.
pub const ATTEMPT_DURATION: Duration = Duration::from_secs(25);
/// Ordinary punching gets this long before a birthday attempt starts.
pub const START_AFTER: Duration = Duration::from_secs(5);
/// Wait after a failed attempt; doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(60);
/// Longest wait between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Hard {
        until: Instant,
    },
    Easy {
        until: Instant,
        target: IpAddr,
        sent: u32,
        next_burst: Instant,
    },
}

/// Per-peer birthday probing state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Birthday {
    phase: Phase,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

impl Default for Birthday {
    fn default() -> Self {
        Self {
            phase: Phase::Idle,
            next_attempt: None,
            backoff: RETRY_MIN,
        }
    }
}

impl Birthday {
    /// Ends an attempt (if one runs); a failure schedules the next one with backoff.
    pub(crate) fn finish(&mut self, now: Instant, success: bool) {
        if self.phase == Phase::Idle {
            return;
        }
        self.phase = Phase::Idle;
        if success {
            self.backoff = RETRY_MIN;
            self.next_attempt = None;
        } else {
            self.next_attempt = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(RETRY_MAX);
        }
    }

    /// Whether this peer holds the extra sockets open.
    pub(crate) fn is_hard(&self) -> bool {
        matches!(self.phase, Phase::Hard { .. })
    }

    /// Whether an attempt is running (either side).
    pub(crate) fn is_running(&self) -> bool {
        self.phase != Phase::Idle
    }

    fn may_start(&self, now: Instant) -> bool {
        self.phase == Phase::Idle && self.next_attempt.is_none_or(|t| now >= t)
    }
}

impl Node {
    /// Whether this side is the hard (symmetric, unmapped) one.
    fn we_are_hard(&self) -> bool {
        self.nat == NatKind::EndpointDependent && self.port_mapping.is_none()
    }

    /// When the birthday probe with `p` next needs to act, if at all.
    pub(super) fn birthday_deadline(&self, p: &Peer) -> Option<Instant> {
        let relayed = p.paths.is_relayed();
        match p.paths.birthday.phase {
            Phase::Idle => {
                let easy_peer = p.announcement.nat == NatKind::EndpointIndependent;
                if !(self.we_are_hard() && easy_peer && relayed) {
                    return None;
                }
                // Nothing to start while another attempt runs (its end re-arms this) or while
                // our own public address is unknown (a STUN answer re-arms it).
                if self.birthday_running() || self.netcheck.reflexive().is_none() {
                    return None;
                }
                let waited = p.paths.relayed_since() + START_AFTER;
                Some(
                    p.paths
                        .birthday
                        .next_attempt
                        .map_or(waited, |t| t.max(waited)),
                )
            }
            Phase::Hard { until } => Some(until),
            Phase::Easy {
                until, next_burst, ..
            } => Some(until.min(next_burst)),
        }
    }

    /// Starts, paces and ends birthday attempts with `key`.
    pub(super) fn birthday_timers(&mut self, now: Instant, key: PeerKey) {
        let we_are_hard = self.we_are_hard();
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let relayed = p.paths.is_relayed();
        match p.paths.birthday.phase {
            Phase::Idle => {
                let easy_peer = p.announcement.nat == NatKind::EndpointIndependent;
                let waited = now.saturating_duration_since(p.paths.relayed_since()) >= START_AFTER;
                if !(we_are_hard
                    && easy_peer
                    && relayed
                    && waited
                    && p.paths.birthday.may_start(now))
                {
                    return;
                }
                if self.birthday_running() {
                    return;
                }
                let Some(p) = self.peers.get_mut(&key) else {
                    return;
                };
                let Some(reflexive) = self.netcheck.reflexive() else {
                    return;
                };
                p.paths.birthday.phase = Phase::Hard {
                    until: now + ATTEMPT_DURATION,
                };
                let target = p.entry.observed;
                tracing::debug!(peer = %p.announcement.name, %target, "starting a birthday probe (this side symmetric)");
                for socket in 1..=SPRAY_SOCKETS {
                    self.send_ping(now, key, Some(target), socket);
                }
                self.send_disco_via_relay(now, key, &Disco::Spray { reflexive });
            }
            Phase::Hard { until } => {
                if now >= until || !relayed {
                    p.paths.birthday.finish(now, !relayed);
                }
            }
            Phase::Easy {
                until,
                target,
                sent,
                next_burst,
            } => {
                if now >= until || sent >= PROBE_BUDGET || !relayed {
                    p.paths.birthday.finish(now, !relayed);
                    return;
                }
                if now < next_burst {
                    return;
                }
                let n = PROBES_PER_TICK.min(PROBE_BUDGET - sent);
                p.paths.birthday.phase = Phase::Easy {
                    until,
                    target,
                    sent: sent + n,
                    next_burst: now + BURST_INTERVAL,
                };
                for _ in 0..n {
                    let port: u16 = self.rng.gen_range(1024..=u16::MAX);
                    self.send_ping(now, key, Some(SocketAddr::new(target, port)), 0);
                }
            }
        }
    }

    /// Whether a birthday attempt with any peer is running.
    fn birthday_running(&self) -> bool {
        self.peers.values().any(|p| p.paths.birthday.is_running())
    }

    /// The symmetric peer `sender` opened its mappings and says its public address is
    /// `reflexive`: spray that address, if we are the easy side and the relay saw the same.
    pub(super) fn handle_spray(&mut self, now: Instant, sender: PeerKey, reflexive: SocketAddr) {
        let we_are_easy = self.nat == NatKind::EndpointIndependent;
        let busy = self.birthday_running();
        let Some(p) = self.peers.get_mut(&sender) else {
            return;
        };
        if !(we_are_easy && p.paths.is_relayed() && p.paths.birthday.may_start(now)) || busy {
            return;
        }
        if reflexive.ip() != p.entry.observed.ip() {
            tracing::debug!(peer = %p.announcement.name, vouched = %reflexive.ip(), observed = %p.entry.observed.ip(), "birthday probe refused: the relay's view of the peer's address differs from its own");
            self.drops.spray_refused += 1;
            return;
        }
        let target = p.entry.observed.ip();
        tracing::debug!(peer = %p.announcement.name, %target, "birthday probe: spraying the symmetric side's ports");
        p.paths.birthday.phase = Phase::Easy {
            until: now + ATTEMPT_DURATION,
            target,
            sent: 0,
            next_burst: now,
        };
    }
}
