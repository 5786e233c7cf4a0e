//! Keys: a member's static X25519 key, the network secret, and everything derived from it.
//!
//! The group token carries one 32-byte random network secret. Every other network-wide value is
//! derived from it with HKDF-SHA256, each under its own label, so that learning one derived value
//! reveals nothing about the others:
//!
//! | value | label | who knows it | used for |
//! |---|---|---|---|
//! | [`NetworkSigningKey`] | `meshvpn v2 network signing key` | members only | signing relay requests |
//! | [`NetworkId`] | (the signing key's public half) | members and the relay | the relay's index, and its check of signatures |
//! | control key | `meshvpn v1 control key` | members only | sealing announcements |
//! | preshared key | `meshvpn v1 wireguard psk` | members only | WireGuard's PSK slot |
//!
//! The network id is an Ed25519 public key, so a relay can check that a registrant knows the
//! network secret (its requests are signed with the private half) without being able to admit
//! anyone itself, and someone who only saw the id on the wire can neither register nor read the
//! member list.
//!
//! Pairwise keys come from static-static X25519 Diffie-Hellman: a member and the relay share a
//! *relay session key* (so each proves possession of its private key to the other), and two
//! members share a *disco key* bound to the network's control key (so path probes are authenticated
//! and only members of the same network can produce them).
//!
//! Secrets implement neither `Display` nor a revealing `Debug`; they never reach logs or status.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Salt shared by every network-secret derivation; versioned so a v2 token can change the scheme.
const NETWORK_SALT: &[u8] = b"meshvpn v1 network secret";

/// A member's (or the relay's) public X25519 key: its identity on the wire and in WireGuard.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    /// The key as standard base64 (the form in config files and `status`).
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Parses a base64 public key; `None` unless it decodes to exactly 32 bytes.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = B64.decode(text.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// A short printable prefix for logs (enough to tell members apart, not a secret).
    pub fn short(&self) -> String {
        let mut s = self.to_base64();
        s.truncate(8);
        s
    }

    /// The key as an x25519-dalek public key.
    pub fn to_public(&self) -> PublicKey {
        PublicKey::from(self.0)
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({})", self.short())
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A static X25519 private key (a member's or the relay's). Never printed.
#[derive(Clone)]
pub struct NodeSecret(StaticSecret);

impl NodeSecret {
    /// Generates a fresh key from the given cryptographic RNG.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self(StaticSecret::from(bytes))
    }

    /// Wraps raw key bytes (as stored in a config or key file).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// Parses a base64 private key; `None` unless it decodes to exactly 32 bytes.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = B64.decode(text.trim()).ok()?;
        Some(Self::from_bytes(bytes.try_into().ok()?))
    }

    /// The key as base64, for writing to a 0600 file only.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> PeerKey {
        PeerKey(PublicKey::from(&self.0).to_bytes())
    }

    /// The underlying x25519-dalek secret (for boringtun).
    pub fn to_static(&self) -> StaticSecret {
        self.0.clone()
    }

    /// Raw Diffie-Hellman with another static key.
    fn dh(&self, other: &PeerKey) -> [u8; 32] {
        self.0.diffie_hellman(&other.to_public()).to_bytes()
    }

    /// The symmetric key this member shares with the relay whose public key is `relay`
    /// (and, computed from the other side, the relay with this member).
    pub fn relay_session_key(&self, member: &PeerKey, relay: &PeerKey) -> [u8; 32] {
        let mut info = Vec::with_capacity(64 + 24);
        info.extend_from_slice(b"meshvpn v1 relay session");
        info.extend_from_slice(&member.0);
        info.extend_from_slice(&relay.0);
        let other = if *member == self.public() {
            relay
        } else {
            member
        };
        hkdf32(b"meshvpn v1 relay", &self.dh(other), &info)
    }

    /// The symmetric key two members of one network use for path probes (disco messages).
    pub fn disco_key(&self, peer: &PeerKey, control_key: &[u8; 32]) -> [u8; 32] {
        let me = self.public();
        let (a, b) = if me < *peer { (me, *peer) } else { (*peer, me) };
        let mut info = Vec::with_capacity(64 + 16);
        info.extend_from_slice(b"meshvpn v1 disco");
        info.extend_from_slice(&a.0);
        info.extend_from_slice(&b.0);
        hkdf32(control_key, &self.dh(peer), &info)
    }

    /// The key that seals a secret handed over at a rotation (see `wire::rotation`): X25519
    /// between an ephemeral key and the recipient's static key, bound to the *old* network's
    /// control key so that only a holder of the old secret can produce a handover a member
    /// accepts (a relay can seal to a member's public key, but not with that salt). Computed
    /// by the sender with the ephemeral secret and the recipient's key, and by the recipient
    /// with its own secret and the ephemeral key; `recipient` and `ephemeral` are the two
    /// public keys in that order either way.
    pub fn handover_key(
        &self,
        other: &PeerKey,
        control_key: &[u8; 32],
        network: &NetworkId,
        recipient: &PeerKey,
        ephemeral: &PeerKey,
    ) -> [u8; 32] {
        let mut info = Vec::with_capacity(32 * 3 + 24);
        info.extend_from_slice(b"meshvpn v1 rotation");
        info.extend_from_slice(&network.0);
        info.extend_from_slice(&recipient.0);
        info.extend_from_slice(&ephemeral.0);
        hkdf32(control_key, &self.dh(other), &info)
    }
}

