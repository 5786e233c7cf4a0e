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
//! Rounds repeat every [`STUN_INTERVAL`] (a changed mapping is noticed within that time) and
//! every [`STUN_RETRY`] while no answer has come.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::NatKind;

/// How often the NAT is re-classified once answers come back: mappings change rarely, and
/// each round costs one small datagram per STUN server.
pub const STUN_INTERVAL: Duration = Duration::from_secs(60);
/// Retry interval while fewer than two STUN servers have answered.
pub const STUN_RETRY: Duration = Duration::from_secs(5);
/// Answers older than this no longer count.
const ANSWER_MAX_AGE: Duration = Duration::from_secs(150);

/// STUN probing state.
pub(crate) struct NetCheck {
    targets: Vec<SocketAddr>,
    outstanding: BTreeMap<[u8; 12], SocketAddr>,
    answers: BTreeMap<SocketAddr, (SocketAddr, Instant)>,
    next_round: Instant,
}

impl NetCheck {
    pub(crate) fn new(targets: Vec<SocketAddr>, now: Instant) -> Self {
        Self {
            targets,
            outstanding: BTreeMap::new(),
            answers: BTreeMap::new(),
            next_round: now,
        }
    }

    /// Replaces the STUN servers (e.g. the relay moved).
    pub(crate) fn set_targets(&mut self, targets: Vec<SocketAddr>, now: Instant) {
        if targets != self.targets {
            self.targets = targets;
            self.answers.clear();
            self.next_round = now;
        }
    }

    /// When the next round is due.
    pub(crate) fn next_round(&self) -> Instant {
        self.next_round
    }

    /// When a round is due, the (destination, transaction id) pairs to send requests for.
    pub(crate) fn poll_round(
        &mut self,
        now: Instant,
        mut tx_id: impl FnMut() -> [u8; 12],
    ) -> Vec<(SocketAddr, [u8; 12])> {
        if now < self.next_round {
            return Vec::new();
        }
        self.answers
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ANSWER_MAX_AGE);
        // A verdict needs two answers; until then (loss, a server down) retry soon.
        let enough = self.answers.len() >= 2.min(self.targets.len());
        self.next_round = now + if enough { STUN_INTERVAL } else { STUN_RETRY };
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
        let mut nc = NetCheck::new(vec![r1, r2], now);
        let mut n = 0u8;
        let round = nc.poll_round(now, || {
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

        let round = nc.poll_round(now + STUN_INTERVAL, || [7; 12]);
        assert_eq!(round.len(), 2);
        let mut nc2 = NetCheck::new(vec![r1, r2], now);
        let mut k = 0u8;
        let round = nc2.poll_round(now, || {
            k += 1;
            [k; 12]
        });
        nc2.handle_response(now, r1, round[0].1, m);
        nc2.handle_response(now, r2, round[1].1, addr("198.51.100.9:4001"));
        assert_eq!(nc2.verdict(&[]), NatKind::EndpointDependent);
    }
}
