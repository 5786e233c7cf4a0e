//! Classifying this member's NAT with STUN.
//!
//! The node sends STUN Binding requests to the relay's port, to the relay's second STUN port
//! (the relay's port + 1, see `relay::driver`) and to any extra STUN servers configured, and
//! compares the mapped addresses they report:
//!
//! - a mapped address equal to one of our own host addresses: no NAT (public address);
//! - the same mapped address from two or more destinations: endpoint-independent mapping, so
//!   a peer will see us where the relay sees us, and hole punching works from both sides;
//! - different mapped addresses: endpoint-dependent ("symmetric") mapping, so a peer sees a
//!   port nobody can predict; direct paths then need the peer's help (open filtering, a
//!   public address, a port mapping) or probing many ports.
//!
//! Rounds repeat every [`STUN_INTERVAL`] (a changed mapping is noticed within that time),
//! every [`STUN_IDLE_INTERVAL`] while the node is quiet (no peer moved bytes lately: a mapping
//! change then matters to nobody until traffic resumes, and the relay's acknowledgements
//! report our address anyway), and every [`STUN_RETRY`] while no answer has come.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::NatKind;

/// How often the NAT is re-classified once answers come back: mappings change rarely, and
/// each round costs one small datagram per STUN server.
pub const STUN_INTERVAL: Duration = Duration::from_secs(60);
/// How often the NAT is re-classified while the node is quiet.
pub const STUN_IDLE_INTERVAL: Duration = Duration::from_secs(900);
/// Retry interval while fewer than two STUN servers have answered.
pub const STUN_RETRY: Duration = Duration::from_secs(5);

/// STUN probing state.
pub(crate) struct NetCheck {
    targets: Vec<SocketAddr>,
    outstanding: BTreeMap<[u8; 12], SocketAddr>,
    answers: BTreeMap<SocketAddr, (SocketAddr, Instant)>,
    /// When the last round went out (`None`: a round is due at once).
    last_round: Option<Instant>,
    /// Whether the round before the last one had enough answers for a verdict.
    enough: bool,
}

impl NetCheck {
    pub(crate) fn new(targets: Vec<SocketAddr>) -> Self {
        Self {
            targets,
            outstanding: BTreeMap::new(),
            answers: BTreeMap::new(),
            last_round: None,
            enough: false,
        }
    }

    /// The interval between rounds once answers come back, `quiet` or not.
    fn interval(quiet: bool) -> Duration {
        if quiet {
            STUN_IDLE_INTERVAL
        } else {
            STUN_INTERVAL
        }
    }

    /// Replaces the STUN servers (e.g. the relay moved).
    pub(crate) fn set_targets(&mut self, targets: Vec<SocketAddr>) {
        if targets != self.targets {
            self.targets = targets;
            self.answers.clear();
            self.last_round = None;
        }
    }

    /// When the next round is due, while the node is `quiet` or not.
    pub(crate) fn next_round(&self, quiet: bool) -> Option<Instant> {
        let last = self.last_round?;
        Some(
            last + if self.enough {
                Self::interval(quiet)
            } else {
                STUN_RETRY
            },
        )
    }

