//! The relay's logic as a sans-IO state machine: rendezvous, STUN and packet relaying.
//!
//! # Driving contract
//! - Feed every datagram (or TCP-framed message) with [`RelayServer::handle_datagram`], giving the
//!   [`Link`] it came from and the current time.
//! - After every input, drain [`RelayServer::poll_transmit`] until it returns `None` and send each
//!   [`Transmit`] on its link.
//! - Call [`RelayServer::handle_timeout`] when [`RelayServer::poll_timeout`] is reached (it returns
//!   the earliest member expiry; `None` when no member is registered).
//!
//! # What it does
//! Members register under a [`NetworkId`] (derived from the network secret, which the relay never
//! sees) with a sealed announcement the relay cannot read. Every request is sealed under the
//! static-static session key of the member and the relay, which proves the member holds its
//! private key, and each answer proves the relay holds its own; a per-member timestamp that must
//! grow refuses replays.
//!
//! Membership is *soft state*: a member that does not re-register within [`MEMBER_TTL`] is
//! dropped and the others are told ([`RelayReply::MemberGone`]). Any change of the member set is
//! pushed to every member at once; each register acknowledgement carries a digest of the set so a
//! member that lost a push asks for a full [`RelayRequest::Sync`].
//!
//! Relay data frames are forwarded by public key, only between members of one network, only
//! from the link a member registered from, and are never decrypted.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::keys::{NetworkId, NodeSecret, PeerKey};
use crate::wire::{
    self, stun, DatagramKind, Frame, MemberEntry, RelayReply, RelayRequest, SyncTag,
};

/// How long a member stays registered without refreshing. Members refresh every
/// `node::REGISTER_INTERVAL` (10 s), so three refreshes may be lost before a live member is
/// dropped, and a member that vanished without saying goodbye is gone from everyone's view
/// within 30 s.
pub const MEMBER_TTL: Duration = Duration::from_secs(30);
/// Most members one network may have on one relay (bounds memory per network id).
pub const MAX_MEMBERS_PER_NETWORK: usize = 1024;
/// Most networks one relay serves (bounds memory against registration floods).
pub const MAX_NETWORKS: usize = 65_536;
/// How long a member's last timestamp is remembered after it leaves, to refuse replays of
/// its old registrations.
const REPLAY_MEMORY: Duration = Duration::from_secs(600);

/// Requests under a not-yet-known key one source address may send per second (each costs an
/// X25519); a whole network of members starting behind one NAT stays far below it.
const NEW_KEY_RATE: f64 = 20.0;
/// Burst of such requests one source address may send at once.
const NEW_KEY_BURST: f64 = 40.0;
/// Most source addresses tracked by the budget (bounds its memory); when full, it is reset.
const BUDGET_SOURCES: usize = 65_536;

/// A token bucket per source IP address.
#[derive(Default)]
struct SourceBudget {
    buckets: BTreeMap<std::net::IpAddr, (f64, Instant)>,
}

