//! The handshake guard: what stands between an unauthenticated datagram and a key agreement.
//!
//! # Job
//! A handshake initiation costs its receiver X25519 operations (one to learn who sent it, more
//! in boringtun to answer it), and one captured initiation can be replayed at line rate. So
//! every WireGuard datagram passes the guard, one for the whole node, before any key
//! agreement:
//! 1. a **replay filter**: the mac1 of every initiation that passed step 2 (a MAC over the
//!    whole message, so a new initiation always has a new one) goes into a small direct-mapped
//!    table; a datagram carrying a mac1 already there is a replay (WireGuard never sends the
//!    same initiation twice) and is dropped before any BLAKE2s or cookie reply, counted as
//!    `handshake_replay`. Only verified mac1s enter the table, so nobody without our public
//!    key can evict one;
//! 2. boringtun's [`RateLimiter`] checks **mac1** (a keyed BLAKE2s with our public key: a
//!    sender that does not know our key fails here, cheaply). The guard counts handshake
//!    messages; above [`HANDSHAKE_LOAD_THRESHOLD`] in one [`LIMITER_RESET`] period the node is
//!    **under load** and a valid **mac2** is demanded, everything else being answered with a
//!    cookie reply bound to the sender's address (WireGuard's under-load mode), counted as
//!    `handshake_cookie`;
//! 3. a **global budget** of initiations admitted to key agreement, a token bucket
//!    ([`HANDSHAKE_BUDGET`] a second), for senders that can answer cookies from many
//!    addresses. Initiations over budget are dropped and counted as `handshake_flood`.
//!
//! # Two limiters, and clocks
//! boringtun's limiter decides "under load" from a count it resets on the real clock, which
//! would make simulations (many virtual seconds per real one) depend on the speed of the
//! machine. So the guard keeps the count itself, on the node's clock (the node calls
//! [`HandshakeGuard::handle_reset`] from its timer table every [`LIMITER_RESET`]), and holds
//! two boringtun limiters made with fixed answers: one that is never under load (mac1 only),
//! which every peer link's `Tunn` shares, so a link's own check of an admitted message is one
//! BLAKE2s more and never a second count; and one that is always under load (mac1 and mac2),
//! used while the node is. What still follows real time is the cookie secret (rotated every
//! two minutes, as WireGuard says) and the limiters' OS-random secrets; that stays behind the
//! peer link (this module and `link.rs` are the only users of boringtun's `noise` types).
//!
//! # Driving contract
//! [`HandshakeGuard::admit`] for every WireGuard datagram, before the peer link sees it; act on
//! the [`Admission`]. [`HandshakeGuard::handle_reset`] every [`LIMITER_RESET`] of node time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};

use crate::keys::PeerKey;
use crate::status::DropCounters;

/// Handshake messages a period of [`LIMITER_RESET`] (across all peers and sources) above which
/// mac2 is demanded. A member sees one initiation and one response per peer per two-minute
/// rekey; 64 a second lets a member that joins a network of 30 answer every first handshake
/// at once, and keeps the share of the budget an attacker with one address can take below
/// two thirds of it.
pub const HANDSHAKE_LOAD_THRESHOLD: u64 = 64;
/// Initiations admitted to key agreement a second across all sources, and the burst allowed.
/// Each costs about six X25519 scalar multiplications (~0.3 ms on a slow core), so 100 a
/// second is at most a few percent of one core, while a member joining a network of 100
/// members can answer all their first handshakes at once.
pub const HANDSHAKE_BUDGET: u32 = 100;
/// How often the node resets the count of handshake messages: boringtun's own period.
pub const LIMITER_RESET: Duration = Duration::from_secs(1);

/// Slots of the replay filter (16 bytes each): the most recent initiations a member sees are
/// one per peer per two-minute rekey plus retries, so 1,024 covers every peer of a large
/// network; an older replay still meets mac1, the cookies and the budget.
const REPLAY_SLOTS: usize = 1_024;
/// Where mac1 sits in a handshake initiation (148 bytes: mac1 and mac2 are its last 32).
const INIT_LEN: usize = 148;
const INIT_MAC1: std::ops::Range<usize> = 116..132;

/// Budget tokens are counted in thousandths, so refills are exact at millisecond resolution.
const MILLI: u64 = 1_000;

