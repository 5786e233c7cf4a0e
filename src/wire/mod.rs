//! Every byte format that crosses a trust boundary: datagram classification, meshvpn frames,
//! the sealed messages inside them, STUN, and the group token.
//!
//! One UDP socket carries four kinds of datagram, told apart by their first bytes
//! ([`classify`]):
//!
//! | kind | first bytes |
//! |---|---|
//! | WireGuard | `1..=4, 0, 0, 0` |
//! | STUN | top two bits `00`, magic cookie `0x2112A442` at 4..8 |
//! | meshvpn frame | `0xFF 'm' version kind` |
//! | anything else | counted and dropped |
//!
//! meshvpn frames ([`Frame`]) are either *sealed* control messages (XChaCha20-Poly1305 with a
//! random 24-byte nonce; the frame header and the sender's key are the associated data, so a
//! relay cannot re-attribute a message) or *relay data* frames that carry an opaque payload
//! (WireGuard or a sealed disco message) addressed by public key. The relay never needs to
//! decrypt relay data, and cannot read announcements, which are sealed with the network's
//! control key that only members hold.
//!
//! Parsing never panics: a checked parse returns a typed value or a [`WireError`] naming why
//! the bytes were refused.

pub mod admission;
mod announcement;
pub(crate) mod codec;
mod disco;
pub mod plain;
pub mod rotation;
pub mod stun;
pub mod token;

use std::net::SocketAddr;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::keys::{NetworkId, PeerKey};

pub use announcement::{Announcement, NatKind};
use codec::{Reader, Writer};
pub use disco::{
    open_disco, probe_padding, seal_disco, Disco, DiscoStamp, DISCO_VERSION, MAX_FORWARD_LEN,
    PROBE_FIXED_LEN,
};
pub use rotation::RotationEntry;

/// First two bytes of every meshvpn frame; 0xFF can start neither WireGuard nor STUN.
pub const MAGIC: [u8; 2] = [0xFF, b'm'];
/// Frame format version; a receiver drops frames of other versions. Version 2 added the
/// cookie to [`Frame::ToRelay`] and the [`Frame::CookieReply`] (see [`admission`]).
pub const VERSION: u8 = 2;
/// Length of the frame header (magic, version, kind).
pub const HEADER_LEN: usize = 4;
/// Bytes a relay data frame adds in front of its payload (header + one public key).
pub const RELAY_OVERHEAD: usize = HEADER_LEN + 32;
/// Length of the random nonce in front of every sealed body.
const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag at the end of every sealed body.
const TAG_LEN: usize = 16;
/// Announcements larger than this are refused by relays and members alike.
pub const MAX_ANNOUNCEMENT: usize = 1024;
/// The longest answer delay a [`RelayRequest::Refresh`] may ask for (five minutes).
pub const MAX_ANSWER_AFTER_MS: u32 = 300_000;

/// Why bytes from outside were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the format requires.
    #[error("truncated message")]
    Truncated,
    /// Not a meshvpn frame (wrong magic).
    #[error("not a meshvpn frame")]
    NotMeshvpn,
    /// A meshvpn frame of a version this build does not speak.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// A frame kind or message type this build does not know.
    #[error("unknown {0} type {1}")]
    UnknownType(&'static str, u8),
    /// Authentication failed: wrong key, forged or altered.
    #[error("authentication failed")]
    Unauthenticated,
    /// Structurally invalid content.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// What a datagram arriving on the member's or relay's one UDP socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A WireGuard message (handshake, cookie or data).
    WireGuard,
    /// A STUN message.
    Stun,
    /// A meshvpn frame.
    Meshvpn,
    /// None of the above.
    Unknown,
}

/// Classifies a datagram by its first bytes (see the module doc).
pub fn classify(b: &[u8]) -> DatagramKind {
    if b.len() >= 4 && (1..=4).contains(&b[0]) && b[1..4] == [0, 0, 0] {
        DatagramKind::WireGuard
    } else if b.len() >= 20 && b[0] & 0xC0 == 0 && b[4..8] == [0x21, 0x12, 0xA4, 0x42] {
        DatagramKind::Stun
    } else if b.len() >= HEADER_LEN && b[..2] == MAGIC {
        DatagramKind::Meshvpn
    } else {
        DatagramKind::Unknown
    }
}

