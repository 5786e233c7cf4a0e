//! The peer link: the one owner of a peer's WireGuard session (boringtun's `Tunn`).
//!
//! # Job
//! Everything boringtun does for one peer happens here and nowhere else: sealing packets from
//! the TUN, holding them while no session is up, opening datagrams, its periodic
//! `update_timers`, and the node's own handshake retries.
//! Every link's `Tunn` shares the node's one cookie rate limiter, owned by the [`guard`]
//! (mac1 first, cookies under load, a global budget of key agreements), which sees every
//! WireGuard datagram before any link does: boringtun stays behind this module. The link knows
//! nothing about paths: it hands each outgoing datagram to its caller tagged as a
//! [`LinkOutput::Reply`] (answer the way the message came) or a [`LinkOutput::Send`] (send on
//! the peer's current path), and each opened packet as [`LinkOutput::Tun`] once its inner source
//! address is the peer's own virtual IP (cryptokey routing).
//!
//! # Packets sent during a handshake
//! boringtun seals with its current session, and has none until a handshake completes (for
//! the initiator, when the response arrives; for the responder, when the first data packet
//! arrives on the new session). Left to itself it would queue such packets internally (up to
//! 256, a fresh `Vec` each, no byte or age limit, uncounted) and release them only from
//! the flush loop after a handshake message, where its attempt to seal them again starts a
//! new initiation; when both sides initiate at once, that new initiation replaces the one
//! whose response is in flight, and the queued packets wait for a later handshake. So the
//! link never hands boringtun a packet it cannot seal: while `Tunn::time_since_last_handshake`
//! is `None` (exactly when boringtun's `encapsulate` has no current session) packets go into
//! the link's own [`HoldQueue`] ([`HOLD_PACKETS`], [`HOLD_BYTES`], [`HOLD_MAX_AGE`], oldest
//! dropped first, each drop counted as `handshake_pending`), and only the first of them starts
//! a handshake. After every datagram the link opens, if a session has come up, the held
//! packets are sealed in order and sent on the peer's current path.
//!
//! # Handshake retries
//! boringtun retries handshakes on the real clock. The link also retries on the node's clock
//! every [`HANDSHAKE_RETRY`] while a session is wanted (traffic is waiting) and none is fresh,
//! and gives up after [`HANDSHAKE_GIVE_UP`], so simulations with loss make progress.
//!
//! # Driving contract
//! Inputs: [`PeerLink::encapsulate`] for a packet from the TUN, [`PeerLink::decapsulate`] for a
//! WireGuard datagram from the peer, [`PeerLink::handle_tick`] every
//! [`TICK`](super::TICK), [`PeerLink::handle_timeout`] at
//! [`PeerLink::poll_timeout`]. Outputs go to the caller's closure, written from the caller's
//! scratch buffer: the link allocates nothing per packet.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};

use super::hold::{HoldLimits, HoldQueue};

pub(crate) mod guard;
pub(crate) use guard::{Admission, HandshakeGuard};

use crate::keys::PeerKey;
use crate::status::DropCounters;

/// A handshake that has not completed is re-sent this often (in the node's time, so the
/// simulator controls it; boringtun's own real-time retry also runs).
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(2);
/// A handshake attempt with no answer is abandoned after this long (data queued for the peer
/// is dropped by boringtun; new traffic starts a new attempt).
pub const HANDSHAKE_GIVE_UP: Duration = Duration::from_secs(30);
/// A session whose last handshake is younger than this is fresh: WireGuard's `REJECT_AFTER_TIME`
/// is 180 s, after which boringtun refuses to use the keys, so an older handshake is no session.
pub const SESSION_FRESH: Duration = Duration::from_secs(180);

/// Packets held per peer while its handshake is in progress: a connection's first packets (a
/// TCP SYN, a DNS query and its retry, a ping or two) fit many times over, while a sender
/// that floods an unreachable peer loses its oldest packets rather than the node's memory.
pub const HOLD_PACKETS: usize = 16;
/// Bytes held per peer while its handshake is in progress: 16 full-size packets of the
/// default 1,420-byte MTU are 22 KiB, so the count binds first for ordinary traffic and this
/// caps a peer's queue when the host sends jumbo (offloaded) packets.
pub const HOLD_BYTES: usize = 64 * 1024;
/// A packet held this long for a handshake is dropped: it covers a first initiation and two
/// node-side retries ([`HANDSHAKE_RETRY`] apart) with a relayed round trip to spare, and an
/// older packet has been replaced by the sender's own retransmission (TCP's 1 s initial
/// retransmission timeout, ping's 1 s interval), so delivering it would only add a duplicate.
pub const HOLD_MAX_AGE: Duration = Duration::from_secs(5);

