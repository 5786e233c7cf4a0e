//! The member's protocol engine: a sans-IO state machine for one member of one network.
//!
//! # Driving contract
//! A [`Node`] reads no clock, opens no socket and draws no OS randomness; time comes in as
//! `now: Instant` arguments and randomness from the seed in [`NodeConfig`]. The driver:
//! 1. feeds inputs: [`Node::handle_udp`] for every datagram on the member's UDP socket,
//!    [`Node::handle_tun_packet`] for every IP packet read from the TUN device,
//!    [`Node::set_local_endpoints`] when the host's addresses change, and
//!    [`Node::handle_timeout`] when the deadline from [`Node::poll_timeout`] passes;
//! 2. after every input drains [`Node::poll_transmit`] (datagrams to send on the UDP socket),
//!    [`Node::poll_tun`] (packets to write to the TUN device) and [`Node::poll_event`]
//!    (things worth logging) until each returns `None`;
//! 3. re-arms its timer with [`Node::poll_timeout`].
//!
//! On shutdown it calls [`Node::leave`] and sends what that queues.
//!
//! # Data flow
//! ```text
//!  TUN ──ip packet──▶ route by destination virtual IP ─▶ peer's WireGuard session (seal)
//!                                                       └▶ path: direct addr | relay frame ─▶ UDP
//!  UDP ──▶ classify: WireGuard ─▶ peer by handshake key / receiver index ─▶ open ─▶
//!                     check inner source == peer's virtual IP (cryptokey routing) ─▶ TUN
//!          meshvpn frame: relay reply (membership) | relayed payload | disco ping/pong
//!          STUN: binding responses (reflexive address)
//! ```
//!
//! # Membership
//! The node registers with its relay every [`REGISTER_INTERVAL`] (with backoff while the relay
//! does not answer), and learns the other members from the relay's pushes and full syncs. Each
//! member's announcement (name, virtual IP, endpoints) is sealed with the network's control key,
//! so only members can read or forge one; an announcement older than the one already known is
//! ignored (no replay). Members that leave or expire on the relay are removed here.
//!
//! Time inside boringtun's `Tunn` is real time; the node additionally re-sends handshakes on its
//! own clock ([`peer::HANDSHAKE_RETRY`]) so that simulations with loss make progress.

pub mod birthday;
mod membership;
pub mod netcheck;
mod paths;
pub mod peer;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::keys::{NetworkKeys, NetworkSecret, NodeSecret, PeerKey};
use crate::status::{DropCounters, NatStatus, PeerPath, PeerStatus, RelayStatus, Status};
use crate::wire::{
    self, stun, Announcement, DatagramKind, Frame, MemberEntry, NatKind, RelayRequest,
};
use peer::{Path, Peer};

/// Base tick: boringtun wants `update_timers` about every 250 ms, and every other timer of the
/// node (probes, registration) is checked at this granularity.
pub const TICK: Duration = Duration::from_millis(250);
/// Re-registration interval; a third of the relay's member TTL (30 s), so two lost refreshes
/// never drop a live member.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(10);
/// First retry delay while the relay does not answer; doubles up to [`REGISTER_RETRY_MAX`].
pub const REGISTER_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay while the relay does not answer.
pub const REGISTER_RETRY_MAX: Duration = Duration::from_secs(8);
/// Without an acknowledgement for this long the relay counts as unreachable (two refreshes
/// and a half lost).
pub const RELAY_LOST_AFTER: Duration = Duration::from_secs(25);
/// A sync request with no complete answer is repeated after this long.
const SYNC_RETRY: Duration = Duration::from_secs(3);
/// Largest IP packet handled (TUN MTU is far smaller; the rest is headroom for WireGuard).
const BUF_LEN: usize = 65_535 + 64;

/// Where this member's relay is and which key it must prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relay's public key (from the token).
    pub key: PeerKey,
    /// The relay's resolved UDP address.
    pub addr: SocketAddr,
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's static key.
    pub secret: NodeSecret,
    /// The network's shared secret.
    pub network_secret: NetworkSecret,
    /// Network name (for status only).
    pub network_name: String,
    /// This member's node name.
    pub name: String,
    /// This member's virtual IPv4 address.
    pub virtual_ip: Ipv4Addr,
    /// The network's virtual subnet.
    pub subnet: Ipv4Net,
    /// The relay to register with.
    pub relay: RelayTarget,
    /// STUN servers to classify the NAT with, besides the relay's two STUN ports.
    pub stun_servers: Vec<SocketAddr>,
    /// Seed for nonces, transaction ids and jitter.
    pub seed: u64,
}