/// Frame kinds (byte 3 of the header).
mod kind {
    pub(super) const KEY_REQUEST: u8 = 0x01;
    pub(super) const KEY_RESPONSE: u8 = 0x02;
    pub(super) const TO_RELAY: u8 = 0x10;
    pub(super) const FROM_RELAY: u8 = 0x11;
    pub(super) const COOKIE_REPLY: u8 = 0x12;
    pub(super) const RELAY_SEND: u8 = 0x20;
    pub(super) const RELAY_RECV: u8 = 0x21;
    pub(super) const DISCO: u8 = 0x30;
}

/// A parsed meshvpn frame, borrowing its body from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// "Tell me your public key" (unauthenticated; used once by `meshvpn create`).
    KeyRequest,
    /// The relay's answer to [`Frame::KeyRequest`].
    KeyResponse { relay: PeerKey },
    /// A sealed, signed [`RelayRequest`] from a member, under the member/relay session key,
    /// with the return-path cookie the relay last gave this address (zeros when it has none).
    ToRelay {
        sender: PeerKey,
        cookie: admission::Cookie,
        sealed: &'a [u8],
    },
    /// A sealed [`RelayReply`] from a relay, under the member/relay session key.
    FromRelay { relay: PeerKey, sealed: &'a [u8] },
    /// The relay's answer to a registration from an address that has not proven it receives:
    /// echo `cookie` in the next request. `echo` repeats the first bytes of the request's nonce
    /// so an off-path sender cannot feed a member false cookies.
    CookieReply {
        echo: [u8; admission::ECHO_LEN],
        cookie: admission::Cookie,
    },
    /// Member to relay: forward `payload` to member `to`.
    RelaySend { to: PeerKey, payload: &'a [u8] },
    /// Relay to member: `payload` comes from member `from`.
    RelayRecv { from: PeerKey, payload: &'a [u8] },
    /// A sealed [`Disco`] message between two members, under their pairwise disco key.
    Disco { sender: PeerKey, sealed: &'a [u8] },
}

impl<'a> Frame<'a> {
    /// Parses a meshvpn frame.
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[..2] != MAGIC {
            return Err(WireError::NotMeshvpn);
        }
        if b[2] != VERSION {
            return Err(WireError::Version(b[2]));
        }
        let mut r = Reader::new(&b[HEADER_LEN..]);
        let frame = match b[3] {
            kind::KEY_REQUEST => Frame::KeyRequest,
            kind::KEY_RESPONSE => Frame::KeyResponse {
                relay: PeerKey(r.array()?),
            },
            kind::TO_RELAY => Frame::ToRelay {
                sender: PeerKey(r.array()?),
                cookie: r.array()?,
                sealed: r.rest(),
            },
            kind::COOKIE_REPLY => {
                let frame = Frame::CookieReply {
                    echo: r.array()?,
                    cookie: r.array()?,
                };
                if !r.is_empty() {
                    return Err(WireError::Malformed("trailing bytes after a cookie"));
                }
                frame
            }
            kind::FROM_RELAY => Frame::FromRelay {
                relay: PeerKey(r.array()?),
                sealed: r.rest(),
            },
            kind::RELAY_SEND => Frame::RelaySend {
                to: PeerKey(r.array()?),
                payload: r.rest(),
            },
            kind::RELAY_RECV => Frame::RelayRecv {
                from: PeerKey(r.array()?),
                payload: r.rest(),
            },
            kind::DISCO => Frame::Disco {
                sender: PeerKey(r.array()?),
                sealed: r.rest(),
            },
            other => return Err(WireError::UnknownType("frame", other)),
        };
        Ok(frame)
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (k, key, body): (u8, Option<&PeerKey>, &[u8]) = match self {
            Frame::KeyRequest => (kind::KEY_REQUEST, None, &[]),
            Frame::CookieReply { echo, .. } => (kind::COOKIE_REPLY, None, echo),
            Frame::KeyResponse { relay } => (kind::KEY_RESPONSE, Some(relay), &[]),
            Frame::ToRelay { sender, sealed, .. } => (kind::TO_RELAY, Some(sender), sealed),
            Frame::FromRelay { relay, sealed } => (kind::FROM_RELAY, Some(relay), sealed),
            Frame::RelaySend { to, payload } => (kind::RELAY_SEND, Some(to), payload),
            Frame::RelayRecv { from, payload } => (kind::RELAY_RECV, Some(from), payload),
            Frame::Disco { sender, sealed } => (kind::DISCO, Some(sender), sealed),
        };
        out.reserve(HEADER_LEN + 32 + body.len());
        out.extend_from_slice(&[MAGIC[0], MAGIC[1], VERSION, k]);
        if let Some(key) = key {
            out.extend_from_slice(&key.0);
        }
        // The cookie follows the key in a request and the echo in a cookie reply.
        if let Frame::ToRelay { cookie, .. } = self {
            out.extend_from_slice(cookie);
        }
        out.extend_from_slice(body);
        if let Frame::CookieReply { cookie, .. } = self {
            out.extend_from_slice(cookie);
        }
    }

    /// The encoded frame as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}

/// Seals `plain` with `key`; `aad` is authenticated but not encrypted. Output: nonce || ciphertext.
pub fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a body made by [`seal`]; fails on any alteration or wrong key.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, WireError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(WireError::Truncated);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| WireError::Unauthenticated)
}

/// Associated data for a sealed frame body: the header and the key that precedes the body.
pub fn frame_aad(kind_byte: u8, key: &PeerKey) -> [u8; HEADER_LEN + 32] {
    let mut aad = [0u8; HEADER_LEN + 32];
    aad[..HEADER_LEN].copy_from_slice(&[MAGIC[0], MAGIC[1], VERSION, kind_byte]);
    aad[HEADER_LEN..].copy_from_slice(&key.0);
    aad
}

/// Builds a sealed `FromRelay` datagram.
pub fn seal_from_relay(
    session: &[u8; 32],
    relay: PeerKey,
    msg: &RelayReply,
    nonce: [u8; 24],
) -> Vec<u8> {
    let sealed = seal(
        session,
        &frame_aad(kind::FROM_RELAY, &relay),
        &msg.encode(),
        nonce,
    );
    Frame::FromRelay {
        relay,
        sealed: &sealed,
    }
    .to_vec()
}

/// Opens the body of a `FromRelay` frame.
pub fn open_from_relay(
    session: &[u8; 32],
    relay: &PeerKey,
    sealed: &[u8],
) -> Result<RelayReply, WireError> {
    RelayReply::decode(&open(session, &frame_aad(kind::FROM_RELAY, relay), sealed)?)
}

/// A member's request to a relay (signed with the network key and sealed under the session key,
/// see [`admission`]).
///
/// Every request carries a millisecond Unix timestamp that must lie near the relay's clock and
/// grow strictly per member, so a captured request cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayRequest {
    /// Join or refresh: store `announcement` (opaque to the relay) for `network`.
    Register {
        network: NetworkId,
        ts_ms: u64,
        announcement: Vec<u8>,
    },
    /// Leave now (graceful shutdown).
    Leave { network: NetworkId, ts_ms: u64 },
    /// Still here: keep the stored announcement, from the address registered. The relay
    /// answers with a [`RelayReply::RegisterAck`] after `answer_after_ms` (at most
    /// [`MAX_ANSWER_AFTER_MS`]; the member sends nothing to the relay meanwhile, so an answer
    /// that arrives proves the NAT kept the mapping that long) and keeps the member that long
    /// plus its member TTL. A relay that does not hold the member at that address answers
    /// [`RelayReply::Unregistered`] at once.
    Refresh {
        network: NetworkId,
        ts_ms: u64,
        answer_after_ms: u32,
    },
    /// Send me every member of `network` again.
    Sync { network: NetworkId, ts_ms: u64 },
    /// Store entries of a secret rotation of `network` (the id being retired): one sealed
    /// handover per recipient (see [`rotation`]). A rotation spans several requests; the
    /// one with `complete` set ends it, and from then on the relay hands each member of
    /// `network` its entry and admits nobody under `network`.
    Rotate {
        network: NetworkId,
        ts_ms: u64,
        complete: bool,
        entries: Vec<RotationEntry>,
    },
}

