//! A member's announcement: what it tells the other members about itself (name, virtual IP,
//! endpoints, NAT verdict), sealed with the network's control key so the relay stores and
//! forwards it without reading it.

use std::net::{Ipv4Addr, SocketAddr};

use super::codec::{Reader, Writer};
use super::{open, seal, WireError, MAX_ENDPOINTS};
use crate::keys::{NetworkId, PeerKey};

/// What a member tells the others about itself, sealed with the network's control key.
///
/// The key is bound into the associated data, so a relay cannot move an announcement to
/// another member's entry; `ts_ms` lets receivers refuse an older announcement (replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The announcing member's public key.
    pub key: PeerKey,
    /// Human-readable node name.
    pub name: String,
    /// The member's virtual IPv4 address.
    pub virtual_ip: Ipv4Addr,
    /// Milliseconds since the Unix epoch when this announcement was made (grows per member).
    pub ts_ms: u64,
    /// The member's own view of where it can be reached (host addresses, mapped ports).
    pub endpoints: Vec<SocketAddr>,
    /// The member's NAT as it classified it (lets peers pick a strategy and explain a relay).
    pub nat: NatKind,
}

/// A member's own verdict on its NAT, shared in its announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NatKind {
    /// Not classified yet (or STUN got no answer).
    #[default]
    Unknown,
    /// The member's address is public (the reflexive address is one of its own).
    Public,
    /// Endpoint-independent mapping: peers see the address the relay sees.
    EndpointIndependent,
    /// Endpoint-dependent ("symmetric") mapping: every destination sees another port.
    EndpointDependent,
    /// UDP to the relay gets no answer; the member is attached over TCP.
    UdpBlocked,
}

impl NatKind {
    pub(super) fn to_byte(self) -> u8 {
        match self {
            NatKind::Unknown => 0,
            NatKind::Public => 1,
            NatKind::EndpointIndependent => 2,
            NatKind::EndpointDependent => 3,
            NatKind::UdpBlocked => 4,
        }
    }

    pub(super) fn from_byte(b: u8) -> Self {
        match b {
            1 => NatKind::Public,
            2 => NatKind::EndpointIndependent,
            3 => NatKind::EndpointDependent,
            4 => NatKind::UdpBlocked,
            _ => NatKind::Unknown,
        }
    }

    /// Human-readable description.
    pub fn describe(self) -> &'static str {
        match self {
            NatKind::Unknown => "unknown",
            NatKind::Public => "no NAT (public address)",
            NatKind::EndpointIndependent => "endpoint-independent mapping",
            NatKind::EndpointDependent => "symmetric (endpoint-dependent mapping)",
            NatKind::UdpBlocked => "UDP blocked (relay over TCP)",
        }
    }
}

impl Announcement {
    fn aad(network: &NetworkId, key: &PeerKey) -> Vec<u8> {
        let mut aad = b"meshvpn v1 announcement".to_vec();
        aad.extend_from_slice(&network.0);
        aad.extend_from_slice(&key.0);
        aad
    }

    /// Seals the announcement for the relay to store and forward.
    pub fn seal(&self, control_key: &[u8; 32], network: &NetworkId, nonce: [u8; 24]) -> Vec<u8> {
        let aad = Self::aad(network, &self.key);
        seal(control_key, &aad, &self.encode_body(), nonce)
    }

    /// Opens an announcement stored under `key`; fails unless sealed by a member for that key.
    pub fn open(
        control_key: &[u8; 32],
        network: &NetworkId,
        key: PeerKey,
        sealed: &[u8],
    ) -> Result<Self, WireError> {
        let plain = open(control_key, &Self::aad(network, &key), sealed)?;
        Self::decode_body(key, &plain)
    }

    pub(super) fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(1)
            .str(&self.name)
            .raw(&self.virtual_ip.octets())
            .u64(self.ts_ms);
        w.u8(self.endpoints.len().min(MAX_ENDPOINTS) as u8);
        for e in self.endpoints.iter().take(MAX_ENDPOINTS) {
            w.addr(e);
        }
        w.u8(self.nat.to_byte());
        w.buf
    }

    pub(super) fn decode_body(key: PeerKey, plain: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(plain);
        if r.u8()? != 1 {
            return Err(WireError::Malformed("unknown announcement version"));
        }
        let name = r.str()?;
        let virtual_ip = Ipv4Addr::from(r.array::<4>()?);
        let ts_ms = r.u64()?;
        let n = usize::from(r.u8()?);
        if n > MAX_ENDPOINTS {
            return Err(WireError::Malformed("too many endpoints"));
        }
        let endpoints = (0..n).map(|_| r.addr()).collect::<Result<_, _>>()?;
        let nat = NatKind::from_byte(r.u8()?);
        Ok(Self {
            key,
            name,
            virtual_ip,
            ts_ms,
            endpoints,
            nat,
        })
    }
}