/// What to do with a WireGuard datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission<'b> {
    /// A response, cookie reply or data packet for our receiver index `index` (the upper 24
    /// bits of the message's receiver index): hand it to that peer's link.
    Index(u32),
    /// A handshake initiation admitted to key agreement; `initiator` is its static key when
    /// the caller asked to identify it (direct datagrams), `None` otherwise.
    Initiation { initiator: Option<PeerKey> },
    /// Under load and without a valid mac2: send this cookie reply back to the sender.
    Cookie(&'b [u8]),
    /// Counted and dropped (bad mac1, malformed, over budget, unknown initiator).
    Dropped,
}

/// The node's shared handshake limiter and global key-agreement budget (see the module doc).
pub(crate) struct HandshakeGuard {
    /// Never under load: checks mac1 only. Shared with every peer link's `Tunn`.
    mac1_only: Arc<RateLimiter>,
    /// Always under load: checks mac1 and mac2, and makes cookie replies.
    with_cookie: RateLimiter,
    /// Handshake messages since the last reset, and how many make the node under load.
    handshakes: u64,
    load_threshold: u64,
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
    /// Available budget in thousandths of an initiation, and when it was last refilled.
    budget_milli: u64,
    refilled_at: Option<Instant>,
    budget: u32,
    /// Initiations admitted to key agreement so far.
    key_agreements: u64,
    /// The mac1 of recent verified initiations, each in the slot its first bytes pick.
    seen_mac1: Box<[[u8; 16]; REPLAY_SLOTS]>,
}

impl HandshakeGuard {
    /// The guard of the member with static key `secret`, with the default limits.
    pub(crate) fn new(secret: x25519_dalek::StaticSecret) -> Self {
        Self::with_limits(secret, HANDSHAKE_LOAD_THRESHOLD, HANDSHAKE_BUDGET)
    }

    /// A guard with its own load threshold and budget (tests lift one to exercise the other).
    pub(crate) fn with_limits(
        secret: x25519_dalek::StaticSecret,
        load_threshold: u64,
        budget: u32,
    ) -> Self {
        let public = x25519_dalek::PublicKey::from(&secret);
        Self {
            mac1_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            with_cookie: RateLimiter::new(&public, 0),
            handshakes: 0,
            load_threshold,
            secret,
            public,
            budget_milli: u64::from(budget) * MILLI,
            refilled_at: None,
            budget,
            key_agreements: 0,
            seen_mac1: Box::new([[0u8; 16]; REPLAY_SLOTS]),
        }
    }

    /// The limiter every peer link's `Tunn` must share.
    pub(super) fn limiter(&self) -> Arc<RateLimiter> {
        Arc::clone(&self.mac1_only)
    }

    /// Initiations admitted to key agreement so far.
    #[cfg(test)]
    pub(crate) fn key_agreements(&self) -> u64 {
        self.key_agreements
    }

    /// Starts a new period of [`LIMITER_RESET`] for the count of handshake messages.
    pub(crate) fn handle_reset(&mut self) {
        self.handshakes = 0;
    }