impl RelayRequest {
    /// The request's replay-protection timestamp.
    pub fn ts_ms(&self) -> u64 {
        match self {
            RelayRequest::Register { ts_ms, .. }
            | RelayRequest::Refresh { ts_ms, .. }
            | RelayRequest::Leave { ts_ms, .. }
            | RelayRequest::Sync { ts_ms, .. }
            | RelayRequest::Rotate { ts_ms, .. } => *ts_ms,
        }
    }

    /// The network the request is about.
    pub fn network(&self) -> NetworkId {
        match self {
            RelayRequest::Register { network, .. }
            | RelayRequest::Refresh { network, .. }
            | RelayRequest::Leave { network, .. }
            | RelayRequest::Sync { network, .. }
            | RelayRequest::Rotate { network, .. } => *network,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            RelayRequest::Register {
                network,
                ts_ms,
                announcement,
            } => {
                w.u8(1).raw(&network.0).u64(*ts_ms).bytes(announcement);
            }
            RelayRequest::Leave { network, ts_ms } => {
                w.u8(2).raw(&network.0).u64(*ts_ms);
            }
            RelayRequest::Refresh {
                network,
                ts_ms,
                answer_after_ms,
            } => {
                w.u8(5).raw(&network.0).u64(*ts_ms).u32(*answer_after_ms);
            }
            RelayRequest::Sync { network, ts_ms } => {
                w.u8(3).raw(&network.0).u64(*ts_ms);
            }
            RelayRequest::Rotate {
                network,
                ts_ms,
                complete,
                entries,
            } => {
                w.u8(4).raw(&network.0).u64(*ts_ms);
                w.u8(u8::from(*complete)).u8(entries.len() as u8);
                for e in entries {
                    e.encode_into(&mut w);
                }
            }
        }
        w.buf
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b);
        let t = r.u8()?;
        let network = NetworkId(r.array()?);
        let ts_ms = r.u64()?;
        Ok(match t {
            1 => {
                let announcement = r.bytes()?.to_vec();
                if announcement.len() > MAX_ANNOUNCEMENT {
                    return Err(WireError::Malformed("announcement too large"));
                }
                RelayRequest::Register {
                    network,
                    ts_ms,
                    announcement,
                }
            }
            2 => RelayRequest::Leave { network, ts_ms },
            3 => RelayRequest::Sync { network, ts_ms },
            5 => {
                let answer_after_ms = r.u32()?;
                if answer_after_ms > MAX_ANSWER_AFTER_MS {
                    return Err(WireError::Malformed("refresh answer delay too long"));
                }
                RelayRequest::Refresh {
                    network,
                    ts_ms,
                    answer_after_ms,
                }
            }
            4 => {
                let complete = flag(&mut r)?;
                let count = usize::from(r.u8()?);
                if count > rotation::ENTRIES_PER_REQUEST {
                    return Err(WireError::Malformed("too many rotation entries"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(RotationEntry::decode_from(&mut r)?);
                }
                RelayRequest::Rotate {
                    network,
                    ts_ms,
                    complete,
                    entries,
                }
            }
            other => return Err(WireError::UnknownType("relay request", other)),
        })
    }
}

/// One member as the relay knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEntry {
    /// The member's public key.
    pub key: PeerKey,
    /// The address the relay sees the member's registrations come from (server-reflexive).
    pub observed: SocketAddr,
    /// The member's sealed [`Announcement`], opaque to the relay.
    pub announcement: Vec<u8>,
    /// The relay's change counter when this member's current presence began (the push that
    /// introduced it): members rank address claims by it, first holder first.
    pub since: u64,
}

