//! Inner packets and the path MTU: what the overlay adds to every packet, TCP MSS clamping,
//! ICMP "fragmentation needed" (IPv4) and ICMPv6 "Packet Too Big" for packets that do not fit,
//! and IPv4 fragmentation of those that may be fragmented. Pure functions over byte slices;
//! nothing here panics on any input.
//!
//! # Why each piece
//! A peer's path can carry fewer bytes than the TUN MTU promises (PPPoE 1492, DS-Lite 1460, a
//! tunnel at 1280), and many paths filter the ICMP that would tell the sending host. Path MTU
//! discovery (`pmtu`) finds the real size per peer; this module makes the hosts behind the TUN
//! respect it:
//! - **MSS clamping**: a TCP SYN or SYN-ACK crossing the tunnel (either way) has its MSS option
//!   lowered to what fits the peer's path, so TCP never sends a segment that cannot arrive. The
//!   TCP checksum is updated incrementally (RFC 1624), not recomputed.
//! - **ICMP "fragmentation needed"** (type 3 code 4, RFC 1191): a packet with DF set that is
//!   larger than the path is answered into the TUN, as a router on the path would, naming the
//!   next-hop MTU. Its source is the original packet's destination (the peer's virtual IP): it
//!   arrives on the TUN from an address routed through the TUN, so reverse-path filtering
//!   accepts it (our own address as source would be dropped as a martian), and the kernel
//!   stores the MTU in its route cache for that destination (`ip route get` shows it).
//! - **ICMPv6 "Packet Too Big"** (type 2, RFC 4443 §3.2): IPv6 routers never fragment, so
//!   every IPv6 packet larger than the path is answered this way, from the original
//!   destination (the peer's overlay address) for the same reason, quoting as much of the
//!   original as keeps the message within the IPv6 minimum MTU (1280). Linux then keeps the
//!   MTU for that destination (never below 1280, RFC 8201).
//! - **Fragmentation**: a packet without DF that is too large is fragmented here, exactly as
//!   a router must (RFC 791), rather than dropped. Linux sets DF on nearly everything (TCP
//!   always, UDP unless it fragmented locally), so this is rare.
//!
//! # Overhead
//! A WireGuard data message is the inner packet plus [`WIREGUARD_OVERHEAD`] bytes (boringtun
//! does not pad), carried in UDP over IPv4 or IPv6; relayed, the relay frame adds
//! [`RELAY_OVERHEAD`]. [`path_overhead`] sums them, so inner MTU = underlay MTU − overhead.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::wire::RELAY_OVERHEAD;

/// Bytes a WireGuard data message adds to the inner packet: type, receiver index and counter
/// (16), Poly1305 tag (16). boringtun sends no padding.
pub(crate) const WIREGUARD_OVERHEAD: u16 = 32;
/// UDP header.
const UDP_HEADER: u16 = 8;
/// IPv4 header without options.
const IPV4_HEADER: u16 = 20;
/// IPv6 header without extension headers.
const IPV6_HEADER: u16 = 40;
/// IPv4 and TCP headers without options: MSS = MTU − this.
const TCP_IPV4_HEADERS: u16 = 40;
/// IPv6 (no extension headers) and TCP headers without options: MSS = MTU − this.
const TCP_IPV6_HEADERS: u16 = 60;
/// The IPv6 minimum link MTU (RFC 8200 §5): an ICMPv6 error is at most this long (RFC 4443
/// §2.4 (c)).
const IPV6_MIN_MTU: usize = 1280;
/// IPv6 next-header value of ICMPv6.
const PROTO_ICMPV6: u8 = 58;
/// An ICMP error carries at most this much in all (RFC 1812 §4.3.2.3: no more than 576 bytes).
const ICMP_ERROR_MAX: usize = 576;
/// IPv4 protocol numbers.
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;

