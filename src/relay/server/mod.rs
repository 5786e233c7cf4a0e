//! The relay's logic as a sans-IO state machine: rendezvous, STUN and packet relaying.
//!
//! # Driving contract
//! - Build it with [`RelayServer::new`], giving a fresh random seed at every start (it makes the
//!   cookie secret and nonces) and a [`UnixClock`] reading; optionally
//!   [`RelayServer::with_config`] and [`RelayServer::with_sequence_start`].
//! - Feed every datagram (or TCP-framed message) with [`RelayServer::handle_datagram`], giving the
//!   [`Link`] it came from and the current time.
//! - After every input, drain [`RelayServer::poll_transmit`] until it returns `None` and send each
//!   [`Transmit`] on its link.
//! - Call [`RelayServer::handle_timeout`] when [`RelayServer::poll_timeout`] is reached (member
//!   expiry and housekeeping; `None` when there is nothing to do).
//! - Read [`RelayServer::counters`] at any time. Tripped limits are logged (rate-limited) here.
//!
//! # What it does
//! Members register under a [`NetworkId`] with a sealed announcement the relay cannot read.
//! Every request is sealed under the static-static session key of the member and the relay
//! (proving the member holds its private key, and each answer proves the relay holds its own)
//! and signed with the network's key, which the relay checks against the network id without
//! being able to sign itself ([`crate::wire::admission`]). Request timestamps must lie within
//! [`CLOCK_WINDOW`] of the relay's clock and grow per member.
//!
//! # Never an amplifier
//! A UDP address that has not proven it receives is sent at most as many bytes as it sent: STUN
//! is answered only when the answer is no larger than the request, key requests likewise, and a
//! registration that would bind an address to a key is answered with a small cookie reply until
//! the address echoes a valid cookie. Everything larger (acknowledgements, syncs, pushes,
//! relayed data) goes only to registered links, which proved themselves when they registered.
//! TCP links proved their address with the handshake.
//!
//! # Budgets and caps
//! Unproven addresses cost one keyed hash. Expensive work (X25519 for a key not seen before,
//! Ed25519 checks) is budgeted per source and relay-wide; sync requests per member; members
//! per network and in all, and networks, are capped ([`ServerConfig`]). Each limit has a counter
//! in [`Counters`].
//!
//! Membership is *soft state*: a member that does not register or refresh within
//! [`MEMBER_TTL`] (plus the answer delay its last refresh asked for, see
//! [`RelayRequest::Refresh`]) is dropped and the others are told ([`RelayReply::MemberGone`]).
//! Delayed answers sit in a second timer heap, at most [`MAX_DELAYED_ANSWERS`] entries. Expiries sit in a timer heap
//! (one entry per member, moved forward lazily when it fires), so no input scans all members.
//! Any change of the member set is pushed to every member of the network at once; each register
//! acknowledgement carries a digest of the set so a member that lost a push asks for a full
//! [`RelayRequest::Sync`].
//!
//! Relay data frames are forwarded by public key, only between members of one network, only
//! from the link a member registered from, and are never decrypted.

mod limits;
mod rotation;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use limits::{Budgets, Limit, Refusal, TokenBucket, TripLog};
pub use limits::{Counters, ServerConfig};
pub use rotation::StoredRotation;

use crate::keys::{NetworkId, NodeSecret, PeerKey};
use crate::wire::admission::{self, Cookie, CookieKey, COOKIE_REPLY_LEN};
use crate::wire::token::TlsEndpoint;
use crate::wire::{
    self, stun, DatagramKind, Frame, MemberEntry, RelayReply, RelayRequest, SyncTag,
};