impl SourceBudget {
    fn allow(&mut self, now: Instant, ip: std::net::IpAddr) -> bool {
        if self.buckets.len() >= BUDGET_SOURCES && !self.buckets.contains_key(&ip) {
            self.buckets.clear();
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((NEW_KEY_BURST, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * NEW_KEY_RATE)
            .min(NEW_KEY_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled completely (nothing to remember).
    fn forget_idle(&mut self, now: Instant) {
        let full_after = std::time::Duration::from_secs_f64(NEW_KEY_BURST / NEW_KEY_RATE);
        self.buckets
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < full_after);
    }
}

/// Where a message came from or goes to: a UDP address or a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Link {
    /// A UDP peer address.
    Udp(SocketAddr),
    /// A TCP connection (for members whose UDP is blocked), numbered by the driver.
    Tcp { id: u64, remote: SocketAddr },
}

impl Link {
    /// The remote address (the member's server-reflexive address for UDP).
    pub fn addr(&self) -> SocketAddr {
        match self {
            Link::Udp(a) | Link::Tcp { remote: a, .. } => *a,
        }
    }
}

/// A message the relay wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub link: Link,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// Counters of what the relay did and refused (exposed for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// Registrations accepted (new and refresh).
    pub registrations: u64,
    /// Relay data frames forwarded.
    pub forwarded: u64,
    /// Bytes of relay data forwarded.
    pub forwarded_bytes: u64,
    /// Datagrams dropped: garbage, unauthenticated, replayed, unknown sender or target.
    pub dropped: u64,
    /// Members dropped because they stopped refreshing.
    pub expired: u64,
}

struct Member {
    link: Link,
    announcement: Vec<u8>,
    expires: Instant,
    session: [u8; 32],
}

/// The relay server's state (see the module doc for the driving contract).
pub struct RelayServer {
    secret: NodeSecret,
    public: PeerKey,
    networks: BTreeMap<NetworkId, BTreeMap<PeerKey, Member>>,
    member_network: BTreeMap<PeerKey, NetworkId>,
    by_link: BTreeMap<Link, PeerKey>,
    last_ts: BTreeMap<PeerKey, (u64, Instant)>,
    transmits: VecDeque<Transmit>,
    rng: ChaCha20Rng,
    generation: u32,
    new_key_budget: SourceBudget,
    /// Change counter: grows with every membership change in any network (see [`SyncTag::seq`]).
    seq: u64,
    stats: RelayStats,
}

impl RelayServer {
    /// A relay with static key `secret`; `seed` drives nonces (pass OS randomness in production).
    pub fn new(secret: NodeSecret, seed: u64) -> Self {
        let public = secret.public();
        Self {
            secret,
            public,
            networks: BTreeMap::new(),
            member_network: BTreeMap::new(),
            by_link: BTreeMap::new(),
            last_ts: BTreeMap::new(),
            transmits: VecDeque::new(),
            rng: ChaCha20Rng::seed_from_u64(seed),
            generation: 0,
            new_key_budget: SourceBudget::default(),
            seq: 0,
            stats: RelayStats::default(),
        }
    }

    /// Starts the change counter at `start`. Pass a clock reading (e.g. Unix microseconds) so a
    /// restarted relay's counter is above every value its previous run handed out: members
    /// then drop entries of members that did not come back.
    pub fn with_sequence_start(mut self, start: u64) -> Self {
        self.seq = start;
        self
    }

    /// The relay's public key.
    pub fn public_key(&self) -> PeerKey {
        self.public
    }

    /// Counters.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Number of registered members across all networks.
    pub fn member_count(&self) -> usize {
        self.member_network.len()
    }

    /// Number of networks with at least one member.
    pub fn network_count(&self) -> usize {
        self.networks.len()
    }

    /// Handles one datagram from `from`. Never fails: garbage is counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: Link, bytes: &[u8]) {
        match wire::classify(bytes) {
            DatagramKind::Stun => match stun::parse(bytes) {
                Some(stun::Binding::Request(tx)) => {
                    self.stats.stun_answered += 1;
                    self.push(from, stun::binding_response(tx, from.addr()));
                }
                Some(stun::Binding::Response { .. }) | None => self.stats.dropped += 1,
            },
            DatagramKind::Meshvpn => self.handle_frame(now, from, bytes),
            DatagramKind::WireGuard | DatagramKind::Unknown => self.stats.dropped += 1,
        }
    }

