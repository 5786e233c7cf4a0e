//! Path discovery and upkeep: probe rounds with backoff, call-me through the relay, keepalive
//! pings on direct paths, handshake retries on the node's clock, and the disco messages
//! (see the [`super::peer`] module doc for the path state machine).

use std::net::SocketAddr;
use std::time::Instant;

use rand::RngCore;

use super::peer::{self, Path, Peer, PendingPing};
use super::{Event, Node};
use crate::keys::PeerKey;
use crate::wire::{self, Disco};

/// What a probe round wants sent.
enum Probe {
    /// A ping to `addr` from our socket `socket` (`addr` `None`: through the relay).
    Ping {
        addr: Option<SocketAddr>,
        socket: u16,
    },
    /// A call-me through the relay.
    CallMe,
}

impl Node {
    /// Runs path selection for every peer whose deadline has come.
    pub(super) fn path_timers(&mut self, now: Instant) {
        let due: Vec<PeerKey> = self
            .peers
            .values()
            .filter(|p| self.path_deadline(p).is_some_and(|at| at <= now))
            .map(|p| p.key)
            .collect();
        for key in due {
            self.peer_timers(now, key);
        }
    }

    /// When path selection next needs to act for `p`: a probe round, a keepalive ping, a
    /// direct path timing out, a stale member's grace ending, or its birthday probe.
    pub(super) fn path_deadline(&self, p: &Peer) -> Option<Instant> {
        let relayed = matches!(p.path, Path::Relayed);
        let stale = p.stale_since.map(|t| {
            if relayed {
                t
            } else {
                t + super::membership::STALE_GRACE
            }
        });
        let own = match p.path {
            Path::Direct { last_pong, .. } => p.next_probe.min(last_pong + peer::DIRECT_TIMEOUT),
            Path::Relayed => p.next_probe.min(p.next_relay_ping),
        };
        [Some(own), stale, self.birthday_deadline(p)]
            .into_iter()
            .flatten()
            .min()
    }

    fn peer_timers(&mut self, now: Instant, key: PeerKey) {
        let expired = self.peers.get(&key).is_some_and(|p| {
            p.stale_since.is_some_and(|t| {
                now.saturating_duration_since(t) >= super::membership::STALE_GRACE
                    || matches!(p.path, Path::Relayed)
            })
        });
        if expired {
            self.remove_member(key);
            return;
        }
        let mut out: Vec<Probe> = Vec::new();
        let mut changed = None;
        let mut missed_pong = false;
        {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            p.outstanding
                .retain(|_, ping| now.saturating_duration_since(ping.sent) < peer::PING_EXPIRY);
            if let Path::Direct {
                addr,
                socket,
                last_pong,
                ..
            } = p.path
            {
                if now.saturating_duration_since(last_pong) >= peer::DIRECT_TIMEOUT {
                    p.link.handle_path_change();
                    p.path = Path::Relayed;
                    p.relayed_since = now;
                    p.backoff = peer::PROBE_BACKOFF_MIN;
                    p.next_probe = now;
                    changed = Some(p.path);
                } else if now >= p.next_probe {
                    p.next_probe = now + peer::DIRECT_PING_INTERVAL;
                    // The previous keepalive went unanswered: perhaps our network changed
                    // (UDP blocked); find out whether the relay still answers.
                    missed_pong =
                        now.saturating_duration_since(last_pong) > peer::DIRECT_PING_INTERVAL;
                    out.push(Probe::Ping {
                        addr: Some(addr),
                        socket,
                    });
                }
            }
            if matches!(p.path, Path::Relayed) {
                if now >= p.next_probe {
                    for c in &p.candidates {
                        out.push(Probe::Ping {
                            addr: Some(*c),
                            socket: 0,
                        });
                    }
                    // Ask the peer (through the relay) to probe us at the same moment, so both
                    // NATs open their mappings towards each other together.
                    out.push(Probe::CallMe);
                    p.next_probe = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(peer::PROBE_BACKOFF_MAX);
                }
                if now >= p.next_relay_ping {
                    p.next_relay_ping = now + peer::RELAY_PING_INTERVAL;
                    out.push(Probe::Ping {
                        addr: None,
                        socket: 0,
                    });
                }
            }
        }
        if let Some(path) = changed {
            self.path_changed(key, path);
        }
        if missed_pong {
            self.relay.check_if_silent(now);
        }
        for probe in out {
            match probe {
                Probe::CallMe => self.send_call_me(key),
                Probe::Ping { addr, socket } => {
                    self.send_ping(now, key, addr, socket);
                }
            }
        }
        self.birthday_timers(now, key);
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
        let Some(p) = self.peers.get_mut(&key) else {
            return tx;
        };
        p.outstanding.insert(
            tx,
            PendingPing {
                addr,
                socket,
                sent: now,
                request: None,
            },
        );
        let dgram = wire::seal_disco(&p.disco_key, self.public, &Disco::Ping { tx }, nonce);
        match addr {
            Some(dst) => self.out.udp(socket, dst, &dgram),
            None => self.relay_payload(key, &dgram),
        }
        tx
    }