/// ICMP "fragmentation needed" written into the TUN, at most this many in a burst. A TCP
/// sender that overshoots loses a window of segments at once, and one answer per flow is
/// enough (the kernel caches the MTU), so a small burst covers several flows starting together.
pub(crate) const ICMP_BURST: u32 = 16;
/// ... and this many a second after the burst: enough for a host that keeps sending
/// oversized datagrams on several sockets, too few for a peer's traffic pattern to make the
/// node write ICMP at line rate.
pub(crate) const ICMP_PER_SEC: u32 = 16;

/// Bytes between an inner packet and the underlay IP MTU of a path: outer IP header, UDP,
/// WireGuard and, when relayed, the relay frame.
pub(crate) fn path_overhead(ipv6: bool, relayed: bool) -> u16 {
    let ip = if ipv6 { IPV6_HEADER } else { IPV4_HEADER };
    let relay = if relayed { RELAY_OVERHEAD as u16 } else { 0 };
    ip + UDP_HEADER + WIREGUARD_OVERHEAD + relay
}

/// The IPv4 header fields this module needs, from a checked parse.
#[derive(Debug, Clone, Copy)]
struct Ipv4Header {
    header_len: usize,
    total_len: usize,
    protocol: u8,
    dont_fragment: bool,
    more_fragments: bool,
    /// Fragment offset in 8-byte units.
    offset: u16,
    src: Ipv4Addr,
}

impl Ipv4Header {
    /// The header of an IPv4 packet, if `packet` is one whose lengths agree with its size.
    fn parse(packet: &[u8]) -> Option<Self> {
        let first = *packet.first()?;
        let header_len = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || header_len < 20 || packet.len() < header_len {
            return None;
        }
        let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if total_len < header_len || total_len > packet.len() {
            return None;
        }
        let flags = u16::from_be_bytes([packet[6], packet[7]]);
        Some(Self {
            header_len,
            total_len,
            protocol: packet[9],
            dont_fragment: flags & 0x4000 != 0,
            more_fragments: flags & 0x2000 != 0,
            offset: flags & 0x1fff,
            src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        })
    }
}

/// The IPv6 header fields this module needs, from a checked parse.
#[derive(Debug, Clone, Copy)]
struct Ipv6Header {
    /// Header and payload: where the packet ends (any bytes after it are not part of it).
    total_len: usize,
    next_header: u8,
    src: Ipv6Addr,
}

impl Ipv6Header {
    /// The header of an IPv6 packet, if `packet` is one whose payload length fits its size.
    fn parse(packet: &[u8]) -> Option<Self> {
        let header: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
        if header[0] >> 4 != 6 {
            return None;
        }
        let total_len = 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
        if total_len > packet.len() {
            return None;
        }
        let src: [u8; 16] = header[8..24].try_into().ok()?;
        Some(Self {
            total_len,
            next_header: header[6],
            src: Ipv6Addr::from(src),
        })
    }
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK), IPv4 or IPv6, to what fits an inner MTU
/// of `mtu` ([`mss_for`], [`mss_for_ipv6`]); see [`clamp_mss`] and [`clamp_mss_ipv6`].
pub(crate) fn clamp_mss_to_mtu(packet: &mut [u8], mtu: u16) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => clamp_mss(packet, mss_for(mtu)),
        Some(6) => clamp_mss_ipv6(packet, mss_for_ipv6(mtu)),
        Some(_) | None => false,
    }
}

/// Lowers the MSS option of an IPv4 TCP SYN (or SYN-ACK) to `max_mss` if it is larger, fixing
/// the TCP checksum incrementally. Returns whether the packet changed; anything else (not
/// TCP, not a SYN, a fragment, malformed options) is left alone.
pub(crate) fn clamp_mss(packet: &mut [u8], max_mss: u16) -> bool {
    let Some(ip) = Ipv4Header::parse(packet) else {
        return false;
    };
    if ip.protocol != PROTO_TCP || ip.offset != 0 || ip.more_fragments {
        return false;
    }
    clamp_tcp_mss(packet, ip.header_len, ip.total_len, max_mss)
}

