//! The peer link: the one owner of a peer's WireGuard session (boringtun's `Tunn`).
//!
//! # Job
//! Everything boringtun does for one peer happens here and nowhere else: sealing packets from
//! the TUN, opening datagrams (including boringtun's flush loop that releases packets queued
//! during a handshake), its periodic `update_timers`, its cookie rate limiter (created by
//! `Tunn::new`, so each link has its own), and the node's own handshake retries. The link knows
//! nothing about paths: it hands each outgoing datagram to its caller tagged as a
//! [`LinkOutput::Reply`] (answer the way the message came) or a [`LinkOutput::Send`] (send on
//! the peer's current path), and each opened packet as [`LinkOutput::Tun`] once its inner source
//! address is the peer's own virtual IP (cryptokey routing).
//!
//! # Handshake retries
//! boringtun retries handshakes on the real clock. The link also retries on the node's clock
//! every [`HANDSHAKE_RETRY`] while a session is wanted (traffic is waiting) and none is fresh,
//! and gives up after [`HANDSHAKE_GIVE_UP`], so simulations with loss make progress.
//!
//! # Driving contract
//! Inputs: [`PeerLink::encapsulate`] for a packet from the TUN, [`PeerLink::decapsulate`] for a
//! WireGuard datagram from the peer, [`PeerLink::handle_tick`] every
//! [`WIREGUARD_TICK`](super::WIREGUARD_TICK), [`PeerLink::handle_timeout`] at
//! [`PeerLink::poll_timeout`]. Outputs go to the caller's closure, written from the caller's
//! scratch buffer: the link allocates nothing per packet.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};

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
    rx_bytes: u64,
    tx_bytes: u64,
}

