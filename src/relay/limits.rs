//! The limits of the relay's TCP listener as a sans-IO table: which connection to accept, which
//! to close and when, and how many bytes each may have waiting to be written.
//!
//! A relay on a public address is reached by anyone. Without these limits one host holding a
//! few thousand idle connections takes every descriptor the relay has, and a member whose UDP
//! is blocked can no longer attach. So:
//!
//! - the table holds at most [`TcpLimits::max_connections`] connections, derived from the
//!   descriptor limit ([`TcpLimits::for_descriptors`]) so the relay refuses politely (accept and
//!   close) before the kernel refuses with `EMFILE`;
//! - one source holds at most [`TcpLimits::per_source`] of them (an IPv4 address, or an IPv6
//!   /64, which one host usually owns whole): by default `max(8, slots / 64)`, so at least 64
//!   hosts are needed to fill the table;
//! - a connection must *register* within [`TcpLimits::register_deadline`]. The frames it sends
//!   before that are not limited in number: a member that moves to TCP in the middle of a
//!   session sends its traffic before its next registration, and the relay server drops frames
//!   from unregistered links cheaply (and budgets the key agreements they could cost);
//! - a registered connection is closed after [`TcpLimits::idle_timeout`] without valid traffic.
//!   Only frames the relay acted on as coming from a member restart that timer, never
//!   arbitrary bytes;
//! - a connection's outbound queue holds at most [`TcpLimits::queue_bytes`]; datagrams beyond
//!   it are dropped, as a congested UDP path would drop them.
//!
//! "Registered" and "valid" are decided by the relay server, not by this table: the driver
//! reports a frame as valid when the server answered it with a sealed reply (only sent after
//! the request was authenticated) or forwarded it to another member (only done for frames from
//! the link a member registered from).
//!
//! # Driving contract
//! - [`ConnTable::handle_accept`] for every accepted stream: `Ok(id)` serves it under that id,
//!   `Err(refusal)` closes it at once.
//! - [`ConnTable::handle_valid`] once the server acted on a frame as a member's.
//! - [`ConnTable::handle_enqueue`] before queueing a datagram (`false`: drop it), and
//!   [`ConnTable::handle_sent`] once the writer wrote those bytes.
//! - At [`ConnTable::poll_timeout`], [`ConnTable::handle_timeout`]; close what it returns.
//! - [`ConnTable::handle_closed`] when a connection ends for any other reason.
//!
//! Every refusal and close is counted in [`TcpCounters`]; [`LogLimiter`] keeps the log line
//! each limit writes when it trips to one per [`LOG_INTERVAL`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::wire::Frame;

/// Descriptors kept out of the connection budget: the UDP sockets, the listener, the control
/// socket and its clients, the runtime's epoll and event descriptors, stdio and the key file,
/// with room to spare so the relay never meets `EMFILE` under its own cap.
pub const RESERVED_DESCRIPTORS: u64 = 64;
/// Most TCP connections whatever the descriptor limit: each idle one costs a task, a read
/// buffer and kernel socket buffers (tens of KiB), so this bounds the relay's memory near 1 GiB
/// even when every connection is busy; TCP is the fallback path, UDP carries the bulk.
pub const MAX_CONNECTIONS_CEILING: usize = 32_768;
/// The per-source cap never goes below this: a small office behind one address may have a
/// handful of members whose UDP is blocked.
pub const MIN_PER_SOURCE: usize = 8;
/// One source may hold at most 1/64 of the slots, so filling the table takes 64 hosts.
pub const PER_SOURCE_SHARE: usize = 64;
/// Time a new connection has to register. A member whose UDP is blocked retries registration
/// at most every 8 s (`node::REGISTER_RETRY_MAX`) and keeps that rhythm when it moves to TCP,
/// so its first registration on a new connection may come 8 s after the connect; 15 s covers
/// that plus a slow round trip, and frees a slot held by someone who never registers.
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(15);
/// A registered connection without valid traffic for this long is closed. Members re-register
/// every 10 s (`node::REGISTER_INTERVAL`), so this is six missed refreshes, well past the
/// relay's own 30 s member expiry.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes waiting to be written to one connection before new datagrams are dropped: about 180
/// full-size packets, 20 ms at 100 Mbit/s. The kernel's socket buffer holds more behind it;
/// more queueing only adds latency and lets slow readers pin relay memory.
pub const QUEUE_BYTES: usize = 256 * 1024;
/// Largest frame a member sends: a WireGuard packet of a 1500-byte underlay MTU plus relay
/// framing, or a registration with a 1 KiB announcement (`wire::MAX_ANNOUNCEMENT`) plus keys,
/// nonce, tag and signature. 4 KiB leaves room for the protocol to grow; anything longer is not
/// ours and the connection is closed before buffering it.
pub const MAX_INBOUND_FRAME: usize = 4096;
/// A limit that trips writes at most one log line per this interval (with the number of trips
/// it did not log), so a flood cannot flood the log too.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The TCP limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpLimits {
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections from one source (IPv4 address or IPv6 /64).
    pub per_source: usize,
    /// Time to register after connecting.
    #[serde(with = "secs")]
    pub register_deadline: Duration,
    /// Time without valid traffic after which a registered connection is closed.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Bytes queued towards one connection at most.
    pub queue_bytes: usize,
    /// Longest frame accepted from a connection.
    pub max_frame: usize,
}

