//! Members helping each other when no relay answers: passing call-mes, carrying ciphertext,
//! and remembering the members across a restart.
//!
//! # Carrying ciphertext
//! While no relay answers, a member's relayed traffic for a peer it has no direct path to goes
//! to a member it does reach directly (public members first: they reach the most), framed
//! exactly as for a relay ([`Frame::RelaySend`]). That member, unless `relay_for_peers` is off,
//! passes it to the target over its own live direct path as a [`Frame::RelayRecv`] naming the
//! sender, within a per-sender budget ([`CARRY_BURST`], [`CARRY_PER_SEC`]); it only ever sees
//! WireGuard ciphertext or sealed disco messages. The target answers through the member the
//! traffic came from. Only datagrams from a live direct path of a member are carried, so nobody
//! on the internet can use a member as an open relay, and a lie about the sender only yields a
//! datagram that does not decrypt. When a relay answers again, relayed traffic returns to it.
//!
//! # Remembered members
//! The driver saves [`Node::member_entries`] (each member's sealed announcement, with its
//! current direct address in place of the relay-observed one) and hands them to a restarted
//! node with [`Node::restore_members`]. They are taken like a relay push at change counter 0:
//! announcements open only with the network's control key and are held to the announcement
//! floors, so the file cannot introduce anyone, and the first snapshot of a relay replaces
//! them (members it does not list are dropped, after the usual grace if their direct path
//! answers). Until then the node probes the remembered addresses, so a member restarted while
//! every relay is down finds its public peers at once and its punchable ones with a passed
//! call-me.
//!
//! # Job
//! A call-me ("probe these addresses of mine now") normally travels through a relay, so both
//! sides of a pair punch their NATs at the same moment. When no relay answers (all down, or
//! unreachable from here) a member sends the sealed call-me to up to [`MAX_HELPERS`] members it
//! has a live direct path to, wrapped in a [`Disco::Forward`]; each passes it on over its own
//! direct path to the target as a [`Disco::Forwarded`], adding the address it sees the caller
//! at (the caller may not know its own public address: its STUN servers are the relays). The
//! target opens the inner call-me with the caller's disco key, so the helper can neither read
//! nor forge it, checks its stamp like any disco message, and pings the caller's addresses and
//! the helper's observation. A member restarted while every relay is down thus finds its
//! punchable peers through a third member.
//!
//! # Abuse
//! Members do not fully trust each other. A helper passes a forward only from a member to a
//! member, both with live direct paths (so only to addresses that proved to be that member),
//! never to itself or back to the sender, at most [`MAX_FORWARD_LEN`] bytes, and within a
//! per-sender token bucket; a forward that arrived through a relay is not passed (a relay is
//! up then, and the caller uses it). A forwarded message whose inner sender is not the member
//! it claims, or that is not a call-me, is dropped and counted. Passing costs the helper one
//! datagram per datagram received: no amplification.
//!
//! [`MAX_FORWARD_LEN`]: crate::wire::MAX_FORWARD_LEN

use std::net::SocketAddr;
use std::time::Instant;

use super::Node;
use crate::keys::PeerKey;
use crate::wire::{self, Disco, Frame, MemberEntry, MAX_FORWARD_LEN};

/// Most members a call-me is handed to for passing on: two independent helpers survive one
/// of them losing its path, and each costs one datagram.
pub const MAX_HELPERS: usize = 2;

/// Datagrams one member may have us carry in a burst (a TCP window's worth of packets)...
pub const CARRY_BURST: u32 = 2048;
/// ...and per second after it (about 20 Mbit/s of full-size packets): enough for interactive
/// use and modest transfers while the relays are down, without letting one member take a
/// helper's uplink.
pub const CARRY_PER_SEC: u32 = 2000;

/// A token bucket of datagrams on `now`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CarryBucket {
    tokens: u32,
    last: Instant,
}

impl CarryBucket {
    /// A full bucket at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            tokens: CARRY_BURST,
            last: now,
        }
    }

    /// Takes one datagram's token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.last).as_millis();
        let refill = u32::try_from(ms * u128::from(CARRY_PER_SEC) / 1000).unwrap_or(u32::MAX);
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(CARRY_BURST);
            self.last = now;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

