//! The member's protocol engine: a sans-IO state machine for one member of one network.
//!
//! # Shape
//! A [`Node`] routes inputs to smaller machines that own their state, and drains their output
//! through one outbox of [`Transmit`]s, TUN packets and [`Event`]s (the shape of firezone's
//! snownet `Node` and quinn-proto's `Connection`):
//! - the **relay session** (`relay_session`): registration, acknowledgements, syncs, relay
//!   loss, and whether relay traffic takes UDP or the stream; one instance per relay;
//! - **membership** (`membership`): the member table, removal records, receiver indices and
//!   the virtual-IP routing table with its conflict resolution;
//! - per peer, a **peer link** (`link`, the only owner of boringtun's `Tunn`) and **path
//!   selection** (`path_selection`, with [`birthday`] probing);
//! - the **NAT check** ([`netcheck`]) and the **timer table** ([`TimerTable`]).
//!
//! # Driving contract
//! A [`Node`] reads no clock, opens no socket and draws no OS randomness; time comes in as
//! `now: Instant` arguments and randomness from the seed in [`NodeConfig`]. The driver:
//! 1. feeds inputs: [`Node::handle_udp`] / [`Node::handle_udp_on`] for every datagram on a
//!    UDP socket, [`Node::handle_tun_packet`] for every IP packet read from the TUN device,
//!    [`Node::handle_relay_stream`] for every datagram read from a relay stream,
//!    [`Node::handle_relay_stream_up`] / [`Node::handle_relay_stream_down`] when a stream it
//!    was asked for connects, fails or closes, [`Node::set_local_endpoints`] when the host's
//!    addresses change, and [`Node::handle_timeout`] when the deadline passes;
//! 2. after every input drains the outputs until each returns `None`: [`Node::poll_transmit`]
//!    (a datagram and its [`Transport`]: UDP socket *n* to an address, or the stream to relay
//!    *r*, written into the driver's reusable buffer), [`Node::poll_tun`] (packets for the
//!    TUN device, likewise), [`Node::poll_event`], and [`Node::wants_stream`] (open or close
//!    the stream to the relay). [`driver::Step`] does exactly this and is what every driver
//!    uses, the agent and the simulator alike;
//! 3. sleeps until [`Node::poll_timeout`]: the earliest named deadline and why, or "now"
//!    while output is still queued.
//!
//! On shutdown it calls [`Node::leave`] and sends what that queues.
//!
//! # Data flow
//! ```text
//!  TUN ──ip packet──▶ route by destination virtual IP ─▶ peer link (seal)
//!                                         └▶ path: direct addr (UDP) | relay frame (UDP or stream)
//!  UDP / stream ──▶ classify: WireGuard ─▶ handshake guard (replay, mac1, cookie, budget) ─▶
//!                     peer by handshake key / receiver index ─▶ open ─▶
//!                     check inner source == peer's virtual IP (cryptokey routing) ─▶ TUN
//!          meshvpn frame: relay reply (membership) | relayed payload | disco ping/pong
//!          STUN: binding responses (reflexive address; over UDP, proof that UDP works)
//! ```
//! The data path (TUN packets, WireGuard datagrams) allocates nothing per packet: boringtun
//! seals and opens into one scratch buffer, and the outbox recycles its buffers. A packet is
//! held, not dropped, while its peer's handshake is in progress (in the peer link) and while
//! no member has its destination address yet (the `unrouted` hold), both bounded in packets,
//! bytes and time.
//!
//! # Membership
//! The node registers with its relay every [`REGISTER_INTERVAL`] (with backoff while the relay
//! does not answer), and learns the other members from the relay's pushes and full syncs. Each
//! member's announcement (name, virtual IP, endpoints) is sealed with the network's control key,
//! so only members can read or forge one; an announcement older than the one already known is
//! ignored (no replay). Members that leave or expire on the relay are removed here.
//!
//! Time inside boringtun's `Tunn` is real time; the node additionally re-sends handshakes on its
//! own clock ([`HANDSHAKE_RETRY`]) so that simulations with loss make progress.

