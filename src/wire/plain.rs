//! The plaintext bodies of sealed messages, encoded and decoded without the AEAD around them.
//!
//! Production code only reaches these codecs through the seal/open functions of [`super`], so
//! the bytes they decode have been authenticated first. Authenticated is not trusted: any
//! member can seal an announcement or a disco message, and a relay can seal any reply, so the
//! decoders must refuse garbage as cleanly as the outer frame parser does. They are exposed
//! here so that fuzz targets reach them directly (an AEAD in front would stop every mutated
//! input) and property tests can check that decoding inverts encoding.

use super::{Announcement, Disco, DiscoStamp, RelayReply, RelayRequest, WireError};
use crate::keys::PeerKey;

/// The plaintext of a [`RelayRequest`] (what a member seals for its relay).
pub fn encode_relay_request(msg: &RelayRequest) -> Vec<u8> {
    msg.encode()
}

/// Decodes the plaintext of a [`RelayRequest`].
pub fn decode_relay_request(bytes: &[u8]) -> Result<RelayRequest, WireError> {
    RelayRequest::decode(bytes)
}

/// The plaintext of a [`RelayReply`] (what a relay seals for a member).
pub fn encode_relay_reply(msg: &RelayReply) -> Vec<u8> {
    msg.encode()
}

/// Decodes the plaintext of a [`RelayReply`].
pub fn decode_relay_reply(bytes: &[u8]) -> Result<RelayReply, WireError> {
    RelayReply::decode(bytes)
}

/// The plaintext of a [`Disco`] message with its freshness stamp (what one member seals for
/// another).
pub fn encode_disco(stamp: DiscoStamp, msg: &Disco) -> Vec<u8> {
    msg.encode(stamp)
}

/// Decodes the plaintext of a [`Disco`] message and its freshness stamp.
pub fn decode_disco(bytes: &[u8]) -> Result<(DiscoStamp, Disco), WireError> {
    Disco::decode(bytes)
}

/// The plaintext body of an [`Announcement`] (its key travels beside it, bound as AAD).
pub fn encode_announcement(msg: &Announcement) -> Vec<u8> {
    msg.encode_body()
}

/// Decodes the plaintext body of an announcement stored under `key`.
pub fn decode_announcement(key: PeerKey, bytes: &[u8]) -> Result<Announcement, WireError> {
    Announcement::decode_body(key, bytes)
}