    /// Expires members whose soft state ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<(NetworkId, PeerKey)> = self
            .networks
            .iter()
            .flat_map(|(net, members)| {
                members
                    .iter()
                    .filter(|(_, m)| m.expires <= now)
                    .map(move |(k, _)| (*net, *k))
            })
            .collect();
        for (net, key) in expired {
            tracing::debug!(member = %key.short(), network = %net, "member expired");
            self.stats.expired += 1;
            self.remove_member(net, key);
        }
        self.last_ts
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < REPLAY_MEMORY);
        self.new_key_budget.forget_idle(now);
    }

    /// Earliest member expiry, if any member is registered.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.networks
            .values()
            .flat_map(|m| m.values().map(|m| m.expires))
            .min()
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Forgets every member attached through `link` (e.g. a closed TCP connection).
    pub fn handle_link_closed(&mut self, link: Link) {
        if let Some(key) = self.by_link.get(&link).copied() {
            if let Some(net) = self.member_network.get(&key).copied() {
                self.remove_member(net, key);
            }
        }
    }

    fn handle_frame(&mut self, now: Instant, from: Link, bytes: &[u8]) {
        let frame = match Frame::parse(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::trace!(%e, from = %from.addr(), "dropping frame");
                self.stats.dropped += 1;
                return;
            }
        };
        match frame {
            // Answer only requests at least as large as the answer: no amplification.
            Frame::KeyRequest if bytes.len() >= wire::RELAY_OVERHEAD => {
                self.push(from, Frame::KeyResponse { relay: self.public }.to_vec());
            }
            Frame::ToRelay { sender, sealed } => self.handle_request(now, from, sender, sealed),
            Frame::RelaySend { to, payload } => self.forward(from, to, payload),
            Frame::KeyRequest
            | Frame::KeyResponse { .. }
            | Frame::FromRelay { .. }
            | Frame::RelayRecv { .. }
            | Frame::Disco { .. } => self.stats.dropped += 1,
        }
    }

    fn handle_request(&mut self, now: Instant, from: Link, sender: PeerKey, sealed: &[u8]) {
        let session = match self.cached_session(&sender) {
            Some(s) => s,
            None => {
                // A key the relay has no session for costs one X25519: bound how often any one
                // source address can make the relay pay that.
                if !self.new_key_budget.allow(now, from.addr().ip()) {
                    self.stats.dropped += 1;
                    return;
                }
                self.secret.relay_session_key(&sender, &self.public)
            }
        };
        let request = match wire::open_to_relay(&session, &sender, sealed) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%e, from = %from.addr(), "refusing relay request");
                self.stats.dropped += 1;
                return;
            }
        };
        let ts = request.ts_ms();
        if self
            .last_ts
            .get(&sender)
            .is_some_and(|(last, _)| ts <= *last)
        {
            tracing::debug!(member = %sender.short(), "refusing replayed relay request");
            self.stats.dropped += 1;
            return;
        }
        self.last_ts.insert(sender, (ts, now));
        let network = request.network();
        match request {
            RelayRequest::Register { announcement, .. } => {
                self.register(now, from, sender, network, announcement, session, ts)
            }
            RelayRequest::Leave { .. } => {
                if self.member_network.get(&sender) == Some(&network) {
                    tracing::debug!(member = %sender.short(), %network, "member left");
                    self.remove_member(network, sender);
                }
            }
            RelayRequest::Sync { .. } => {
                if self.member_network.get(&sender) == Some(&network) {
                    self.send_full_sync(network, sender);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        now: Instant,
        from: Link,
        sender: PeerKey,
        network: NetworkId,
        announcement: Vec<u8>,
        session: [u8; 32],
        ts: u64,
    ) {
        // A key belongs to one network per relay; moving networks drops the old entry.
        if let Some(old) = self.member_network.get(&sender).copied() {
            if old != network {
                self.remove_member(old, sender);
            }
        }
        if !self.networks.contains_key(&network) && self.networks.len() >= MAX_NETWORKS {
            self.reply(
                from,
                &session,
                RelayReply::Error {
                    message: "relay is full".into(),
                },
            );
            return;
        }
        let members = self.networks.entry(network).or_default();
        let is_new = !members.contains_key(&sender);
        if is_new && members.len() >= MAX_MEMBERS_PER_NETWORK {
            self.reply(
                from,
                &session,
                RelayReply::Error {
                    message: "network is full on this relay".into(),
                },
            );
            return;
        }
        let changed = members
            .get(&sender)
            .is_none_or(|m| m.link != from || m.announcement != announcement);
        if let Some(old) = members.get(&sender) {
            if old.link != from {
                self.by_link.remove(&old.link);
            }
        }
        members.insert(
            sender,
            Member {
                link: from,
                announcement,
                expires: now + MEMBER_TTL,
                session,
            },
        );
        self.member_network.insert(sender, network);
        self.by_link.insert(from, sender);
        self.stats.registrations += 1;
        if is_new {
            tracing::debug!(member = %sender.short(), %network, addr = %from.addr(), "member registered");
        }

        let entries = self.entries_except(network, sender);
        let ack = RelayReply::RegisterAck {
            echo_ts_ms: ts,
            observed: from.addr(),
            members: entries.len() as u32,
            digest: wire::membership_digest(entries.iter()),
            ttl_s: MEMBER_TTL.as_secs() as u16,
        };
        self.reply(from, &session, ack);
        if changed {
            self.seq += 1;
            let entry = self.entry(network, sender);
            if let Some(entry) = entry {
                self.broadcast(
                    network,
                    sender,
                    RelayReply::Member {
                        tag: SyncTag {
                            generation: 0,
                            seq: self.seq,
                            index: 0,
                            total: 1,
                        },
                        entry,
                    },
                );
            }
        }
        if is_new {
            self.send_full_sync(network, sender);
        }
    }

    fn forward(&mut self, from: Link, to: PeerKey, payload: &[u8]) {
        let Some(sender) = self.by_link.get(&from).copied() else {
            self.stats.dropped += 1;
            return;
        };
        let Some(network) = self.member_network.get(&sender) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(target) = self.networks.get(network).and_then(|m| m.get(&to)) else {
            self.stats.dropped += 1;
            return;
        };
        let link = target.link;
        self.stats.forwarded += 1;
        self.stats.forwarded_bytes += payload.len() as u64;
        self.push(
            link,
            Frame::RelayRecv {
                from: sender,
                payload,
            }
            .to_vec(),
        );
    }

    fn send_full_sync(&mut self, network: NetworkId, to: PeerKey) {
        self.generation = self.generation.wrapping_add(1).max(1);
        let generation = self.generation;
        let entries = self.entries_except(network, to);
        let Some((link, session)) = self
            .networks
            .get(&network)
            .and_then(|m| m.get(&to))
            .map(|m| (m.link, m.session))
        else {
            return;
        };
        if entries.is_empty() {
            let seq = self.seq;
            self.reply(link, &session, RelayReply::SyncEmpty { generation, seq });
            return;
        }
        let total = entries.len() as u16;
        for (index, entry) in entries.into_iter().enumerate() {
            let tag = SyncTag {
                generation,
                index: index as u16,
                total,
                seq: self.seq,
            };
            self.reply(link, &session, RelayReply::Member { tag, entry });
        }
    }

    fn remove_member(&mut self, network: NetworkId, key: PeerKey) {
        let Some(members) = self.networks.get_mut(&network) else {
            return;
        };
        let Some(member) = members.remove(&key) else {
            return;
        };
        if members.is_empty() {
            self.networks.remove(&network);
        }
        self.member_network.remove(&key);
        if self.by_link.get(&member.link) == Some(&key) {
            self.by_link.remove(&member.link);
        }
        self.seq += 1;
        let seq = self.seq;
        // Sent twice: a lost goodbye would otherwise leave the member listed until the next
        // registration's digest triggers a sync (up to one register interval); the second copy
        // is idempotent.
        for _ in 0..2 {
            self.broadcast(network, key, RelayReply::MemberGone { key, seq });
        }
    }

    fn broadcast(&mut self, network: NetworkId, except: PeerKey, reply: RelayReply) {
        let targets: Vec<(Link, [u8; 32])> = self
            .networks
            .get(&network)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| **k != except)
                    .map(|(_, m)| (m.link, m.session))
                    .collect()
            })
            .unwrap_or_default();
        for (link, session) in targets {
            self.reply(link, &session, reply.clone());
        }
    }

    fn entries_except(&self, network: NetworkId, except: PeerKey) -> Vec<MemberEntry> {
        self.networks
            .get(&network)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| **k != except)
                    .map(|(k, m)| MemberEntry {
                        key: *k,
                        observed: m.link.addr(),
                        announcement: m.announcement.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn entry(&self, network: NetworkId, key: PeerKey) -> Option<MemberEntry> {
        let m = self.networks.get(&network)?.get(&key)?;
        Some(MemberEntry {
            key,
            observed: m.link.addr(),
            announcement: m.announcement.clone(),
        })
    }

    fn cached_session(&self, member: &PeerKey) -> Option<[u8; 32]> {
        self.member_network
            .get(member)
            .and_then(|n| self.networks.get(n))
            .and_then(|m| m.get(member))
            .map(|m| m.session)
    }

    fn reply(&mut self, link: Link, session: &[u8; 32], reply: RelayReply) {
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        let dgram = wire::seal_from_relay(session, self.public, &reply, nonce);
        self.push(link, dgram);
    }

    fn push(&mut self, link: Link, payload: Vec<u8>) {
        self.transmits.push_back(Transmit { link, payload });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NetworkSecret;

    struct Client {
        secret: NodeSecret,
        link: Link,
    }

    impl Client {
        fn new(b: u8, port: u16) -> Self {
            Self {
                secret: NodeSecret::from_bytes([b; 32]),
                link: Link::Udp(SocketAddr::from(([198, 51, 100, b], port))),
            }
        }
        fn request(&self, relay: &RelayServer, req: &RelayRequest) -> Vec<u8> {
            let me = self.secret.public();
            let session = self.secret.relay_session_key(&me, &relay.public_key());
            wire::seal_to_relay(&session, me, req, [b'n'; 24])
        }
        fn replies(&self, relay: &mut RelayServer) -> Vec<RelayReply> {
            let me = self.secret.public();
            let session = self.secret.relay_session_key(&me, &relay.public_key());
            let mut out = Vec::new();
            let mut others = Vec::new();
            while let Some(t) = relay.poll_transmit() {
                if t.link != self.link {
                    others.push(t);
                    continue;
                }
                if let Ok(Frame::FromRelay { relay: k, sealed }) = Frame::parse(&t.payload) {
                    out.push(wire::open_from_relay(&session, &k, sealed).expect("sealed for us"));
                }
            }
            relay.transmits.extend(others);
            out
        }
    }

    fn register(network: NetworkId, ts: u64) -> RelayRequest {
        RelayRequest::Register {
            network,
            ts_ms: ts,
            announcement: vec![1, 2, 3],
        }
    }

    #[test]
    fn registration_sync_forwarding_and_replay() {
        let now = Instant::now();
        let mut relay = RelayServer::new(NodeSecret::from_bytes([1; 32]), 7);
        let net = NetworkSecret([3; 32]).derive().network_id;
        let (a, b) = (Client::new(10, 1000), Client::new(11, 1001));
        relay.handle_datagram(now, a.link, &a.request(&relay, &register(net, 5)));
        let replies = a.replies(&mut relay);
        assert!(matches!(
            replies[0],
            RelayReply::RegisterAck {
                echo_ts_ms: 5,
                members: 0,
                ..
            }
        ));
        assert!(matches!(replies[1], RelayReply::SyncEmpty { .. }));

        relay.handle_datagram(now, b.link, &b.request(&relay, &register(net, 5)));
        // a is told about b at once.
        let to_a = a.replies(&mut relay);
        assert!(
            matches!(&to_a[..], [RelayReply::Member { entry, .. }] if entry.key == b.secret.public())
        );
        let to_b = b.replies(&mut relay);
        assert!(matches!(
            to_b[0],
            RelayReply::RegisterAck { members: 1, .. }
        ));

        // A replayed registration is refused (no answer at all).
        relay.handle_datagram(now, b.link, &b.request(&relay, &register(net, 5)));
        assert!(b.replies(&mut relay).is_empty());
        assert_eq!(relay.stats().dropped, 1);

        // Relay frames are forwarded by key, from registered links only.
        relay.handle_datagram(
            now,
            a.link,
            &Frame::RelaySend {
                to: b.secret.public(),
                payload: b"wg",
            }
            .to_vec(),
        );
        let t = relay.poll_transmit().expect("forwarded");
        assert_eq!(t.link, b.link);
        assert_eq!(
            Frame::parse(&t.payload),
            Ok(Frame::RelayRecv {
                from: a.secret.public(),
                payload: b"wg"
            })
        );
        let stranger = Link::Udp("192.0.2.9:9".parse().expect("lit"));
        relay.handle_datagram(
            now,
            stranger,
            &Frame::RelaySend {
                to: b.secret.public(),
                payload: b"x",
            }
            .to_vec(),
        );
        assert!(relay.poll_transmit().is_none());

        // Expiry: b stops refreshing and a is told.
        relay.handle_datagram(
            now + Duration::from_secs(20),
            a.link,
            &a.request(&relay, &register(net, 6)),
        );
        let _ = a.replies(&mut relay);
        relay.handle_timeout(now + MEMBER_TTL + Duration::from_millis(1));
        let to_a = a.replies(&mut relay);
        let gone = RelayReply::MemberGone {
            seq: relay.seq,
            key: b.secret.public(),
        };
        assert_eq!(to_a, vec![gone.clone(), gone], "the goodbye goes out twice");
        assert_eq!(relay.member_count(), 1);
    }

    #[test]
    fn requests_under_unknown_keys_are_rate_limited_per_source() {
        let now = Instant::now();
        let mut relay = RelayServer::new(NodeSecret::from_bytes([1; 32]), 7);
        let net = NetworkSecret([3; 32]).derive().network_id;
        // A flood of forged requests from one address: only the burst is even looked at.
        let attacker = Link::Udp("192.0.2.66:4000".parse().expect("lit"));
        for i in 0..200u8 {
            let mut forged = Frame::ToRelay {
                sender: PeerKey([i; 32]),
                sealed: &[0u8; 64],
            }
            .to_vec();
            forged.push(i);
            relay.handle_datagram(now, attacker, &forged);
        }
        assert_eq!(relay.stats().dropped, 200);
        // A genuine member from another address is unaffected.
        let a = Client::new(10, 1000);
        relay.handle_datagram(now, a.link, &a.request(&relay, &register(net, 1)));
        assert!(matches!(
            a.replies(&mut relay)[0],
            RelayReply::RegisterAck { .. }
        ));
        // And one from the flooding address gets through once its bucket refills.
        let b = Client {
            secret: NodeSecret::from_bytes([11; 32]),
            link: attacker,
        };
        relay.handle_datagram(now, b.link, &b.request(&relay, &register(net, 1)));
        assert!(b.replies(&mut relay).is_empty(), "budget spent");
        let later = now + std::time::Duration::from_secs(1);
        relay.handle_datagram(later, b.link, &b.request(&relay, &register(net, 2)));
        assert!(matches!(
            b.replies(&mut relay).first(),
            Some(RelayReply::RegisterAck { .. })
        ));
    }

    #[test]
    fn networks_are_isolated() {
        let now = Instant::now();
        let mut relay = RelayServer::new(NodeSecret::from_bytes([1; 32]), 7);
        let n1 = NetworkSecret([3; 32]).derive().network_id;
        let n2 = NetworkSecret([4; 32]).derive().network_id;
        let (a, b) = (Client::new(10, 1000), Client::new(11, 1001));
        relay.handle_datagram(now, a.link, &a.request(&relay, &register(n1, 1)));
        relay.handle_datagram(now, b.link, &b.request(&relay, &register(n2, 1)));
        assert!(a
            .replies(&mut relay)
            .iter()
            .all(|r| !matches!(r, RelayReply::Member { .. })));
        relay.handle_datagram(
            now,
            a.link,
            &Frame::RelaySend {
                to: b.secret.public(),
                payload: b"x",
            }
            .to_vec(),
        );
        let _ = b.replies(&mut relay);
        assert!(
            relay.poll_transmit().is_none(),
            "no forwarding across networks"
        );
        assert_eq!(relay.network_count(), 2);
    }

    #[test]
    fn stun_and_key_requests_without_amplification() {
        let now = Instant::now();
        let mut relay = RelayServer::new(NodeSecret::from_bytes([1; 32]), 7);
        let from = Link::Udp("203.0.113.7:5555".parse().expect("lit"));
        relay.handle_datagram(now, from, &stun::binding_request([9; 12]));
        let t = relay.poll_transmit().expect("stun answer");
        assert_eq!(
            stun::parse(&t.payload),
            Some(stun::Binding::Response {
                tx: [9; 12],
                mapped: from.addr()
            })
        );
        relay.handle_datagram(now, from, &Frame::KeyRequest.to_vec());
        assert!(
            relay.poll_transmit().is_none(),
            "a short key request is not answered"
        );
        let mut padded = Frame::KeyRequest.to_vec();
        padded.resize(wire::RELAY_OVERHEAD, 0);
        relay.handle_datagram(now, from, &padded);
        let t = relay.poll_transmit().expect("key answer");
        assert_eq!(
            Frame::parse(&t.payload),
            Ok(Frame::KeyResponse {
                relay: relay.public_key()
            })
        );
        for garbage in [
            &b""[..],
            b"\xff",
            b"\x01\x00\x00\x00garbage",
            b"\xffm\x01\x10short",
        ] {
            relay.handle_datagram(now, from, garbage);
        }
        assert!(relay.poll_transmit().is_none());
    }
}