/// What this member passed on or refused for others (for tests and the curious).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForwardCounters {
    /// Forwards asked of others (one per helper).
    pub asked: u64,
    /// Forwards passed on to their target.
    pub passed: u64,
    /// Forwards refused: no direct path to the target or from the sender, over budget,
    /// addressed to ourselves or the sender, or too large.
    pub refused: u64,
    /// Forwarded call-mes acted on.
    pub received: u64,
    /// Datagrams carried between two other members.
    pub carried: u64,
    /// Datagrams refused for carrying: not from a live direct path, no live direct path to
    /// the target, over budget, or carrying switched off.
    pub carry_refused: u64,
}

impl Node {
    /// Every current member's entry, to remember across a restart (see the module doc): the
    /// relay's entry, with the direct path's address as the observed one where there is a path.
    pub fn member_entries(&self) -> Vec<MemberEntry> {
        self.peers
            .values()
            .map(|p| {
                let mut entry = p.entry.clone();
                if let Some((addr, _)) = p.direct() {
                    entry.observed = addr;
                }
                entry
            })
            .collect()
    }

    /// Takes remembered members (from [`Node::member_entries`] of an earlier run) as if a
    /// relay had pushed them at change counter 0.
    pub fn restore_members(&mut self, now: Instant, entries: Vec<MemberEntry>) {
        self.now = self.now.max(now);
        for entry in entries {
            self.apply_push(now, 0, entry);
        }
        self.refresh_timers();
    }

    /// What this member forwarded, refused and received so far.
    pub fn forward_counters(&self) -> ForwardCounters {
        self.forwards
    }

    /// Hands `call_me` for member `to` to up to [`MAX_HELPERS`] members with a live direct
    /// path, for passing on (no relay answers).
    pub(super) fn forward_call_me(&mut self, now: Instant, to: PeerKey, call_me: &Disco) {
        let Some(inner) = self.seal_for(now, to, call_me) else {
            return;
        };
        if inner.len() > MAX_FORWARD_LEN {
            return;
        }
        let helpers: Vec<(PeerKey, SocketAddr, u16)> = self
            .peers
            .values()
            .filter(|p| p.key != to)
            .filter_map(|p| {
                p.live_direct(now)
                    .map(|(addr, socket)| (p.key, addr, socket))
            })
            .take(MAX_HELPERS)
            .collect();
        for (helper, addr, socket) in helpers {
            let msg = Disco::Forward {
                to,
                inner: inner.clone(),
            };
            if let Some(dgram) = self.seal_for(now, helper, &msg) {
                self.forwards.asked += 1;
                self.out.udp(socket, addr, &dgram);
            }
        }
    }

    /// `sender` (at `from`, or through a relay if `None`) asks us to pass `inner` to `to`.
    pub(super) fn handle_forward(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        sender: PeerKey,
        to: PeerKey,
        inner: &[u8],
    ) {
        let Some(observed) = from else {
            self.forwards.refused += 1;
            return;
        };
        let sender_direct = self
            .peers
            .get(&sender)
            .is_some_and(|p| p.live_direct(now).is_some());
        let target = self.peers.get(&to).and_then(|p| p.live_direct(now));
        let within_budget = self
            .peers
            .get_mut(&sender)
            .is_some_and(|p| p.forwards.take(now));
        let (Some((addr, socket)), true, true, false, false, true) = (
            target,
            sender_direct,
            within_budget,
            to == sender,
            to == self.public,
            inner.len() <= MAX_FORWARD_LEN,
        ) else {
            self.forwards.refused += 1;
            return;
        };
        let msg = Disco::Forwarded {
            from: sender,
            observed,
            inner: inner.to_vec(),
        };
        if let Some(dgram) = self.seal_for(now, to, &msg) {
            tracing::debug!(from = %sender.short(), to = %to.short(), %observed, "passing a call-me on (no relay answers the caller)");
            self.forwards.passed += 1;
            self.out.udp(socket, addr, &dgram);
        }
    }

