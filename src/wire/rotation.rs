//! Secret rotation: how a new network secret reaches every member but the ones left out.
//!
//! Revoking a member of a shared-secret network means replacing the secret. The member that
//! rotates (`meshvpn rotate` / `kick`) seals the new secret once per recipient, to the
//! recipient's static X25519 key, and uploads the sealed entries to the relay under the *old*
//! network id ([`super::RelayRequest::Rotate`]). The relay keeps them blindly for a bounded
//! time ([`ROTATION_RECORD_TTL`]): it pushes each online member its own entry at once
//! ([`super::RelayReply::Rotated`]) and answers any later registration under the old id with
//! the registrant's entry, or with none, and admits nobody under that id again.
//!
//! An entry is `recipient key ‖ ephemeral key ‖ sealed handover`. The sealing key comes from
//! X25519(ephemeral, recipient) with the old network's control key as HKDF salt
//! ([`NodeSecret::handover_key`]), so:
//! - only the recipient can open its entry (the relay and the member left out cannot);
//! - only a holder of the old secret can make one (a relay can encrypt to a member's public
//!   key, but without the control key it cannot produce an entry the member accepts, so it
//!   cannot steer members into a network whose secret it knows);
//! - an entry opens only under the secret it rotates *from*: replaying an old rotation to a
//!   member that has moved on fails to open.
//!
//! Limit of the shared-secret scheme, stated here so nobody relies on more: a member left out
//! still holds the old secret and could race the rotation with one of its own. The relay keeps
//! the first rotation of a network id and refuses any other member's, and members already on
//! the new secret ignore the old id entirely; but a kicked member that rotates *first* wins the
//! members that were offline. An admin-signed enterprise mode (a later token version) closes
//! that.

use std::time::Duration;

use rand::{CryptoRng, RngCore};

use super::codec::{Reader, Writer};
use super::{open, seal, WireError};
use crate::keys::{NetworkKeys, NetworkSecret, NodeSecret, PeerKey};

/// How long the relay keeps a rotation record: members offline for up to a week still find
/// their way into the new network; after that they need a fresh token (`meshvpn invite`).
pub const ROTATION_RECORD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Entries per [`super::RelayRequest::Rotate`] request: six entries of [`ENTRY_LEN`] bytes keep
/// the sealed request under 1,000 bytes, well inside a 1,280-byte IPv6 path.
pub const ENTRIES_PER_REQUEST: usize = 6;
/// Version byte of the handover body.
const HANDOVER_VERSION: u8 = 1;
/// Length of a sealed handover: nonce (24), version, secret (32), timestamp (8), tag (16).
pub const SEALED_LEN: usize = 24 + 1 + 32 + 8 + 16;
/// Length of one encoded entry.
pub const ENTRY_LEN: usize = 32 + 32 + SEALED_LEN;

/// What a rotation hands a member: the new secret, and when the rotation was made.
#[derive(Clone, PartialEq, Eq)]
pub struct Handover {
    /// The network's new secret.
    pub secret: NetworkSecret,
    /// Wall-clock milliseconds when the rotating member made it.
    pub rotated_at_ms: u64,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handover(at {} ms, ..)", self.rotated_at_ms)
    }
}

/// One recipient's sealed copy of a [`Handover`]; opaque to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationEntry {
    /// The member this entry is for.
    pub recipient: PeerKey,
    /// The sender's one-time public key.
    pub ephemeral: PeerKey,
    /// The handover, sealed with [`NodeSecret::handover_key`].
    pub sealed: [u8; SEALED_LEN],
}

impl RotationEntry {
    /// Seals `handover` for `recipient` under the network keys `old` (the secret being
    /// replaced), with a fresh ephemeral key and nonce from `rng`.
    pub fn seal<R: RngCore + CryptoRng>(
        old: &NetworkKeys,
        recipient: PeerKey,
        handover: &Handover,
        rng: &mut R,
    ) -> Self {
        let ephemeral_secret = NodeSecret::generate(rng);
        let ephemeral = ephemeral_secret.public();
        let key = ephemeral_secret.handover_key(
            &recipient,
            &old.control_key,
            &old.network_id,
            &recipient,
            &ephemeral,
        );
        let mut body = Writer::new();
        body.u8(HANDOVER_VERSION)
            .raw(&handover.secret.0)
            .u64(handover.rotated_at_ms);
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let sealed = seal(&key, &Self::aad(&recipient, &ephemeral), &body.buf, nonce);
        let sealed: [u8; SEALED_LEN] = sealed
            .try_into()
            .expect("a handover body has a fixed length, so its sealed form is SEALED_LEN bytes");
        Self {
            recipient,
            ephemeral,
            sealed,
        }
    }