impl PeerLink {
    /// A link for the peer `peer`, with our `index` (the upper 24 bits of boringtun's receiver
    /// indices, which route incoming datagrams to this link).
    pub(crate) fn new(
        secret: x25519_dalek::StaticSecret,
        peer: PeerKey,
        preshared_key: [u8; 32],
        index: u32,
    ) -> Self {
        let tunn = Tunn::new(
            secret,
            peer.to_public(),
            Some(preshared_key),
            None,
            index,
            None,
        );
        Self {
            tunn: Box::new(tunn),
            index,
            want_session_since: None,
            last_init_sent: None,
            rx_bytes: 0,
            tx_bytes: 0,
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

    /// Time since the last completed handshake (boringtun's real clock).
    pub(crate) fn handshake_age(&self) -> Option<Duration> {
        self.tunn.stats().0
    }

    /// Whether a session exists whose keys WireGuard still uses.
    pub(crate) fn session_fresh(&self) -> bool {
        self.handshake_age().is_some_and(|d| d < SESSION_FRESH)
    }

    /// Seals one IP packet from the TUN into `scratch`; returns the datagram to send on the
    /// current path, or `None` while the packet waits inside boringtun for a handshake.
    pub(crate) fn encapsulate<'b>(
        &mut self,
        now: Instant,
        packet: &[u8],
        scratch: &'b mut [u8],
    ) -> Option<&'b [u8]> {
        self.tx_bytes += packet.len() as u64;
        match self.tunn.encapsulate(packet, scratch) {
            TunnResult::WriteToNetwork(bytes) => {
                if bytes.first() == Some(&1) {
                    self.want_session_since.get_or_insert(now);
                    self.last_init_sent = Some(now);
                }
                Some(bytes)
            }
            TunnResult::Done => {
                // Queued inside boringtun until the handshake completes.
                self.want_session_since.get_or_insert(now);
                None
            }
            TunnResult::Err(e) => {
                tracing::debug!(?e, "encapsulate failed");
                None
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    /// Opens one WireGuard datagram that came from `from`, then runs boringtun's flush loop
    /// (packets queued during a handshake come out as [`LinkOutput::Send`]). Opened packets
    /// whose inner source is not `allowed_source` are counted as spoofed and dropped.
    pub(crate) fn decapsulate(
        &mut self,
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
                TunnResult::WriteToTunnelV6(..) => {
                    drops.spoofed_source += 1;
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
        if self.session_fresh() {
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

    /// When the node-side handshake retry (or give-up) is due; `None` while no session is wanted.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let since = self.want_session_since?;
        let give_up = since + HANDSHAKE_GIVE_UP;
        let retry = self.last_init_sent.map_or(since, |t| t + HANDSHAKE_RETRY);
        Some(retry.min(give_up))
    }

    /// The path to the peer changed: a handshake in progress went to the old path, so the
    /// next retry is due at once instead of after [`HANDSHAKE_RETRY`].
    pub(crate) fn handle_path_change(&mut self) {
        if self.want_session_since.is_some() {
            self.last_init_sent = None;
        }
    }

    /// Runs the handshake retry if due: a fresh session or a long wait ends the attempt,
    /// otherwise a new initiation is returned, to be sent on the current path.
    pub(crate) fn handle_timeout<'b>(
        &mut self,
        now: Instant,
        scratch: &'b mut [u8],
    ) -> Option<&'b [u8]> {
        let since = self.want_session_since?;
        if self.session_fresh() || now.saturating_duration_since(since) >= HANDSHAKE_GIVE_UP {
            self.want_session_since = None;
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
        let la = PeerLink::new(a.to_static(), b.public(), psk, 1);
        let lb = PeerLink::new(b.to_static(), a.public(), psk, 2);
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

    #[test]
    fn handshake_flushes_queued_packet_and_checks_the_inner_source() {
        let (mut a, mut b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut scratch = vec![0u8; 2048];
        let mut drops = DropCounters::default();
        let init = a
            .encapsulate(now, &packet(ip_a, ip_b), &mut scratch)
            .expect("first packet starts a handshake")
            .to_vec();
        assert_eq!(init[0], 1, "a handshake initiation");
        assert!(a.poll_timeout().is_some(), "a session is wanted");
        let (replies, _, _) = deliver(&mut b, &init, ip_a, &mut drops);
        assert_eq!(replies.len(), 1, "the response goes back the way it came");
        let (_, sends, _) = deliver(&mut a, &replies[0], ip_b, &mut drops);
        assert_eq!(sends.len(), 1, "the queued packet is flushed on the path");
        assert!(a.session_fresh());
        assert_eq!(a.poll_timeout(), None, "no retry once the session is fresh");
        let (_, _, tun) = deliver(&mut b, &sends[0], ip_a, &mut drops);
        assert_eq!(tun, vec![packet(ip_a, ip_b)]);

        // A packet whose inner source is not the peer's address is dropped and counted.
        let spoofed = a
            .encapsulate(now, &packet(Ipv4Addr::new(10, 0, 0, 9), ip_b), &mut scratch)
            .expect("session up")
            .to_vec();
        let (_, _, tun) = deliver(&mut b, &spoofed, ip_a, &mut drops);
        assert!(tun.is_empty());
        assert_eq!(drops.spoofed_source, 1);
    }

    #[test]
    fn handshake_is_retried_on_the_node_clock_then_abandoned() {
        let (mut a, _b, ip_a, ip_b) = pair();
        let now = Instant::now();
        let mut scratch = vec![0u8; 2048];
        assert!(a
            .encapsulate(now, &packet(ip_a, ip_b), &mut scratch)
            .is_some());
        assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_RETRY));
        assert!(a
            .handle_timeout(now + Duration::from_secs(1), &mut scratch)
            .is_none());
        let retry = a
            .handle_timeout(now + HANDSHAKE_RETRY, &mut scratch)
            .expect("retry due");
        assert_eq!(retry[0], 1);
        assert_eq!(a.poll_timeout(), Some(now + HANDSHAKE_RETRY * 2));
        assert!(a
            .handle_timeout(now + HANDSHAKE_GIVE_UP, &mut scratch)
            .is_none());
        assert_eq!(a.poll_timeout(), None, "gave up");
    }
}