/// Position of a [`RelayReply::Member`] within a full membership sync, or a live push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTag {
    /// Sync round; 0 marks a single live update rather than part of a full sync.
    pub generation: u32,
    /// Index of this entry within the round.
    pub index: u16,
    /// Number of entries in the round.
    pub total: u16,
    /// The relay's change counter when this was sent: orders pushes and snapshots that the
    /// network delivered out of order.
    pub seq: u64,
}

/// A relay's message to a member (sealed under their session key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayReply {
    /// The registration with timestamp `echo_ts_ms` was accepted. `digest` summarises the
    /// member set (see [`membership_digest`]) so the member can tell when it missed an update.
    RegisterAck {
        echo_ts_ms: u64,
        observed: SocketAddr,
        members: u32,
        digest: [u8; 8],
        ttl_s: u16,
        /// The relay's change counter when the registering member's presence began (see
        /// [`MemberEntry::since`]).
        since: u64,
    },
    /// A member of the network (a live update, or one entry of a full sync).
    Member { tag: SyncTag, entry: MemberEntry },
    /// A member left or expired.
    MemberGone { key: PeerKey, seq: u64 },
    /// The refresh with timestamp `echo_ts_ms` came from a member the relay does not hold at
    /// that address (it restarted, the member expired, or the member's NAT mapping changed):
    /// register again.
    Unregistered { echo_ts_ms: u64 },
    /// A sync round with zero other members (so an empty network is distinguishable from loss).
    SyncEmpty { generation: u32, seq: u64 },
    /// The relay refused a request.
    Error { message: String },
    /// The rotation request with timestamp `echo_ts_ms` was stored; `stored` entries are
    /// held for the rotation now.
    RotateAck {
        echo_ts_ms: u64,
        stored: u32,
        complete: bool,
    },
    /// Network id `network`, which this member registers under, was rotated: here is its
    /// entry, or `None` when the rotation left it out. The member is not admitted under that
    /// network id.
    Rotated {
        network: NetworkId,
        entry: Option<RotationEntry>,
    },
}