/// A datagram the node wants sent from one of its UDP sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination address.
    pub dst: SocketAddr,
    /// Which socket sends it: 0 is the main socket; 1..=256 are the extra sockets of a
    /// birthday probe, which the driver opens on first use (any free port) and closes when
    /// [`Node::active_sockets`] no longer lists them.
    pub socket: u16,
    /// Datagram bytes.
    pub payload: Vec<u8>,
}

/// Things worth telling the operator about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The relay acknowledged our registration (first time, or again after losing it).
    RelayRegistered { observed: SocketAddr },
    /// The relay stopped answering.
    RelayLost,
    /// Something answered at the relay's address with a different key than the token names.
    RelayKeyMismatch {
        addr: SocketAddr,
        expected: PeerKey,
        got: PeerKey,
    },
    /// The relay refused a request.
    RelayError { message: String },
    /// A member appeared.
    PeerJoined {
        key: PeerKey,
        name: String,
        virtual_ip: Ipv4Addr,
    },
    /// A member left or expired.
    PeerLeft { key: PeerKey, name: String },
    /// The path to a member changed.
    PathChanged {
        key: PeerKey,
        name: String,
        path: Path,
    },
    /// The answer to [`Node::ping_peer`]: `direct` is the address it came from, `None` for
    /// the relay.
    PingResult {
        request: u64,
        name: String,
        rtt: Duration,
        direct: Option<SocketAddr>,
    },
    /// Two members claim one virtual IP; `owner` keeps it.
    VirtualIpConflict {
        ip: Ipv4Addr,
        owner: PeerKey,
        loser: PeerKey,
        we_lost: bool,
    },
}

struct RelaySession {
    target: RelayTarget,
    session: [u8; 32],
    next_register: Instant,
    backoff: Duration,
    pending_ts: Option<u64>,
    register_sent: Option<Instant>,
    unanswered: bool,
    last_ack: Option<Instant>,
    registered: bool,
    observed: Option<SocketAddr>,
    sync_sent: Option<Instant>,
    sync: Option<SyncCollector>,
    key_mismatch_reported: bool,
    admission: wire::admission::AdmissionClient,
}

struct SyncCollector {
    generation: u32,
    total: u16,
    entries: BTreeMap<u16, MemberEntry>,
}

/// One member's protocol engine (see the module doc for the driving contract).
pub struct Node {
    cfg: NodeConfig,
    public: PeerKey,
    keys: NetworkKeys,
    rng: ChaCha20Rng,
    epoch: Instant,
    epoch_unix_ms: u64,
    last_ts: u64,
    relay: RelaySession,
    entries: BTreeMap<PeerKey, MemberEntry>,
    peers: BTreeMap<PeerKey, Peer>,
    by_ip: BTreeMap<Ipv4Addr, PeerKey>,
    by_index: BTreeMap<u32, PeerKey>,
    next_index: u32,
    /// Change counter (relay's) at which each member entry was last set.
    learned: BTreeMap<PeerKey, u64>,
    /// Members removed at a change counter, so an older push or snapshot does not revive them.
    tombstones: BTreeMap<PeerKey, u64>,
    local_endpoints: Vec<SocketAddr>,
    announcement: Vec<u8>,
    ip_conflict: Option<(Ipv4Addr, PeerKey)>,
    netcheck: netcheck::NetCheck,
    nat: NatKind,
    port_mapping: Option<(String, SocketAddr)>,
    relay_over_tcp: bool,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    tun_out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    drops: DropCounters,
    buf: Vec<u8>,
}