impl fmt::Debug for NodeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeSecret(public {})", self.public().short())
    }
}

/// The 32-byte secret shared by all members of a network (carried in the group token).
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkSecret(pub [u8; 32]);

impl NetworkSecret {
    /// Generates a fresh secret.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Parses the base64 form stored in config files.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = B64.decode(text.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// Base64 form, for 0600 config files only.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Derives the signing key, network id, control key and WireGuard preshared key.
    pub fn derive(&self) -> NetworkKeys {
        let signing = SigningKey::from_bytes(&hkdf32(
            NETWORK_SALT,
            &self.0,
            b"meshvpn v2 network signing key",
        ));
        NetworkKeys {
            network_id: NetworkId(signing.verifying_key().to_bytes()),
            signing: NetworkSigningKey(signing),
            control_key: hkdf32(NETWORK_SALT, &self.0, b"meshvpn v1 control key"),
            preshared_key: hkdf32(NETWORK_SALT, &self.0, b"meshvpn v1 wireguard psk"),
        }
    }
}

impl fmt::Debug for NetworkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkSecret(..)")
    }
}

/// What the relay indexes members by: the Ed25519 public key matching the network's
/// [`NetworkSigningKey`]. Derived from the secret, reveals nothing about it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkId(pub [u8; 32]);

impl NetworkId {
    /// Checks an Ed25519 signature made with the network's signing key over `message`.
    /// `false` for a bad signature and for an id that is not a valid public key.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }
}

/// The private half of the network id, derived from the network secret: members sign their
/// relay requests with it. Never printed.
#[derive(Clone)]
pub struct NetworkSigningKey(SigningKey);

impl NetworkSigningKey {
    /// Signs `message` (Ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// The public half: the network id.
    pub fn network_id(&self) -> NetworkId {
        NetworkId(self.0.verifying_key().to_bytes())
    }
}

impl fmt::Debug for NetworkSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkSigningKey(network {})", self.network_id())
    }
}

impl fmt::Debug for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkId({self})")
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The keys derived from a network secret.
#[derive(Clone)]
pub struct NetworkKeys {
    /// The relay's index for this network (the public half of `signing`).
    pub network_id: NetworkId,
    /// Signs relay requests; members only.
    pub signing: NetworkSigningKey,
    /// Seals member announcements; members only.
    pub control_key: [u8; 32],
    /// WireGuard preshared key; members only.
    pub preshared_key: [u8; 32],
}

impl fmt::Debug for NetworkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkKeys({:?}, ..)", self.network_id)
    }
}

fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn derivations_are_distinct_and_stable() {
        let secret = NetworkSecret([7u8; 32]);
        let a = secret.derive();
        let b = secret.derive();
        assert_eq!(a.network_id, b.network_id);
        assert_eq!(a.control_key, b.control_key);
        assert_ne!(a.control_key, a.preshared_key);
        assert_ne!(&a.control_key[..16], &a.network_id.0[..]);
        let other = NetworkSecret([8u8; 32]).derive();
        assert_ne!(a.network_id, other.network_id);
        assert_ne!(a.preshared_key, other.preshared_key);
        assert_eq!(a.signing.network_id(), a.network_id);
    }

    #[test]
    fn only_the_secret_signs_for_the_network_id() {
        let keys = NetworkSecret([7u8; 32]).derive();
        let sig = keys.signing.sign(b"hello");
        assert!(keys.network_id.verify(b"hello", &sig));
        assert!(!keys.network_id.verify(b"hellp", &sig));
        let other = NetworkSecret([8u8; 32]).derive();
        assert!(!other.network_id.verify(b"hello", &sig));
        // An id that is not a curve point verifies nothing (and does not panic).
        assert!(!NetworkId([0xff; 32]).verify(b"hello", &sig));
        assert!(!format!("{:?}", keys.signing).contains("07070707"));
    }

    #[test]
    fn pairwise_keys_agree_from_both_sides() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let member = NodeSecret::generate(&mut rng);
        let relay = NodeSecret::generate(&mut rng);
        let (m, r) = (member.public(), relay.public());
        assert_eq!(
            member.relay_session_key(&m, &r),
            relay.relay_session_key(&m, &r)
        );

        let peer = NodeSecret::generate(&mut rng);
        let control = [3u8; 32];
        let k1 = member.disco_key(&peer.public(), &control);
        assert_eq!(k1, peer.disco_key(&m, &control));
        assert_ne!(k1, member.disco_key(&peer.public(), &[4u8; 32]));
    }

    #[test]
    fn base64_round_trip_and_rejects_wrong_length() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let s = NodeSecret::generate(&mut rng);
        let back = NodeSecret::from_base64(&s.to_base64()).expect("round trip");
        assert_eq!(back.public(), s.public());
        assert!(PeerKey::from_base64("AAAA").is_none());
        assert!(PeerKey::from_base64("not base64!").is_none());
        assert!(!format!("{s:?}").contains(&s.to_base64()));
    }
}