impl TcpLimits {
    /// The limits for a process allowed `descriptors` open files: the slots left after
    /// [`RESERVED_DESCRIPTORS`] (at most [`MAX_CONNECTIONS_CEILING`], at least one), and
    /// `max(MIN_PER_SOURCE, slots / PER_SOURCE_SHARE)` per source.
    pub fn for_descriptors(descriptors: u64) -> Self {
        let slots = usize::try_from(descriptors.saturating_sub(RESERVED_DESCRIPTORS))
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_CONNECTIONS_CEILING);
        Self {
            max_connections: slots,
            per_source: (slots / PER_SOURCE_SHARE).max(MIN_PER_SOURCE),
            register_deadline: REGISTER_DEADLINE,
            idle_timeout: IDLE_TIMEOUT,
            queue_bytes: QUEUE_BYTES,
            max_frame: MAX_INBOUND_FRAME,
        }
    }

    /// Applies operator overrides; the connection cap never exceeds what the descriptors allow.
    pub fn with_overrides(
        mut self,
        max_connections: Option<usize>,
        per_source: Option<usize>,
    ) -> Self {
        if let Some(max) = max_connections {
            self.max_connections = max.clamp(1, self.max_connections);
        }
        if let Some(per) = per_source {
            self.per_source = per.max(1);
        }
        self
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    TableFull,
    /// Its source already holds its share.
    PerSource,
}

/// Why the table closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// It did not register in time.
    RegisterDeadline,
    /// It registered, then sent nothing valid for too long.
    Idle,
    /// It announced a frame longer than the cap.
    FrameTooLong,
}

/// The limits an operator sees trip, one log line each per [`LOG_INTERVAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    /// The connection table was full.
    TableFull,
    /// A source was at its share.
    PerSource,
    /// A connection did not register in time.
    RegisterDeadline,
    /// A registered connection went idle.
    Idle,
    /// A connection announced an oversized frame.
    FrameTooLong,
    /// A connection's outbound queue was full.
    QueueFull,
    /// `accept` failed for lack of descriptors (`EMFILE`/`ENFILE`).
    Descriptors,
}

impl Limit {
    /// What the log line says.
    pub fn describe(self) -> &'static str {
        match self {
            Limit::TableFull => "refusing TCP connections: every slot is taken",
            Limit::PerSource => "refusing TCP connections: source holds its share of the slots",
            Limit::RegisterDeadline => "closing TCP connections that did not register in time",
            Limit::Idle => "closing idle TCP connections",
            Limit::FrameTooLong => "closing TCP connections that announced oversized frames",
            Limit::QueueFull => "dropping datagrams for TCP connections with full queues",
            Limit::Descriptors => "out of file descriptors; backing off accepts",
        }
    }
}

impl From<Refusal> for Limit {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::TableFull => Limit::TableFull,
            Refusal::PerSource => Limit::PerSource,
        }
    }
}

