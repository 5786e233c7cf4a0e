//! Path discovery and upkeep: probe rounds with backoff, call-me through the relay, keepalive
//! pings on direct paths, handshake retries on the node's clock, and the disco messages
//! (see the [`super::peer`] module doc for the path state machine).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use rand::RngCore;

use super::peer::{self, Path, PendingPing};
use super::{Event, Node, Transmit};
use crate::keys::PeerKey;
use crate::wire::{self, Disco};

impl Node {
    // ----- per-peer timers: probing, keepalive, handshakes ---------------------------------

    pub(super) fn peer_timers(&mut self, now: Instant, key: PeerKey) {
        let mut out: Vec<(Option<SocketAddr>, Disco)> = Vec::new();
        let mut changed = None;
        {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            p.outstanding
                .retain(|_, ping| now.saturating_duration_since(ping.sent) < peer::PING_EXPIRY);
            match p.path {
                Path::Direct {
                    addr, last_pong, ..
                } => {
                    if now.saturating_duration_since(last_pong) > peer::DIRECT_TIMEOUT {
                        p.path = Path::Relayed;
                        p.backoff = peer::PROBE_BACKOFF_MIN;
                        p.next_probe = now;
                        changed = Some(p.path);
                    } else if now >= p.next_probe {
                        p.next_probe = now + peer::DIRECT_PING_INTERVAL;
                        out.push((Some(addr), Disco::Ping { tx: [0; 12] }));
                    }
                }
                Path::Relayed => {}
            }
            if matches!(p.path, Path::Relayed) {
                if now >= p.next_probe {
                    for c in &p.candidates {
                        out.push((Some(*c), Disco::Ping { tx: [0; 12] }));
                    }
                    // Ask the peer (through the relay) to probe us at the same moment, so both
                    // NATs open their mappings towards each other together.
                    out.push((
                        None,
                        Disco::CallMe {
                            endpoints: Vec::new(),
                        },
                    ));
                    p.next_probe = now + p.backoff;
                    p.backoff = (p.backoff * 2).min(peer::PROBE_BACKOFF_MAX);
                }
                if now >= p.next_relay_ping {
                    p.next_relay_ping = now + peer::RELAY_PING_INTERVAL;
                    out.push((None, Disco::Ping { tx: [0; 12] }));
                }
            }
        }
        if let Some(path) = changed {
            self.path_changed(key, path);
        }
        for (addr, msg) in out {
            match msg {
                Disco::CallMe { .. } => self.send_call_me(key),
                Disco::Ping { .. } | Disco::Pong { .. } => self.send_ping(now, key, addr, msg),
            }
        }
        self.wireguard_timers(now, key);
    }

    pub(super) fn wireguard_timers(&mut self, now: Instant, key: PeerKey) {
        let mut sends: Vec<Vec<u8>> = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&key) else {
                return;
            };
            if let Some(since) = p.want_session_since {
                let (hs, ..) = p.tunn.stats();
                let established = hs.is_some_and(|d| d < Duration::from_secs(180));
                if established || now.saturating_duration_since(since) > peer::HANDSHAKE_GIVE_UP {
                    p.want_session_since = None;
                } else if p
                    .last_init_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= peer::HANDSHAKE_RETRY)
                {
                    if let TunnResult::WriteToNetwork(b) =
                        p.tunn.format_handshake_initiation(&mut self.buf, true)
                    {
                        sends.push(b.to_vec());
                    }
                    p.last_init_sent = Some(now);
                }
            }
            // update_timers emits at most one packet (keepalive or handshake) per call.
            if let TunnResult::WriteToNetwork(b) = p.tunn.update_timers(&mut self.buf) {
                sends.push(b.to_vec());
            }
        }
        for b in sends {
            self.send_to_peer(key, b);
        }
    }

    pub(super) fn send_ping(
        &mut self,
        now: Instant,
        key: PeerKey,
        addr: Option<SocketAddr>,
        _template: Disco,
    ) {
        let mut tx = [0u8; 12];
        self.rng.fill_bytes(&mut tx);
        let nonce = self.nonce();
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        p.outstanding.insert(tx, PendingPing { addr, sent: now });
        let dgram = wire::seal_disco(&p.disco_key, self.public, &Disco::Ping { tx }, nonce);
        match addr {
            Some(dst) => self.transmits.push_back(Transmit {
                dst,
                payload: dgram,
            }),
            None => self.relay_payload(key, &dgram),
        }
    }

    /// Sends a call-me with every address we know for ourselves through the relay.
    pub(super) fn send_call_me(&mut self, key: PeerKey) {
        let mut endpoints = self.local_endpoints.clone();
        endpoints.extend(self.relay.observed);
        endpoints.sort();
        endpoints.dedup();
        let nonce = self.nonce();
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let dgram = wire::seal_disco(
            &p.disco_key,
            self.public,
            &Disco::CallMe { endpoints },
            nonce,
        );
        self.relay_payload(key, &dgram);
    }

    pub(super) fn path_changed(&mut self, key: PeerKey, path: Path) {
        if let Some(p) = self.peers.get(&key) {
            self.events.push_back(Event::PathChanged {
                key,
                name: p.announcement.name.clone(),
                path,
            });
        }
    }

    /// A disco message from `sender`, arrived directly from `from` or (if `None`) via the relay.
    pub(super) fn handle_disco(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
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
                let observed = from.unwrap_or(self.relay.target.addr);
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
                    let new =
                        p.candidates.len() < peer::MAX_CANDIDATES && p.candidates.insert(addr);
                    if matches!(p.path, Path::Relayed) || new {
                        punch_back = Some(addr);
                    }
                }
                match from {
                    Some(dst) => self.transmits.push_back(Transmit { dst, payload: pong }),
                    None => self.relay_payload(sender, &pong),
                }
                if let Some(addr) = punch_back {
                    self.send_ping(now, sender, Some(addr), Disco::Ping { tx: [0; 12] });
                }
            }
            Disco::Pong { tx, .. } => {
                let Some(ping) = p.outstanding.remove(&tx) else {
                    return;
                };
                let rtt = now.saturating_duration_since(ping.sent);
                match (ping.addr, from) {
                    (None, None) => p.relay_rtt = Some(rtt),
                    (Some(addr), Some(src)) if addr == src => {
                        let switch = match p.path {
                            Path::Relayed => true,
                            Path::Direct {
                                addr: cur,
                                rtt: cur_rtt,
                                last_pong,
                            } => {
                                cur == addr
                                    || now.saturating_duration_since(last_pong)
                                        > peer::DIRECT_PING_INTERVAL * 2
                                    || rtt.as_secs_f64() < cur_rtt.as_secs_f64() * 0.7
                            }
                        };
                        if switch {
                            let was_relayed = matches!(p.path, Path::Relayed);
                            let addr_changed = p.direct_addr() != Some(addr);
                            p.path = Path::Direct {
                                addr,
                                rtt,
                                last_pong: now,
                            };
                            if was_relayed || addr_changed {
                                p.next_probe = now + peer::DIRECT_PING_INTERVAL;
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
                        self.send_ping(now, sender, Some(addr), Disco::Ping { tx: [0; 12] });
                    }
                }
            }
        }
    }
}
