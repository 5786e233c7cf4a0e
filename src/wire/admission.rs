//! Admission at a relay: signed requests and return-path cookies, for both sides.
//!
//! # Signatures: admission without the secret
//! The network id is the Ed25519 public key derived from the network secret
//! ([`crate::keys::NetworkSigningKey`]). Every [`RelayRequest`] a member sends is signed with
//! the private half over
//! `label || relay key || sender key || cookie || request bytes`
//! and the request and signature are sealed together under the member/relay session key. The
//! relay checks the signature against the network id in the request, so it can tell a member
//! from someone who only saw the id on the wire, yet holds nothing that would let it admit
//! anyone itself. Binding the relay key stops a request made for one relay from being played
//! to another; binding the sender key stops it being moved to another member; binding the
//! cookie (which is keyed by a secret the relay makes at every start, and by the source address)
//! makes a captured registration useless after a relay restart and from any other address.
//!
//! # Cookies: return-path proof
//! Before a relay binds an address to a key it wants to know the address really receives.
//! Like WireGuard's cookie reply and QUIC's Retry, the proof is stateless: the relay answers a
//! registration that lacks a valid cookie with a [`Frame::CookieReply`] that is smaller than the
//! request, carrying `MAC(relay secret, time bucket || source address)`; the member repeats the
//! request with that cookie. The relay keeps no state for unproven addresses, and never sends
//! one more bytes than it received from it. A cookie is valid in the bucket it was made in and
//! the next one ([`COOKIE_BUCKET`]), so it expires within two buckets.
//!
//! # Member side
//! [`AdmissionClient`] holds the signing key and the current cookie, seals every request and,
//! when a cookie reply answers one of its recent requests, re-seals that request with the new
//! cookie (once). The node calls it; nothing here reads a clock or a socket.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use blake2::digest::{FixedOutput as _, Update as _};
use blake2::Blake2sMac256;

use super::{frame_aad, kind, open, seal, Frame, RelayRequest, WireError};
use crate::keys::{NetworkSigningKey, PeerKey};

/// Length of a return-path cookie.
pub const COOKIE_LEN: usize = 16;
/// A return-path cookie (all zeros: none).
pub type Cookie = [u8; COOKIE_LEN];
/// Bytes of the request nonce a cookie reply echoes.
pub const ECHO_LEN: usize = 16;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an encoded [`Frame::CookieReply`]: header, echo and cookie.
pub const COOKIE_REPLY_LEN: usize = super::HEADER_LEN + ECHO_LEN + COOKIE_LEN;
/// Width of a cookie's time bucket. A cookie is accepted in its own bucket and the next, so it
/// lives between one and two minutes: long enough that a member re-registering every 10 s
/// needs a new one only about once a minute (one extra round trip), short enough that a
/// cookie seen on the wire is soon worthless.
pub const COOKIE_BUCKET: Duration = Duration::from_secs(60);
/// Recent requests the member remembers so a cookie reply can be matched to one (a register
/// and a sync may be in flight together, plus their retries).
const PENDING_REQUESTS: usize = 4;

/// Label at the start of every signed message (versioned so a new scheme cannot be confused).
const SIGNATURE_LABEL: &[u8] = b"meshvpn v2 relay request";

/// The relay's per-start cookie secret and the MAC it computes.
#[derive(Clone)]
pub struct CookieKey([u8; 32]);

impl CookieKey {
    /// A cookie key from 32 random bytes (made afresh at every relay start).
    pub fn new(secret: [u8; 32]) -> Self {
        Self(secret)
    }

    /// The cookie for `addr` in time bucket `bucket`.
    pub fn cookie(&self, addr: SocketAddr, bucket: u64) -> Cookie {
        let mut mac = <Blake2sMac256 as blake2::digest::KeyInit>::new_from_slice(&self.0)
            .expect("a 32-byte key is valid for BLAKE2s-MAC");
        mac.update(&bucket.to_be_bytes());
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        mac.update(&ip.octets());
        mac.update(&addr.port().to_be_bytes());
        let full = mac.finalize_fixed();
        let mut out = [0u8; COOKIE_LEN];
        out.copy_from_slice(&full[..COOKIE_LEN]);
        out
    }

    /// Whether `cookie` was made for `addr` in `bucket` or the bucket before.
    pub fn check(&self, addr: SocketAddr, bucket: u64, cookie: &Cookie) -> bool {
        let now = self.cookie(addr, bucket);
        let before = bucket
            .checked_sub(1)
            .map(|b| self.cookie(addr, b))
            .unwrap_or(now);
        // Non-short-circuiting comparison of both: timing reveals nothing about which matched.
        let eq = |a: &Cookie| a.iter().zip(cookie).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        eq(&now) | eq(&before)
    }
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

/// A request the relay opened but whose signature it has not checked yet (the check is the
/// expensive part, done only once cheaper checks and the budgets allow it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The request.
    pub request: RelayRequest,
    signature: [u8; SIGNATURE_LEN],
    message: Vec<u8>,
}