impl RelayReply {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            RelayReply::RegisterAck {
                echo_ts_ms,
                observed,
                members,
                digest,
                ttl_s,
                since,
            } => {
                w.u8(1)
                    .u64(*echo_ts_ms)
                    .addr(observed)
                    .u32(*members)
                    .raw(digest)
                    .u16(*ttl_s)
                    .u64(*since);
            }
            RelayReply::Member { tag, entry } => {
                w.u8(2)
                    .u32(tag.generation)
                    .u16(tag.index)
                    .u16(tag.total)
                    .u64(tag.seq);
                w.raw(&entry.key.0)
                    .addr(&entry.observed)
                    .bytes(&entry.announcement)
                    .u64(entry.since);
            }
            RelayReply::MemberGone { key, seq } => {
                w.u8(3).raw(&key.0).u64(*seq);
            }
            RelayReply::Unregistered { echo_ts_ms } => {
                w.u8(8).u64(*echo_ts_ms);
            }
            RelayReply::SyncEmpty { generation, seq } => {
                w.u8(4).u32(*generation).u64(*seq);
            }
            RelayReply::Error { message } => {
                w.u8(5).str(message);
            }
            RelayReply::RotateAck {
                echo_ts_ms,
                stored,
                complete,
            } => {
                w.u8(6)
                    .u64(*echo_ts_ms)
                    .u32(*stored)
                    .u8(u8::from(*complete));
            }
            RelayReply::Rotated { network, entry } => {
                w.u8(7).raw(&network.0);
                match entry {
                    Some(e) => {
                        w.u8(1);
                        e.encode_into(&mut w);
                    }
                    None => {
                        w.u8(0);
                    }
                }
            }
        }
        w.buf
    }

    fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b);
        Ok(match r.u8()? {
            1 => RelayReply::RegisterAck {
                echo_ts_ms: r.u64()?,
                observed: r.addr()?,
                members: r.u32()?,
                digest: r.array()?,
                ttl_s: r.u16()?,
                since: r.u64()?,
            },
            2 => {
                let tag = SyncTag {
                    generation: r.u32()?,
                    index: r.u16()?,
                    total: r.u16()?,
                    seq: r.u64()?,
                };
                let entry = MemberEntry {
                    key: PeerKey(r.array()?),
                    observed: r.addr()?,
                    announcement: r.bytes()?.to_vec(),
                    since: r.u64()?,
                };
                RelayReply::Member { tag, entry }
            }
            3 => RelayReply::MemberGone {
                key: PeerKey(r.array()?),
                seq: r.u64()?,
            },
            4 => RelayReply::SyncEmpty {
                generation: r.u32()?,
                seq: r.u64()?,
            },
            5 => RelayReply::Error { message: r.str()? },
            6 => RelayReply::RotateAck {
                echo_ts_ms: r.u64()?,
                stored: r.u32()?,
                complete: flag(&mut r)?,
            },
            7 => RelayReply::Rotated {
                network: NetworkId(r.array()?),
                entry: match flag(&mut r)? {
                    false => None,
                    true => Some(RotationEntry::decode_from(&mut r)?),
                },
            },
            8 => RelayReply::Unregistered {
                echo_ts_ms: r.u64()?,
            },
            other => return Err(WireError::UnknownType("relay reply", other)),
        })
    }
}

