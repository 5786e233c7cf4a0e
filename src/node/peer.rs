//! One peer: its WireGuard session, its candidate addresses, and the path packets take to it.
//!
//! # Path state machine
//! ```text
//!            pong from candidate A                 no pong for DIRECT_TIMEOUT
//!  Relayed ───────────────────────────▶ Direct{A} ─────────────────────────────▶ Relayed
//!     ▲  probe every candidate, backoff      │  ping A every DIRECT_PING_INTERVAL     │
//!     └──────────────────────────────────────┴────────────────────────────────────────┘
//! ```
//! Traffic always flows: on the relay until a probe to a candidate address is answered, then on
//! that address. The WireGuard session is independent of the path, so switching loses nothing.
//! Probes are sealed disco pings; the answer (pong) proves the peer is reachable at that address
//! and measures the round trip. A ping received directly from an unknown address makes that
//! address a candidate (peer-reflexive) and is answered with a ping of our own at once, which is
//! what opens both NATs' mappings when both sides probe together.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::link::PeerLink;
use super::path_selection::PathSelection;
use crate::keys::PeerKey;
use crate::wire::{Announcement, MemberEntry};

/// First interval between probe rounds while relayed; doubles up to [`PROBE_BACKOFF_MAX`].
pub const PROBE_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest interval between probe rounds while relayed: a path that opens later (a NAT
/// mapping appearing, a peer roaming) is found within this time even without new information.
pub const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Ping interval on a direct path. Also the NAT keepalive: well under the 30 s UDP mapping
/// timeouts common in home routers (RFC 4787 asks for at least 2 minutes; many use 30 s).
pub const DIRECT_PING_INTERVAL: Duration = Duration::from_secs(2);
/// A direct path with no pong for this long is abandoned for the relay: three pings lost,
/// so one lost packet never flaps the path.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(6_500);
/// Outstanding pings older than this are forgotten.
pub const PING_EXPIRY: Duration = Duration::from_secs(5);
/// RTT of the relayed path is measured this often while relayed.
pub const RELAY_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A faster direct candidate replaces the current direct path only if its round trip is below
/// this fraction of the current one: measured RTTs jitter by a few tens of percent, and a
/// 30 % margin keeps two similar paths from flapping on every pong.
pub const SWITCH_RTT_RATIO: f64 = 0.7;
/// Most candidate addresses kept per peer.
pub const MAX_CANDIDATES: usize = 24;

/// Which way packets to a peer go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Path {
    /// Through the relay.
    Relayed,
    /// Straight to `addr` from our socket `socket` (0 is the main socket; others are the
    /// extra sockets of a birthday probe), last confirmed by a pong at `last_pong`.
    Direct {
        addr: SocketAddr,
        socket: u16,
        rtt: Duration,
        last_pong: Instant,
    },
}

/// A ping in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingPing {
    /// Where it went (`None`: through the relay).
    pub(crate) addr: Option<SocketAddr>,
    /// Which of our sockets sent it.
    pub(crate) socket: u16,
    pub(crate) sent: Instant,
    /// Set for pings asked for by the operator (`meshvpn ping`): reported as an event.
    pub(crate) request: Option<u64>,
}

/// Everything the node keeps about one other member.
pub(crate) struct Peer {
    pub(crate) key: PeerKey,
    pub(crate) entry: MemberEntry,
    pub(crate) announcement: Announcement,
    /// The WireGuard session (the only owner of boringtun's `Tunn`).
    pub(crate) link: PeerLink,
    pub(crate) disco_key: [u8; 32],
    /// Path selection for this peer (its path, candidates, probes, birthday probing).
    pub(crate) paths: PathSelection,
    /// Set when the relay's member list stopped listing this peer while its direct path
    /// still answered (see `membership::STALE_GRACE`).
    pub(crate) stale_since: Option<Instant>,
}

impl Peer {
    pub(crate) fn virtual_ip(&self) -> Ipv4Addr {
        self.announcement.virtual_ip
    }

    /// Adds the peer's announced endpoints and relay-observed address to its candidates,
    /// keeping addresses learned from its pings. Returns whether anything new appeared.
    pub(crate) fn refresh_candidates(&mut self) -> bool {
        let announced = self.announcement.endpoints.iter().copied();
        self.paths
            .add_candidates(announced.chain([self.entry.observed]))
    }

    /// The direct address and our socket for it, if the path is direct.
    pub(crate) fn direct(&self) -> Option<(SocketAddr, u16)> {
        self.paths.direct()
    }
}