    /// Opens this entry with the recipient's static key `me` under the network keys `old`
    /// the member holds now. Fails unless the entry is for `me`, was made by a holder of the
    /// same secret, and is unaltered.
    pub fn open(&self, old: &NetworkKeys, me: &NodeSecret) -> Result<Handover, WireError> {
        if self.recipient != me.public() {
            return Err(WireError::Unauthenticated);
        }
        let key = me.handover_key(
            &self.ephemeral,
            &old.control_key,
            &old.network_id,
            &self.recipient,
            &self.ephemeral,
        );
        let plain = open(
            &key,
            &Self::aad(&self.recipient, &self.ephemeral),
            &self.sealed,
        )?;
        let mut r = Reader::new(&plain);
        if r.u8()? != HANDOVER_VERSION {
            return Err(WireError::Malformed("unknown handover version"));
        }
        let secret = NetworkSecret(r.array()?);
        let rotated_at_ms = r.u64()?;
        Ok(Handover {
            secret,
            rotated_at_ms,
        })
    }

    /// The entry's fixed-length encoding ([`ENTRY_LEN`] bytes), e.g. for the relay's store.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_into(&mut w);
        w.buf
    }

    /// Reads an entry from exactly [`ENTRY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != ENTRY_LEN {
            return Err(WireError::Malformed("a rotation entry has a fixed length"));
        }
        Self::decode_from(&mut Reader::new(bytes))
    }

    /// Appends the entry's fixed-length encoding.
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.raw(&self.recipient.0)
            .raw(&self.ephemeral.0)
            .raw(&self.sealed);
    }

    /// Reads one entry.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Self {
            recipient: PeerKey(r.array()?),
            ephemeral: PeerKey(r.array()?),
            sealed: r.array()?,
        })
    }

    fn aad(recipient: &PeerKey, ephemeral: &PeerKey) -> Vec<u8> {
        let mut aad = b"meshvpn v1 handover".to_vec();
        aad.extend_from_slice(&recipient.0);
        aad.extend_from_slice(&ephemeral.0);
        aad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn setup() -> (ChaCha20Rng, NetworkKeys, NodeSecret, Handover) {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let old = NetworkSecret::generate(&mut rng).derive();
        let member = NodeSecret::generate(&mut rng);
        let handover = Handover {
            secret: NetworkSecret::generate(&mut rng),
            rotated_at_ms: 1_700_000_000_123,
        };
        (rng, old, member, handover)
    }

    #[test]
    fn the_recipient_opens_its_entry_and_gets_the_new_secret() {
        let (mut rng, old, member, handover) = setup();
        let entry = RotationEntry::seal(&old, member.public(), &handover, &mut rng);
        let mut w = Writer::new();
        entry.encode_into(&mut w);
        assert_eq!(w.buf.len(), ENTRY_LEN);
        let back = RotationEntry::decode_from(&mut Reader::new(&w.buf)).expect("decodes");
        assert_eq!(back, entry);
        assert_eq!(back.open(&old, &member).expect("opens"), handover);
        // No two entries share an ephemeral key or ciphertext.
        let again = RotationEntry::seal(&old, member.public(), &handover, &mut rng);
        assert_ne!(again.ephemeral, entry.ephemeral);
        assert_ne!(again.sealed, entry.sealed);
    }

    #[test]
    fn nobody_else_opens_it_and_nobody_without_the_old_secret_makes_one() {
        let (mut rng, old, member, handover) = setup();
        let entry = RotationEntry::seal(&old, member.public(), &handover, &mut rng);
        // Another member (say, the one kicked) cannot open it, even claiming to be the recipient.
        let other = NodeSecret::generate(&mut rng);
        assert!(entry.open(&old, &other).is_err());
        let mut readdressed = entry.clone();
        readdressed.recipient = other.public();
        assert!(readdressed.open(&old, &other).is_err());
        // A member holding another secret (it already moved on: a replay) cannot open it.
        let newer = handover.secret.derive();
        assert!(entry.open(&newer, &member).is_err());
        // Someone who knows only the member's public key (a relay) seals under a guessed
        // control key: the member refuses it.
        let forged_keys = NetworkSecret::generate(&mut rng).derive();
        let mut forged = RotationEntry::seal(&forged_keys, member.public(), &handover, &mut rng);
        assert!(forged.open(&old, &member).is_err());
        // Any flipped bit is refused.
        for i in 0..SEALED_LEN {
            let mut bent = entry.clone();
            bent.sealed[i] ^= 1;
            assert!(bent.open(&old, &member).is_err(), "bit flip at {i}");
        }
        forged.ephemeral = entry.ephemeral;
        forged.sealed = entry.sealed;
        assert!(
            forged.open(&old, &member).is_ok(),
            "the genuine entry still opens"
        );
    }

    #[test]
    fn handover_debug_hides_the_secret() {
        let (_, _, _, handover) = setup();
        let shown = format!("{handover:?}");
        assert!(!shown.contains(&handover.secret.to_base64()));
        assert!(shown.contains("1700000000123"));
    }
}