    /// Checks one WireGuard datagram from `from` before any key agreement. `identify` asks
    /// for the initiator's static key of an admitted initiation (one X25519). A cookie reply
    /// is written into `scratch`.
    pub(crate) fn admit<'b>(
        &mut self,
        now: Instant,
        from: IpAddr,
        bytes: &[u8],
        identify: bool,
        scratch: &'b mut [u8],
        drops: &mut DropCounters,
    ) -> Admission<'b> {
        let mac1 = (bytes.len() == INIT_LEN && bytes.first() == Some(&1))
            .then(|| bytes.get(INIT_MAC1))
            .flatten()
            .and_then(|m| <[u8; 16]>::try_from(m).ok());
        let slot = mac1.map(|m| Self::slot(&m));
        if let (Some(m), Some(i)) = (mac1, slot) {
            if self.seen_mac1[i] == m {
                drops.handshake_replay += 1;
                return Admission::Dropped;
            }
        }
        // Handshake messages (initiations, responses) with a valid mac1 count towards the load.
        let handshake = matches!(bytes.first(), Some(1 | 2));
        let limiter = if self.handshakes >= self.load_threshold {
            &self.with_cookie
        } else {
            &*self.mac1_only
        };
        let verdict = limiter.verify_packet(Some(from), bytes, scratch);
        if handshake && matches!(verdict, Ok(_) | Err(TunnResult::WriteToNetwork(_))) {
            self.handshakes = self.handshakes.saturating_add(1);
        }
        let packet = match verdict {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                if let (Some(m), Some(i)) = (mac1, slot) {
                    self.seen_mac1[i] = m;
                }
                drops.handshake_cookie += 1;
                return Admission::Cookie(cookie);
            }
            Err(_) => {
                drops.wireguard += 1;
                return Admission::Dropped;
            }
        };
        let init = match packet {
            Packet::HandshakeInit(init) => init,
            Packet::HandshakeResponse(p) => return Admission::Index(p.receiver_idx >> 8),
            Packet::PacketCookieReply(p) => return Admission::Index(p.receiver_idx >> 8),
            Packet::PacketData(p) => return Admission::Index(p.receiver_idx >> 8),
        };
        if let (Some(m), Some(i)) = (mac1, slot) {
            self.seen_mac1[i] = m;
        }
        if !self.take_budget(now) {
            drops.handshake_flood += 1;
            return Admission::Dropped;
        }
        self.key_agreements += 1;
        if !identify {
            return Admission::Initiation { initiator: None };
        }
        match parse_handshake_anon(&self.secret, &self.public, &init) {
            Ok(half) => Admission::Initiation {
                initiator: Some(PeerKey(half.peer_static_public)),
            },
            Err(_) => {
                drops.wireguard += 1;
                Admission::Dropped
            }
        }
    }

    /// The replay filter's slot for a mac1 (a MAC output, so its bytes are uniform).
    fn slot(mac1: &[u8; 16]) -> usize {
        usize::from(u16::from_le_bytes([mac1[0], mac1[1]])) % REPLAY_SLOTS
    }

    /// Takes one initiation from the budget, refilling it for the time since the last refill.
    fn take_budget(&mut self, now: Instant) -> bool {
        let cap = u64::from(self.budget) * MILLI;
        if let Some(at) = self.refilled_at {
            let ms = now.saturating_duration_since(at).as_millis();
            let ms = u64::try_from(ms).unwrap_or(u64::MAX);
            self.budget_milli = cap.min(
                self.budget_milli
                    .saturating_add(ms.saturating_mul(u64::from(self.budget))),
            );
            // A full bucket restarts at `now`; otherwise the sub-millisecond remainder is kept
            // for the next refill (and `ms` is small, as the bucket fills within a second).
            self.refilled_at = Some(if self.budget_milli == cap {
                now.max(at)
            } else {
                at + Duration::from_millis(ms)
            });
        } else {
            self.refilled_at = Some(now);
        }
        if self.budget_milli < MILLI {
            return false;
        }
        self.budget_milli -= MILLI;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeSecret;
    use crate::node::link::{LinkOutput, PeerLink, HANDSHAKE_RETRY};
    use boringtun::noise::Tunn;
    use rand::SeedableRng;
    use std::net::Ipv4Addr;

    const PSK: [u8; 32] = [5; 32];

    fn keys() -> (NodeSecret, NodeSecret, NodeSecret) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
        (
            NodeSecret::generate(&mut rng),
            NodeSecret::generate(&mut rng),
            NodeSecret::generate(&mut rng),
        )
    }

    /// `n` real handshake initiations from `from` to `to`, each new (its own ephemeral key).
    fn initiations(from: &NodeSecret, to: &NodeSecret, n: usize) -> Vec<Vec<u8>> {
        let mut tunn = Tunn::new(
            from.to_static(),
            to.public().to_public(),
            Some(PSK),
            None,
            1,
            None,
        );
        let mut buf = vec![0u8; 256];
        (0..n)
            .map(|_| {
                let TunnResult::WriteToNetwork(b) =
                    tunn.format_handshake_initiation(&mut buf, true)
                else {
                    panic!("an initiation");
                };
                b.to_vec()
            })
            .collect()
    }

    fn initiation(from: &NodeSecret, to: &NodeSecret) -> Vec<u8> {
        initiations(from, to, 1).remove(0)
    }

    fn source(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0x00ff_ffff)))
    }

    #[test]
    fn a_bad_mac1_never_reaches_key_agreement_and_a_replay_is_dropped_before_any_crypto() {
        let (a, b, c) = keys();
        let mut guard = HandshakeGuard::new(b.to_static());
        let mut scratch = vec![0u8; 256];
        let mut drops = DropCounters::default();
        let now = Instant::now();
        let mut forged = initiation(&a, &b);
        forged[INIT_MAC1.start] ^= 1;
        // An initiation meant for someone else carries a mac1 for their key.
        let for_c = initiation(&a, &c);
        for bytes in [&forged, &for_c] {
            for _ in 0..1_000 {
                let got = guard.admit(now, source(1), bytes, true, &mut scratch, &mut drops);
                assert_eq!(got, Admission::Dropped);
            }
        }
        assert_eq!(guard.key_agreements(), 0, "no X25519 for a bad mac1");
        assert_eq!(drops.wireguard, 2_000);
        assert_eq!(drops.handshake_cookie, 0, "a bad mac1 is not answered");
        assert_eq!(
            drops.handshake_replay, 0,
            "a bad mac1 never enters the filter"
        );
        let real = initiation(&a, &b);
        let got = guard.admit(now, source(1), &real, true, &mut scratch, &mut drops);
        assert_eq!(
            got,
            Admission::Initiation {
                initiator: Some(a.public())
            }
        );
        assert_eq!(guard.key_agreements(), 1);
        // The same initiation again, from anywhere and with any mac2, is a replay.
        let mut other_mac2 = real.clone();
        other_mac2[INIT_LEN - 1] ^= 0xff;
        for (i, bytes) in [&real, &other_mac2]
            .into_iter()
            .cycle()
            .take(10_000)
            .enumerate()
        {
            let from = source(u32::try_from(i).expect("small"));
            let got = guard.admit(now, from, bytes, true, &mut scratch, &mut drops);
            assert_eq!(got, Admission::Dropped);
        }
        assert_eq!(guard.key_agreements(), 1);
        assert_eq!(drops.handshake_replay, 10_000);
        assert_eq!(drops.handshake_cookie, 0, "replays get no cookie reply");
    }

    #[test]
    fn under_load_initiations_without_mac2_get_a_cookie_and_no_key_agreement() {
        let (a, b, _) = keys();
        let mut guard = HandshakeGuard::new(b.to_static());
        let mut scratch = vec![0u8; 256];
        let mut drops = DropCounters::default();
        let now = Instant::now();
        let n = 300;
        let (mut admitted, mut cookies) = (0u64, 0u64);
        for init in initiations(&a, &b, n) {
            match guard.admit(now, source(7), &init, true, &mut scratch, &mut drops) {
                Admission::Initiation { .. } => admitted += 1,
                Admission::Cookie(reply) => {
                    assert_eq!(reply.len(), 64, "a cookie reply");
                    assert_eq!(reply[0], 3);
                    cookies += 1;
                }
                other @ (Admission::Index(_) | Admission::Dropped) => {
                    panic!("unexpected {other:?}")
                }
            }
        }
        // The count is reset only by `handle_reset`, from the node's timer table.
        assert_eq!(admitted, HANDSHAKE_LOAD_THRESHOLD);
        assert_eq!(guard.key_agreements(), HANDSHAKE_LOAD_THRESHOLD);
        assert_eq!(cookies, n as u64 - HANDSHAKE_LOAD_THRESHOLD);
        assert_eq!(drops.handshake_cookie, cookies);
    }

    #[test]
    fn a_real_peer_that_answers_the_cookie_completes_its_handshake_under_load() {
        let (a, b, c) = keys();
        let guard_a = HandshakeGuard::new(a.to_static());
        let mut guard_b = HandshakeGuard::new(b.to_static());
        let mut link_a = PeerLink::new(a.to_static(), b.public(), PSK, 1, &guard_a);
        let mut link_b = PeerLink::new(b.to_static(), a.public(), PSK, 2, &guard_b);
        let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let (addr_a, addr_b) = (
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
        );
        let mut scratch = vec![0u8; 2048];
        let mut drops = DropCounters::default();
        let now = Instant::now();
        // Someone else's initiations put B under load.
        for (i, junk) in (0..).zip(initiations(&c, &b, 100)) {
            guard_b.admit(now, source(i), &junk, true, &mut scratch, &mut drops);
        }
        assert!(drops.handshake_cookie > 0, "B is under load");
        let agreements = guard_b.key_agreements();

        let mut packet = vec![0u8; 28];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&28u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = 253;
        packet[12..16].copy_from_slice(&ip_a.octets());
        packet[16..20].copy_from_slice(&ip_b.octets());
        let mut sent = Vec::new();
        link_a.encapsulate(now, &packet, &mut scratch, &mut drops, |b| {
            sent.push(b.to_vec())
        });
        let init = sent.pop().expect("a starts a handshake");
        let cookie = match guard_b.admit(now, addr_a, &init, true, &mut scratch, &mut drops) {
            Admission::Cookie(c) => c.to_vec(),
            other @ (Admission::Index(_) | Admission::Initiation { .. } | Admission::Dropped) => {
                panic!("expected a cookie reply, got {other:?}")
            }
        };
        assert_eq!(
            guard_b.key_agreements(),
            agreements,
            "no key agreement for it"
        );

        let mut outputs = Vec::new();
        let deliver = |link: &mut PeerLink,
                       from: IpAddr,
                       bytes: &[u8],
                       allowed,
                       outputs: &mut Vec<(u8, Vec<u8>)>| {
            let mut buf = vec![0u8; 2048];
            let mut d = DropCounters::default();
            link.decapsulate(now, from, bytes, allowed, &mut buf, &mut d, |o| {
                outputs.push(match o {
                    LinkOutput::Reply(b) => (0, b.to_vec()),
                    LinkOutput::Send(b) => (1, b.to_vec()),
                    LinkOutput::Tun(b) => (2, b.to_vec()),
                })
            });
        };
        deliver(&mut link_a, addr_b, &cookie, ip_b, &mut outputs);
        assert!(outputs.is_empty(), "a cookie reply only stores the cookie");
        // A's retry carries mac2 from the cookie and is admitted.
        let retry = link_a
            .handle_timeout(now + HANDSHAKE_RETRY, &mut scratch, &mut drops)
            .expect("retry due")
            .to_vec();
        let got = guard_b.admit(now, addr_a, &retry, true, &mut scratch, &mut drops);
        assert_eq!(
            got,
            Admission::Initiation {
                initiator: Some(a.public())
            }
        );
        deliver(&mut link_b, addr_a, &retry, ip_a, &mut outputs);
        let response = match outputs.pop() {
            Some((0, r)) => r,
            other => panic!("expected a handshake response, got {other:?}"),
        };
        deliver(&mut link_a, addr_b, &response, ip_b, &mut outputs);
        assert!(link_a.session_fresh(), "A's handshake completed");
        let data = match outputs.pop() {
            Some((1, d)) => d,
            other => panic!("expected the queued packet, got {other:?}"),
        };
        deliver(&mut link_b, addr_a, &data, ip_a, &mut outputs);
        assert_eq!(outputs.pop(), Some((2, packet)));
    }

    #[test]
    fn the_budget_holds_under_floods_from_distinct_forged_sources() {
        let (a, b, _) = keys();
        let mut scratch = vec![0u8; 256];
        let t0 = Instant::now();
        // 100,000 replays of one initiation at 10,000 a second, each from a new address: one
        // key agreement, the rest dropped by the replay filter.
        let replayed = initiation(&a, &b);
        let mut guard = HandshakeGuard::new(b.to_static());
        let mut drops = DropCounters::default();
        let n: u32 = 100_000;
        for i in 0..n {
            let now = t0 + Duration::from_micros(100) * i;
            guard.admit(now, source(i), &replayed, true, &mut scratch, &mut drops);
        }
        assert_eq!(guard.key_agreements(), 1);
        assert_eq!(drops.handshake_replay, u64::from(n) - 1);

        // New initiations from a sender that answers every cookie (the limiter never demands
        // one, so only the budget stands): 2,000 at 1,000 a second of node time.
        let fresh = initiations(&a, &b, 2_000);
        let mut guard = HandshakeGuard::with_limits(b.to_static(), u64::MAX, HANDSHAKE_BUDGET);
        let mut drops = DropCounters::default();
        for (i, init) in (0..).zip(&fresh) {
            let now = t0 + Duration::from_millis(1) * i;
            guard.admit(now, source(i), init, true, &mut scratch, &mut drops);
        }
        let bound = u64::from(HANDSHAKE_BUDGET) * 3;
        println!(
            "{} key agreements for {} new initiations over 2 s (bound {bound})",
            guard.key_agreements(),
            fresh.len()
        );
        assert!(guard.key_agreements() <= bound);
        assert!(
            guard.key_agreements() >= u64::from(HANDSHAKE_BUDGET) * 2,
            "the budget refills"
        );
        assert_eq!(
            drops.handshake_flood,
            fresh.len() as u64 - guard.key_agreements()
        );

        // With the default limiter the cookies stop them first, from any number of addresses.
        let mut guard = HandshakeGuard::new(b.to_static());
        let mut drops = DropCounters::default();
        for (i, init) in (0..).zip(&fresh) {
            let now = t0 + Duration::from_millis(1) * i;
            guard.admit(now, source(i), init, true, &mut scratch, &mut drops);
        }
        assert!(guard.key_agreements() <= HANDSHAKE_LOAD_THRESHOLD);
        assert_eq!(
            drops.handshake_cookie,
            fresh.len() as u64 - guard.key_agreements()
        );
    }
}