impl SignedRequest {
    /// Checks the signature against the network id named in the request.
    pub fn verify(&self) -> bool {
        self.request
            .network()
            .verify(&self.message, &self.signature)
    }
}

/// The first bytes of a sealed body's nonce, which a cookie reply echoes.
pub fn echo_of(sealed: &[u8]) -> Option<[u8; ECHO_LEN]> {
    sealed.get(..ECHO_LEN)?.try_into().ok()
}

/// Builds a `ToRelay` datagram: `req` signed with the network key (bound to `relay`, `sender`
/// and `cookie`) and sealed under the member/relay `session` key.
pub fn seal_request(
    session: &[u8; 32],
    sender: PeerKey,
    relay: &PeerKey,
    signing: &NetworkSigningKey,
    cookie: Cookie,
    req: &RelayRequest,
    nonce: [u8; 24],
) -> Vec<u8> {
    let body = req.encode();
    let signature = signing.sign(&signed_message(relay, &sender, &cookie, &body));
    let mut plain = body;
    plain.extend_from_slice(&signature);
    let sealed = seal(session, &request_aad(&sender, &cookie), &plain, nonce);
    Frame::ToRelay {
        sender,
        cookie,
        sealed: &sealed,
    }
    .to_vec()
}

/// Opens the body of a `ToRelay` frame (the relay side); the signature is checked later with
/// [`SignedRequest::verify`].
pub fn open_request(
    session: &[u8; 32],
    sender: &PeerKey,
    relay: &PeerKey,
    cookie: &Cookie,
    sealed: &[u8],
) -> Result<SignedRequest, WireError> {
    let plain = open(session, &request_aad(sender, cookie), sealed)?;
    if plain.len() < SIGNATURE_LEN {
        return Err(WireError::Truncated);
    }
    let (body, sig) = plain.split_at(plain.len() - SIGNATURE_LEN);
    let request = RelayRequest::decode(body)?;
    let signature: [u8; SIGNATURE_LEN] = sig
        .try_into()
        .map_err(|_| WireError::Malformed("signature length"))?;
    Ok(SignedRequest {
        request,
        signature,
        message: signed_message(relay, sender, cookie, body),
    })
}

/// The member's side of admission: signs and seals requests, keeps the relay's cookie, and
/// answers cookie replies (see the module doc).
#[derive(Debug)]
pub struct AdmissionClient {
    signing: NetworkSigningKey,
    relay: PeerKey,
    cookie: Cookie,
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    echo: [u8; ECHO_LEN],
    request: RelayRequest,
    resent: bool,
}

impl AdmissionClient {
    /// A client for the relay with public key `relay`, signing with the network's key.
    pub fn new(signing: NetworkSigningKey, relay: PeerKey) -> Self {
        Self {
            signing,
            relay,
            cookie: [0; COOKIE_LEN],
            pending: VecDeque::new(),
        }
    }

    /// Seals `req` for the relay with the current cookie; remembers it so a cookie reply can
    /// have it sent again.
    pub fn seal(
        &mut self,
        session: &[u8; 32],
        sender: PeerKey,
        req: &RelayRequest,
        nonce: [u8; 24],
    ) -> Vec<u8> {
        self.seal_pending(session, sender, req.clone(), nonce, false)
    }

    /// Handles a [`Frame::CookieReply`] from the relay's address: if it answers one of the
    /// recent requests, stores the cookie and returns that request sealed again with it (a
    /// request is re-sent at most once; after that the node's own retry takes over).
    pub fn handle_cookie_reply(
        &mut self,
        echo: [u8; ECHO_LEN],
        cookie: Cookie,
        session: &[u8; 32],
        sender: PeerKey,
        nonce: [u8; 24],
    ) -> Option<Vec<u8>> {
        let i = self.pending.iter().position(|p| p.echo == echo)?;
        let pending = self.pending.remove(i)?;
        self.cookie = cookie;
        if pending.resent {
            return None;
        }
        Some(self.seal_pending(session, sender, pending.request, nonce, true))
    }

    fn seal_pending(
        &mut self,
        session: &[u8; 32],
        sender: PeerKey,
        request: RelayRequest,
        nonce: [u8; 24],
        resent: bool,
    ) -> Vec<u8> {
        let dgram = seal_request(
            session,
            sender,
            &self.relay,
            &self.signing,
            self.cookie,
            &request,
            nonce,
        );
        if self.pending.len() >= PENDING_REQUESTS {
            self.pending.pop_front();
        }
        let mut echo = [0u8; ECHO_LEN];
        echo.copy_from_slice(&nonce[..ECHO_LEN]);
        self.pending.push_back(Pending {
            echo,
            request,
            resent,
        });
        dgram
    }
}

fn request_aad(sender: &PeerKey, cookie: &Cookie) -> Vec<u8> {
    let mut aad = frame_aad(kind::TO_RELAY, sender).to_vec();
    aad.extend_from_slice(cookie);
    aad
}