pub mod birthday;
pub mod driver;
mod helping;
mod hold;
mod inbound;
mod link;
mod membership;
mod mtu;
pub mod names;
pub mod netcheck;
mod outbox;
mod path_mtu;
mod path_selection;
mod paths;
pub mod peer;
mod pmtu;
mod registration;
pub mod relay_session;
mod relays;
mod report;
mod rotation;
mod timers;
mod unrouted;

pub use helping::{ForwardCounters, CARRY_BURST, CARRY_PER_SEC, MAX_HELPERS};
pub use link::guard::{HANDSHAKE_BUDGET, HANDSHAKE_LOAD_THRESHOLD, LIMITER_RESET};
pub use link::{
    HANDSHAKE_GIVE_UP, HANDSHAKE_RETRY, HOLD_BYTES, HOLD_MAX_AGE, HOLD_PACKETS, SESSION_FRESH,
};
pub use outbox::{Transmit, Transport};
pub use relay_session::{
    StreamKind, ACK_TIMEOUT, REGISTER_INTERVAL, REGISTER_RETRY_MAX, REGISTER_RETRY_MIN,
    RELAY_KEEPALIVE_MAX, RELAY_KEEPALIVE_START, RELAY_LOST_AFTER, UDP_FALLBACK_AFTER,
};
pub use rotation::{RotationRefused, ROTATE_GIVE_UP, ROTATE_RETRY};
pub use timers::{Timer, TimerTable};
pub use unrouted::{UNROUTED_BYTES, UNROUTED_MAX_AGE, UNROUTED_PACKETS, UNROUTED_PER_DESTINATION};

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::keys::{NetworkKeys, NetworkSecret, NodeSecret, PeerKey};
use crate::status::DropCounters;
use crate::wire::{self, stun, Announcement, DatagramKind, NatKind, RelayRequest};
use outbox::Outbox;
use peer::{Path, Peer};

/// The period of the node's housekeeping ([`Timer::Tick`]), which runs only while the node has
/// peers: boringtun's `update_timers` (boringtun rounds its timers to whole seconds, and the
/// shortest of them are seconds long: a keepalive 10 s after the last packet received, a
/// handshake retransmission after 5 s), the reset of the handshake guard's count every
/// [`LIMITER_RESET`], and a look at the byte counters of every peer. Every other timer of the
/// node is a real deadline in the [`TimerTable`].
pub const TICK: Duration = Duration::from_secs(1);
// The tick resets the handshake guard's count, so the two periods are one.
const _: () = assert!(TICK.as_nanos() == LIMITER_RESET.as_nanos());
/// Largest IP packet handled (TUN MTU is far smaller; the rest is headroom for WireGuard).
const BUF_LEN: usize = 65_535 + 64;

/// Where this member's relay is and which key it must prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relay's public key (from the token).
    pub key: PeerKey,
    /// The relay's resolved UDP address.
    pub addr: SocketAddr,
    /// Whether the relay serves WebSocket-over-TLS (its token entry names a TLS endpoint), so
    /// a stream to it may be TLS when plain TCP does not get through.
    pub tls: bool,
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
    /// The relays to register with, in the token's order (at least one; the first answering
    /// one is the primary, see the `relays` module).
    pub relays: Vec<RelayTarget>,
    /// STUN servers to classify the NAT with, besides the relay's two STUN ports.
    pub stun_servers: Vec<SocketAddr>,
    /// Seed for nonces, transaction ids and jitter.
    pub seed: u64,
    /// Whether to carry other members' ciphertext while no relay answers them (see
    /// `helping`).
    pub relay_for_peers: bool,
}

