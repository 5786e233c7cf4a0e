//! A deterministic simulated network for the sans-IO core: members ([`Node`]) and a relay
//! ([`RelayServer`]) exchanging datagrams through a virtual clock, with per-link latency and
//! random loss drawn from one seeded RNG. No sockets, no real time (except inside boringtun,
//! whose real-time timers never fire within a simulation's few wall-clock seconds).
//!
//! Members are driven through the library's own stepping code ([`Step`], the same the agent
//! uses). A member can have its UDP blocked (every datagram to or from it is dropped); it then
//! reaches the relay over a simulated stream: reliable, ordered, with the same latency, fed to
//! the relay server as a `Link::Tcp` exactly as the relay's driver does.
//!
//! A member can have an underlay MTU ([`Member::mtu`]): a UDP datagram to or from it whose IP
//! packet (payload + 28 bytes of IPv4 and UDP headers) is larger is dropped silently, as on a
//! path whose ICMP "fragmentation needed" is filtered.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod nat;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshvpn::keys::{NetworkSecret, NodeSecret, PeerKey};
use meshvpn::node::driver::{Output, Step};
use meshvpn::node::{Event, Node, NodeConfig, RelayTarget};
use meshvpn::relay::server::{Link, RelayServer, UnixClock};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The seed: `MESHVPN_SIM_SEED` if set, else `default`. Printed so a failure can be replayed.
pub fn seed(default: u64) -> u64 {
    let s = std::env::var("MESHVPN_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    println!("simulation seed {s} (replay with MESHVPN_SIM_SEED={s})");
    s
}

enum InFlight {
    /// A UDP datagram.
    Datagram {
        src: SocketAddr,
        dst: SocketAddr,
        payload: Vec<u8>,
    },
    /// A connection attempt of member `member`'s stream reaching the relay.
    Connect { member: usize },
    /// A frame on member `member`'s stream `link`, towards the relay or towards the member.
    Stream {
        member: usize,
        link: Link,
        to_relay: bool,
        payload: Vec<u8>,
    },
}

/// One output of a member's [`Step`], owned so the simulator can act on it.
enum Owned {
    Udp {
        socket: u16,
        dst: SocketAddr,
        bytes: Vec<u8>,
    },
    Stream(Vec<u8>),
    Tun(Vec<u8>),
    Event(Event),
    Open(usize),
    Close(usize),
}

impl Owned {
    fn from(o: Output<'_>) -> Self {
        match o {
            Output::Udp { socket, dst, bytes } => Owned::Udp {
                socket,
                dst,
                bytes: bytes.to_vec(),
            },
            Output::Stream { bytes, .. } => Owned::Stream(bytes.to_vec()),
            Output::Tun(p) => Owned::Tun(p.to_vec()),
            Output::Event(e) => Owned::Event(e),
            Output::OpenStream { relay, .. } => Owned::Open(relay),
            Output::CloseStream { relay } => Owned::Close(relay),
        }
    }
}

/// One simulated member.
pub struct Member {
    pub node: Node,
    step: Step,
    pub addr: SocketAddr,
    /// Every UDP datagram to or from this member is dropped (a firewall blocking UDP).
    pub udp_blocked: bool,
    /// The underlay IP MTU of this member's link: larger datagrams to or from it vanish.
    pub mtu: Option<usize>,
    /// The member's stream to the relay, once connected.
    pub stream: Option<Link>,
    /// Frames this member's stream carried (both directions).
    pub stream_frames: u64,
    /// Latest arrival time on the stream, per direction (towards the relay, towards the
    /// member), so frames stay in order.
    stream_clock: (Instant, Instant),
    pub alive: bool,
    /// Index of the NAT this member sits behind (its `addr` is then private).
    pub site: Option<usize>,
    /// Datagrams this member sent to anything but the relay.
    pub sent_direct: u64,
    /// How often the node's own deadline came (each a wake-up of the agent's control loop).
    pub timer_wakes: u64,
    /// IP packets the node wrote to its TUN device.
    pub delivered: Vec<Vec<u8>>,
    /// The config the node was built from (a rotation rebuilds it with a new secret).
    pub cfg: NodeConfig,
    /// Rotation events, with the simulated time they came at (a driver restarts the node on
    /// the new secret after `SecretRotated`, as the agent does).
    pub rotation_events: Vec<(Duration, Event)>,
}

/// A relay besides the main one (see [`Sim::extra_relays`]).
pub struct ExtraRelay {
    pub server: RelayServer,
    pub secret: NodeSecret,
    pub addr: SocketAddr,
    /// A dead relay neither receives nor sends anything.
    pub alive: bool,
}

/// The simulated world.
pub struct Sim {
    pub now: Instant,
    pub start: Instant,
    pub rng: ChaCha20Rng,
    pub relay: RelayServer,
    /// The relay's static key (tests playing a hostile relay seal replies with it).
    pub relay_secret: NodeSecret,
    pub relay_addr: SocketAddr,
    pub relay_alive: bool,
    /// Further relays (numbers 1, 2, … in every member's token), reached over UDP only. Add
    /// them with [`Sim::add_relay`] before adding members.
    pub extra_relays: Vec<ExtraRelay>,
    pub members: Vec<Member>,
    pub secret: NetworkSecret,
    pub subnet: ipnet::Ipv4Net,
    /// One-way latency range in milliseconds.
    pub latency_ms: (u64, u64),
    /// Probability that any datagram is lost.
    pub loss: f64,
    /// Drop every datagram between two members (only relay traffic passes), as when both sit
    /// behind NATs that no probe can open.
    pub direct_blocked: bool,
    /// Members behind one NAT cannot reach each other on their LAN (client isolation), so
    /// only hairpinning through the NAT's public address can connect them directly.
    pub lan_blocked: bool,
    /// If set, the next member added claims this virtual IP instead of a derived one.
    pub next_virtual_ip: Option<Ipv4Addr>,
    /// If set, the next member added uses this static key instead of a fresh one.
    pub next_secret: Option<NodeSecret>,
    /// If set, the next member added does not carry other members' traffic.
    pub next_no_carry: bool,
    /// NAT boxes; members with `site: Some(i)` sit behind `nats[i]`.
    pub nats: Vec<nat::Nat>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: BTreeMap<u64, InFlight>,
    seq: u64,
    next_stream_id: u64,
    pub delivered_datagrams: u64,
    pub lost_datagrams: u64,
    pub filtered_datagrams: u64,
    /// Datagrams dropped because they exceeded a member's underlay MTU.
    pub mtu_dropped: u64,
    /// When set, every datagram put on the simulated wire (after NAT) is recorded here.
    pub tap: Option<Vec<Tapped>>,
    /// When set, the relay lies: every member entry and registration acknowledgement it sends
    /// over UDP names an address at this IP (a new port each time) as the observed address.
    pub observed_lie: Option<std::net::IpAddr>,
    /// How many differently lying copies of each such reply the relay sends.
    pub lie_copies: usize,
    lies: u16,
}

/// One datagram seen by [`Sim::tap`].
#[derive(Debug, Clone)]
pub struct Tapped {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Sim {
    pub fn new(seed: u64, latency_ms: (u64, u64), loss: f64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let relay_key = NodeSecret::generate(&mut rng);
        let start = Instant::now();
        let relay = RelayServer::new(relay_key.clone(), rng.gen(), unix_clock(start, start));
        Self {
            now: start,
            start,
            secret: NetworkSecret::generate(&mut rng),
            rng,
            relay,
            relay_secret: relay_key,
            relay_addr: "203.0.113.1:3478".parse().unwrap(),
            relay_alive: true,
            extra_relays: Vec::new(),
            members: Vec::new(),
            subnet: "10.77.0.0/16".parse().unwrap(),
            latency_ms,
            loss,
            direct_blocked: false,
            lan_blocked: false,
            next_virtual_ip: None,
            next_secret: None,
            next_no_carry: false,
            nats: Vec::new(),
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            next_stream_id: 1,
            delivered_datagrams: 0,
            lost_datagrams: 0,
            filtered_datagrams: 0,
            mtu_dropped: 0,
            tap: None,
            observed_lie: None,
            lie_copies: 1,
            lies: 0,
        }
    }

    /// Adds a relay (number 1, 2, … in the tokens of members added afterwards) on a public
    /// address of its own; returns its index in [`Sim::extra_relays`].
    pub fn add_relay(&mut self) -> usize {
        let n = self.extra_relays.len();
        let secret = NodeSecret::generate(&mut self.rng);
        let server = RelayServer::new(secret.clone(), self.rng.gen(), self.relay_clock());
        self.extra_relays.push(ExtraRelay {
            server,
            secret,
            addr: SocketAddr::new(Ipv4Addr::new(203, 0, 113, 2 + n as u8).into(), 3478),
            alive: true,
        });
        n
    }

    /// Adds a member on a public address; returns its index.
    pub fn add_member(&mut self, secret: Option<NetworkSecret>) -> usize {
        let i = self.members.len();
        let addr = SocketAddr::new(
            Ipv4Addr::new(198, 51, 100, 10 + i as u8).into(),
            40_000 + i as u16,
        );
        self.add_member_at(addr, None, secret)
    }

    /// Adds a member behind a new NAT of kind `spec`; returns its index.
    pub fn add_member_behind(&mut self, spec: nat::NatSpec) -> usize {
        let site = self.nats.len();
        self.nats.push(nat::Nat::new(
            spec,
            Ipv4Addr::new(203, 0, 113, 100 + site as u8),
        ));
        self.add_member_in_site(site)
    }

    /// Adds a member behind the existing NAT `site`; returns its index.
    pub fn add_member_in_site(&mut self, site: usize) -> usize {
        let i = self.members.len();
        let addr = SocketAddr::new(
            Ipv4Addr::new(192, 168, site as u8, 10 + i as u8).into(),
            40_000 + i as u16,
        );
        self.add_member_at(addr, Some(site), None)
    }

    fn add_member_at(
        &mut self,
        addr: SocketAddr,
        site: Option<usize>,
        secret: Option<NetworkSecret>,
    ) -> usize {
        let i = self.members.len();
        let key = self
            .next_secret
            .take()
            .unwrap_or_else(|| NodeSecret::generate(&mut self.rng));
        let vip = match self.next_virtual_ip.take() {
            Some(ip) => ip,
            None => meshvpn::addressing::derive_virtual_ip(&self.subnet, &key.public(), 0).unwrap(),
        };
        let cfg = NodeConfig {
            secret: key,
            network_secret: secret.unwrap_or_else(|| self.secret.clone()),
            network_name: "sim".into(),
            name: format!("m{i}"),
            virtual_ip: vip,
            subnet: self.subnet,
            relays: std::iter::once(RelayTarget {
                key: self.relay.public_key(),
                addr: self.relay_addr,
                tls: false,
            })
            .chain(self.extra_relays.iter().map(|r| RelayTarget {
                key: r.server.public_key(),
                addr: r.addr,
                tls: false,
            }))
            .collect(),
            stun_servers: Vec::new(),
            seed: self.rng.gen(),
            relay_for_peers: !std::mem::take(&mut self.next_no_carry),
        };
        let mut node = Node::new(
            cfg.clone(),
            self.now,
            SIM_UNIX_MS + self.elapsed().as_millis() as u64,
        );
        node.set_local_endpoints(self.now, vec![addr]);
        self.members.push(Member {
            cfg,
            rotation_events: Vec::new(),
            node,
            step: Step::new(),
            addr,
            udp_blocked: false,
            mtu: None,
            stream: None,
            stream_frames: 0,
            stream_clock: (self.now, self.now),
            alive: true,
            site,
            sent_direct: 0,
            timer_wakes: 0,
            delivered: Vec::new(),
        });
        i
    }

    /// The Unix clock a relay (re)started now reads (the members' clocks agree with it).
    pub fn relay_clock(&self) -> UnixClock {
        unix_clock(self.start, self.now)
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn key(&self, i: usize) -> PeerKey {
        self.members[i].node.public_key()
    }

    /// Whether member `a` sends to member `b` on a direct path.
    pub fn is_direct(&self, a: usize, b: usize) -> bool {
        matches!(
            self.members[a].node.path_to(&self.key(b)),
            Some(meshvpn::node::peer::Path::Direct { .. })
        )
    }

    /// Whether members `a` and `b` are on a direct path, each toward the other.
    pub fn both_direct(&self, a: usize, b: usize) -> bool {
        self.is_direct(a, b) && self.is_direct(b, a)
    }

    /// Routes a datagram from member `i` (or the relay, `None`) towards `dst`, through NATs.
    /// Member `i`'s socket `socket` sends from port `main port + socket`.
    fn send_from(&mut self, i: Option<usize>, socket: u16, dst: SocketAddr, payload: Vec<u8>) {
        let src = match i {
            None => self.relay_addr,
            Some(i) => {
                if self.members[i].udp_blocked {
                    self.lost_datagrams += 1;
                    return;
                }
                if self.members[i].mtu.is_some_and(|m| payload.len() + 28 > m) {
                    self.mtu_dropped += 1;
                    return;
                }
                let (mut addr, site) = (self.members[i].addr, self.members[i].site);
                addr.set_port(addr.port() + socket);
                match site {
                    None => addr,
                    Some(s) => {
                        let same_lan = self
                            .members
                            .iter()
                            .any(|m| m.site == Some(s) && m.addr == dst);
                        let hairpin_refused = dst.ip()
                            == std::net::IpAddr::V4(self.nats[s].public_ip)
                            && !self.nats[s].spec.hairpin;
                        if same_lan && !self.lan_blocked {
                            addr
                        } else if same_lan || hairpin_refused || is_private(&dst) {
                            // Isolated LAN, no hairpinning, or another site's LAN (unroutable).
                            return;
                        } else {
                            let now = self.now;
                            self.nats[s].outbound(now, addr, dst, &mut self.rng)
                        }
                    }
                }
            }
        };
        self.send(src, dst, payload);
    }

    /// Puts a datagram with any (forged) source on the wire towards `dst`, as an attacker on
    /// the internet could.
    pub fn send_forged(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        self.send(src, dst, payload);
    }

    fn send(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        if let Some(tap) = &mut self.tap {
            tap.push(Tapped {
                src,
                dst,
                payload: payload.clone(),
            });
        }
        let is_relay = |a: SocketAddr| {
            a.ip() == self.relay_addr.ip()
                || self.extra_relays.iter().any(|r| r.addr.ip() == a.ip())
        };
        let direct = !is_relay(src) && !is_relay(dst);
        if (self.direct_blocked && direct) || self.rng.gen_bool(self.loss) {
            self.lost_datagrams += 1;
            return;
        }
        let (lo, hi) = self.latency_ms;
        let delay = Duration::from_millis(self.rng.gen_range(lo..=hi));
        self.schedule(self.now + delay, InFlight::Datagram { src, dst, payload });
    }

    fn schedule(&mut self, at: Instant, what: InFlight) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, what);
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.latency_ms;
        Duration::from_millis(self.rng.gen_range(lo..=hi))
    }

    /// Puts a frame on member `i`'s stream (in order, never lost).
    fn stream_send(&mut self, i: usize, link: Link, to_relay: bool, payload: Vec<u8>) {
        let delay = self.latency();
        let clock = &mut self.members[i].stream_clock;
        let last = if to_relay { &mut clock.0 } else { &mut clock.1 };
        let at = (self.now + delay).max(*last);
        *last = at;
        self.members[i].stream_frames += 1;
        self.schedule(
            at,
            InFlight::Stream {
                member: i,
                link,
                to_relay,
                payload,
            },
        );
    }

    /// Carries out one output of member `i`'s node.
    fn execute(&mut self, i: usize, out: Owned) {
        let alive = self.members[i].alive;
        match out {
            Owned::Udp { socket, dst, bytes } => {
                if alive {
                    if dst.ip() != self.relay_addr.ip()
                        && !self.extra_relays.iter().any(|r| r.addr.ip() == dst.ip())
                    {
                        self.members[i].sent_direct += 1;
                    }
                    self.send_from(Some(i), socket, dst, bytes);
                }
            }
            Owned::Stream(bytes) => {
                if let (true, Some(link)) = (alive, self.members[i].stream) {
                    self.stream_send(i, link, true, bytes);
                }
            }
            Owned::Tun(p) => self.members[i].delivered.push(p),
            Owned::Event(e) => match e {
                Event::SecretRotated { ref secret, .. } => {
                    let secret = secret.clone();
                    let at = self.elapsed();
                    self.members[i].rotation_events.push((at, e));
                    self.rejoin(i, secret);
                }
                Event::RotationFailed { .. } | Event::LeftOutOfRotation => {
                    let at = self.elapsed();
                    self.members[i].rotation_events.push((at, e));
                }
                Event::RelayRegistered { .. }
                | Event::RelayLost { .. }
                | Event::PrimaryRelay { .. }
                | Event::RelayKeyMismatch { .. }
                | Event::RelayError { .. }
                | Event::PeerJoined { .. }
                | Event::PeerLeft { .. }
                | Event::PathChanged { .. }
                | Event::PingResult { .. }
                | Event::VirtualIpConflict { .. } => {}
            },
            Owned::Open(r) | Owned::Close(r) if r != 0 => {
                // Streams exist to relay 0 only in the simulation: report the attempt failed.
                let now = self.now;
                self.members[i].node.handle_relay_stream_down(now, r);
            }
            Owned::Open(_) => {
                // The handshake takes a round trip before the member knows.
                let rtt = self.latency() * 2;
                self.schedule(self.now + rtt, InFlight::Connect { member: i });
            }
            Owned::Close(_) => {
                if let Some(link) = self.members[i].stream.take() {
                    self.relay.handle_link_closed(link);
                }
            }
        }
    }

    /// Restarts member `i`'s node on local port `port` (so its NAT maps it to a new public
    /// port, as after a router reboot or on another network), remembering the members it knew
    /// (as the agent's state file does).
    pub fn restart_on_port(&mut self, i: usize, port: u16) {
        let remembered = self.members[i].node.member_entries();
        self.members[i].addr.set_port(port);
        self.restart(i);
        let now = self.now;
        self.members[i].node.restore_members(now, remembered);
    }

    /// Restarts member `i`'s node (same key, address, virtual IP and network secret; fresh
    /// protocol state), as a restarted agent would start.
    pub fn restart(&mut self, i: usize) {
        let secret = self.members[i].cfg.network_secret.clone();
        self.rejoin(i, secret);
    }

    /// Restarts member `i`'s node on network secret `secret`, as the agent does after a
    /// rotation: same key, address and virtual IP, fresh protocol state.
    fn rejoin(&mut self, i: usize, secret: NetworkSecret) {
        let mut cfg = self.members[i].cfg.clone();
        cfg.network_secret = secret;
        cfg.seed = self.rng.gen();
        let mut node = Node::new(
            cfg.clone(),
            self.now,
            SIM_UNIX_MS + self.elapsed().as_millis() as u64,
        );
        let addr = self.members[i].addr;
        node.set_local_endpoints(self.now, vec![addr]);
        if let Some(link) = self.members[i].stream.take() {
            self.relay.handle_link_closed(link);
        }
        let m = &mut self.members[i];
        m.cfg = cfg;
        m.node = node;
        m.step = Step::new();
    }

    /// Moves every output of every node and of the relay onto the network.
    fn drain(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.members.len() {
                loop {
                    let m = &mut self.members[i];
                    let Some(out) = m.step.poll(&mut m.node).map(Owned::from) else {
                        break;
                    };
                    moved = true;
                    self.execute(i, out);
                }
            }
            while let Some(t) = self.relay.poll_transmit() {
                moved = true;
                if !self.relay_alive {
                    continue;
                }
                match t.link {
                    Link::Udp(dst) => {
                        let copies = if self.observed_lie.is_some() {
                            self.lie_copies.max(1)
                        } else {
                            1
                        };
                        for _ in 1..copies {
                            let payload = self.maybe_lie(dst, t.payload.clone());
                            self.send_from(None, 0, dst, payload);
                        }
                        let payload = self.maybe_lie(dst, t.payload);
                        self.send_from(None, 0, dst, payload)
                    }
                    Link::Tcp { .. } => {
                        if let Some(i) = self.members.iter().position(|m| m.stream == Some(t.link))
                        {
                            self.stream_send(i, t.link, false, t.payload);
                        }
                    }
                }
            }
            for r in 0..self.extra_relays.len() {
                while let Some(t) = self.extra_relays[r].server.poll_transmit() {
                    moved = true;
                    let relay = &self.extra_relays[r];
                    if let (true, Link::Udp(dst)) = (relay.alive, t.link) {
                        let src = relay.addr;
                        self.send(src, dst, t.payload);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// With [`Sim::observed_lie`] set, rewrites the observed address in a relay reply to a
    /// member (public at `dst`, or behind a NAT); anything else passes unchanged.
    fn maybe_lie(&mut self, dst: SocketAddr, payload: Vec<u8>) -> Vec<u8> {
        use meshvpn::wire::{open_from_relay, seal_from_relay, Frame, RelayReply};
        let Some(ip) = self.observed_lie else {
            return payload;
        };
        let Ok(Frame::FromRelay { relay, sealed }) = Frame::parse(&payload) else {
            return payload;
        };
        // The recipient: the member on `dst`, or (behind a NAT, where `dst` is the NAT's
        // address) the member whose session key opens the reply.
        let relay_key = self.relay.public_key();
        let session_of = |m: &Member| {
            self.relay_secret
                .relay_session_key(&m.node.public_key(), &relay_key)
        };
        let opened = self
            .members
            .iter()
            .filter(|m| m.addr == dst || m.site.is_some())
            .find_map(|m| {
                let session = session_of(m);
                open_from_relay(&session, &relay, sealed)
                    .ok()
                    .map(|r| (session, r))
            });
        let Some((session, mut reply)) = opened else {
            return payload;
        };
        self.lies = self.lies.wrapping_add(1);
        let bogus = SocketAddr::new(ip, 10_000 + self.lies % 50_000);
        match &mut reply {
            RelayReply::RegisterAck { observed, .. } => *observed = bogus,
            RelayReply::Member { entry, .. } => entry.observed = bogus,
            RelayReply::MemberGone { .. }
            | RelayReply::Unregistered { .. }
            | RelayReply::SyncEmpty { .. }
            | RelayReply::Error { .. }
            | RelayReply::RotateAck { .. }
            | RelayReply::Rotated { .. } => return payload,
        }
        seal_from_relay(&session, relay, &reply, self.rng.gen())
    }

    /// Advances the clock to the next event (delivery or timer) no later than `until`.
    pub fn step(&mut self, until: Instant) {
        self.drain();
        let mut next = until;
        if let Some(Reverse((t, _))) = self.queue.peek() {
            next = next.min(*t);
        }
        for m in &self.members {
            if m.alive {
                if let Some((at, _)) = m.node.poll_timeout() {
                    next = next.min(at);
                }
            }
        }
        if let Some(t) = self.relay.poll_timeout() {
            next = next.min(t);
        }
        for r in &self.extra_relays {
            if let Some(t) = r.server.poll_timeout() {
                next = next.min(t);
            }
        }
        self.now = self.now.max(next);
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            let Some(p) = self.in_flight.remove(&seq) else {
                continue;
            };
            self.deliver(p);
        }
        let now = self.now;
        for m in &mut self.members {
            if m.alive && m.node.poll_timeout().is_some_and(|(at, _)| at <= now) {
                m.timer_wakes += 1;
                m.node.handle_timeout(now);
            }
        }
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            self.relay.handle_timeout(now);
        }
        for r in &mut self.extra_relays {
            if r.server.poll_timeout().is_some_and(|t| t <= now) {
                r.server.handle_timeout(now);
            }
        }
        self.drain();
    }

    fn deliver(&mut self, what: InFlight) {
        let p = match what {
            InFlight::Datagram { src, dst, payload } => Datagram { src, dst, payload },
            InFlight::Connect { member } => return self.connect(member),
            InFlight::Stream {
                member,
                link,
                to_relay,
                payload,
            } => {
                let m = &mut self.members[member];
                if m.stream != Some(link) {
                    return;
                }
                if to_relay && self.relay_alive {
                    self.relay.handle_datagram(self.now, link, &payload);
                } else if !to_relay && m.alive {
                    m.node.handle_relay_stream(self.now, 0, &payload);
                }
                return;
            }
        };
        if let Some(r) = self
            .extra_relays
            .iter()
            .position(|r| r.addr.ip() == p.dst.ip())
        {
            let relay = &mut self.extra_relays[r];
            if !relay.alive {
                return;
            }
            if p.dst.port() == relay.addr.port() + 1 {
                if let Some(meshvpn::wire::stun::Binding::Request(tx)) =
                    meshvpn::wire::stun::parse(&p.payload)
                {
                    let reply = meshvpn::wire::stun::binding_response(tx, p.src);
                    let src = p.dst;
                    self.send(src, p.src, reply);
                }
            } else if p.dst == relay.addr {
                self.delivered_datagrams += 1;
                relay
                    .server
                    .handle_datagram(self.now, Link::Udp(p.src), &p.payload);
            }
            return;
        }
        let mut alt = self.relay_addr;
        alt.set_port(self.relay_addr.port() + 1);
        if p.dst == alt {
            // The relay's second STUN port answers Binding requests only.
            if let (true, Some(meshvpn::wire::stun::Binding::Request(tx))) =
                (self.relay_alive, meshvpn::wire::stun::parse(&p.payload))
            {
                let reply = meshvpn::wire::stun::binding_response(tx, p.src);
                self.send(alt, p.src, reply);
            }
            return;
        }
        if p.dst == self.relay_addr {
            if self.relay_alive {
                self.delivered_datagrams += 1;
                self.relay
                    .handle_datagram(self.now, Link::Udp(p.src), &p.payload);
            }
            return;
        }
        let now = self.now;
        let mut dst = p.dst;
        if let Some(nat) = self
            .nats
            .iter_mut()
            .find(|n| std::net::IpAddr::V4(n.public_ip) == p.dst.ip())
        {
            match nat.inbound(now, p.src, p.dst.port()) {
                Some(inside) => dst = inside,
                None => {
                    self.filtered_datagrams += 1;
                    return;
                }
            }
        }
        let owner = |m: &Member| {
            m.alive
                && m.addr.ip() == dst.ip()
                && (m.addr.port()..=m.addr.port() + 256).contains(&dst.port())
        };
        if let Some(m) = self.members.iter_mut().find(|m| owner(m)) {
            if m.udp_blocked {
                self.lost_datagrams += 1;
                return;
            }
            if m.mtu.is_some_and(|mtu| p.payload.len() + 28 > mtu) {
                self.mtu_dropped += 1;
                return;
            }
            self.delivered_datagrams += 1;
            let socket = dst.port() - m.addr.port();
            m.node.handle_udp_on(now, socket, p.src, &p.payload);
        }
    }

    /// A stream connection attempt of member `i` reached the relay (or did not).
    fn connect(&mut self, i: usize) {
        let now = self.now;
        if !self.members[i].step.stream_wanted(0) {
            return;
        }
        let Some(kind) = self.members[i].node.wanted_stream(0) else {
            return;
        };
        if !self.relay_alive {
            self.members[i].node.handle_relay_stream_down(now, 0);
            return;
        }
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        let link = Link::Tcp {
            id,
            remote: self.members[i].addr,
        };
        self.members[i].stream = Some(link);
        self.members[i].stream_clock = (now, now);
        self.members[i].node.handle_relay_stream_up(now, 0, kind);
    }

    /// Runs until `cond` holds or `limit` of simulated time passes; returns the time it took.
    pub fn run_until(
        &mut self,
        limit: Duration,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let begin = self.now;
        let end = self.now + limit;
        let mut steps = 0u64;
        while self.now < end {
            if cond(self) {
                return Some(self.now - begin);
            }
            self.step(end);
            steps += 1;
            assert!(steps < 50_000_000, "simulation did not advance");
        }
        cond(self).then(|| self.now - begin)
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let _ = self.run_until(d, |_| false);
    }

    /// Injects an IPv4/UDP-like packet from member `a` to member `b` (through `a`'s TUN) carrying `tag`.
    pub fn inject(&mut self, a: usize, b: usize, tag: u32) {
        let src = self.members[a].node.virtual_ip();
        let dst = self.members[b].node.virtual_ip();
        let pkt = ipv4_packet(src, dst, tag);
        let now = self.now;
        self.members[a].node.handle_tun_packet(now, &pkt);
        self.drain();
    }

    /// Hands `packet` to member `a`'s node as if read from its TUN device.
    pub fn inject_packet(&mut self, a: usize, packet: &[u8]) {
        let now = self.now;
        self.members[a].node.handle_tun_packet(now, packet);
        self.drain();
    }

    /// Whether member `b` received the packet tagged `tag` from member `a`.
    pub fn received(&self, a: usize, b: usize, tag: u32) -> bool {
        let src = self.members[a].node.virtual_ip().octets();
        self.members[b]
            .delivered
            .iter()
            .any(|p| p.len() >= 28 && p[12..16] == src && p[24..28] == tag.to_be_bytes())
    }
}

/// A UDP datagram in flight.
struct Datagram {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

fn is_private(a: &SocketAddr) -> bool {
    match a.ip() {
        std::net::IpAddr::V4(v4) => v4.is_private(),
        std::net::IpAddr::V6(_) => false,
    }
}

/// A minimal IPv4 packet (protocol 253, "experimental") with a 4-byte payload tag at offset 24.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, tag: u32) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 253;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[24..28].copy_from_slice(&tag.to_be_bytes());
    p
}

/// The Unix time (ms) at which every simulation starts.
pub const SIM_UNIX_MS: u64 = 1_700_000_000_000;

fn unix_clock(start: Instant, now: Instant) -> UnixClock {
    UnixClock {
        at: now,
        unix_ms: SIM_UNIX_MS + (now - start).as_millis() as u64,
    }
}