/// Lowers the MSS option of an IPv6 TCP SYN (or SYN-ACK) whose TCP header follows the fixed
/// header directly (no extension headers, as every SYN Linux sends) to `max_mss`, like
/// [`clamp_mss`]; the pseudo header does not change, so the same incremental update holds.
pub(crate) fn clamp_mss_ipv6(packet: &mut [u8], max_mss: u16) -> bool {
    let Some(ip) = Ipv6Header::parse(packet) else {
        return false;
    };
    if ip.next_header != PROTO_TCP {
        return false;
    }
    clamp_tcp_mss(packet, 40, ip.total_len, max_mss)
}

/// Lowers the MSS option of the TCP SYN starting at `tcp` in a packet ending at `total_len`.
fn clamp_tcp_mss(packet: &mut [u8], tcp: usize, total_len: usize, max_mss: u16) -> bool {
    let Some(&offset_byte) = packet.get(tcp + 12) else {
        return false;
    };
    let Some(&flags) = packet.get(tcp + 13) else {
        return false;
    };
    let tcp_len = usize::from(offset_byte >> 4) * 4;
    if flags & 0x02 == 0 || tcp_len < 20 || tcp + tcp_len > total_len {
        return false;
    }
    let mut at = tcp + 20;
    let end = tcp + tcp_len;
    while at < end {
        match packet[at] {
            0 => return false,
            1 => at += 1,
            kind => {
                let Some(&len) = packet.get(at + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || at + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let field = at + 2;
                    let old = u16::from_be_bytes([packet[field], packet[field + 1]]);
                    if old <= max_mss {
                        return false;
                    }
                    packet[field..field + 2].copy_from_slice(&max_mss.to_be_bytes());
                    // A word at an odd offset from the TCP header straddles two checksum
                    // words; its contribution to the sum is then the byte-swapped value.
                    let (old, new) = if (field - tcp) % 2 == 0 {
                        (old, max_mss)
                    } else {
                        (old.swap_bytes(), max_mss.swap_bytes())
                    };
                    let sum = tcp + 16;
                    let hc = u16::from_be_bytes([packet[sum], packet[sum + 1]]);
                    let hc = checksum_update(hc, old, new);
                    packet[sum..sum + 2].copy_from_slice(&hc.to_be_bytes());
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

/// Whether `packet` is an IPv4 TCP segment, or an IPv6 one without extension headers, with
/// SYN set (a cheap look before copying it to clamp its MSS).
pub(crate) fn is_tcp_syn(packet: &[u8]) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let (protocol, header_len) = match first >> 4 {
        4 => (packet.get(9), usize::from(first & 0x0f) * 4),
        6 => (packet.get(6), 40),
        _ => return false,
    };
    protocol == Some(&PROTO_TCP) && packet.get(header_len + 13).is_some_and(|f| f & 0x02 != 0)
}

/// The MSS that fits an inner MTU of `mtu` (IPv4, no options).
pub(crate) fn mss_for(mtu: u16) -> u16 {
    mtu.saturating_sub(TCP_IPV4_HEADERS)
}

/// The MSS that fits an inner MTU of `mtu` (IPv6 without extension headers, no options).
pub(crate) fn mss_for_ipv6(mtu: u16) -> u16 {
    mtu.saturating_sub(TCP_IPV6_HEADERS)
}

/// What to do with an inner packet larger than the path MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TooBig {
    /// DF is set: answer with ICMP "fragmentation needed" ([`frag_needed`]).
    Answer,
    /// DF is clear: fragment it ([`fragment`]).
    Fragment,
    /// IPv6 (never fragmented on the way): answer with ICMPv6 "Packet Too Big"
    /// ([`packet_too_big`]).
    AnswerIpv6,
    /// Malformed, or IPv4 with options and DF clear: drop it.
    Drop,
}

/// How to handle `packet`, which does not fit the path.
pub(crate) fn classify_too_big(packet: &[u8]) -> TooBig {
    if Ipv6Header::parse(packet).is_some() {
        return TooBig::AnswerIpv6;
    }
    match Ipv4Header::parse(packet) {
        Some(ip) if ip.dont_fragment => TooBig::Answer,
        Some(ip) if ip.header_len == 20 => TooBig::Fragment,
        Some(_) | None => TooBig::Drop,
    }
}

/// Writes into `out` the ICMPv6 "Packet Too Big" (type 2, code 0) answering the IPv6 packet
/// `original`, from the original destination to its source, naming `mtu` and quoting as much
/// of the original as keeps the message within 1280 bytes, with its checksum over the IPv6
/// pseudo header. Returns `false` (and leaves `out` empty) where RFC 4443 §2.4 forbids an
/// error: about an ICMPv6 error, or a source that is not a single host.
pub(crate) fn packet_too_big(original: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some(ip) = Ipv6Header::parse(original) else {
        return false;
    };
    if ip.src.is_unspecified() || ip.src.is_multicast() || ip.src.is_loopback() {
        return false;
    }
    // ICMPv6 errors are types 0–127; informational messages (echo, 128 and up) may be answered.
    if ip.next_header == PROTO_ICMPV6 && original.get(40).is_none_or(|t| *t < 128) {
        return false;
    }
    let quoted = ip.total_len.min(IPV6_MIN_MTU - 48);
    let icmp_len = 8 + quoted;
    out.resize(40 + icmp_len, 0);
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    out[6] = PROTO_ICMPV6;
    out[7] = 64;
    out[8..24].copy_from_slice(&original[24..40]);
    out[24..40].copy_from_slice(&original[8..24]);
    out[40] = 2;
    out[44..48].copy_from_slice(&u32::from(mtu).to_be_bytes());
    out[48..].copy_from_slice(&original[..quoted]);
    let sum = icmpv6_checksum(out);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Writes into `out` the ICMP "fragmentation needed" (type 3, code 4) answering `original`,
/// from the original destination to its source, naming `mtu` as the next-hop MTU and quoting
/// as much of the original as fits in 576 bytes. Returns `false` (and leaves `out` empty)
/// where RFC 1122 §3.2.2 forbids an error: about an ICMP error, a non-first fragment, or a
/// source that is not a single host.
pub(crate) fn frag_needed(original: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some(ip) = Ipv4Header::parse(original) else {
        return false;
    };
    if ip.offset != 0
        || ip.src.is_unspecified()
        || ip.src.is_broadcast()
        || ip.src.is_multicast()
        || ip.src.is_loopback()
    {
        return false;
    }
    if ip.protocol == PROTO_ICMP {
        // Only queries (echo, timestamp, …) may be answered with an error; their types are
        // 0, 8 and 13 and up. Types 3, 4, 5, 11 and 12 are errors.
        match original.get(ip.header_len) {
            Some(0 | 8) | Some(13..) => {}
            Some(_) | None => return false,
        }
    }
    let quoted = ip.total_len.min(ICMP_ERROR_MAX - 28);
    let total = 28 + quoted;
    out.resize(total, 0);
    out[0] = 0x45;
    out[1] = 0xc0; // internetwork control, as routers send their errors
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&original[16..20]);
    out[16..20].copy_from_slice(&original[12..16]);
    let header = checksum(&out[..20]);
    out[10..12].copy_from_slice(&header.to_be_bytes());
    out[20] = 3;
    out[21] = 4;
    out[26..28].copy_from_slice(&mtu.to_be_bytes());
    out[28..].copy_from_slice(&original[..quoted]);
    let icmp = checksum(&out[20..]);
    out[22..24].copy_from_slice(&icmp.to_be_bytes());
    true
}

/// Splits an IPv4 packet without options into fragments of at most `mtu` bytes, handing each
/// to `emit` (built in `scratch`). Returns `false` if it cannot be split (DF set, options,
/// malformed, or an MTU too small for one 8-byte block).
pub(crate) fn fragment(
    packet: &[u8],
    mtu: u16,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> bool {
    let Some(ip) = Ipv4Header::parse(packet) else {
        return false;
    };
    let block = (usize::from(mtu).saturating_sub(20)) & !7;
    if ip.dont_fragment || ip.header_len != 20 || block == 0 {
        return false;
    }
    let payload = &packet[20..ip.total_len];
    for (i, chunk) in payload.chunks(block).enumerate() {
        let last = (i + 1) * block >= payload.len();
        let offset = ip.offset + (i * block / 8) as u16;
        let more = !last || ip.more_fragments;
        scratch.clear();
        scratch.extend_from_slice(&packet[..20]);
        scratch.extend_from_slice(chunk);
        let len = scratch.len() as u16;
        scratch[2..4].copy_from_slice(&len.to_be_bytes());
        let flags = offset | if more { 0x2000 } else { 0 };
        scratch[6..8].copy_from_slice(&flags.to_be_bytes());
        scratch[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&scratch[..20]);
        scratch[10..12].copy_from_slice(&sum.to_be_bytes());
        emit(scratch);
    }
    true
}

/// A token bucket on `now` limiting the ICMP errors the node writes into the TUN
/// ([`ICMP_BURST`], [`ICMP_PER_SEC`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IcmpLimiter {
    milli_tokens: u64,
    last: Option<Instant>,
}

impl Default for IcmpLimiter {
    fn default() -> Self {
        Self {
            milli_tokens: u64::from(ICMP_BURST) * 1000,
            last: None,
        }
    }
}

impl IcmpLimiter {
    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        let refill = (elapsed.as_millis() as u64).saturating_mul(u64::from(ICMP_PER_SEC));
        self.milli_tokens = (self.milli_tokens + refill).min(u64::from(ICMP_BURST) * 1000);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// RFC 1624 eqn. 3: the checksum `hc` after one 16-bit word of the data changed from `old`
/// to `new`: HC' = ~(~HC + ~m + m').
fn checksum_update(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of the IPv6 packet `packet` (its checksum field
/// zero): the Internet checksum over the pseudo header (addresses, upper-layer length, next
/// header) and the ICMPv6 message.
fn icmpv6_checksum(packet: &[u8]) -> u16 {
    let message = packet.get(40..).unwrap_or_default();
    let len = message.len() as u32;
    let pseudo = sum_words(packet.get(8..40).unwrap_or_default())
        + (len >> 16)
        + (len & 0xffff)
        + u32::from(PROTO_ICMPV6);
    !fold(pseudo + sum_words(message))
}

/// The Internet checksum (RFC 1071) of `data`, ready to store.
fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data))
}

fn sum_words(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: [u8; 4] = [10, 77, 0, 1];
    const DST: [u8; 4] = [10, 77, 0, 2];

    /// An IPv4 packet of `total` bytes with protocol `proto` and DF as given.
    fn ipv4(proto: u8, total: usize, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&SRC);
        p[16..20].copy_from_slice(&DST);
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// A TCP segment's checksum over the pseudo header, computed from scratch.
    fn tcp_checksum(p: &[u8]) -> u16 {
        let tcp = &p[20..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        let mut zeroed = tcp.to_vec();
        zeroed[16..18].copy_from_slice(&[0, 0]);
        !fold(sum_words(&pseudo) + sum_words(&zeroed))
    }

    /// A TCP SYN (flags as given) whose options are `options` (padded to 4 bytes).
    fn syn(flags: u8, options: &[u8]) -> Vec<u8> {
        let opt_len = options.len().div_ceil(4) * 4;
        let total = 40 + opt_len;
        let mut p = ipv4(PROTO_TCP, total, true);
        let tcp = &mut p[20..];
        tcp.fill(0);
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        tcp[12] = (((20 + opt_len) / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp[20..20 + options.len()].copy_from_slice(options);
        let sum = tcp_checksum(&p);
        p[36..38].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn mss_of(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    #[test]
    fn overhead_matches_the_default_mtu_budget() {
        assert_eq!(path_overhead(false, false), 60);
        assert_eq!(path_overhead(true, false), 80);
        assert_eq!(path_overhead(false, true), 96);
        assert_eq!(path_overhead(true, true), 116);
        // The default TUN MTU fits a 1500-byte underlay on every path.
        assert!(crate::config::DEFAULT_MTU + path_overhead(true, true) <= 1500);
        assert_eq!(mss_for(1220), 1180);
    }

    #[test]
    fn mss_is_clamped_with_a_correct_incremental_checksum() {
        // Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
        let options = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        for flags in [0x02, 0x12] {
            let mut p = syn(flags, &options);
            assert!(is_tcp_syn(&p));
            assert!(clamp_mss(&mut p, 1180));
            assert_eq!(mss_of(&p, 42), 1180);
            assert_eq!(mss_of(&p, 36), tcp_checksum(&p), "checksum after clamping");
            // Already small enough: untouched.
            let before = p.clone();
            assert!(!clamp_mss(&mut p, 1300));
            assert_eq!(p, before);
        }
    }

    #[test]
    fn mss_at_an_odd_offset_keeps_the_checksum_right() {
        // One NOP first puts the MSS value at offset 23 of the TCP header.
        let options = [1, 2, 4, 0x05, 0xb4];
        let mut p = syn(0x02, &options);
        assert!(clamp_mss(&mut p, 1000));
        assert_eq!(mss_of(&p, 43), 1000);
        assert_eq!(mss_of(&p, 36), tcp_checksum(&p));
    }

    #[test]
    fn non_syns_fragments_and_garbage_are_left_alone() {
        let options = [2, 4, 0x05, 0xb4];
        let mut ack = syn(0x10, &options);
        assert!(!clamp_mss(&mut ack, 1000), "not a SYN");
        assert!(!is_tcp_syn(&ack) && !is_tcp_syn(&[]) && !is_tcp_syn(&[0x4f]));
        let mut udp = ipv4(17, 60, true);
        assert!(!clamp_mss(&mut udp, 1000));
        // Options running past the header, a zero-length option, truncated packets.
        let mut bad = syn(0x02, &[2, 9, 0x05, 0xb4]);
        assert!(!clamp_mss(&mut bad, 1000));
        let mut zero = syn(0x02, &[3, 0, 2, 4, 0x05, 0xb4]);
        assert!(!clamp_mss(&mut zero, 1000));
        let good = syn(0x02, &options);
        for n in 0..good.len() {
            let mut cut = good[..n].to_vec();
            assert!(!clamp_mss(&mut cut, 1000), "truncated to {n}");
        }
        // Every single-byte corruption of a SYN: no panic.
        for i in 0..good.len() {
            for v in [0u8, 0x0f, 0x45, 0xff] {
                let mut p = good.clone();
                p[i] = v;
                clamp_mss(&mut p, 1000);
            }
        }
    }

    #[test]
    fn frag_needed_answers_from_the_destination_with_valid_checksums() {
        let original = ipv4(17, 1400, true);
        assert_eq!(classify_too_big(&original), TooBig::Answer);
        let mut out = Vec::new();
        assert!(frag_needed(&original, 1220, &mut out));
        assert_eq!(out.len(), 576, "quotes as much as fits in 576 bytes");
        assert_eq!(checksum(&out[..20]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&out[20..]), 0, "ICMP checksum");
        assert_eq!((out[9], out[20], out[21]), (PROTO_ICMP, 3, 4));
        assert_eq!(&out[12..16], &DST, "from the original destination");
        assert_eq!(&out[16..20], &SRC, "to the original source");
        assert_eq!(mss_of(&out, 26), 1220, "next-hop MTU");
        assert_eq!(&out[28..48], &original[..20], "quotes the original header");
        // A short original is quoted whole.
        let small = ipv4(17, 100, true);
        assert!(frag_needed(&small, 60, &mut out));
        assert_eq!(out.len(), 128);
        assert_eq!(checksum(&out[20..]), 0);
    }

    #[test]
    fn no_icmp_error_about_errors_fragments_or_odd_sources() {
        let mut out = Vec::new();
        let mut error = ipv4(PROTO_ICMP, 1400, true);
        error[20] = 3;
        assert!(!frag_needed(&error, 1220, &mut out));
        assert!(out.is_empty());
        let mut echo = ipv4(PROTO_ICMP, 1400, true);
        echo[20] = 8;
        assert!(
            frag_needed(&echo, 1220, &mut out),
            "an echo request is answered"
        );
        let mut later = ipv4(17, 1400, true);
        later[7] = 10;
        assert!(!frag_needed(&later, 1220, &mut out), "non-first fragment");
        let mut multicast = ipv4(17, 1400, true);
        multicast[12] = 224;
        assert!(!frag_needed(&multicast, 1220, &mut out));
        assert!(!frag_needed(&[0x45, 0, 5], 1220, &mut out));
        assert_eq!(classify_too_big(&[0x60, 0, 0]), TooBig::Drop);
    }

    #[test]
    fn fragments_reassemble_to_the_original() {
        let original = ipv4(17, 1400, false);
        assert_eq!(classify_too_big(&original), TooBig::Fragment);
        let mut scratch = Vec::new();
        let mut frags = Vec::new();
        assert!(fragment(&original, 1220, &mut scratch, |f| frags.push(f.to_vec())));
        assert_eq!(frags.len(), 2);
        let mut payload = Vec::new();
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1220);
            assert_eq!(checksum(&f[..20]), 0, "header checksum");
            let flags = u16::from_be_bytes([f[6], f[7]]);
            assert_eq!(flags & 0x2000 != 0, i == 0, "MF on all but the last");
            assert_eq!(usize::from(flags & 0x1fff) * 8, payload.len(), "offset");
            assert_eq!(&f[4..6], &original[4..6], "same identification");
            payload.extend_from_slice(&f[20..]);
        }
        assert_eq!(payload, original[20..]);
        // DF set: not fragmented.
        assert!(!fragment(&ipv4(17, 1400, true), 1220, &mut scratch, |_| {}));
    }

    #[test]
    fn icmp_limiter_allows_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = IcmpLimiter::default();
        let burst = (0..100).take_while(|_| l.take(t0)).count();
        assert_eq!(burst, ICMP_BURST as usize);
        let t1 = t0 + Duration::from_millis(500);
        let more = (0..100).take_while(|_| l.take(t1)).count();
        assert_eq!(more, ICMP_PER_SEC as usize / 2);
    }

    const SRC6: [u8; 16] = [0xfd, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 1, 2, 3, 4, 5, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9];

    /// An IPv6 packet with next header `next` and `payload` bytes of (patterned) payload.
    fn ipv6(next: u8, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&SRC6);
        p[24..40].copy_from_slice(&DST6);
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// The upper-layer checksum of an IPv6 packet over its pseudo header, computed from
    /// scratch, with the checksum field (at `at` in the payload) taken as zero.
    fn ipv6_checksum(p: &[u8], next: u8, at: usize) -> u16 {
        let upper = &p[40..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[8..40]);
        pseudo.extend_from_slice(&(upper.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, next]);
        let mut zeroed = upper.to_vec();
        zeroed[at..at + 2].copy_from_slice(&[0, 0]);
        !fold(sum_words(&pseudo) + sum_words(&zeroed))
    }

    fn syn6(options: &[u8]) -> Vec<u8> {
        let opt_len = options.len().div_ceil(4) * 4;
        let mut p = ipv6(PROTO_TCP, 20 + opt_len);
        let tcp = &mut p[40..];
        tcp.fill(0);
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[12] = (((20 + opt_len) / 4) as u8) << 4;
        tcp[13] = 0x02;
        tcp[20..20 + options.len()].copy_from_slice(options);
        let sum = ipv6_checksum(&p, PROTO_TCP, 16);
        p[56..58].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn ipv6_syn_mss_is_clamped_for_sixty_bytes_of_headers() {
        // NOP, then MSS 1440 at an odd offset; then window scale.
        let mut p = syn6(&[1, 2, 4, 0x05, 0xa0, 3, 3, 7]);
        assert!(is_tcp_syn(&p));
        assert_eq!(mss_for_ipv6(1280), 1220);
        assert!(clamp_mss_to_mtu(&mut p, 1280));
        assert_eq!(mss_of(&p, 63), 1220);
        assert_eq!(mss_of(&p, 56), ipv6_checksum(&p, PROTO_TCP, 16));
        assert!(!clamp_mss_to_mtu(&mut p, 1400), "already below 1340");
        // Even offset, and an IPv4 MTU would have given 1240.
        let mut p = syn6(&[2, 4, 0x05, 0xb4]);
        assert!(clamp_mss_to_mtu(&mut p, 1280));
        assert_eq!(mss_of(&p, 62), 1220);
        assert_eq!(mss_of(&p, 56), ipv6_checksum(&p, PROTO_TCP, 16));
        // Not a SYN, not TCP, a payload length past the end: left alone.
        let mut ack = syn6(&[2, 4, 0x05, 0xb4]);
        ack[53] = 0x10;
        assert!(!is_tcp_syn(&ack) && !clamp_mss_to_mtu(&mut ack, 1280));
        let mut udp = ipv6(17, 40);
        assert!(!clamp_mss_to_mtu(&mut udp, 1280));
        let mut cut = syn6(&[2, 4, 0x05, 0xb4]);
        cut.truncate(50);
        assert!(!clamp_mss_to_mtu(&mut cut, 1280));
    }

    #[test]
    fn packet_too_big_answers_from_the_destination_with_a_valid_icmpv6_checksum() {
        let mut original = ipv6(PROTO_ICMPV6, 1400);
        original[40] = 128; // echo request
        assert_eq!(classify_too_big(&original), TooBig::AnswerIpv6);
        let mut out = Vec::new();
        assert!(packet_too_big(&original, 1300, &mut out));
        assert_eq!(out.len(), IPV6_MIN_MTU, "within the IPv6 minimum MTU");
        assert_eq!(out[0] >> 4, 6);
        assert_eq!(
            usize::from(u16::from_be_bytes([out[4], out[5]])),
            out.len() - 40
        );
        assert_eq!(out[6], PROTO_ICMPV6);
        assert_eq!((&out[8..24], &out[24..40]), (&DST6[..], &SRC6[..]));
        assert_eq!((out[40], out[41]), (2, 0), "Packet Too Big");
        assert_eq!(
            u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
            1300
        );
        assert_eq!(
            &out[48..],
            &original[..out.len() - 48],
            "quotes the original"
        );
        assert_eq!(
            u16::from_be_bytes([out[42], out[43]]),
            ipv6_checksum(&out, PROTO_ICMPV6, 2)
        );
        // A short original is quoted whole.
        let small = ipv6(17, 60);
        assert!(packet_too_big(&small, 1280, &mut out));
        assert_eq!(out.len(), 48 + 100);
        assert_eq!(
            u16::from_be_bytes([out[42], out[43]]),
            ipv6_checksum(&out, PROTO_ICMPV6, 2)
        );
        // No error about an ICMPv6 error, from a multicast or unspecified source, or about
        // a malformed packet.
        let mut error = ipv6(PROTO_ICMPV6, 100);
        error[40] = 1;
        assert!(!packet_too_big(&error, 1280, &mut out) && out.is_empty());
        let mut multicast = ipv6(17, 100);
        multicast[8] = 0xff;
        assert!(!packet_too_big(&multicast, 1280, &mut out));
        let mut unspecified = ipv6(17, 100);
        unspecified[8..24].fill(0);
        assert!(!packet_too_big(&unspecified, 1280, &mut out));
        assert!(!packet_too_big(&original[..100], 1280, &mut out));
        assert_eq!(classify_too_big(&original[..100]), TooBig::Drop);
    }
}