/// Things worth telling the operator about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Relay `relay` acknowledged our registration (first time, or again after losing it).
    RelayRegistered { relay: usize, observed: SocketAddr },
    /// Relay `relay` stopped answering.
    RelayLost { relay: usize },
    /// The member table now follows relay `relay` (the first relay that answers); `from` is
    /// the relay it followed before.
    PrimaryRelay { relay: usize, from: usize },
    /// Something answered at a relay's address with a different key than the token names.
    RelayKeyMismatch {
        addr: SocketAddr,
        expected: PeerKey,
        got: PeerKey,
    },
    /// Relay `relay` refused a request.
    RelayError { relay: usize, message: String },
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
    /// The network's secret is now `secret`: this node's rotation finished (`request` is the
    /// id given to [`Node::start_rotation`]), or another member's rotation handed it over
    /// (`None`). The driver saves it and restarts the node on it.
    SecretRotated {
        secret: NetworkSecret,
        request: Option<u64>,
    },
    /// This node's rotation did not finish; nothing changed.
    RotationFailed { request: u64, reason: String },
    /// The relay says the network was rotated without this member (it was kicked, or its
    /// token is an old one); it reaches nobody until it is given a current token.
    LeftOutOfRotation,
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
    /// One session per relay, by relay number.
    relays: Vec<relay_session::RelaySession>,
    /// The relay whose member table this node follows (see the `relays` module).
    primary: usize,
    /// The member table, removal records and routing tables.
    members: membership::Membership,
    peers: BTreeMap<PeerKey, Peer>,
    local_endpoints: Vec<SocketAddr>,
    announcement: Vec<u8>,
    netcheck: netcheck::NetCheck,
    nat: NatKind,
    port_mapping: Option<(String, SocketAddr)>,
    timers: TimerTable,
    /// The latest time any input carried; `poll_timeout` answers it while output is queued.
    now: Instant,
    out: Outbox,
    drops: DropCounters,
    /// Mac1, cookies and the key-agreement budget, before any WireGuard datagram reaches a link.
    guard: link::HandshakeGuard,
    /// Scratch space boringtun seals and opens into.
    buf: Vec<u8>,
    /// A rotation this node uploads, and whether a handover was already reported.
    rotation: rotation::RotationState,
    /// Packets for subnet addresses no member has yet, until one joins.
    unrouted: hold::HoldQueue,
    /// The TUN device's MTU: path MTU discovery searches up to it.
    tun_mtu: u16,
    /// Scratch space for inner packets the node rewrites (clamped SYNs, fragments, ICMP).
    scratch: Vec<u8>,
    /// Limits the ICMP "fragmentation needed" the node writes into the TUN.
    icmp: mtu::IcmpLimiter,
    /// Call-mes passed for and by other members (see `helping`).
    forwards: helping::ForwardCounters,
    /// Whether the member table matches the primary relay's: its latest acknowledgement's
    /// digest equalled ours, or its full snapshot was applied since.
    synced: bool,
}

/// Whether an input touched only the data path (no deadline can have moved except the peer
/// link's, which the data path arms itself) or control state (recompute the timer table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Data,
    Control,
}