impl Node {
    /// A node starting at `now`; `unix_ms` is the wall clock at `now` (for announcement
    /// timestamps, which must grow across restarts).
    pub fn new(cfg: NodeConfig, now: Instant, unix_ms: u64) -> Self {
        let public = cfg.secret.public();
        let keys = cfg.network_secret.derive();
        let session = cfg.secret.relay_session_key(&public, &cfg.relay.key);
        let netcheck = netcheck::NetCheck::new(stun_targets(&cfg.relay, &cfg.stun_servers), now);
        let relay = RelaySession {
            target: cfg.relay,
            session,
            next_register: now,
            backoff: REGISTER_RETRY_MIN,
            pending_ts: None,
            register_sent: None,
            unanswered: false,
            last_ack: None,
            registered: false,
            observed: None,
            sync_sent: None,
            sync: None,
            key_mismatch_reported: false,
            admission: wire::admission::AdmissionClient::new(keys.signing.clone(), cfg.relay.key),
        };
        let mut node = Self {
            rng: ChaCha20Rng::seed_from_u64(cfg.seed),
            cfg,
            public,
            keys,
            epoch: now,
            epoch_unix_ms: unix_ms,
            last_ts: 0,
            relay,
            entries: BTreeMap::new(),
            peers: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            by_index: BTreeMap::new(),
            next_index: 1,
            learned: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            local_endpoints: Vec::new(),
            announcement: Vec::new(),
            ip_conflict: None,
            netcheck,
            nat: NatKind::Unknown,
            port_mapping: None,
            relay_over_tcp: false,
            next_tick: now,
            transmits: VecDeque::new(),
            tun_out: VecDeque::new(),
            events: VecDeque::new(),
            drops: DropCounters::default(),
            buf: vec![0u8; BUF_LEN],
        };
        node.reseal_announcement(now);
        node
    }

    /// This member's public key.
    pub fn public_key(&self) -> PeerKey {
        self.public
    }

    /// This member's virtual IP.
    pub fn virtual_ip(&self) -> Ipv4Addr {
        self.cfg.virtual_ip
    }

    /// Whether the relay has acknowledged a registration recently.
    pub fn is_registered(&self) -> bool {
        self.relay.registered
    }

    /// Whether the relay answers now: registered, and the latest registration did not go
    /// unanswered (a relay that stopped answering is noticed within seconds, long before the
    /// registration is considered lost).
    pub fn relay_answering(&self) -> bool {
        self.relay.registered && !self.relay.unanswered
    }

    /// Keys of the members this node currently knows.
    pub fn peer_keys(&self) -> impl Iterator<Item = &PeerKey> {
        self.peers.keys()
    }

    /// The current path to `key`, if it is a known member.
    pub fn path_to(&self, key: &PeerKey) -> Option<Path> {
        self.peers.get(key).map(|p| p.path)
    }

    /// Tells the node which local addresses (with its UDP port) it can be reached at.
    pub fn set_local_endpoints(&mut self, now: Instant, mut endpoints: Vec<SocketAddr>) {
        endpoints.sort();
        endpoints.dedup();
        endpoints.truncate(wire::MAX_ENDPOINTS);
        if endpoints != self.local_endpoints {
            self.local_endpoints = endpoints;
            self.reseal_announcement(now);
            self.relay.next_register = now;
        }
    }

    /// Moves the relay to a new address (after re-resolving its host name).
    pub fn set_relay_addr(&mut self, now: Instant, addr: SocketAddr) {
        if self.relay.target.addr != addr {
            self.relay.target.addr = addr;
            self.relay.next_register = now;
            let targets = stun_targets(&self.relay.target, &self.cfg.stun_servers);
            self.netcheck.set_targets(targets, now);
        }
    }

    /// Tells the node about a port mapping on the gateway (UPnP-IGD, NAT-PMP or PCP): the
    /// external address is announced to peers as a candidate. `label` names the protocol.
    pub fn set_port_mapping(&mut self, now: Instant, mapping: Option<(String, SocketAddr)>) {
        if mapping != self.port_mapping {
            self.port_mapping = mapping;
            self.reseal_announcement(now);
            self.relay.next_register = now;
        }
    }

    /// Tells the node whether its relay traffic goes over TCP (UDP to the relay is blocked).
    pub fn set_relay_over_tcp(&mut self, now: Instant, over_tcp: bool) {
        if over_tcp != self.relay_over_tcp {
            self.relay_over_tcp = over_tcp;
            self.update_nat_verdict(now);
        }
    }

