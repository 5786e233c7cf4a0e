//! The node's side of path selection: runs each peer's [`PathSelection`] when its deadline
//! comes, seals and sends the probes it asks for, answers and routes the disco messages
//! (pings, pongs, call-mes, spray), and reports path changes. The decisions themselves are
//! [`PathSelection`]'s (see the [`super::peer`] module doc for the path state machine).
//!
//! Every disco message leaves stamped with our wall clock and a random nonce; every one that
//! arrives is opened, then checked against the sender's replay cache before anything else
//! (a stale or replayed message is counted as unauthenticated and dropped).
//!
//! [`PathSelection`]: super::path_selection::PathSelection

use std::net::SocketAddr;
use std::time::Instant;

use rand::RngCore;

use super::path_selection::Probe;
use super::peer::{Path, Peer, PendingPing};
use super::{Event, Node};
use crate::keys::PeerKey;
use crate::wire::{self, Disco, DiscoStamp, NatKind};

impl Node {
    /// Runs path selection for every peer whose deadline has come.
    pub(super) fn path_timers(&mut self, now: Instant) {
        let due: Vec<PeerKey> = self
            .peers
            .values()
            .filter(|p| self.path_deadline(p).is_some_and(|at| at <= now))
            .map(|p| p.key)
            .collect();
        self.run_path_timers(now, due);
    }

    /// Runs path selection for the peers `due`.
    pub(super) fn run_path_timers(&mut self, now: Instant, due: Vec<PeerKey>) {
        let mut probes = Vec::new();
        for key in due {
            self.peer_timers(now, key, &mut probes);
        }
        // Paths came or went: who carries relayed traffic while no relay answers may change.
        self.update_member_relays(now);
    }

    /// When path selection next needs to act for `p`: its own deadline, a stale member's
    /// grace ending, or its birthday probe.
    pub(super) fn path_deadline(&self, p: &Peer) -> Option<Instant> {
        let stale = p.stale_since.map(|t| {
            if p.paths.is_relayed() {
                t
            } else {
                t + super::membership::STALE_GRACE
            }
        });
        [
            Some(p.paths.poll_timeout()),
            Self::pmtu_deadline(self.now, p),
            stale,
            self.birthday_deadline(p),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs `key`'s path selection: a stale member whose grace ended is removed; otherwise
    /// the probes it asks for go out, a fallback to the relay is reported, and a keepalive that
    /// missed its pong makes the relay session check the relay.
    fn peer_timers(&mut self, now: Instant, key: PeerKey, probes: &mut Vec<Probe>) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let expired = p.stale_since.is_some_and(|t| {
            now.saturating_duration_since(t) >= super::membership::STALE_GRACE
                || p.paths.is_relayed()
        });
        if expired {
            self.remove_member(key);
            return;
        }
        probes.clear();
        let no_nat = self.nat == NatKind::Public && p.announcement.nat == NatKind::Public;
        p.paths.set_no_nat(no_nat);
        p.paths
            .set_nat_cap(self.relays[self.primary].proven_keepalive());
        p.paths.set_leads(self.public < key);
        p.paths.note_activity(now, p.link.activity());
        // A keepalive whose predecessor went unanswered: perhaps our network changed (UDP
        // blocked); find out whether the relay still answers.
        let missed_pong = p.paths.missed_pong(now);
        let changed = p.paths.handle_timeout(now, probes);
        if let Some(path) = changed {
            // A handshake in progress went to the old path: retry it on the new one at once.
            p.link.handle_path_change();
            self.path_changed(key, path);
            self.restart_pmtu(now, key, path);
        }
        if missed_pong
            && probes
                .iter()
                .any(|p| matches!(p, Probe::Ping { addr: Some(_), .. }))
        {
            let relay = self.out.peer_relay(&key);
            self.relays[relay].check_if_silent(now);
        }
        for probe in probes.iter() {
            match *probe {
                Probe::CallMe => self.send_call_me(now, key),
                Probe::Ping { addr, socket } => {
                    self.send_ping(now, key, addr, socket);
                }
            }
        }
        self.birthday_timers(now, key);
        self.pmtu_timers(now, key);
    }

    /// Sends a ping to `addr` from our socket `socket`, or through the relay if `addr` is `None`.
    pub(super) fn send_ping(
        &mut self,
        now: Instant,
        key: PeerKey,
        addr: Option<SocketAddr>,
        socket: u16,
    ) -> [u8; 12] {
        let mut tx = [0u8; 12];
        self.rng.fill_bytes(&mut tx);
        let nonce = self.nonce();
        let stamp = self.disco_stamp(now);
        let Some(p) = self.peers.get_mut(&key) else {
            return tx;
        };
        p.paths.record_ping(
            tx,
            PendingPing {
                addr,
                socket,
                sent: now,
                request: None,
            },
        );
        let dgram = wire::seal_disco(&p.disco_key, self.public, stamp, &Disco::Ping { tx }, nonce);
        match addr {
            Some(dst) => self.out.udp(socket, dst, &dgram),
            None => self.relay_payload(key, &dgram),
        }
        tx
    }

    /// Sends a sealed disco message to `key` through the relay.
    pub(super) fn send_disco_via_relay(&mut self, now: Instant, key: PeerKey, msg: &Disco) {
        if let Some(dgram) = self.seal_for(now, key, msg) {
            self.relay_payload(key, &dgram);
        }
    }

    /// Sends a call-me with every address we know for ourselves through the relay.
    pub(super) fn send_call_me(&mut self, now: Instant, key: PeerKey) {
        let mut endpoints = self.local_endpoints.clone();
        endpoints.extend(self.relays.iter().filter_map(|r| r.observed()));
        endpoints.extend(self.port_mapping.as_ref().map(|(_, a)| *a));
        endpoints.sort();
        endpoints.dedup();
        let call_me = Disco::CallMe { endpoints };
        if !self.relay_answering() {
            self.forward_call_me(now, key, &call_me);
        }
        self.send_disco_via_relay(now, key, &call_me);
    }

    /// A fresh stamp for a disco message sealed at `now`: our wall clock and a random nonce.
    pub(super) fn disco_stamp(&mut self, now: Instant) -> DiscoStamp {
        DiscoStamp {
            ts_ms: self.wall_ms(now),
            nonce: self.rng.next_u64(),
        }
    }

    /// Our wall clock at `now`, in milliseconds since the Unix epoch.
    fn wall_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch).as_millis();
        self.epoch_unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// The candidate addresses path selection holds for member `key` (for status and tests).
    pub fn candidates_of(&self, key: &PeerKey) -> Vec<SocketAddr> {
        self.peers
            .get(key)
            .map(|p| p.paths.candidates().into_iter().collect())
            .unwrap_or_default()
    }