impl From<CloseReason> for Limit {
    fn from(r: CloseReason) -> Self {
        match r {
            CloseReason::RegisterDeadline => Limit::RegisterDeadline,
            CloseReason::Idle => Limit::Idle,
            CloseReason::FrameTooLong => Limit::FrameTooLong,
        }
    }
}

/// What the TCP limits did, for the relay's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused because every slot was taken.
    pub refused_table_full: u64,
    /// Connections refused because their source held its share.
    pub refused_per_source: u64,
    /// Connections closed for not registering in time.
    pub closed_register_deadline: u64,
    /// Registered connections closed for idleness.
    pub closed_idle: u64,
    /// Connections closed for announcing a frame over the cap.
    pub closed_frame_too_long: u64,
    /// Datagrams dropped because a connection's queue was full.
    pub queue_dropped: u64,
    /// Bytes of those datagrams.
    pub queue_dropped_bytes: u64,
    /// `accept` failures for lack of descriptors (each followed by a back-off).
    pub accept_descriptor_errors: u64,
    /// Other `accept` failures.
    pub accept_other_errors: u64,
}

/// Where a connection comes from, for the per-source cap: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a remote address (IPv4-mapped IPv6 counts as IPv4).
    pub fn of(remote: SocketAddr) -> Self {
        match remote.ip().to_canonical() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(prefix.into()))
            }
        }
    }
}

/// The relay's TCP connections and their limits (see the module doc for the driving contract).
#[derive(Debug)]
pub struct ConnTable {
    limits: TcpLimits,
    conns: BTreeMap<u64, Conn>,
    per_source: BTreeMap<Source, usize>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_id: u64,
    counters: TcpCounters,
}

#[derive(Debug)]
struct Conn {
    source: Source,
    state: ConnState,
    deadline: Instant,
    queued: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Connected, not registered yet.
    Registering,
    /// The relay acted on one of its frames as a member's.
    Registered,
}

impl ConnTable {
    /// An empty table under `limits`.
    pub fn new(limits: TcpLimits) -> Self {
        Self {
            limits,
            conns: BTreeMap::new(),
            per_source: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_id: 1,
            counters: TcpCounters::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> TcpLimits {
        self.limits
    }

    /// Counters.
    pub fn counters(&self) -> TcpCounters {
        self.counters
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Open connections that registered.
    pub fn registered(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.state == ConnState::Registered)
            .count()
    }

    /// Distinct sources with an open connection.
    pub fn sources(&self) -> usize {
        self.per_source.len()
    }

    /// Whether `id` is open.
    pub fn contains(&self, id: u64) -> bool {
        self.conns.contains_key(&id)
    }

    /// A new stream from `remote`: its id, or why it must be closed at once.
    pub fn handle_accept(&mut self, now: Instant, remote: SocketAddr) -> Result<u64, Refusal> {
        let source = Source::of(remote);
        let held = self.per_source.get(&source).copied().unwrap_or(0);
        if held >= self.limits.per_source {
            self.counters.refused_per_source += 1;
            return Err(Refusal::PerSource);
        }
        if self.conns.len() >= self.limits.max_connections {
            self.counters.refused_table_full += 1;
            return Err(Refusal::TableFull);
        }
        let id = self.next_id;
        self.next_id += 1;
        let deadline = now + self.limits.register_deadline;
        self.conns.insert(
            id,
            Conn {
                source,
                state: ConnState::Registering,
                deadline,
                queued: 0,
            },
        );
        self.deadlines.insert((deadline, id));
        *self.per_source.entry(source).or_insert(0) += 1;
        self.counters.accepted += 1;
        Ok(id)
    }

    /// The relay acted on a frame from `id` as a member's: `id` counts as registered and its
    /// idle timer restarts.
    pub fn handle_valid(&mut self, now: Instant, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.state = ConnState::Registered;
        let deadline = now + self.limits.idle_timeout;
        if deadline != conn.deadline {
            self.deadlines.remove(&(conn.deadline, id));
            conn.deadline = deadline;
            self.deadlines.insert((deadline, id));
        }
    }

    /// `id` announced a frame over the cap; removes it.
    pub fn handle_frame_too_long(&mut self, id: u64) {
        if self.conns.contains_key(&id) {
            self.close(id, CloseReason::FrameTooLong);
        }
    }

    /// Whether `len` more bytes may be queued towards `id` (and accounts them if so).
    pub fn handle_enqueue(&mut self, id: u64, len: usize) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        if conn.queued.saturating_add(len) > self.limits.queue_bytes {
            self.counters.queue_dropped += 1;
            self.counters.queue_dropped_bytes += len as u64;
            return false;
        }
        conn.queued += len;
        true
    }

    /// The writer of `id` wrote `len` queued bytes.
    pub fn handle_sent(&mut self, id: u64, len: usize) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.queued = conn.queued.saturating_sub(len);
        }
    }

    /// Bytes queued towards `id`.
    pub fn queued(&self, id: u64) -> usize {
        self.conns.get(&id).map_or(0, |c| c.queued)
    }

    /// `accept` failed; `descriptors` if for lack of file descriptors.
    pub fn handle_accept_error(&mut self, descriptors: bool) {
        if descriptors {
            self.counters.accept_descriptor_errors += 1;
        } else {
            self.counters.accept_other_errors += 1;
        }
    }

    /// The earliest registration deadline or idle timeout.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Removes and returns the connections whose deadline passed, with the reason.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(u64, CloseReason)> {
        let mut closed = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let reason = match self.conns.get(&id).map(|c| c.state) {
                Some(ConnState::Registered) => CloseReason::Idle,
                Some(ConnState::Registering) | None => CloseReason::RegisterDeadline,
            };
            self.close(id, reason);
            closed.push((id, reason));
        }
        closed
    }

    /// `id` ended (the peer closed it, an error, or the driver closed it); forgets it.
    pub fn handle_closed(&mut self, id: u64) {
        self.remove(id);
    }

    fn close(&mut self, id: u64, reason: CloseReason) {
        self.remove(id);
        let counter = match reason {
            CloseReason::RegisterDeadline => &mut self.counters.closed_register_deadline,
            CloseReason::Idle => &mut self.counters.closed_idle,
            CloseReason::FrameTooLong => &mut self.counters.closed_frame_too_long,
        };
        *counter += 1;
    }

    fn remove(&mut self, id: u64) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(conn.deadline, id));
        if let Some(n) = self.per_source.get_mut(&conn.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&conn.source);
            }
        }
    }
}