impl Node {
    /// A node starting at `now`; `unix_ms` is the wall clock at `now` (for announcement
    /// timestamps, which must grow across restarts).
    pub fn new(cfg: NodeConfig, now: Instant, unix_ms: u64) -> Self {
        let public = cfg.secret.public();
        let keys = cfg.network_secret.derive();
        assert!(!cfg.relays.is_empty(), "a node needs at least one relay");
        let cfg_secret = cfg.secret.to_static();
        let netcheck = netcheck::NetCheck::new(stun_targets(&cfg.relays, &cfg.stun_servers));
        let relays: Vec<_> = cfg
            .relays
            .iter()
            .enumerate()
            .map(|(n, target)| {
                let session = cfg.secret.relay_session_key(&public, &target.key);
                relay_session::RelaySession::new(n, *target, session, keys.signing.clone(), now)
            })
            .collect();
        let transports = relays.iter().map(|r| r.transport()).collect();
        let members =
            membership::Membership::new(public, cfg.virtual_ip, cfg.subnet, keys.network_id);
        let mut node = Self {
            rng: ChaCha20Rng::seed_from_u64(cfg.seed),
            cfg,
            public,
            keys,
            epoch: now,
            epoch_unix_ms: unix_ms,
            last_ts: 0,
            relays,
            primary: 0,
            members,
            peers: BTreeMap::new(),
            local_endpoints: Vec::new(),
            announcement: Vec::new(),
            netcheck,
            nat: NatKind::Unknown,
            port_mapping: None,
            timers: TimerTable::default(),
            now,
            out: Outbox::new(transports),
            drops: DropCounters::default(),
            guard: link::HandshakeGuard::new(cfg_secret),
            buf: vec![0u8; BUF_LEN],
            rotation: rotation::RotationState::default(),
            unrouted: unrouted::queue(),
            tun_mtu: crate::config::DEFAULT_MTU,
            scratch: Vec::with_capacity(BUF_LEN),
            icmp: mtu::IcmpLimiter::default(),
            forwards: helping::ForwardCounters::default(),
            synced: false,
        };
        node.reseal_announcement(now);
        node.refresh_timers();
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

    /// This member's IPv6 overlay address (derived from the network id and its key, see
    /// [`crate::addressing::overlay_ipv6`]; the prefix is a /64).
    pub fn overlay_ipv6(&self) -> Ipv6Addr {
        self.members.own_ipv6()
    }

    /// Whether a relay has acknowledged a registration recently.
    pub fn is_registered(&self) -> bool {
        self.relays.iter().any(|r| r.is_registered())
    }

    /// Whether this member is registered with its primary relay and its member table matches
    /// that relay's (what `meshvpn wait` waits for): the relay's latest acknowledgement named
    /// the digest of our table, or its full snapshot was applied since.
    pub fn is_synced(&self) -> bool {
        self.synced && self.relays[self.primary].is_registered()
    }

    /// Whether a relay answers now: registered, and the latest registration did not go
    /// unanswered (a relay that stopped answering is noticed within seconds, long before the
    /// registration is considered lost).
    pub fn relay_answering(&self) -> bool {
        self.relays.iter().any(|r| r.answering())
    }

    /// Keys of the members this node currently knows.
    pub fn peer_keys(&self) -> impl Iterator<Item = &PeerKey> {
        self.peers.keys()
    }

    /// The current path to `key`, if it is a known member.
    pub fn path_to(&self, key: &PeerKey) -> Option<Path> {
        self.peers.get(key).map(|p| p.paths.path())
    }

    /// Tells the node which local addresses (with its UDP port) it can be reached at.
    pub fn set_local_endpoints(&mut self, now: Instant, mut endpoints: Vec<SocketAddr>) {
        self.now = self.now.max(now);
        endpoints.sort();
        endpoints.dedup();
        endpoints.truncate(wire::MAX_ENDPOINTS);
        if endpoints != self.local_endpoints {
            self.local_endpoints = endpoints;
            self.reseal_announcement(now);
            self.register_everywhere(now);
            self.refresh_timers();
        }
    }

    /// Moves relay `relay` to a new address (after re-resolving its host name).
    pub fn set_relay_addr(&mut self, now: Instant, relay: usize, addr: SocketAddr) {
        self.now = self.now.max(now);
        let Some(session) = self.relays.get_mut(relay) else {
            return;
        };
        if session.set_addr(now, addr) {
            self.out.set_relay_transport(relay, session.transport());
            let targets: Vec<RelayTarget> = self.relays.iter().map(|r| r.target()).collect();
            self.netcheck
                .set_targets(stun_targets(&targets, &self.cfg.stun_servers));
            self.refresh_timers();
        }
    }

    /// Tells the node about a port mapping on the gateway (UPnP-IGD, NAT-PMP or PCP): the
    /// external address is announced to peers as a candidate. `label` names the protocol.
    pub fn set_port_mapping(&mut self, now: Instant, mapping: Option<(String, SocketAddr)>) {
        self.now = self.now.max(now);
        if mapping != self.port_mapping {
            self.port_mapping = mapping;
            self.reseal_announcement(now);
            self.register_everywhere(now);
            self.refresh_timers();
        }
    }

    /// This member's NAT verdict.
    pub fn nat(&self) -> NatKind {
        self.nat
    }

    /// Handles one IP packet read from the TUN device: IPv4 is routed by the virtual-IP table,
    /// IPv6 by the overlay table (each member's key-derived address); IPv6 multicast and
    /// link-local traffic (router and neighbour solicitations, MLD) stays on this host. The
    /// data path: nothing here allocates (a packet that must wait, for a handshake or for its
    /// destination's member, is copied into a buffer its hold recycles).
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        self.now = self.now.max(now);
        let dst = match packet.first().map(|b| b >> 4) {
            Some(4) => match ipv4_destination(packet) {
                Some(dst) => IpAddr::V4(dst),
                None => return self.drops.no_route += 1,
            },
            Some(6) => match ipv6_destination(packet) {
                Some(dst) if is_link_scope(&dst) => return,
                Some(dst) => IpAddr::V6(dst),
                None => return self.drops.no_route += 1,
            },
            // Not IP: nothing the kernel routes into a TUN device.
            Some(_) | None => return,
        };
        let Some(key) = self.members.route_ip(dst) else {
            self.hold_unrouted(now, dst, packet);
            return;
        };
        self.send_to_peer(now, key, packet);
    }