/// How long a member stays registered without refreshing. Active members refresh every
/// `node::REGISTER_INTERVAL` (10 s), so three refreshes may be lost before a live member is
/// dropped, and a member that vanished without saying goodbye is gone from everyone's view
/// within 30 s (a quiet one within its answer delay, at most two minutes, and 30 s).
pub const MEMBER_TTL: Duration = Duration::from_secs(30);
/// Delayed refresh answers held at once, relay-wide (heap entries, stale ones included):
/// beyond this, refreshes are answered at once, so a member flooding refreshes costs bounded
/// memory. Honest members hold one each.
const MAX_DELAYED_ANSWERS: usize = 65_536;
/// How far a request's timestamp may be from the relay's clock. Hosts synchronised by NTP agree
/// within a second; two minutes tolerates a badly kept clock while a captured request is
/// refused soon after (and the per-member memory of timestamps outlives this window).
pub const CLOCK_WINDOW: Duration = Duration::from_secs(120);
/// How long a member's last timestamp is remembered after it leaves, to refuse replays of its
/// old requests: longer than [`CLOCK_WINDOW`] (older requests are refused by the clock) and
/// than a cookie's life (two [`admission::COOKIE_BUCKET`]s).
const REPLAY_MEMORY: Duration = Duration::from_secs(600);
/// Housekeeping (forgetting old timestamps and idle budgets) runs this often: often enough to
/// keep the tables small under churn, rarely enough that its scans cost nothing.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Full syncs one member may ask for per second. A member asks after a missed push (noticed at
/// its next registration, every 10 s) and repeats after 3 s without an answer, so one every
/// two seconds is plenty; a sync of a large network is many datagrams, so it is worth bounding.
const SYNC_RATE: f64 = 0.5;
/// Syncs one member may ask for at once.
const SYNC_BURST: f64 = 4.0;

/// A timer heap of (when, member, tag) entries, earliest first.
type TimerHeap = BinaryHeap<Reverse<(Instant, PeerKey, u64)>>;

/// Takes the earliest entry of `heap` off it if it is due at `now`.
fn pop_due(heap: &mut TimerHeap, now: Instant) -> Option<(Instant, PeerKey, u64)> {
    let Reverse(top) = heap.peek().copied()?;
    (top.0 <= now).then(|| {
        heap.pop();
        top
    })
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

/// A reading of the Unix clock at an [`Instant`]: the relay's wall time is derived from it, so
/// the server itself reads no clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixClock {
    /// When the reading was taken.
    pub at: Instant,
    /// Milliseconds since the Unix epoch at `at`.
    pub unix_ms: u64,
}

impl UnixClock {
    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if now >= self.at {
            self.unix_ms.saturating_add(ms(now - self.at))
        } else {
            self.unix_ms.saturating_sub(ms(self.at - now))
        }
    }
}

/// Who sent an authenticated request, from where, under which session key, and its
/// timestamp: what every request handler needs besides the request's own fields.
#[derive(Debug, Clone, Copy)]
pub(super) struct Requester {
    pub(super) from: Link,
    pub(super) sender: PeerKey,
    pub(super) network: NetworkId,
    pub(super) session: [u8; 32],
    pub(super) ts: u64,
}

struct Member {
    link: Link,
    announcement: Vec<u8>,
    expires: Instant,
    session: [u8; 32],
    /// Identifies this member's entry in the timer heap (entries of earlier registrations of
    /// the same key are stale).
    timer: u64,
    syncs: TokenBucket,
    /// The change counter of the push that introduced this member (see [`MemberEntry::since`]).
    since: u64,
    /// The delayed answer to the member's latest refresh: when, and the timestamp it echoes.
    answer: Option<(Instant, u64)>,
}