/// Whether an output of the relay server shows that the input which caused it came from a
/// member: a sealed reply (sent only once a request was authenticated) or a forwarded packet
/// (forwarded only from the link its sender registered from). STUN answers, key responses and
/// silence prove nothing. The driver calls [`ConnTable::handle_valid`] on this.
pub fn proves_member(output: &[u8]) -> bool {
    matches!(
        Frame::parse(output),
        Ok(Frame::FromRelay { .. } | Frame::RelayRecv { .. })
    )
}

/// Keeps each [`Limit`]'s log line to one per [`LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: BTreeMap<Limit, (Instant, u64)>,
}

impl LogLimiter {
    /// `limit` tripped at `now`: `Some(n)` if a line should be written now, `n` being the trips
    /// not logged since the previous line; `None` to stay quiet.
    pub fn handle_trip(&mut self, now: Instant, limit: Limit) -> Option<u64> {
        match self.last.get_mut(&limit) {
            Some((logged, suppressed)) if now.saturating_duration_since(*logged) < LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((logged, suppressed)) => {
                let n = *suppressed;
                *logged = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.last.insert(limit, (now, 0));
                Some(0)
            }
        }
    }
}

/// Durations as whole seconds in the status JSON.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn small() -> TcpLimits {
        TcpLimits {
            max_connections: 10,
            per_source: 3,
            ..TcpLimits::for_descriptors(1024)
        }
    }

    #[test]
    fn limits_follow_the_descriptor_limit() {
        let l = TcpLimits::for_descriptors(1024);
        assert_eq!(l.max_connections, 960);
        assert_eq!(l.per_source, 15);
        let l = TcpLimits::for_descriptors(100);
        assert_eq!((l.max_connections, l.per_source), (36, MIN_PER_SOURCE));
        let l = TcpLimits::for_descriptors(10);
        assert_eq!(l.max_connections, 1);
        let l = TcpLimits::for_descriptors(u64::MAX);
        assert_eq!(l.max_connections, MAX_CONNECTIONS_CEILING);
        assert_eq!(l.per_source, MAX_CONNECTIONS_CEILING / PER_SOURCE_SHARE);
        let l = TcpLimits::for_descriptors(1024).with_overrides(Some(5000), Some(2));
        assert_eq!((l.max_connections, l.per_source), (960, 2));
        let l = TcpLimits::for_descriptors(1024).with_overrides(Some(100), None);
        assert_eq!(l.max_connections, 100);
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_others_still_get_in() {
        let now = Instant::now();
        let mut t = ConnTable::new(small());
        let ids: Vec<u64> = (0..3)
            .map(|p| {
                t.handle_accept(now, addr(&format!("198.51.100.7:{}", 4000 + p)))
                    .expect("within the share")
            })
            .collect();
        for p in 0..100 {
            assert_eq!(
                t.handle_accept(now, addr(&format!("198.51.100.7:{}", 5000 + p))),
                Err(Refusal::PerSource)
            );
        }
        assert_eq!(t.counters().refused_per_source, 100);
        assert!(t.handle_accept(now, addr("203.0.113.9:1234")).is_ok());
        t.handle_closed(ids[0]);
        assert!(t.handle_accept(now, addr("198.51.100.7:6000")).is_ok());
        assert_eq!(t.sources(), 2);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let now = Instant::now();
        let mut t = ConnTable::new(small());
        for i in 1..=3 {
            t.handle_accept(now, addr(&format!("[2001:db8:1:2::{i}]:443")))
                .expect("within the share");
        }
        assert_eq!(
            t.handle_accept(now, addr("[2001:db8:1:2:ffff::1]:443")),
            Err(Refusal::PerSource)
        );
        assert!(t.handle_accept(now, addr("[2001:db8:1:3::1]:443")).is_ok());
        assert_eq!(
            Source::of(addr("[::ffff:198.51.100.7]:1")),
            Source::of(addr("198.51.100.7:2"))
        );
    }

    #[test]
    fn a_full_table_refuses() {
        let now = Instant::now();
        let mut t = ConnTable::new(small());
        for i in 0..10 {
            t.handle_accept(now, addr(&format!("198.51.100.{i}:1")))
                .expect("free slot");
        }
        assert_eq!(
            t.handle_accept(now, addr("203.0.113.1:1")),
            Err(Refusal::TableFull)
        );
        assert_eq!(t.counters().refused_table_full, 1);
        assert_eq!(t.len(), 10);
    }

    #[test]
    fn unregistered_connections_are_closed_at_the_deadline() {
        let t0 = Instant::now();
        let mut t = ConnTable::new(small());
        let idle = t.handle_accept(t0, addr("198.51.100.1:1")).expect("slot");
        let member = t.handle_accept(t0, addr("198.51.100.2:1")).expect("slot");
        assert_eq!(t.poll_timeout(), Some(t0 + REGISTER_DEADLINE));
        t.handle_valid(t0 + Duration::from_secs(2), member);
        assert_eq!(t.registered(), 1);
        assert!(t
            .handle_timeout(t0 + REGISTER_DEADLINE - Duration::from_millis(1))
            .is_empty());
        assert_eq!(
            t.handle_timeout(t0 + REGISTER_DEADLINE),
            vec![(idle, CloseReason::RegisterDeadline)]
        );
        assert!(!t.contains(idle) && t.contains(member));
        assert_eq!(t.counters().closed_register_deadline, 1);
        assert_eq!(
            t.poll_timeout(),
            Some(t0 + Duration::from_secs(2) + IDLE_TIMEOUT)
        );
    }

    #[test]
    fn only_valid_traffic_restarts_the_idle_timer() {
        let t0 = Instant::now();
        let mut t = ConnTable::new(small());
        let id = t.handle_accept(t0, addr("198.51.100.1:1")).expect("slot");
        t.handle_valid(t0, id);
        // Nothing but handle_valid moves the deadline (the driver calls it only when
        // `proves_member` holds for an output; see the test below).
        assert_eq!(
            t.handle_timeout(t0 + IDLE_TIMEOUT),
            vec![(id, CloseReason::Idle)]
        );
        let id = t.handle_accept(t0, addr("198.51.100.1:2")).expect("slot");
        t.handle_valid(t0, id);
        t.handle_valid(t0 + Duration::from_secs(50), id);
        assert!(t.handle_timeout(t0 + IDLE_TIMEOUT).is_empty());
        assert_eq!(t.counters().closed_idle, 1);
    }

    #[test]
    fn only_answered_or_forwarded_frames_prove_a_member() {
        use crate::keys::{NodeSecret, PeerKey};
        use crate::relay::server::{Link, RelayServer};
        use crate::wire::{self, stun};

        let key = PeerKey([7; 32]);
        assert!(proves_member(
            &Frame::FromRelay {
                relay: key,
                sealed: &[1, 2, 3]
            }
            .to_vec()
        ));
        assert!(proves_member(
            &Frame::RelayRecv {
                from: key,
                payload: &[1, 2, 3]
            }
            .to_vec()
        ));
        assert!(!proves_member(&Frame::KeyResponse { relay: key }.to_vec()));
        assert!(!proves_member(b"garbage"));

        // What a stranger on a TCP link can make the server say proves nothing.
        let now = Instant::now();
        let mut server = RelayServer::new(
            NodeSecret::from_bytes([1; 32]),
            7,
            crate::relay::server::UnixClock {
                at: now,
                unix_ms: 1_700_000_000_000,
            },
        );
        let link = Link::Tcp {
            id: 1,
            remote: addr("198.51.100.9:4000"),
        };
        let mut key_request = Frame::KeyRequest.to_vec();
        key_request.resize(wire::RELAY_OVERHEAD, 0);
        let relay_send = Frame::RelaySend {
            to: key,
            payload: &[0; 64],
        }
        .to_vec();
        let stun_request = stun::binding_request([9; 12]);
        let inputs: [&[u8]; 4] = [
            b"\xFFm\x01garbage",
            &key_request,
            &relay_send,
            &stun_request,
        ];
        let mut outputs = 0;
        for input in inputs {
            server.handle_datagram(now, link, input);
            while let Some(t) = server.poll_transmit() {
                outputs += 1;
                assert!(!proves_member(&t.payload), "{:?}", t.payload);
            }
        }
        assert!(
            outputs >= 2,
            "the key request and STUN request are answered"
        );
    }

    #[test]
    fn the_queue_is_capped_in_bytes() {
        let now = Instant::now();
        let mut t = ConnTable::new(small());
        let id = t.handle_accept(now, addr("198.51.100.1:1")).expect("slot");
        let frame = 1400;
        let fits = QUEUE_BYTES / frame;
        for _ in 0..fits {
            assert!(t.handle_enqueue(id, frame));
        }
        assert!(!t.handle_enqueue(id, frame), "over the byte cap");
        assert!(
            !t.handle_enqueue(id, 65_535),
            "one big frame does not fit either"
        );
        assert_eq!(t.counters().queue_dropped, 2);
        assert_eq!(t.counters().queue_dropped_bytes, (frame + 65_535) as u64);
        t.handle_sent(id, frame * 10);
        assert_eq!(t.queued(id), frame * (fits - 10));
        assert!(t.handle_enqueue(id, frame));
        assert!(
            !t.handle_enqueue(999, 1),
            "unknown connections queue nothing"
        );
    }

    #[test]
    fn oversized_frames_are_counted() {
        let now = Instant::now();
        let mut t = ConnTable::new(small());
        let id = t.handle_accept(now, addr("198.51.100.1:1")).expect("slot");
        t.handle_frame_too_long(id);
        t.handle_frame_too_long(id);
        assert_eq!(t.counters().closed_frame_too_long, 1);
        assert!(t.is_empty());
    }

    #[test]
    fn log_lines_are_rate_limited_per_limit() {
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        assert_eq!(l.handle_trip(t0, Limit::PerSource), Some(0));
        for i in 1..100 {
            assert_eq!(
                l.handle_trip(t0 + Duration::from_millis(i), Limit::PerSource),
                None
            );
        }
        assert_eq!(l.handle_trip(t0, Limit::Descriptors), Some(0));
        assert_eq!(l.handle_trip(t0 + LOG_INTERVAL, Limit::PerSource), Some(99));
        assert_eq!(l.handle_trip(t0 + LOG_INTERVAL, Limit::PerSource), None);
    }
}