    /// `helper` (at `via`) passed us `inner`, a call-me from `origin`, whom it sees at
    /// `observed`: ping the caller's addresses and the helper's observation.
    pub(super) fn handle_forwarded(
        &mut self,
        now: Instant,
        via: Option<SocketAddr>,
        helper: PeerKey,
        origin: PeerKey,
        observed: SocketAddr,
        inner: &[u8],
    ) {
        let sealed = match Frame::parse(inner) {
            Ok(Frame::Disco { sender, sealed })
                if sender == origin && origin != helper && via.is_some() =>
            {
                sealed
            }
            _ => {
                self.drops.unauthenticated += 1;
                return;
            }
        };
        let Some(Disco::CallMe { mut endpoints }) =
            self.open_disco_checked(now, via, origin, sealed)
        else {
            self.drops.unauthenticated += 1;
            return;
        };
        self.forwards.received += 1;
        tracing::debug!(caller = %origin.short(), helper = %helper.short(), %observed, "probing a caller whose call-me a member passed on");
        endpoints.push(observed);
        let Some(p) = self.peers.get_mut(&origin) else {
            return;
        };
        // The caller cannot reach us through a relay, so whatever our side believes about the
        // path, probe the helper's observation of it too (once per forwarded call-me, which
        // the helper's budget and the replay check bound).
        let mut targets = p.paths.handle_call_me(now, endpoints);
        if !targets.contains(&observed) && super::path_selection::usable_candidate(&observed) {
            targets.push(observed);
        }
        for addr in targets {
            self.send_ping(now, origin, Some(addr), 0);
        }
    }

    /// `msg` sealed for member `to` with a fresh stamp, or `None` if `to` is unknown.
    pub(super) fn seal_for(&mut self, now: Instant, to: PeerKey, msg: &Disco) -> Option<Vec<u8>> {
        let nonce = self.nonce();
        let stamp = self.disco_stamp(now);
        let p = self.peers.get(&to)?;
        Some(wire::seal_disco(
            &p.disco_key,
            self.public,
            stamp,
            msg,
            nonce,
        ))
    }

    /// The member whose live direct path is `addr`, if any.
    pub(super) fn member_at(&self, now: Instant, addr: SocketAddr) -> Option<PeerKey> {
        self.peers
            .values()
            .find(|p| p.live_direct(now).map(|d| d.0) == Some(addr))
            .map(|p| p.key)
    }

    /// A [`Frame::RelaySend`] from `from`: carry it to `to` if we may (see the module doc).
    pub(super) fn handle_relay_for_peer(
        &mut self,
        now: Instant,
        from: SocketAddr,
        to: PeerKey,
        payload: &[u8],
    ) {
        let sender = match self.member_at(now, from) {
            Some(k) if self.cfg.relay_for_peers && k != to => k,
            Some(_) | None => {
                self.forwards.carry_refused += 1;
                return;
            }
        };
        let target = self.peers.get(&to).and_then(|p| p.live_direct(now));
        let within_budget = self
            .peers
            .get_mut(&sender)
            .is_some_and(|p| p.carry.take(now));
        let (Some((dst, socket)), true) = (target, within_budget) else {
            self.forwards.carry_refused += 1;
            return;
        };
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        Frame::RelayRecv {
            from: sender,
            payload,
        }
        .encode_into(&mut frame);
        self.out.udp(socket, dst, &frame);
        self.scratch = frame;
        self.forwards.carried += 1;
    }

    /// While no relay answers, sends relayed traffic for peers without a live direct path
    /// through a member we reach directly (public ones first); once a relay answers, through
    /// the relays again.
    pub(super) fn update_member_relays(&mut self, now: Instant) {
        if self.relay_answering() {
            self.out.clear_member_relays();
            return;
        }
        let mut helpers: Vec<(bool, PeerKey, SocketAddr, u16)> = self
            .peers
            .values()
            .filter_map(|p| {
                let (addr, socket) = p.live_direct(now)?;
                Some((
                    p.announcement.nat != crate::wire::NatKind::Public,
                    p.key,
                    addr,
                    socket,
                ))
            })
            .collect();
        helpers.sort();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            let Some(p) = self.peers.get(&key) else {
                continue;
            };
            if p.paths.direct_alive(now) {
                self.out.set_member_relay(key, None);
                continue;
            }
            let current = self.out.member_relay(&key);
            let still_good = current.is_some_and(|c| {
                helpers
                    .iter()
                    .any(|(_, k, a, s)| *k != key && (*a, *s) == c)
            });
            if !still_good {
                let pick = helpers
                    .iter()
                    .find(|(_, k, _, _)| *k != key)
                    .map(|(_, _, a, s)| (*a, *s));
                self.out.set_member_relay(key, pick);
            }
        }
    }
}