    /// This member's NAT verdict.
    pub fn nat(&self) -> NatKind {
        self.nat
    }

    /// Handles one IP packet read from the TUN device.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        let Some(dst) = ipv4_destination(packet) else {
            // IPv6 (router solicitations, MLD) and non-IP: not routed in the overlay yet.
            return;
        };
        let Some(key) = self.by_ip.get(&dst).copied() else {
            self.drops.no_route += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.tx_bytes += packet.len() as u64;
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(bytes) => {
                if bytes.first() == Some(&1) {
                    peer.want_session_since.get_or_insert(now);
                    peer.last_init_sent = Some(now);
                }
                let bytes = bytes.to_vec();
                self.send_to_peer(key, bytes);
            }
            TunnResult::Done => {
                // Queued inside boringtun until the handshake completes.
                peer.want_session_since.get_or_insert(now);
            }
            TunnResult::Err(e) => tracing::debug!(?e, peer = %key.short(), "encapsulate failed"),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// Handles one datagram received on the main UDP socket from `from`.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.handle_udp_on(now, 0, from, bytes);
    }

    /// Handles one datagram received on socket `socket` (see [`Transmit::socket`]) from `from`.
    pub fn handle_udp_on(&mut self, now: Instant, socket: u16, from: SocketAddr, bytes: &[u8]) {
        match wire::classify(bytes) {
            DatagramKind::WireGuard => self.handle_wireguard(from, socket, None, bytes),
            DatagramKind::Meshvpn => self.handle_frame(now, from, socket, bytes),
            DatagramKind::Stun => match stun::parse(bytes) {
                Some(stun::Binding::Response { tx, mapped }) => {
                    if self.netcheck.handle_response(now, from, tx, mapped) {
                        self.update_nat_verdict(now);
                    }
                }
                // Members do not serve STUN.
                Some(stun::Binding::Request(_)) => {}
                None => self.drops.malformed += 1,
            },
            DatagramKind::Unknown => self.drops.malformed += 1,
        }
    }

    /// The sockets the node uses now: the main one (0), the extra sockets of a running
    /// birthday probe, and the sockets of direct paths. The driver closes any others.
    pub fn active_sockets(&self) -> std::collections::BTreeSet<u16> {
        let mut set: std::collections::BTreeSet<u16> = [0].into();
        for p in self.peers.values() {
            if p.birthday.is_hard() {
                set.extend(1..=birthday::SPRAY_SOCKETS);
            }
            if let Some((_, socket)) = p.direct() {
                set.insert(socket);
            }
        }
        set
    }

    /// Pings member `key` once on its current path (direct or relay), for `meshvpn ping`; the
    /// answer comes back as [`Event::PingResult`] with `request`. `false` if `key` is unknown.
    pub fn ping_peer(&mut self, now: Instant, key: &PeerKey, request: u64) -> bool {
        let Some((addr, socket)) = self.peers.get(key).map(|p| match p.direct() {
            Some((a, s)) => (Some(a), s),
            None => (None, 0),
        }) else {
            return false;
        };
        let tx = self.send_ping(now, *key, addr, socket);
        if let Some(ping) = self
            .peers
            .get_mut(key)
            .and_then(|p| p.outstanding.get_mut(&tx))
        {
            ping.request = Some(request);
        }
        true
    }

    /// Finds a member by node name or virtual IP.
    pub fn find_peer(&self, name_or_ip: &str) -> Option<PeerKey> {
        self.peers
            .values()
            .find(|p| p.announcement.name == name_or_ip || p.virtual_ip().to_string() == name_or_ip)
            .map(|p| p.key)
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        self.relay_timers(now);
        self.stun_round(now);
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for key in keys {
            self.peer_timers(now, key);
        }
    }

    /// When the node next needs [`Node::handle_timeout`].
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next packet to write to the TUN device.
    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Tells the relay this member leaves (graceful shutdown); send what this queues.
    pub fn leave(&mut self, now: Instant) {
        let ts = self.next_ts(now);
        let req = RelayRequest::Leave {
            network: self.keys.network_id,
            ts_ms: ts,
        };
        self.send_to_relay(&req);
    }

    /// A snapshot for `meshvpn status`.
    pub fn status(&self, now: Instant) -> Status {
        let peers = self
            .peers
            .values()
            .map(|p| {
                let relayed = if self.relay_over_tcp {
                    PeerPath::RelayTcp
                } else {
                    PeerPath::Relay
                };
                let (path, endpoint) = match p.path {
                    Path::Direct { addr, .. } => (PeerPath::Direct, addr),
                    Path::Relayed => (relayed, self.relay.target.addr),
                };
                let (since_handshake, _, _, _, _) = p.tunn.stats();
                PeerStatus {
                    name: p.announcement.name.clone(),
                    public_key: p.key.to_base64(),
                    virtual_ip: p.virtual_ip().to_string(),
                    path,
                    endpoint: Some(endpoint.to_string()),
                    rtt_ms: p.rtt().map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
                    last_handshake_age_s: since_handshake.map(|d| d.as_secs()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    ip_conflict: p.ip_conflict,
                    relay_reason: matches!(p.path, Path::Relayed)
                        .then(|| self.relay_reason(now, p)),
                }
            })
            .collect();
        Status {
            network: self.cfg.network_name.clone(),
            name: self.cfg.name.clone(),
            virtual_ip: self.cfg.virtual_ip.to_string(),
            public_key: self.public.to_base64(),
            relay: RelayStatus {
                address: self.relay.target.addr.to_string(),
                public_key: self.relay.target.key.to_base64(),
                registered: self.relay.registered,
                observed: self.relay.observed.map(|a| a.to_string()),
            },
            endpoints: self.local_endpoints.iter().map(ToString::to_string).collect(),
            ip_conflict: self.ip_conflict.map(|(ip, owner)| {
                format!("virtual IP {ip} is also claimed by member {}, which keeps it; this member gets no traffic (choose another address with --ip)", owner.short())
            }),
            nat: NatStatus {
                mapping: self.nat.into(),
                summary: self.nat_summary(),
                reflexive: self.netcheck.reflexive().or(self.relay.observed).map(|a| a.to_string()),
                port_mapping: self.port_mapping.as_ref().map(|(l, a)| format!("{l} {a}")),
                udp_blocked: self.relay_over_tcp,
            },
            peers,
            dropped: self.drops,
        }
    }

    /// Why `p` is relayed, in words for `status` and `netcheck`.
    fn relay_reason(&self, now: Instant, p: &Peer) -> String {
        let next = p.next_probe.saturating_duration_since(now).as_secs();
        if self.relay_over_tcp {
            return "UDP blocked here (relay over TCP)".into();
        }
        if p.announcement.nat == NatKind::UdpBlocked {
            return "UDP blocked at the peer (it uses the relay over TCP)".into();
        }
        let hard = |k: NatKind| k == NatKind::EndpointDependent;
        if hard(self.nat) && hard(p.announcement.nat) && self.port_mapping.is_none() {
            return format!(
                "both sides symmetric, no port mapping; next direct attempt in {next} s"
            );
        }
        if p.birthday.is_running() {
            return "birthday probe in progress (one side symmetric)".into();
        }
        format!("no direct answer yet; next direct attempt in {next} s")
    }

    // ----- NAT classification --------------------------------------------------------------

    fn stun_round(&mut self, now: Instant) {
        let rng = &mut self.rng;
        let round = self.netcheck.poll_round(now, || {
            let mut tx = [0u8; 12];
            rng.fill_bytes(&mut tx);
            tx
        });
        for (dst, tx) in round {
            self.transmits.push_back(Transmit {
                dst,
                socket: 0,
                payload: stun::binding_request(tx),
            });
        }
    }

    fn update_nat_verdict(&mut self, now: Instant) {
        let verdict = if self.relay_over_tcp {
            NatKind::UdpBlocked
        } else {
            self.netcheck.verdict(&self.local_endpoints)
        };
        if verdict != self.nat {
            self.nat = verdict;
            self.reseal_announcement(now);
            self.relay.next_register = now;
        }
    }

    /// What `status` says about this member's NAT.
    fn nat_summary(&self) -> String {
        let mut text = self.nat.describe().to_string();
        if let Some((label, addr)) = &self.port_mapping {
            text.push_str(&format!(", {label} mapped {addr}"));
        }
        text
    }

    // ----- inbound -------------------------------------------------------------------------

    fn handle_frame(&mut self, now: Instant, from: SocketAddr, socket: u16, bytes: &[u8]) {
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::trace!(%e, %from, "dropping frame");
                self.drops.malformed += 1;
                return;
            }
        };
        match frame {
            Frame::FromRelay { relay, sealed } => {
                if from != self.relay.target.addr {
                    self.drops.unauthenticated += 1;
                    return;
                }
                if relay != self.relay.target.key {
                    if !self.relay.key_mismatch_reported {
                        self.relay.key_mismatch_reported = true;
                        self.events.push_back(Event::RelayKeyMismatch {
                            addr: from,
                            expected: self.relay.target.key,
                            got: relay,
                        });
                    }
                    self.drops.unauthenticated += 1;
                    return;
                }
                match wire::open_from_relay(&self.relay.session, &relay, sealed) {
                    Ok(reply) => self.handle_relay_reply(now, reply),
                    Err(_) => self.drops.unauthenticated += 1,
                }
            }
            Frame::RelayRecv {
                from: sender,
                payload,
            } => {
                if from != self.relay.target.addr {
                    self.drops.unauthenticated += 1;
                    return;
                }
                match wire::classify(payload) {
                    DatagramKind::WireGuard => {
                        self.handle_wireguard(from, 0, Some(sender), payload)
                    }
                    DatagramKind::Meshvpn => match Frame::parse(payload) {
                        Ok(Frame::Disco {
                            sender: inner,
                            sealed,
                        }) if inner == sender => self.handle_disco(now, None, 0, sender, sealed),
                        _ => self.drops.malformed += 1,
                    },
                    DatagramKind::Stun | DatagramKind::Unknown => self.drops.malformed += 1,
                }
            }
            Frame::Disco { sender, sealed } => {
                self.handle_disco(now, Some(from), socket, sender, sealed)
            }
            Frame::CookieReply { echo, cookie } if from == self.relay.target.addr => {
                let (session, nonce) = (self.relay.session, self.nonce());
                let admission = &mut self.relay.admission;
                if let Some(payload) =
                    admission.handle_cookie_reply(echo, cookie, &session, self.public, nonce)
                {
                    let dst = self.relay.target.addr;
                    self.transmits.push_back(Transmit {
                        dst,
                        socket: 0,
                        payload,
                    });
                }
            }
            Frame::KeyRequest
            | Frame::KeyResponse { .. }
            | Frame::ToRelay { .. }
            | Frame::CookieReply { .. }
            | Frame::RelaySend { .. } => self.drops.malformed += 1,
        }
    }

    /// A WireGuard message from `from`, relayed on behalf of `via_relay` if set.
    fn handle_wireguard(
        &mut self,
        from: SocketAddr,
        socket: u16,
        via_relay: Option<PeerKey>,
        bytes: &[u8],
    ) {
        let key = match via_relay {
            Some(k) => Some(k),
            None => self.wireguard_sender(bytes),
        };
        let Some(key) = key else {
            self.drops.wireguard += 1;
            return;
        };
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut queued: Vec<Vec<u8>> = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&key) else {
                self.drops.wireguard += 1;
                return;
            };
            let vip = p.virtual_ip();
            let mut result = p.tunn.decapsulate(Some(from.ip()), bytes, &mut self.buf);
            let mut first = true;
            loop {
                match result {
                    TunnResult::WriteToNetwork(b) => {
                        if first {
                            replies.push(b.to_vec());
                        } else {
                            queued.push(b.to_vec());
                        }
                        first = false;
                        result = p.tunn.decapsulate(None, &[], &mut self.buf);
                    }
                    TunnResult::WriteToTunnelV4(pkt, src) => {
                        if src == vip {
                            p.rx_bytes += pkt.len() as u64;
                            self.tun_out.push_back(pkt.to_vec());
                        } else {
                            self.drops.spoofed_source += 1;
                        }
                        break;
                    }
                    TunnResult::WriteToTunnelV6(..) => {
                        self.drops.spoofed_source += 1;
                        break;
                    }
                    TunnResult::Done => break,
                    TunnResult::Err(e) => {
                        tracing::trace!(?e, peer = %key.short(), "decapsulate failed");
                        self.drops.wireguard += 1;
                        break;
                    }
                }
            }
            let (hs, ..) = p.tunn.stats();
            if hs.is_some_and(|d| d < Duration::from_secs(180)) {
                p.want_session_since = None;
            }
        }
        for r in replies {
            // Answer the way the message came, so handshakes complete even before a path is known.
            match via_relay {
                Some(k) => self.relay_payload(k, &r),
                None => self.transmits.push_back(Transmit {
                    dst: from,
                    socket,
                    payload: r,
                }),
            }
        }
        for q in queued {
            self.send_to_peer(key, q);
        }
    }

    /// Finds the peer a direct WireGuard message belongs to: the initiator's static key for a
    /// handshake initiation, the receiver index for everything else.
    fn wireguard_sender(&self, bytes: &[u8]) -> Option<PeerKey> {
        match Tunn::parse_incoming_packet(bytes).ok()? {
            Packet::HandshakeInit(init) => {
                let secret = self.cfg.secret.to_static();
                let public = x25519_dalek::PublicKey::from(&secret);
                let half = parse_handshake_anon(&secret, &public, &init).ok()?;
                let key = PeerKey(half.peer_static_public);
                self.peers.contains_key(&key).then_some(key)
            }
            Packet::HandshakeResponse(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
        }
    }

    // ----- outbound helpers ----------------------------------------------------------------

    fn send_to_peer(&mut self, key: PeerKey, payload: Vec<u8>) {
        match self.peers.get(&key).and_then(|p| p.direct()) {
            Some((dst, socket)) => self.transmits.push_back(Transmit {
                dst,
                socket,
                payload,
            }),
            None => self.relay_payload(key, &payload),
        }
    }

    fn relay_payload(&mut self, to: PeerKey, payload: &[u8]) {
        let dgram = Frame::RelaySend { to, payload }.to_vec();
        self.transmits.push_back(Transmit {
            dst: self.relay.target.addr,
            socket: 0,
            payload: dgram,
        });
    }

    fn reseal_announcement(&mut self, now: Instant) {
        let ann = Announcement {
            key: self.public,
            name: self.cfg.name.clone(),
            virtual_ip: self.cfg.virtual_ip,
            ts_ms: self.next_ts(now),
            endpoints: self
                .local_endpoints
                .iter()
                .copied()
                .chain(self.port_mapping.as_ref().map(|(_, a)| *a))
                .collect(),
            nat: self.nat,
        };
        let nonce = self.nonce();
        self.announcement = ann.seal(&self.keys.control_key, &self.keys.network_id, nonce);
    }

    /// A strictly growing millisecond timestamp on the wall clock.
    fn next_ts(&mut self, now: Instant) -> u64 {
        let wall =
            self.epoch_unix_ms + now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ts = wall.max(self.last_ts + 1);
        self.last_ts
    }

    fn nonce(&mut self) -> [u8; 24] {
        let mut n = [0u8; 24];
        self.rng.fill_bytes(&mut n);
        n
    }
}

/// The STUN servers the node asks: the relay's port, the relay's second STUN port (port + 1,
/// so two destinations reveal an endpoint-dependent mapping), then the extra servers.
fn stun_targets(relay: &RelayTarget, extra: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut alt = relay.addr;
    alt.set_port(relay.addr.port().wrapping_add(1));
    let mut targets = vec![relay.addr, alt];
    targets.extend(
        extra
            .iter()
            .copied()
            .filter(|a| *a != relay.addr && *a != alt),
    );
    targets
}

/// The destination of an IPv4 packet; `None` for anything else or a truncated header.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// Whether an address is worth announcing as a host candidate: IPv4 other than loopback and
/// link-local; IPv6 global or unique-local (link-local needs a scope id peers cannot use).
pub fn is_announceable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local() && !v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && !v6.is_unicast_link_local()
                && v6.to_ipv4_mapped().is_none()
        }
    }
}