    /// Sends one IP packet from the TUN to member `key`, held to the peer's path MTU (see
    /// `path_mtu`) and by its link while the handshake is in progress.
    fn send_to_peer(&mut self, now: Instant, key: PeerKey, packet: &[u8]) {
        self.send_fitted(now, key, packet);
    }

    /// Seals one IP packet that fits the path for member `key`.
    fn seal_to_peer(&mut self, now: Instant, key: PeerKey, packet: &[u8]) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let (direct, out) = (peer.direct(), &mut self.out);
        peer.link
            .encapsulate(now, packet, &mut self.buf, &mut self.drops, |bytes| {
                out.for_peer(direct, key, bytes)
            });
        if let Some(at) = peer.link.poll_timeout() {
            self.timers.arm_earliest(Timer::Handshake, at);
        }
        if direct.is_none() {
            let relay = self.out.peer_relay(&key);
            if self.relays[relay].check_if_silent(now) {
                self.timers.arm_earliest(Timer::Relay, now);
            }
        }
    }

    /// Handles one datagram received on the main UDP socket from `from`.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.handle_udp_on(now, 0, from, bytes);
    }

    /// Handles one datagram received on socket `socket` (see [`Transport::Udp`]) from `from`.
    pub fn handle_udp_on(&mut self, now: Instant, socket: u16, from: SocketAddr, bytes: &[u8]) {
        self.handle_datagram(now, socket, from, bytes, false);
    }

    /// One datagram from `from`, on UDP socket `socket` or (`from_stream`) the relay stream.
    fn handle_datagram(
        &mut self,
        now: Instant,
        socket: u16,
        from: SocketAddr,
        bytes: &[u8],
        from_stream: bool,
    ) {
        self.now = self.now.max(now);
        match wire::classify(bytes) {
            DatagramKind::WireGuard => self.handle_wireguard(now, from, socket, None, bytes),
            DatagramKind::Meshvpn => {
                if self.handle_frame(now, from, socket, bytes) == Handled::Control {
                    self.refresh_timers();
                }
            }
            DatagramKind::Stun => {
                match stun::parse(bytes) {
                    Some(stun::Binding::Response { tx, mapped }) => {
                        // Only an answer that really came over UDP proves UDP works.
                        if !from_stream {
                            // Each session checks the answer came from its relay's host
                            // (either STUN port).
                            for r in 0..self.relays.len() {
                                if self.relays[r].handle_udp_stun(now, from) {
                                    self.relay_transport_changed(now, r);
                                }
                            }
                        }
                        if self.netcheck.handle_response(now, from, tx, mapped) {
                            self.update_nat_verdict(now);
                        }
                    }
                    // Members do not serve STUN.
                    Some(stun::Binding::Request(_)) => {}
                    None => self.drops.malformed += 1,
                }
                self.refresh_timers();
            }
            DatagramKind::Unknown => self.drops.malformed += 1,
        }
    }

    /// The sockets the node uses now: the main one (0), the extra sockets of a running
    /// birthday probe, and the sockets of direct paths. The driver closes any others.
    pub fn active_sockets(&self) -> std::collections::BTreeSet<u16> {
        let mut set: std::collections::BTreeSet<u16> = [0].into();
        for p in self.peers.values() {
            if p.paths.birthday.is_hard() {
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
        self.now = self.now.max(now);
        let Some((addr, socket)) = self.peers.get(key).map(|p| match p.direct() {
            Some((a, s)) => (Some(a), s),
            None => (None, 0),
        }) else {
            return false;
        };
        let tx = self.send_ping(now, *key, addr, socket);
        if let Some(p) = self.peers.get_mut(key) {
            p.paths.set_request(&tx, request);
        }
        true
    }

    /// Finds a member by node name, virtual IP or IPv6 overlay address.
    pub fn find_peer(&self, name_or_ip: &str) -> Option<PeerKey> {
        let ipv6 = name_or_ip.parse::<Ipv6Addr>().ok();
        self.peers
            .values()
            .find(|p| {
                p.announcement.name == name_or_ip
                    || p.virtual_ip().to_string() == name_or_ip
                    || (ipv6.is_some() && self.members.overlay_ipv6_of(&p.key) == ipv6)
            })
            .map(|p| p.key)
    }

    /// Runs every timer that is due at `now` (calling it early is harmless: nothing is due).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        for timer in Timer::ALL {
            if self.timers.get(timer).is_none_or(|at| at > now) {
                continue;
            }
            match timer {
                Timer::Tick => self.tick(now),
                Timer::Handshake => self.handshake_timers(now),
                Timer::Relay => self.relay_timers(now),
                Timer::Stun => self.stun_round(now),
                Timer::Paths => self.path_timers(now),
                Timer::Unrouted => self.expire_unrouted(now),
            }
        }
        self.refresh_timers();
    }

    /// When the node next needs [`Node::handle_timeout`], and why. While output is queued this
    /// is the latest time the node has seen ("now"), so a driver that forgot to drain wakes at
    /// once.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        if !self.out.is_empty() {
            return Some((self.now, "output queued"));
        }
        self.timers.next().map(|(at, timer)| (at, timer.reason()))
    }

    /// Moves the next datagram to send into `buf` (whose old contents are recycled, so the
    /// driver allocates nothing by reusing one `Vec`); `None` when nothing is queued.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.out.pop_transmit(buf)
    }

    /// How the next datagram [`poll_transmit`](Self::poll_transmit) returns leaves, without
    /// taking it (a data-path thread executes only datagrams for the main socket).
    pub fn next_transport(&self) -> Option<Transport> {
        self.out.next_transport()
    }

    /// Moves the next packet for the TUN device into `buf` and returns its length.
    pub fn poll_tun(&mut self, buf: &mut Vec<u8>) -> Option<usize> {
        self.out.pop_tun(buf)
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_event()
    }

    /// Recomputes every slot of the timer table from the sub-machines' deadlines.
    fn refresh_timers(&mut self) {
        // Without peers there are no links to tick, and no handshake can complete, so the
        // handshake guard's count may stay high.
        let tick = match self.timers.get(Timer::Tick) {
            _ if self.peers.is_empty() => None,
            Some(at) => Some(at),
            None => Some(self.now + TICK),
        };
        self.timers.set(Timer::Tick, tick);
        let handshake = self
            .peers
            .values()
            .filter_map(|p| p.link.poll_timeout())
            .min();
        self.timers.set(Timer::Handshake, handshake);
        let quiet = self.quiet(self.now);
        for r in &mut self.relays {
            r.set_quiet(self.now, quiet);
        }
        // The rotation upload talks to the relay, so its retries share the relay's slot.
        let sessions = self
            .relays
            .iter()
            .map(|r| r.poll_timeout())
            .chain(self.primary_deadline())
            .min();
        let relay = match (self.rotation.poll_timeout(), sessions) {
            (Some(at), Some(s)) => at.min(s),
            (None, Some(s)) => s,
            (Some(at), None) => at,
            (None, None) => self.now + REGISTER_INTERVAL,
        };
        self.timers.set(Timer::Relay, Some(relay));
        let stun = self.netcheck.next_round(quiet);
        self.timers.set(Timer::Stun, Some(stun.unwrap_or(self.now)));
        let paths = self
            .peers
            .values()
            .filter_map(|p| self.path_deadline(p))
            .min();
        self.timers.set(Timer::Paths, paths);
        self.timers
            .set(Timer::Unrouted, self.unrouted.next_expiry());
    }

    /// The housekeeping of [`TICK`]: the handshake guard's new period, boringtun's periodic
    /// timers on every peer link, and path selection for every peer whose byte counters are
    /// due for a look.
    fn tick(&mut self, now: Instant) {
        self.timers.set(Timer::Tick, Some(now + TICK));
        self.guard.handle_reset();
        for (key, p) in &mut self.peers {
            if let Some(bytes) = p.link.handle_tick(&mut self.buf) {
                self.out.for_peer(p.direct(), *key, bytes);
            }
        }
        let due: Vec<PeerKey> = self
            .peers
            .values()
            .filter(|p| p.paths.activity_check_due(now))
            .map(|p| p.key)
            .collect();
        if !due.is_empty() {
            self.run_path_timers(now, due);
        }
    }

    /// The node-side handshake retries of the links that are due.
    fn handshake_timers(&mut self, now: Instant) {
        for (key, p) in &mut self.peers {
            if p.link.poll_timeout().is_none_or(|at| at > now) {
                continue;
            }
            if let Some(bytes) = p.link.handle_timeout(now, &mut self.buf, &mut self.drops) {
                self.out.for_peer(p.direct(), *key, bytes);
            }
        }
    }

    /// Tells every relay this member leaves (graceful shutdown); send what this queues.
    pub fn leave(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let ts = self.next_ts(now);
        let req = RelayRequest::Leave {
            network: self.keys.network_id,
            ts_ms: ts,
        };
        for relay in 0..self.relays.len() {
            self.send_to_relay_n(relay, &req);
        }
        self.refresh_timers();
    }

    // ----- NAT classification --------------------------------------------------------------

    /// Whether the node is quiet: no peer moved a byte for [`peer::IDLE_AFTER`] and every
    /// relay is reached over UDP (a stream needs the STUN answers that bring it back to UDP).
    pub(crate) fn quiet(&self, now: Instant) -> bool {
        self.peers.values().all(|p| p.paths.is_idle(now))
            && !self.relays.iter().any(|r| r.wants_stream())
    }

    /// Sends the STUN requests of a round, if one is due.
    fn stun_round(&mut self, now: Instant) {
        let quiet = self.quiet(now);
        let rng = &mut self.rng;
        let round = self.netcheck.poll_round(now, quiet, || {
            let mut tx = [0u8; 12];
            rng.fill_bytes(&mut tx);
            tx
        });
        // STUN always goes over UDP: an answer over UDP is what proves UDP works.
        for (dst, tx) in round {
            self.out.udp(0, dst, &stun::binding_request(tx));
        }
    }

    /// Recomputes the NAT verdict (UDP blocked while on the stream); a change is announced.
    fn update_nat_verdict(&mut self, now: Instant) {
        let verdict = if self.relays[self.primary].on_stream() {
            NatKind::UdpBlocked
        } else {
            self.netcheck.verdict(&self.local_endpoints)
        };
        if verdict != self.nat {
            self.nat = verdict;
            self.reseal_announcement(now);
            self.register_everywhere(now);
        }
    }

    // ----- outbound helpers ----------------------------------------------------------------

    /// Sends `payload` to peer `to` through the relay.
    fn relay_payload(&mut self, to: PeerKey, payload: &[u8]) {
        self.out.relay_to_peer(to, payload);
    }

    /// Seals our announcement again (name, virtual IP, endpoints, NAT verdict, timestamp).
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

    /// A fresh nonce from the seeded RNG.
    fn nonce(&mut self) -> [u8; 24] {
        let mut n = [0u8; 24];
        self.rng.fill_bytes(&mut n);
        n
    }
}