/// The limits of a link's [`HoldQueue`]; every packet goes to the one peer, so one
/// destination may use the whole queue.
const HOLD_LIMITS: HoldLimits = HoldLimits {
    packets: HOLD_PACKETS,
    bytes: HOLD_BYTES,
    per_destination: HOLD_PACKETS,
    max_age: HOLD_MAX_AGE,
};

/// What a link asks its caller to do with bytes it produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkOutput<'a> {
    /// Send back the way the triggering datagram came (handshake response, cookie reply), so
    /// handshakes complete even before a path is known.
    Reply(&'a [u8]),
    /// Send on the peer's current path (data, keepalives, handshake initiations).
    Send(&'a [u8]),
    /// Write to the TUN device: an opened packet whose source is the peer's virtual IP.
    Tun(&'a [u8]),
}

/// One peer's WireGuard session and the node-side state around it.
pub(crate) struct PeerLink {
    tunn: Box<Tunn>,
    index: u32,
    /// Since when traffic waits for a session (cleared once one is fresh or we gave up).
    want_session_since: Option<Instant>,
    last_init_sent: Option<Instant>,
    /// Packets from the TUN waiting for a session (see the module doc).
    held: HoldQueue,
    rx_bytes: u64,
    tx_bytes: u64,
    /// Packets handed to the link to send, sealed or held (activity, for path selection).
    offered: u64,
}

impl PeerLink {
    /// A link for the peer `peer`, with our `index` (the upper 24 bits of boringtun's receiver
    /// indices, which route incoming datagrams to this link). Its `Tunn` uses the node's
    /// shared rate limiter from `guard`.
    pub(crate) fn new(
        secret: x25519_dalek::StaticSecret,
        peer: PeerKey,
        preshared_key: [u8; 32],
        index: u32,
        guard: &HandshakeGuard,
    ) -> Self {
        let tunn = Tunn::new(
            secret,
            peer.to_public(),
            Some(preshared_key),
            None,
            index,
            Some(guard.limiter()),
        );
        Self {
            tunn: Box::new(tunn),
            index,
            want_session_since: None,
            last_init_sent: None,
            held: HoldQueue::new(HOLD_LIMITS),
            rx_bytes: 0,
            tx_bytes: 0,
            offered: 0,
        }
    }

    /// Our receiver index for this peer.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// Bytes received from and sent to the peer (inner packets).
    pub(crate) fn byte_counts(&self) -> (u64, u64) {
        (self.rx_bytes, self.tx_bytes)
    }

    /// Counters that move whenever the session is used: bytes received, and packets offered
    /// to send (sealed or held for a handshake).
    pub(crate) fn activity(&self) -> (u64, u64) {
        (self.rx_bytes, self.offered)
    }

    /// Time since the last completed handshake (boringtun's real clock). Not `Tunn::stats`,
    /// which also estimates loss by locking every session's replay window.
    pub(crate) fn handshake_age(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    /// Whether a session exists whose keys WireGuard still uses.
    pub(crate) fn session_fresh(&self) -> bool {
        self.handshake_age().is_some_and(|d| d < SESSION_FRESH)
    }

    /// How many packets wait for a session.
    pub(crate) fn held_packets(&self) -> usize {
        self.held.len()
    }

    /// Handles one IP packet from the TUN: with a session, sealed into `scratch` and handed to
    /// `send` (for the peer's current path); without one, held until the handshake completes,
    /// and the first packet held starts the handshake (its initiation goes to `send`). Drops
    /// from the hold are counted in `drops`.
    pub(crate) fn encapsulate(
        &mut self,
        now: Instant,
        packet: &[u8],
        scratch: &mut [u8],
        drops: &mut DropCounters,
        mut send: impl FnMut(&[u8]),
    ) {
        self.offered += 1;
        if self.has_session() {
            // Held packets go first, so the peer sees packets in the order they were sent.
            self.flush_held(now, scratch, drops, &mut send);
            if let Some(bytes) = self.seal(packet, scratch) {
                send(bytes);
            }
            return;
        }
        drops.handshake_pending += self.held.expire(now);
        drops.handshake_pending += self.held.push(now, Ipv4Addr::UNSPECIFIED, packet);
        if self.want_session_since.is_some() {
            // A handshake is under way; the node-side retry covers a lost one.
            return;
        }
        self.want_session_since = Some(now);
        match self.tunn.format_handshake_initiation(scratch, false) {
            TunnResult::WriteToNetwork(bytes) => {
                self.last_init_sent = Some(now);
                send(bytes);
            }
            // boringtun has an attempt of its own in progress (or answered the peer's
            // initiation and waits for its first data packet): the retry timer takes over.
            TunnResult::Done => {}
            TunnResult::Err(e) => tracing::debug!(?e, "handshake initiation failed"),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// Opens one WireGuard datagram that came from `from` at `now`, then runs boringtun's
    /// flush loop; if a session is up afterwards, the packets held for it come out, in order,
    /// as [`LinkOutput::Send`]. Opened IPv4 packets whose inner source is not `allowed_source`
    /// are counted as spoofed and dropped; opened IPv6 packets are the caller's to check.
    #[allow(clippy::too_many_arguments)] // each is one input of the one datagram
    pub(crate) fn decapsulate(
        &mut self,
        now: Instant,
        from: IpAddr,
        bytes: &[u8],
        allowed_source: Ipv4Addr,
        scratch: &mut [u8],
        drops: &mut DropCounters,
        mut out: impl FnMut(LinkOutput<'_>),
    ) {
        let mut result = self.tunn.decapsulate(Some(from), bytes, scratch);
        let mut first = true;
        loop {
            match result {
                TunnResult::WriteToNetwork(b) => {
                    out(if first {
                        LinkOutput::Reply(b)
                    } else {
                        LinkOutput::Send(b)
                    });
                    first = false;
                    result = self.tunn.decapsulate(None, &[], scratch);
                }
                TunnResult::WriteToTunnelV4(packet, source) => {
                    if source == allowed_source {
                        self.rx_bytes += packet.len() as u64;
                        out(LinkOutput::Tun(packet));
                    } else {
                        drops.spoofed_source += 1;
                    }
                    break;
                }
                // The IPv6 source is checked by the caller, against the overlay address the
                // sender's key derives (`Membership::check_inner`); no announcement names it.
                TunnResult::WriteToTunnelV6(packet, _) => {
                    self.rx_bytes += packet.len() as u64;
                    out(LinkOutput::Tun(packet));
                    break;
                }
                TunnResult::Done => break,
                TunnResult::Err(e) => {
                    tracing::trace!(?e, "decapsulate failed");
                    drops.wireguard += 1;
                    break;
                }
            }
        }
        if !self.held.is_empty() {
            self.flush_held(now, scratch, drops, |b| out(LinkOutput::Send(b)));
        }
        if self.want_session_since.is_some() && self.session_fresh() {
            self.want_session_since = None;
        }
    }

    /// boringtun's periodic work (keepalives, rekeys, its own retries); at most one datagram,
    /// to be sent on the current path.
    pub(crate) fn handle_tick<'b>(&mut self, scratch: &'b mut [u8]) -> Option<&'b [u8]> {
        match self.tunn.update_timers(scratch) {
            TunnResult::WriteToNetwork(b) => Some(b),
            TunnResult::Done
            | TunnResult::Err(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    /// When the node-side handshake retry (or give-up) or the expiry of a held packet is
    /// due; `None` while no session is wanted and nothing is held.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let retry = self.want_session_since.map(|since| {
            let give_up = since + HANDSHAKE_GIVE_UP;
            let retry = self.last_init_sent.map_or(since, |t| t + HANDSHAKE_RETRY);
            retry.min(give_up)
        });
        [retry, self.held.next_expiry()].into_iter().flatten().min()
    }

    /// The path to the peer changed: a handshake in progress went to the old path, so the
    /// next retry is due at once instead of after [`HANDSHAKE_RETRY`].
    pub(crate) fn handle_path_change(&mut self) {
        if self.want_session_since.is_some() {
            self.last_init_sent = None;
        }
    }

    /// Drops held packets that expired, then runs the handshake retry if due: a fresh
    /// session or a long wait ends the attempt (dropping what is still held), otherwise a new
    /// initiation is returned, to be sent on the current path.
    pub(crate) fn handle_timeout<'b>(
        &mut self,
        now: Instant,
        scratch: &'b mut [u8],
        drops: &mut DropCounters,
    ) -> Option<&'b [u8]> {
        drops.handshake_pending += self.held.expire(now);
        let since = self.want_session_since?;
        if self.session_fresh() || now.saturating_duration_since(since) >= HANDSHAKE_GIVE_UP {
            self.want_session_since = None;
            drops.handshake_pending += self.held.clear();
            return None;
        }
        let due = self
            .last_init_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= HANDSHAKE_RETRY);
        if !due {
            return None;
        }
        self.last_init_sent = Some(now);
        match self.tunn.format_handshake_initiation(scratch, true) {
            TunnResult::WriteToNetwork(b) => Some(b),
            TunnResult::Done
            | TunnResult::Err(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    /// Whether boringtun has a current session, i.e. its `encapsulate` seals instead of
    /// queueing (`time_since_last_handshake` tests exactly that session slot).
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// Seals `packet` with the current session; `None` (and nothing queued in boringtun)
    /// without one.
    fn seal<'b>(&mut self, packet: &[u8], scratch: &'b mut [u8]) -> Option<&'b [u8]> {
        if !self.has_session() {
            return None;
        }
        match self.tunn.encapsulate(packet, scratch) {
            TunnResult::WriteToNetwork(bytes) => {
                self.tx_bytes += packet.len() as u64;
                Some(bytes)
            }
            TunnResult::Done
            | TunnResult::Err(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    /// With a session up, seals every held packet that has not expired, oldest first, and
    /// hands each to `send`; then frees the hold's buffers.
    fn flush_held(
        &mut self,
        now: Instant,
        scratch: &mut [u8],
        drops: &mut DropCounters,
        mut send: impl FnMut(&[u8]),
    ) {
        if self.held.is_empty() || !self.has_session() {
            return;
        }
        drops.handshake_pending += self.held.expire(now);
        while let Some(held) = self.held.pop() {
            if let Some(bytes) = self.seal(&held.packet, scratch) {
                send(bytes);
            }
            self.held.recycle(held.packet);
        }
        self.held.release_spares();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeSecret;
    use rand::SeedableRng;

    fn pair() -> (PeerLink, PeerLink, Ipv4Addr, Ipv4Addr) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let (a, b) = (
            NodeSecret::generate(&mut rng),
            NodeSecret::generate(&mut rng),
        );
        let psk = [9u8; 32];
        let la = PeerLink::new(
            a.to_static(),
            b.public(),
            psk,
            1,
            &HandshakeGuard::new(a.to_static()),
        );
        let lb = PeerLink::new(
            b.to_static(),
            a.public(),
            psk,
            2,
            &HandshakeGuard::new(b.to_static()),
        );
        (
            la,
            lb,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
        )
    }

    fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[8] = 64;
        p[9] = 253;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p
    }

    /// What one delivery produced: replies, sends, TUN packets.
    type Produced = (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>);

    /// Delivers `bytes` to `to`, returning what it produced.
    fn deliver(
        to: &mut PeerLink,
        bytes: &[u8],
        allowed: Ipv4Addr,
        drops: &mut DropCounters,
    ) -> Produced {
        let mut scratch = vec![0u8; 2048];
        let (mut replies, mut sends, mut tun) = (Vec::new(), Vec::new(), Vec::new());
        to.decapsulate(
            Instant::now(),
            "192.0.2.1".parse().expect("literal"),
            bytes,
            allowed,
            &mut scratch,
            drops,
            |o| match o {
                LinkOutput::Reply(b) => replies.push(b.to_vec()),
                LinkOutput::Send(b) => sends.push(b.to_vec()),
                LinkOutput::Tun(b) => tun.push(b.to_vec()),
            },
        );
        (replies, sends, tun)
    }

    /// Hands `packet` from the TUN to `link` at `now`; returns what it sent.
    fn seal(
        link: &mut PeerLink,
        now: Instant,
        packet: &[u8],
        drops: &mut DropCounters,
    ) -> Vec<Vec<u8>> {
        let mut scratch = vec![0u8; 2048];
        let mut sent = Vec::new();
        link.encapsulate(now, packet, &mut scratch, drops, |b| sent.push(b.to_vec()));
        sent
    }

    /// A packet from `src` to `dst` whose payload carries `tag`.
    fn tagged(src: Ipv4Addr, dst: Ipv4Addr, tag: u8) -> Vec<u8> {
        let mut p = packet(src, dst);
        p[27] = tag;
        p
    }

    #[test]
    fn handshake_flushes_held_packet_and_checks_the_inner_source() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut drops = DropCounters::default();
        let sent = seal(&mut a, now, &packet(ip_a, ip_b), &mut drops);
        assert_eq!(sent.len(), 1, "the first packet starts a handshake");
        assert_eq!(sent[0][0], 1, "a handshake initiation");
        assert_eq!(a.held_packets(), 1);
        assert!(a.poll_timeout().is_some(), "a session is wanted");
        let (replies, _, _) = deliver(&mut b, &sent[0], ip_a, &mut drops);
        assert_eq!(replies.len(), 1, "the response goes back the way it came");
        let (keepalive, sends, _) = deliver(&mut a, &replies[0], ip_b, &mut drops);
        assert_eq!(
            keepalive.len(),
            1,
            "boringtun's keepalive answers the response"
        );
        assert_eq!(sends.len(), 1, "the held packet is sent on the path");
        assert_eq!(a.held_packets(), 0);
        assert!(a.session_fresh());
        assert_eq!(a.poll_timeout(), None, "no retry once the session is fresh");
        deliver(&mut b, &keepalive[0], ip_a, &mut drops);
        let (_, _, tun) = deliver(&mut b, &sends[0], ip_a, &mut drops);
        assert_eq!(tun, vec![packet(ip_a, ip_b)]);

        // A packet whose inner source is not the peer's address is dropped and counted.
        let spoofed = seal(
            &mut a,
            now,
            &packet(Ipv4Addr::new(10, 0, 0, 9), ip_b),
            &mut drops,
        );
        assert_eq!(spoofed.len(), 1, "session up: sealed at once");
        let (_, _, tun) = deliver(&mut b, &spoofed[0], ip_a, &mut drops);
        assert!(tun.is_empty());
        assert_eq!(drops.spoofed_source, 1);
        assert_eq!(drops.handshake_pending, 0);
    }

    #[test]
    fn packets_held_during_the_handshake_arrive_in_order_within_the_bounds() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut drops = DropCounters::default();
        let mut init = Vec::new();
        for tag in 0..(HOLD_PACKETS as u8 + 4) {
            let sent = seal(&mut a, now, &tagged(ip_a, ip_b, tag), &mut drops);
            init.extend(sent);
        }
        assert_eq!(init.len(), 1, "one initiation, however many packets wait");
        assert_eq!(a.held_packets(), HOLD_PACKETS);
        assert_eq!(drops.handshake_pending, 4, "the four oldest were dropped");
        let (replies, _, _) = deliver(&mut b, &init[0], ip_a, &mut drops);
        let (keepalive, sends, _) = deliver(&mut a, &replies[0], ip_b, &mut drops);
        deliver(&mut b, &keepalive[0], ip_a, &mut drops);
        let tags: Vec<u8> = sends
            .iter()
            .flat_map(|d| deliver(&mut b, d, ip_a, &mut drops).2)
            .map(|p| p[27])
            .collect();
        assert_eq!(tags, (4..HOLD_PACKETS as u8 + 4).collect::<Vec<_>>());
        // Once up, a packet is sealed at once, after anything still held.
        assert_eq!(
            seal(&mut a, now, &tagged(ip_a, ip_b, 99), &mut drops).len(),
            1
        );
    }

    #[test]
    fn held_packets_expire_on_the_node_clock() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut drops = DropCounters::default();
        let init = seal(&mut a, now, &tagged(ip_a, ip_b, 1), &mut drops);
        let later = now + HOLD_MAX_AGE - Duration::from_millis(1);
        assert!(seal(&mut a, later, &tagged(ip_a, ip_b, 2), &mut drops).is_empty());
        assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_RETRY));
        let mut scratch = vec![0u8; 2048];
        // The first packet's expiry passes while the handshake is still out.
        a.handle_timeout(now + HOLD_MAX_AGE, &mut scratch, &mut drops);
        assert_eq!((a.held_packets(), drops.handshake_pending), (1, 1));
        let (replies, _, _) = deliver(&mut b, &init[0], ip_a, &mut drops);
        let mut sends = Vec::new();
        a.decapsulate(
            now + HOLD_MAX_AGE,
            "192.0.2.1".parse().expect("literal"),
            &replies[0],
            ip_b,
            &mut scratch,
            &mut drops,
            |o| {
                if let LinkOutput::Send(b) = o {
                    sends.push(b.to_vec());
                }
            },
        );
        assert_eq!(sends.len(), 1, "only the packet that has not expired");
        let (_, _, tun) = deliver(&mut b, &sends[0], ip_a, &mut drops);
        assert_eq!(tun, vec![tagged(ip_a, ip_b, 2)]);
    }

    #[test]
    fn a_responder_holds_until_the_initiators_first_data_packet() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut drops = DropCounters::default();
        let init = seal(&mut a, now, &tagged(ip_a, ip_b, 1), &mut drops);
        let (replies, _, _) = deliver(&mut b, &init[0], ip_a, &mut drops);
        // b answered but cannot send yet: WireGuard's responder waits for the initiator's
        // first data packet before using the new keys.
        let early = seal(&mut b, now, &tagged(ip_b, ip_a, 2), &mut drops);
        assert!(
            early.iter().all(|d| d[0] != 4),
            "nothing sealed before confirmation"
        );
        assert_eq!(b.held_packets(), 1);
        let (keepalive, sends, _) = deliver(&mut a, &replies[0], ip_b, &mut drops);
        let (_, b_sends, _) = deliver(&mut b, &keepalive[0], ip_a, &mut drops);
        assert_eq!(
            b_sends.len(),
            1,
            "the keepalive confirms the session: b's packet goes"
        );
        let (_, _, tun) = deliver(&mut b, &sends[0], ip_a, &mut drops);
        assert_eq!(tun, vec![tagged(ip_a, ip_b, 1)]);
        let (_, _, tun) = deliver(&mut a, &b_sends[0], ip_b, &mut drops);
        assert_eq!(tun, vec![tagged(ip_b, ip_a, 2)]);
        assert_eq!(drops.handshake_pending, 0);
    }

    #[test]
    fn crossing_initiations_deliver_both_first_packets() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut drops = DropCounters::default();
        let init_a = seal(&mut a, now, &tagged(ip_a, ip_b, 1), &mut drops);
        let init_b = seal(&mut b, now, &tagged(ip_b, ip_a, 2), &mut drops);
        let (resp_b, _, _) = deliver(&mut b, &init_a[0], ip_a, &mut drops);
        let (resp_a, _, _) = deliver(&mut a, &init_b[0], ip_b, &mut drops);
        let (ka, sends_a, _) = deliver(&mut a, &resp_b[0], ip_b, &mut drops);
        let (kb, sends_b, _) = deliver(&mut b, &resp_a[0], ip_a, &mut drops);
        assert_eq!(
            (sends_a.len(), sends_b.len()),
            (1, 1),
            "both sessions came up"
        );
        deliver(&mut b, &ka[0], ip_a, &mut drops);
        deliver(&mut a, &kb[0], ip_b, &mut drops);
        let (_, _, at_b) = deliver(&mut b, &sends_a[0], ip_a, &mut drops);
        let (_, _, at_a) = deliver(&mut a, &sends_b[0], ip_b, &mut drops);
        assert_eq!(at_b, vec![tagged(ip_a, ip_b, 1)]);
        assert_eq!(at_a, vec![tagged(ip_b, ip_a, 2)]);
    }

    #[test]
    fn handshake_is_retried_on_the_node_clock_then_abandoned() {
        let (mut a, _b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut scratch = vec![0u8; 2048];
        let mut drops = DropCounters::default();
        assert_eq!(seal(&mut a, now, &packet(ip_a, ip_b), &mut drops).len(), 1);
        assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_RETRY));
        assert!(a
            .handle_timeout(now + Duration::from_secs(1), &mut scratch, &mut drops)
            .is_none());
        let retry = a
            .handle_timeout(now + HANDSHAKE_RETRY, &mut scratch, &mut drops)
            .expect("retry due");
        assert_eq!(retry[0], 1);
        assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_RETRY * 2));
        assert!(a
            .handle_timeout(now + HANDSHAKE_GIVE_UP, &mut scratch, &mut drops)
            .is_none());
        assert_eq!(a.poll_timeout(), None, "gave up");
        assert_eq!((a.held_packets(), drops.handshake_pending), (0, 1));
    }
}