    /// When a round is due (the node `quiet` or not), the (destination, transaction id)
    /// pairs to send requests for.
    pub(crate) fn poll_round(
        &mut self,
        now: Instant,
        quiet: bool,
        mut tx_id: impl FnMut() -> [u8; 12],
    ) -> Vec<(SocketAddr, [u8; 12])> {
        if self.next_round(quiet).is_some_and(|at| now < at) {
            return Vec::new();
        }
        // Answers older than two and a half intervals no longer count (a server that stopped
        // answering is forgotten).
        let max_age = Self::interval(quiet) * 5 / 2;
        self.answers
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < max_age);
        // A verdict needs two answers; until then (loss, a server down) retry soon.
        self.enough = self.answers.len() >= 2.min(self.targets.len());
        self.last_round = Some(now);
        self.outstanding.clear();
        self.targets
            .iter()
            .map(|t| {
                let tx = tx_id();
                self.outstanding.insert(tx, *t);
                (*t, tx)
            })
            .collect()
    }

    /// A Binding response; returns whether it was one of ours.
    pub(crate) fn handle_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tx: [u8; 12],
        mapped: SocketAddr,
    ) -> bool {
        match self.outstanding.remove(&tx) {
            Some(target) if target == from => {
                self.answers.insert(target, (mapped, now));
                true
            }
            Some(_) | None => false,
        }
    }

    /// The mapped address the first STUN server that answered reports (the first relay's
    /// port when it answers).
    pub(crate) fn reflexive(&self) -> Option<SocketAddr> {
        self.targets
            .iter()
            .find_map(|t| self.answers.get(t))
            .map(|(m, _)| *m)
    }

    /// Every server's latest answer, `(server, mapped)`, in target order.
    pub(crate) fn answers(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.targets
            .iter()
            .filter_map(|t| self.answers.get(t).map(|(m, _)| (*t, *m)))
            .collect()
    }

    /// The verdict from the answers so far, given our own host addresses.
    pub(crate) fn verdict(&self, local: &[SocketAddr]) -> NatKind {
        let mapped: Vec<SocketAddr> = self.answers.values().map(|(m, _)| *m).collect();
        let Some(first) = mapped.first() else {
            return NatKind::Unknown;
        };
        if mapped.iter().any(|m| local.contains(m)) {
            NatKind::Public
        } else if mapped.iter().any(|m| m != first) {
            NatKind::EndpointDependent
        } else if mapped.len() >= 2 {
            NatKind::EndpointIndependent
        } else {
            NatKind::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn classifies_from_answers() {
        let now = Instant::now();
        let (r1, r2) = (addr("203.0.113.1:3478"), addr("203.0.113.1:3479"));
        let mut nc = NetCheck::new(vec![r1, r2]);
        let mut n = 0u8;
        let round = nc.poll_round(now, false, || {
            n += 1;
            [n; 12]
        });
        assert_eq!(round.len(), 2);
        assert_eq!(nc.verdict(&[]), NatKind::Unknown);
        let m = addr("198.51.100.9:4000");
        assert!(nc.handle_response(now, r1, round[0].1, m));
        assert!(
            !nc.handle_response(now, r1, [99; 12], m),
            "unknown transaction"
        );
        assert_eq!(nc.verdict(&[]), NatKind::Unknown, "one answer cannot tell");
        assert!(nc.handle_response(now, r2, round[1].1, m));
        assert_eq!(nc.verdict(&[]), NatKind::EndpointIndependent);
        assert_eq!(nc.verdict(&[m]), NatKind::Public);
        assert_eq!(nc.reflexive(), Some(m));

        // Answered: the next round follows after the interval, a longer one while quiet.
        assert!(nc
            .poll_round(now + Duration::from_secs(1), false, || [6; 12])
            .is_empty());
        let later = now + STUN_RETRY;
        let round = nc.poll_round(later, false, || [7; 12]);
        assert_eq!(
            round.len(),
            2,
            "the first round had no verdict yet: retried soon"
        );
        nc.handle_response(later, r1, [7; 12], m);
        assert!(nc
            .poll_round(later + STUN_INTERVAL, true, || [8; 12])
            .is_empty());
        assert_eq!(nc.next_round(true), Some(later + STUN_IDLE_INTERVAL));
        assert_eq!(nc.next_round(false), Some(later + STUN_INTERVAL));
        assert_eq!(
            nc.poll_round(later + STUN_INTERVAL, false, || [9; 12])
                .len(),
            2
        );
        let mut nc2 = NetCheck::new(vec![r1, r2]);
        let mut k = 0u8;
        let round = nc2.poll_round(now, false, || {
            k += 1;
            [k; 12]
        });
        nc2.handle_response(now, r1, round[0].1, m);
        nc2.handle_response(now, r2, round[1].1, addr("198.51.100.9:4001"));
        assert_eq!(nc2.verdict(&[]), NatKind::EndpointDependent);
    }
}