fn signed_message(relay: &PeerKey, sender: &PeerKey, cookie: &Cookie, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_LABEL.len() + 64 + COOKIE_LEN + body.len());
    m.extend_from_slice(SIGNATURE_LABEL);
    m.extend_from_slice(&relay.0);
    m.extend_from_slice(&sender.0);
    m.extend_from_slice(cookie);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NetworkSecret;

    fn req(network: crate::keys::NetworkId) -> RelayRequest {
        RelayRequest::Register {
            network,
            ts_ms: 42,
            announcement: vec![1, 2, 3],
        }
    }

    #[test]
    fn signed_requests_round_trip_and_bind_relay_sender_and_cookie() {
        let keys = NetworkSecret([5; 32]).derive();
        let (session, me, relay) = ([9u8; 32], PeerKey([7; 32]), PeerKey([1; 32]));
        let cookie = [3u8; COOKIE_LEN];
        let r = req(keys.network_id);
        let dgram = seal_request(&session, me, &relay, &keys.signing, cookie, &r, [0; 24]);
        let Ok(Frame::ToRelay {
            sender,
            cookie: c,
            sealed,
        }) = Frame::parse(&dgram)
        else {
            panic!("parse")
        };
        assert_eq!(c, cookie);
        let opened = open_request(&session, &sender, &relay, &c, sealed).expect("opens");
        assert_eq!(opened.request, r);
        assert!(opened.verify());
        // Another relay, another cookie in the clear, another sender: all refused.
        let other_relay =
            open_request(&session, &sender, &PeerKey([2; 32]), &c, sealed).expect("opens");
        assert!(!other_relay.verify());
        assert_eq!(
            open_request(&session, &sender, &relay, &[4; COOKIE_LEN], sealed),
            Err(WireError::Unauthenticated)
        );
        assert_eq!(
            open_request(&session, &PeerKey([8; 32]), &relay, &c, sealed),
            Err(WireError::Unauthenticated)
        );
        // Signed by someone who only knows the network id: refused.
        let stranger = NetworkSecret([6; 32]).derive();
        let forged = seal_request(&session, me, &relay, &stranger.signing, cookie, &r, [1; 24]);
        let Ok(Frame::ToRelay { sealed, .. }) = Frame::parse(&forged) else {
            panic!("parse")
        };
        let opened = open_request(&session, &me, &relay, &cookie, sealed).expect("opens");
        assert!(!opened.verify());
    }

    #[test]
    fn cookies_are_per_address_and_expire_after_two_buckets() {
        let key = CookieKey::new([1; 32]);
        let a: SocketAddr = "198.51.100.1:4000".parse().expect("lit");
        let b: SocketAddr = "198.51.100.1:4001".parse().expect("lit");
        let c = key.cookie(a, 10);
        assert!(key.check(a, 10, &c));
        assert!(key.check(a, 11, &c));
        assert!(!key.check(a, 12, &c));
        assert!(!key.check(b, 10, &c));
        assert!(!CookieKey::new([2; 32]).check(a, 10, &c));
        assert!(!key.check(a, 0, &[0; COOKIE_LEN]));
    }

    #[test]
    fn the_client_resends_once_with_the_cookie() {
        let keys = NetworkSecret([5; 32]).derive();
        let (session, me, relay) = ([9u8; 32], PeerKey([7; 32]), PeerKey([1; 32]));
        let mut client = AdmissionClient::new(keys.signing.clone(), relay);
        let first = client.seal(&session, me, &req(keys.network_id), [0x11; 24]);
        let Ok(Frame::ToRelay { cookie, sealed, .. }) = Frame::parse(&first) else {
            panic!("parse")
        };
        assert_eq!(cookie, [0; COOKIE_LEN]);
        let echo = echo_of(sealed).expect("long enough");
        assert!(client
            .handle_cookie_reply([0x99; ECHO_LEN], [5; 16], &session, me, [0x22; 24])
            .is_none());
        let again = client
            .handle_cookie_reply(echo, [5; 16], &session, me, [0x22; 24])
            .expect("re-sent");
        let Ok(Frame::ToRelay { cookie, sealed, .. }) = Frame::parse(&again) else {
            panic!("parse")
        };
        assert_eq!(cookie, [5; 16]);
        let opened = open_request(&session, &me, &relay, &cookie, sealed).expect("opens");
        assert_eq!(opened.request, req(keys.network_id));
        assert!(opened.verify());
        // A second challenge for the re-sent copy stores the cookie but sends nothing.
        let echo = echo_of(sealed).expect("long enough");
        assert!(client
            .handle_cookie_reply(echo, [6; 16], &session, me, [0x33; 24])
            .is_none());
    }

    #[test]
    fn garbage_never_panics() {
        let relay = PeerKey([1; 32]);
        for len in 0..300usize {
            let buf: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let _ = open_request(&[0; 32], &relay, &relay, &[0; 16], &buf);
            let _ = echo_of(&buf);
        }
    }
}