/// A boolean byte: exactly 0 or 1, so every value has one encoding.
fn flag(r: &mut Reader<'_>) -> Result<bool, WireError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::Malformed("flag byte is not 0 or 1")),
    }
}

/// Summary of a member set: 8 bytes of BLAKE2s over the entries sorted by key. Relay and
/// member compute it the same way; a difference means the member missed an update.
pub fn membership_digest<'a>(entries: impl IntoIterator<Item = &'a MemberEntry>) -> [u8; 8] {
    let mut sorted: Vec<&MemberEntry> = entries.into_iter().collect();
    sorted.sort_by_key(|e| e.key);
    let mut h = Blake2s256::new();
    for e in sorted {
        let mut w = Writer::new();
        w.raw(&e.key.0)
            .addr(&e.observed)
            .bytes(&e.announcement)
            .u64(e.since);
        h.update(&w.buf);
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize()[..8]);
    out
}

/// At most this many endpoints in an announcement or a call-me.
pub const MAX_ENDPOINTS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(b: u8) -> PeerKey {
        PeerKey([b; 32])
    }

    #[test]
    fn classify_demuxes_the_four_kinds() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), DatagramKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), DatagramKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        let mut stun = [0u8; 20];
        stun[1] = 1;
        stun[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(classify(&stun), DatagramKind::Stun);
        assert_eq!(classify(&Frame::KeyRequest.to_vec()), DatagramKind::Meshvpn);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(b"GET / HTTP/1.1"), DatagramKind::Unknown);
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::KeyRequest,
            Frame::KeyResponse { relay: key(1) },
            Frame::ToRelay {
                sender: key(2),
                cookie: [7; 16],
                sealed: b"abc",
            },
            Frame::CookieReply {
                echo: [1; 16],
                cookie: [2; 16],
            },
            Frame::FromRelay {
                relay: key(3),
                sealed: b"",
            },
            Frame::RelaySend {
                to: key(4),
                payload: b"payload",
            },
            Frame::RelayRecv {
                from: key(5),
                payload: b"x",
            },
            Frame::Disco {
                sender: key(6),
                sealed: b"yz",
            },
        ];
        for f in frames {
            let bytes = f.to_vec();
            assert_eq!(Frame::parse(&bytes), Ok(f));
            for cut in 0..bytes.len().min(HEADER_LEN + 32) {
                if f == Frame::KeyRequest && cut == HEADER_LEN {
                    continue;
                }
                assert!(Frame::parse(&bytes[..cut]).is_err() || cut >= HEADER_LEN + 32);
            }
        }
        assert_eq!(
            Frame::parse(&[0xFF, b'm', 9, 1]),
            Err(WireError::Version(9))
        );
        assert_eq!(
            Frame::parse(&[0xFF, b'm', VERSION, 0x77]),
            Err(WireError::UnknownType("frame", 0x77))
        );
    }

    #[test]
    fn sealed_relay_replies_round_trip_and_detect_tampering() {
        let session = [9u8; 32];
        let entry = MemberEntry {
            key: key(3),
            observed: "198.51.100.2:5000".parse().expect("lit"),
            announcement: vec![5; 40],
            since: 7,
        };
        let replies = [
            RelayReply::RegisterAck {
                echo_ts_ms: 5,
                observed: entry.observed,
                members: 3,
                digest: [1; 8],
                ttl_s: 30,
                since: 12,
            },
            RelayReply::Member {
                tag: SyncTag {
                    generation: 2,
                    index: 1,
                    total: 3,
                    seq: 99,
                },
                entry,
            },
            RelayReply::MemberGone {
                key: key(4),
                seq: 5,
            },
            RelayReply::Unregistered { echo_ts_ms: 9 },
            RelayReply::SyncEmpty {
                generation: 7,
                seq: 6,
            },
            RelayReply::Error {
                message: "no".into(),
            },
        ];
        for reply in replies {
            let dgram = seal_from_relay(&session, key(1), &reply, [3; 24]);
            let Ok(Frame::FromRelay { relay, sealed }) = Frame::parse(&dgram) else {
                panic!("parse")
            };
            assert_eq!(open_from_relay(&session, &relay, sealed), Ok(reply));
            assert!(open_from_relay(&[0; 32], &relay, sealed).is_err());
        }
    }

    #[test]
    fn disco_and_announcement_round_trip() {
        let k = [4u8; 32];
        for msg in [
            Disco::Ping { tx: [1; 12] },
            Disco::Pong {
                tx: [2; 12],
                observed: "[2001:db8::5]:9".parse().expect("lit"),
            },
            Disco::CallMe {
                endpoints: vec!["203.0.113.9:1".parse().expect("lit")],
            },
            Disco::Forward {
                to: key(3),
                inner: vec![7; 300],
            },
            Disco::Forwarded {
                from: key(3),
                observed: "198.51.100.4:41641".parse().expect("lit"),
                inner: vec![8; 512],
            },
        ] {
            let stamp = DiscoStamp {
                ts_ms: 1_700_000_000_123,
                nonce: 0x0123_4567_89ab_cdef,
            };
            let d = seal_disco(&k, key(1), stamp, &msg, [5; 24]);
            let Ok(Frame::Disco { sender, sealed }) = Frame::parse(&d) else {
                panic!("parse")
            };
            assert_eq!(open_disco(&k, &sender, sealed), Ok((stamp, msg)));
            assert!(open_disco(&k, &key(2), sealed).is_err(), "sender is bound");
        }
        // A body of the format before the stamp (type byte first, no version) is refused.
        let old = seal(&k, &frame_aad(kind::DISCO, &key(1)), &[1; 13], [5; 24]);
        assert_eq!(open_disco(&k, &key(1), &old), Err(WireError::Version(1)));
        let network = NetworkId([2; 32]);
        let a = Announcement {
            key: key(9),
            name: "alice".into(),
            virtual_ip: Ipv4Addr::new(10, 1, 2, 3),
            ts_ms: 77,
            endpoints: vec!["192.0.2.1:4000".parse().expect("lit")],
            nat: NatKind::EndpointDependent,
        };
        let sealed = a.seal(&k, &network, [6; 24]);
        assert_eq!(Announcement::open(&k, &network, key(9), &sealed), Ok(a));
        assert!(Announcement::open(&k, &network, key(8), &sealed).is_err());
        assert!(Announcement::open(&[0; 32], &network, key(9), &sealed).is_err());
    }

    #[test]
    fn digest_is_order_independent() {
        let e = |b| MemberEntry {
            key: key(b),
            observed: "192.0.2.1:1".parse().expect("lit"),
            announcement: vec![b],
            since: 0,
        };
        let (a, b) = (e(1), e(2));
        assert_eq!(membership_digest([&a, &b]), membership_digest([&b, &a]));
        assert_ne!(membership_digest([&a]), membership_digest([&a, &b]));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 12345;
        for len in 0..200usize {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            if len >= 4 {
                buf[..3].copy_from_slice(&[0xFF, b'm', VERSION]);
            }
            let _ = Frame::parse(&buf);
            let _ = RelayRequest::decode(&buf);
            let _ = RelayReply::decode(&buf);
            let _ = Disco::decode(&buf);
        }
    }
}