/// The STUN servers the node asks: each relay's port and its second STUN port (port + 1, so
/// two destinations reveal an endpoint-dependent mapping even with one relay), then the extra
/// servers. A relay that is down just does not answer; the verdict uses the answers there are.
fn stun_targets(relays: &[RelayTarget], extra: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut targets = Vec::new();
    for relay in relays {
        let mut alt = relay.addr;
        alt.set_port(relay.addr.port().wrapping_add(1));
        targets.extend([relay.addr, alt]);
    }
    targets.extend(extra.iter().copied());
    let mut seen = std::collections::BTreeSet::new();
    targets.retain(|a| seen.insert(*a));
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

/// The destination of an IPv6 packet; `None` for anything else or a truncated header.
fn ipv6_destination(packet: &[u8]) -> Option<Ipv6Addr> {
    let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
    (packet[0] >> 4 == 6).then(|| Ipv6Addr::from(dst))
}

/// Whether an IPv6 destination stays on the link (multicast, link-local, unspecified): the
/// kernel's own neighbour discovery, router solicitations and MLD on the TUN device, which
/// the overlay does not carry and which are no error.
fn is_link_scope(dst: &Ipv6Addr) -> bool {
    dst.is_multicast() || dst.is_unicast_link_local() || dst.is_unspecified()
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

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::keys::{NetworkSecret, NodeSecret};

    /// A node of a one-member test network, its keys drawn from `seed`, starting at `now`.
    pub(crate) fn node(seed: u64, now: Instant) -> Node {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let relay = NodeSecret::generate(&mut rng).public();
        let cfg = NodeConfig {
            secret: NodeSecret::generate(&mut rng),
            network_secret: NetworkSecret::generate(&mut rng),
            network_name: "test".into(),
            name: "a".into(),
            virtual_ip: Ipv4Addr::new(10, 77, 0, 1),
            subnet: "10.77.0.0/16".parse().expect("literal"),
            relays: vec![RelayTarget {
                key: relay,
                addr: "203.0.113.1:3478".parse().expect("literal"),
                tls: false,
            }],
            stun_servers: Vec::new(),
            seed: 1,
            relay_for_peers: true,
        };
        Node::new(cfg, now, 1_700_000_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(now: Instant) -> Node {
        test_support::node(11, now)
    }

    #[test]
    fn poll_timeout_says_now_while_output_waits_then_the_next_deadline_and_why() {
        let t0 = Instant::now();
        let mut n = node(t0);
        // Nothing is queued at construction; the registration and the STUN round are due now.
        assert_eq!(n.poll_timeout(), Some((t0, "relay session")));
        let later = t0 + Duration::from_millis(5);
        n.handle_timeout(later);
        assert_eq!(n.poll_timeout(), Some((later, "output queued")));
        let mut buf = Vec::new();
        let mut sent = Vec::new();
        while let Some(t) = n.poll_transmit(&mut buf) {
            sent.push(t.transport);
        }
        assert_eq!(
            sent.len(),
            3,
            "a registration and two STUN requests: {sent:?}"
        );
        assert!(sent
            .iter()
            .all(|t| matches!(t, Transport::Udp { socket: 0, .. })));
        // Drained: the next deadline is the unanswered registration's acknowledgement timeout.
        let (at, why) = n.poll_timeout().expect("a deadline");
        assert_eq!(why, "relay session");
        assert_eq!(at, later + relay_session::REGISTER_RETRY_MIN);
        // No peers: no housekeeping tick.
        assert_eq!(n.timers.get(Timer::Tick), None);
        // A relay that stays silent: the node asks for the stream within the fallback time.
        let mut now = later;
        for _ in 0..100 {
            if n.wants_stream(0) {
                break;
            }
            now = n.poll_timeout().expect("a deadline").0.max(now);
            n.handle_timeout(now);
            while n.poll_transmit(&mut buf).is_some() {}
        }
        assert!(n.wants_stream(0));
        assert_eq!(now - t0, UDP_FALLBACK_AFTER);
    }
}