    /// Sends a sealed disco message to `key` through the relay.
    pub(super) fn send_disco_via_relay(&mut self, key: PeerKey, msg: &Disco) {
        let nonce = self.nonce();
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let dgram = wire::seal_disco(&p.disco_key, self.public, msg, nonce);
        self.relay_payload(key, &dgram);
    }

    /// Sends a call-me with every address we know for ourselves through the relay.
    pub(super) fn send_call_me(&mut self, key: PeerKey) {
        let mut endpoints = self.local_endpoints.clone();
        endpoints.extend(self.relay.observed());
        endpoints.extend(self.port_mapping.as_ref().map(|(_, a)| *a));
        endpoints.sort();
        endpoints.dedup();
        self.send_disco_via_relay(key, &Disco::CallMe { endpoints });
    }

    pub(super) fn path_changed(&mut self, key: PeerKey, path: Path) {
        if let Some(p) = self.peers.get(&key) {
            self.out.event(Event::PathChanged {
                key,
                name: p.announcement.name.clone(),
                path,
            });
        }
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
        let Some(p) = self.peers.get_mut(&sender) else {
            self.drops.unauthenticated += 1;
            return;
        };
        let msg = match wire::open_disco(&p.disco_key, &sender, sealed) {
            Ok(m) => m,
            Err(_) => {
                self.drops.unauthenticated += 1;
                return;
            }
        };
        match msg {
            Disco::Ping { tx } => {
                let observed = from.unwrap_or(self.relay.target().addr);
                let nonce = self.nonce();
                let Some(p) = self.peers.get_mut(&sender) else {
                    return;
                };
                let pong = wire::seal_disco(
                    &p.disco_key,
                    self.public,
                    &Disco::Pong { tx, observed },
                    nonce,
                );
                let mut punch_back = None;
                if let Some(addr) = from {
                    let new = socket == 0
                        && p.candidates.len() < peer::MAX_CANDIDATES
                        && p.candidates.insert(addr);
                    if matches!(p.path, Path::Relayed) || new {
                        punch_back = Some(addr);
                    }
                }
                match from {
                    Some(dst) => self.out.udp(socket, dst, &pong),
                    None => self.relay_payload(sender, &pong),
                }
                if let Some(addr) = punch_back {
                    self.send_ping(now, sender, Some(addr), socket);
                }
            }
            Disco::Pong { tx, .. } => {
                let Some(ping) = p.outstanding.remove(&tx) else {
                    return;
                };
                if now.saturating_duration_since(ping.sent) >= peer::PING_EXPIRY {
                    return;
                }
                let rtt = now.saturating_duration_since(ping.sent);
                if let Some(request) = ping.request {
                    self.out.event(Event::PingResult {
                        request,
                        name: p.announcement.name.clone(),
                        rtt,
                        direct: ping.addr,
                    });
                }
                match (ping.addr, from) {
                    (None, None) => p.relay_rtt = Some(rtt),
                    (Some(addr), Some(src)) if addr == src && ping.socket == socket => {
                        let switch = match p.path {
                            Path::Relayed => true,
                            Path::Direct {
                                addr: cur,
                                socket: cur_socket,
                                rtt: cur_rtt,
                                last_pong,
                            } => {
                                (cur == addr && cur_socket == socket)
                                    || now.saturating_duration_since(last_pong)
                                        > peer::DIRECT_PING_INTERVAL * 2
                                    || rtt.as_secs_f64()
                                        < cur_rtt.as_secs_f64() * peer::SWITCH_RTT_RATIO
                            }
                        };
                        if switch {
                            let was_relayed = matches!(p.path, Path::Relayed);
                            let moved = p.direct() != Some((addr, socket));
                            p.path = Path::Direct {
                                addr,
                                socket,
                                rtt,
                                last_pong: now,
                            };
                            if was_relayed || moved {
                                p.next_probe = now + peer::DIRECT_PING_INTERVAL;
                                p.birthday.finish(now, true);
                                let path = p.path;
                                self.path_changed(sender, path);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Disco::CallMe { endpoints } => {
                for e in endpoints {
                    if p.candidates.len() < peer::MAX_CANDIDATES {
                        p.candidates.insert(e);
                    }
                }
                if matches!(p.path, Path::Relayed) {
                    // Probe every candidate now, without a call-me of our own (no ping-pong of
                    // call-mes) and without touching our backoff.
                    let targets: Vec<SocketAddr> = p.candidates.iter().copied().collect();
                    for addr in targets {
                        self.send_ping(now, sender, Some(addr), 0);
                    }
                }
            }
            Disco::Spray => self.handle_spray(now, sender),
        }
    }
}