    /// Reports a new path to `key`.
    pub(super) fn path_changed(&mut self, key: PeerKey, path: Path) {
        if let Some(p) = self.peers.get(&key) {
            self.out.event(Event::PathChanged {
                key,
                name: p.announcement.name.clone(),
                path,
            });
        }
    }

    /// Opens a disco message from `sender` and checks its stamp (window and replay cache);
    /// `None` (counted) if it does not open or is stale. `from` is only for the log.
    pub(super) fn open_disco_checked(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        sender: PeerKey,
        sealed: &[u8],
    ) -> Option<Disco> {
        let Some(p) = self.peers.get_mut(&sender) else {
            self.drops.unauthenticated += 1;
            return None;
        };
        let Ok((stamp, msg)) = wire::open_disco(&p.disco_key, &sender, sealed) else {
            self.drops.unauthenticated += 1;
            return None;
        };
        let wall = self.wall_ms(now);
        let p = self.peers.get_mut(&sender)?;
        if let Err(why) = p.paths.replay.check(stamp, wall) {
            tracing::debug!(peer = %p.announcement.name, ?why, ?from, "dropping a stale disco message");
            self.drops.unauthenticated += 1;
            return None;
        }
        Some(msg)
    }

    /// A disco message from `sender`, arrived directly from `from` on our socket `socket`, or
    /// (if `from` is `None`) via the relay.
    pub(super) fn handle_disco(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        socket: u16,
        sender: PeerKey,
        sealed: &[u8],
    ) {
        let Some(msg) = self.open_disco_checked(now, from, sender, sealed) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&sender) else {
            return;
        };
        match msg {
            Disco::Ping { tx } => {
                let relay = self.out.peer_relay(&sender);
                let observed = from.unwrap_or(self.relays[relay].target().addr);
                let nonce = self.nonce();
                let stamp = self.disco_stamp(now);
                let Some(p) = self.peers.get_mut(&sender) else {
                    return;
                };
                let pong = wire::seal_disco(
                    &p.disco_key,
                    self.public,
                    stamp,
                    &Disco::Pong { tx, observed },
                    nonce,
                );
                let punch_back = from.and_then(|addr| p.paths.handle_ping_from(now, addr, socket));
                match from {
                    Some(dst) => self.out.udp(socket, dst, &pong),
                    None => self.relay_payload(sender, &pong),
                }
                if let Some(addr) = punch_back {
                    self.send_ping(now, sender, Some(addr), socket);
                }
            }
            Disco::Pong { tx, .. } => {
                let Some(pong) = p.paths.handle_pong(now, tx, from, socket) else {
                    return;
                };
                if let Some(request) = pong.ping.request {
                    self.out.event(Event::PingResult {
                        request,
                        name: p.announcement.name.clone(),
                        rtt: pong.rtt,
                        direct: pong.ping.addr,
                    });
                }
                if let Some(path) = pong.changed {
                    self.path_changed(sender, path);
                    self.restart_pmtu(now, sender, path);
                }
            }
            Disco::CallMe { endpoints } => {
                for addr in p.paths.handle_call_me(now, endpoints) {
                    self.send_ping(now, sender, Some(addr), 0);
                }
            }
            Disco::Spray { reflexive } => self.handle_spray(now, sender, reflexive),
            Disco::Probe { tx, .. } => self.ack_probe(now, from, socket, sender, tx),
            Disco::ProbeAck { tx } => self.handle_probe_ack(now, sender, tx),
            Disco::Forward { to, inner } => self.handle_forward(now, from, sender, to, &inner),
            Disco::Forwarded {
                from: origin,
                observed,
                inner,
            } => self.handle_forwarded(now, from, sender, origin, observed, &inner),
        }
    }
}