/// The relay server's state (see the module doc for the driving contract).
pub struct RelayServer {
    secret: NodeSecret,
    public: PeerKey,
    config: ServerConfig,
    tls_endpoint: Option<TlsEndpoint>,
    clock: UnixClock,
    cookies: CookieKey,
    networks: BTreeMap<NetworkId, BTreeMap<PeerKey, Member>>,
    member_network: BTreeMap<PeerKey, NetworkId>,
    by_link: BTreeMap<Link, PeerKey>,
    last_ts: BTreeMap<PeerKey, (u64, Instant)>,
    expiries: TimerHeap,
    /// Delayed refresh answers: (when, member, echoed timestamp); entries whose member has
    /// another answer pending since are stale and skipped.
    answers: TimerHeap,
    next_timer: u64,
    next_housekeeping: Option<Instant>,
    transmits: VecDeque<Transmit>,
    rng: ChaCha20Rng,
    generation: u32,
    budgets: Budgets,
    /// Change counter: grows with every membership change in any network (see [`SyncTag::seq`]).
    seq: u64,
    counters: Counters,
    trips: TripLog,
    /// Records of secret rotations: retired network ids and their sealed handovers.
    rotations: rotation::Rotations,
}

impl RelayServer {
    /// A relay with static key `secret`. `seed` makes the cookie secret and nonces: pass fresh
    /// OS randomness at every start, so cookies (and registrations bound to them) from an
    /// earlier run are refused. `clock` anchors the relay's Unix time.
    pub fn new(secret: NodeSecret, seed: u64, clock: UnixClock) -> Self {
        let public = secret.public();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut cookie_secret = [0u8; 32];
        rng.fill_bytes(&mut cookie_secret);
        Self {
            secret,
            public,
            config: ServerConfig::default(),
            tls_endpoint: None,
            clock,
            cookies: CookieKey::new(cookie_secret),
            networks: BTreeMap::new(),
            member_network: BTreeMap::new(),
            by_link: BTreeMap::new(),
            last_ts: BTreeMap::new(),
            expiries: BinaryHeap::new(),
            answers: BinaryHeap::new(),
            next_timer: 0,
            next_housekeeping: None,
            transmits: VecDeque::new(),
            rng,
            generation: 0,
            budgets: Budgets::new(),
            seq: 0,
            counters: Counters::default(),
            trips: TripLog::default(),
            rotations: rotation::Rotations::default(),
        }
    }

    /// Replaces the cookie secret with `secret` (the driver passes 32 bytes of OS randomness,
    /// so the secret does not rest on the 64-bit `seed` alone).
    pub fn with_cookie_secret(mut self, secret: [u8; 32]) -> Self {
        self.cookies = CookieKey::new(secret);
        self
    }

    /// Uses `config` for the relay's limits.
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Names the WebSocket-over-TLS endpoint in key responses (to requests padded to
    /// [`KEY_REQUEST_WITH_TLS_LEN`](crate::wire::token::KEY_REQUEST_WITH_TLS_LEN), so the answer is never larger than the request).
    pub fn with_tls_endpoint(mut self, endpoint: Option<TlsEndpoint>) -> Self {
        self.tls_endpoint = endpoint;
        self
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

    /// Counters of what the relay did and refused.
    pub fn counters(&self) -> Counters {
        self.counters
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
        self.next_housekeeping
            .get_or_insert(now + HOUSEKEEPING_INTERVAL);
        match wire::classify(bytes) {
            DatagramKind::Stun => match stun::answer(bytes, from.addr()) {
                Some(answer) => {
                    self.counters.stun_answered += 1;
                    self.push(from, answer);
                }
                None if matches!(stun::parse(bytes), Some(stun::Binding::Request(_))) => {
                    self.counters.stun_too_small += 1;
                    self.counters.dropped += 1;
                }
                None => self.malformed(),
            },
            DatagramKind::Meshvpn => self.handle_frame(now, from, bytes),
            DatagramKind::WireGuard | DatagramKind::Unknown => self.malformed(),
        }
    }

    /// Expires members whose soft state ran out, and does housekeeping when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((_, key, timer)) = pop_due(&mut self.expiries, now) {
            let Some((net, member)) = self.member(&key) else {
                continue;
            };
            if member.timer != timer {
                continue;
            }
            if member.expires > now {
                // Refreshed since this entry was pushed: move it to the new expiry.
                self.expiries.push(Reverse((member.expires, key, timer)));
                continue;
            }
            tracing::debug!(member = %key.short(), network = %net, "member expired");
            self.counters.expired += 1;
            self.remove_member(net, key);
        }
        while let Some((at, key, ts)) = pop_due(&mut self.answers, now) {
            let Some(net) = self.member_network.get(&key).copied() else {
                continue;
            };
            let Some(member) = self.networks.get_mut(&net).and_then(|m| m.get_mut(&key)) else {
                continue;
            };
            if member.answer != Some((at, ts)) {
                continue;
            }
            member.answer = None;
            let (link, session) = (member.link, member.session);
            let ttl = member.expires.saturating_duration_since(now);
            self.counters.delayed_answers += 1;
            self.acknowledge(link, net, key, ts, &session, ttl);
        }
        self.rotations.expire(now);
        if self.next_housekeeping.is_some_and(|t| t <= now) {
            self.last_ts
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < REPLAY_MEMORY);
            self.budgets.forget_idle(now, &self.config);
            let idle =
                self.last_ts.is_empty() && self.budgets.sources() == 0 && self.networks.is_empty();
            self.next_housekeeping = (!idle).then_some(now + HOUSEKEEPING_INTERVAL);
        }
    }

    /// When [`RelayServer::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.expiries.peek().map(|Reverse((at, _, _))| *at);
        let answer = self.answers.peek().map(|Reverse((at, _, _))| *at);
        [
            expiry,
            answer,
            self.next_housekeeping,
            self.rotations.next_expiry(),
        ]
        .into_iter()
        .flatten()
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
                self.malformed();
                return;
            }
        };
        match frame {
            // Answer only requests at least as large as the answer: no amplification.
            Frame::KeyRequest if bytes.len() >= wire::RELAY_OVERHEAD => {
                self.counters.key_requests_answered += 1;
                let mut answer = Frame::KeyResponse { relay: self.public }.to_vec();
                if let Some(tls) = &self.tls_endpoint {
                    let mut tail = Vec::new();
                    tls.encode_into(&mut tail);
                    if bytes.len() >= answer.len() + tail.len() {
                        answer.extend_from_slice(&tail);
                    }
                }
                self.push(from, answer);
            }
            Frame::ToRelay {
                sender,
                cookie,
                sealed,
            } => self.handle_request(now, from, sender, cookie, sealed, bytes.len()),
            Frame::RelaySend { to, payload } => self.forward(from, to, payload),
            Frame::KeyRequest
            | Frame::KeyResponse { .. }
            | Frame::FromRelay { .. }
            | Frame::CookieReply { .. }
            | Frame::RelayRecv { .. }
            | Frame::Disco { .. } => self.malformed(),
        }
    }

    /// Checks a request in order of cost: cookie (a keyed hash), session (cached, or an X25519
    /// within budget), decryption, clock and replay, then the signature (within budget).
    fn handle_request(
        &mut self,
        now: Instant,
        from: Link,
        sender: PeerKey,
        cookie: Cookie,
        sealed: &[u8],
        len: usize,
    ) {
        let unix_ms = self.clock.unix_ms(now);
        let bucket = unix_ms / admission::COOKIE_BUCKET.as_millis() as u64;
        let proven = match from {
            Link::Tcp { .. } => true,
            Link::Udp(addr) => self.cookies.check(addr, bucket, &cookie),
        };
        let cached = self.member(&sender).map(|(_, m)| (m.session, m.link));
        let session = match cached {
            Some((session, _)) => session,
            None => {
                // Only a registration can come from an unknown key, and it binds an address.
                if !proven {
                    self.send_cookie(from, bucket, sealed, len);
                    return;
                }
                if !self.spend_expensive(now, from) {
                    return;
                }
                self.secret.relay_session_key(&sender, &self.public)
            }
        };
        let signed = match admission::open_request(&session, &sender, &self.public, &cookie, sealed)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%e, from = %from.addr(), "refusing relay request");
                self.counters.unauthenticated += 1;
                self.counters.dropped += 1;
                return;
            }
        };
        let request = &signed.request;
        let ts = request.ts_ms();
        if ts.abs_diff(unix_ms) > CLOCK_WINDOW.as_millis() as u64 {
            tracing::debug!(member = %sender.short(), skew_ms = ts.abs_diff(unix_ms), "refusing relay request: clock too far off");
            self.counters.clock_skew += 1;
            self.counters.dropped += 1;
            return;
        }
        if self
            .last_ts
            .get(&sender)
            .is_some_and(|(last, _)| ts <= *last)
        {
            tracing::debug!(member = %sender.short(), "refusing replayed relay request");
            self.counters.replayed += 1;
            self.counters.dropped += 1;
            return;
        }
        let binds_new_link = matches!(request, RelayRequest::Register { .. })
            && cached.is_none_or(|(_, link)| link != from);
        if binds_new_link && !proven {
            self.send_cookie(from, bucket, sealed, len);
            return;
        }
        let registered_here =
            cached.is_some() && self.member_network.get(&sender) == Some(&request.network());
        if matches!(request, RelayRequest::Refresh { .. })
            && (!registered_here || cached.is_some_and(|(_, link)| link != from))
        {
            // Sealed by the key's holder, so it is worth an answer: smaller than the request,
            // it tells a member the relay lost (a restart, an expiry, a new NAT mapping) to
            // register again at once instead of waiting out its answer delay.
            tracing::debug!(member = %sender.short(), from = %from.addr(), "refresh from a member not held there; asking it to register");
            self.last_ts.insert(sender, (ts, now));
            self.counters.unregistered_refreshes += 1;
            self.reply(from, &session, RelayReply::Unregistered { echo_ts_ms: ts });
            return;
        }
        // The owner of a finished rotation is no longer registered under the retired id, but
        // may repeat its last part (the acknowledgement got lost) and must be answered.
        let rotation_owner = matches!(request, RelayRequest::Rotate { .. })
            && self.rotations.owner(&request.network()) == Some(sender);
        if !matches!(request, RelayRequest::Register { .. }) && !registered_here && !rotation_owner
        {
            self.counters.unknown_sender += 1;
            self.counters.dropped += 1;
            return;
        }
        if !self.spend_expensive(now, from) {
            return;
        }
        if !signed.verify() {
            tracing::debug!(member = %sender.short(), from = %from.addr(), "refusing relay request: bad network signature");
            self.counters.bad_signature += 1;
            self.counters.dropped += 1;
            return;
        }
        self.last_ts.insert(sender, (ts, now));
        let network = request.network();
        let req = Requester {
            from,
            sender,
            network,
            session,
            ts,
        };
        match signed.request {
            RelayRequest::Register { announcement, .. } => self.register(now, &req, announcement),
            RelayRequest::Refresh {
                answer_after_ms, ..
            } => self.refresh(now, &req, answer_after_ms),
            RelayRequest::Leave { .. } => {
                tracing::debug!(member = %sender.short(), %network, "member left");
                self.counters.leaves += 1;
                self.remove_member(network, sender);
            }
            RelayRequest::Sync { .. } => {
                let allowed = self
                    .networks
                    .get_mut(&network)
                    .and_then(|m| m.get_mut(&sender))
                    .is_some_and(|m| m.syncs.take(now, SYNC_RATE, SYNC_BURST));
                if allowed {
                    self.send_full_sync(network, sender);
                } else {
                    self.trips.trip(now, Limit::SyncRate, &mut self.counters);
                }
            }
            RelayRequest::Rotate {
                complete, entries, ..
            } => self.rotate(now, &req, complete, entries),
        }
    }

    /// Answers a request from an address that has not proven it receives: a cookie reply, never
    /// larger than the request (or nothing).
    fn send_cookie(&mut self, from: Link, bucket: u64, sealed: &[u8], len: usize) {
        let (Link::Udp(addr), Some(echo)) = (from, admission::echo_of(sealed)) else {
            self.malformed();
            return;
        };
        if len < COOKIE_REPLY_LEN {
            self.malformed();
            return;
        }
        self.counters.cookie_replies += 1;
        let cookie = self.cookies.cookie(addr, bucket);
        self.push(from, Frame::CookieReply { echo, cookie }.to_vec());
    }

    /// Takes one expensive operation from `from`'s and the relay's budgets; counts and logs a
    /// refusal.
    fn spend_expensive(&mut self, now: Instant, from: Link) -> bool {
        match self.budgets.allow(now, from.addr().ip(), &self.config) {
            Ok(()) => {
                self.counters.expensive_ops += 1;
                true
            }
            Err(refusal) => {
                let limit = match refusal {
                    Refusal::Source => Limit::SourceBudget,
                    Refusal::SourceTable => Limit::SourceTable,
                    Refusal::Global => Limit::GlobalBudget,
                };
                self.trips.trip(now, limit, &mut self.counters);
                false
            }
        }
    }

    /// A registration: stores (or refreshes) `req.sender`'s announcement at the link it came
    /// from, acknowledges it, and tells the network's other members what changed.
    fn register(&mut self, now: Instant, req: &Requester, announcement: Vec<u8>) {
        let &Requester {
            from,
            sender,
            network,
            session,
            ts,
        } = req;
        if self.refuse_retired(from, sender, network, &session) {
            return;
        }
        // A key belongs to one network per relay; moving networks drops the old entry.
        if let Some(old) = self.member_network.get(&sender).copied() {
            if old != network {
                self.remove_member(old, sender);
            }
        }
        let members_here = self.networks.get(&network).map_or(0, BTreeMap::len);
        let is_new = !self
            .networks
            .get(&network)
            .is_some_and(|m| m.contains_key(&sender));
        let refusal = if !is_new {
            None
        } else if members_here == 0 && self.networks.len() >= self.config.max_networks {
            Some((Limit::NetworkCap, "relay is full (networks)"))
        } else if self.member_count() >= self.config.max_members {
            Some((Limit::MemberCap, "relay is full (members)"))
        } else if members_here >= self.config.max_members_per_network {
            Some((Limit::NetworkMemberCap, "network is full on this relay"))
        } else {
            None
        };
        if let Some((limit, message)) = refusal {
            self.refuse(now, from, &session, limit, message);
            return;
        }
        let members = self.networks.entry(network).or_default();
        let changed = members
            .get(&sender)
            .is_none_or(|m| m.link != from || m.announcement != announcement);
        let expires = now + MEMBER_TTL;
        match members.get_mut(&sender) {
            Some(m) => {
                if m.link != from {
                    if self.by_link.get(&m.link) == Some(&sender) {
                        self.by_link.remove(&m.link);
                    }
                    m.link = from;
                }
                m.announcement = announcement;
                m.expires = m.expires.max(expires);
                m.session = session;
                m.answer = None;
            }
            None => {
                let timer = self.next_timer;
                self.next_timer += 1;
                members.insert(
                    sender,
                    Member {
                        link: from,
                        announcement,
                        expires,
                        session,
                        timer,
                        syncs: TokenBucket::full(now, SYNC_BURST),
                        since: self.seq + 1,
                        answer: None,
                    },
                );
                self.expiries.push(Reverse((expires, sender, timer)));
            }
        }
        self.member_network.insert(sender, network);
        self.by_link.insert(from, sender);
        self.counters.registrations += 1;
        if is_new {
            tracing::debug!(member = %sender.short(), %network, addr = %from.addr(), "member registered");
        }

        self.acknowledge(from, network, sender, ts, &session, MEMBER_TTL);
        if changed {
            self.seq += 1;
            if let Some(entry) = self.entry(network, sender) {
                let tag = SyncTag {
                    generation: 0,
                    seq: self.seq,
                    index: 0,
                    total: 1,
                };
                self.broadcast(network, sender, RelayReply::Member { tag, entry });
            }
        }
        if is_new {
            self.send_full_sync(network, sender);
        }
    }

    /// A registered member, at the address it registered from, is still there: keep it for
    /// the answer delay it asks for plus [`MEMBER_TTL`], and acknowledge after that delay
    /// (at once if none was asked for, or if [`MAX_DELAYED_ANSWERS`] are held already).
    fn refresh(&mut self, now: Instant, req: &Requester, answer_after_ms: u32) {
        let &Requester {
            from,
            sender,
            network,
            session,
            ts,
        } = req;
        let delay =
            Duration::from_millis(u64::from(answer_after_ms.min(wire::MAX_ANSWER_AFTER_MS)));
        let full = self.answers.len() >= MAX_DELAYED_ANSWERS;
        if full && !delay.is_zero() {
            self.counters.delayed_answers_full += 1;
        }
        let delay = if full { Duration::ZERO } else { delay };
        let Some(m) = self
            .networks
            .get_mut(&network)
            .and_then(|m| m.get_mut(&sender))
        else {
            return;
        };
        m.expires = m.expires.max(now + delay + MEMBER_TTL);
        m.session = session;
        self.counters.refreshes += 1;
        if delay.is_zero() {
            m.answer = None;
            self.acknowledge(from, network, sender, ts, &session, MEMBER_TTL);
        } else {
            let at = now + delay;
            m.answer = Some((at, ts));
            self.answers.push(Reverse((at, sender, ts)));
        }
    }

    /// Acknowledges `sender`'s registration or refresh with timestamp `ts` on `link`: the
    /// member set's size and digest, and how long the member is kept without another one.
    fn acknowledge(
        &mut self,
        link: Link,
        network: NetworkId,
        sender: PeerKey,
        ts: u64,
        session: &[u8; 32],
        ttl: Duration,
    ) {
        let entries = self.entries_except(network, sender);
        let ack = RelayReply::RegisterAck {
            echo_ts_ms: ts,
            observed: link.addr(),
            members: entries.len() as u32,
            digest: wire::membership_digest(entries.iter()),
            ttl_s: u16::try_from(ttl.as_secs()).unwrap_or(u16::MAX),
            since: self
                .networks
                .get(&network)
                .and_then(|m| m.get(&sender))
                .map_or(0, |m| m.since),
        };
        self.reply(link, session, ack);
    }

    /// Counts a trip of `limit` and tells the requester why its request was refused.
    fn refuse(&mut self, now: Instant, to: Link, session: &[u8; 32], limit: Limit, message: &str) {
        self.trips.trip(now, limit, &mut self.counters);
        self.reply(
            to,
            session,
            RelayReply::Error {
                message: message.into(),
            },
        );
    }

    fn forward(&mut self, from: Link, to: PeerKey, payload: &[u8]) {
        let Some(sender) = self.by_link.get(&from).copied() else {
            self.unknown_sender();
            return;
        };
        let Some(network) = self.member_network.get(&sender) else {
            self.unknown_sender();
            return;
        };
        let Some(target) = self.networks.get(network).and_then(|m| m.get(&to)) else {
            self.unknown_sender();
            return;
        };
        let link = target.link;
        self.counters.forwarded += 1;
        self.counters.forwarded_bytes += payload.len() as u64;
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
        self.counters.syncs += 1;
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
                        since: m.since,
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
            since: m.since,
        })
    }

    fn member(&self, key: &PeerKey) -> Option<(NetworkId, &Member)> {
        let net = self.member_network.get(key)?;
        Some((*net, self.networks.get(net)?.get(key)?))
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

    fn malformed(&mut self) {
        self.counters.malformed += 1;
        self.counters.dropped += 1;
    }

    fn unknown_sender(&mut self) {
        self.counters.unknown_sender += 1;
        self.counters.dropped += 1;
    }
}
