//! STUN Binding (RFC 8489) on the shared UDP socket, via `stun_codec`.
//!
//! The relay answers Binding requests with the XOR-MAPPED-ADDRESS it saw; members send requests
//! to learn their server-reflexive address. Only the Binding method is spoken; anything else is
//! refused with `None` (the caller counts and drops it).
//!
//! No amplification: a relay answers a request only when the answer is no larger than the
//! request ([`answer`]), so it can never be used to send a spoofed victim more bytes than the
//! attacker spent. Members therefore pad their requests (a SOFTWARE attribute) to
//! [`PADDED_REQUEST_LEN`], which holds an answer with an IPv6 mapped address.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{Software, XorMappedAddress};
use stun_codec::rfc5389::{methods::BINDING, Attribute};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

/// Length of a member's padded Binding request: the 20-byte header and a SOFTWARE attribute
/// of 4 + 24 bytes, as large as the largest answer (an IPv6 XOR-MAPPED-ADDRESS, 44 bytes) plus
/// room to spare.
pub const PADDED_REQUEST_LEN: usize = 48;
/// The SOFTWARE description that pads a member's request to [`PADDED_REQUEST_LEN`].
const PADDING: &str = "meshvpn padded request..";

/// Encodes a Binding request with transaction id `tx`, padded to [`PADDED_REQUEST_LEN`] so
/// that a relay may answer it.
pub fn binding_request(tx: [u8; 12]) -> Vec<u8> {
    let mut msg = Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(tx));
    msg.add_attribute(Attribute::Software(Software::new_static(PADDING)));
    encode(msg)
}

/// The answer to `request` (received from `from`), if it is a Binding request and the answer
/// is no larger than it: unpadded requests get no answer, so nobody can use a relay to send a
/// spoofed address more than was sent to the relay.
pub fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let Some(Binding::Request(tx)) = parse(request) else {
        return None;
    };
    let response = binding_response(tx, from);
    (response.len() <= request.len()).then_some(response)
}

/// Encodes a Binding success response telling the requester its `mapped` address.
pub fn binding_response(tx: [u8; 12], mapped: SocketAddr) -> Vec<u8> {
    let mut msg = Message::<Attribute>::new(
        MessageClass::SuccessResponse,
        BINDING,
        TransactionId::new(tx),
    );
    msg.add_attribute(Attribute::XorMappedAddress(XorMappedAddress::new(mapped)));
    encode(msg)
}

/// A decoded STUN Binding message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A request with this transaction id.
    Request([u8; 12]),
    /// A success response carrying the mapped address.
    Response { tx: [u8; 12], mapped: SocketAddr },
}

/// Decodes a Binding request or success response; `None` for anything else or garbage.
pub fn parse(bytes: &[u8]) -> Option<Binding> {
    let mut decoder = MessageDecoder::<Attribute>::new();
    let msg = decoder.decode_from_bytes(bytes).ok()?.ok()?;
    if msg.method() != BINDING {
        return None;
    }
    let tx = *msg.transaction_id().as_bytes();
    match msg.class() {
        MessageClass::Request => Some(Binding::Request(tx)),
        MessageClass::SuccessResponse => {
            let mapped = msg.get_attribute::<XorMappedAddress>()?.address();
            Some(Binding::Response { tx, mapped })
        }
        MessageClass::Indication | MessageClass::ErrorResponse => None,
    }
}

fn encode(msg: Message<Attribute>) -> Vec<u8> {
    MessageEncoder::new()
        .encode_into_bytes(msg)
        .expect("encoding a Binding message with only XOR-MAPPED-ADDRESS cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{classify, DatagramKind};

    #[test]
    fn request_and_response_round_trip() {
        let req = binding_request([7; 12]);
        assert_eq!(req.len(), PADDED_REQUEST_LEN);
        assert_eq!(classify(&req), DatagramKind::Stun);
        assert_eq!(parse(&req), Some(Binding::Request([7; 12])));
        let mapped: SocketAddr = "203.0.113.5:41641".parse().expect("lit");
        let resp = binding_response([7; 12], mapped);
        assert_eq!(classify(&resp), DatagramKind::Stun);
        assert_eq!(
            parse(&resp),
            Some(Binding::Response {
                tx: [7; 12],
                mapped
            })
        );
        let v6: SocketAddr = "[2001:db8::9]:1".parse().expect("lit");
        assert_eq!(
            parse(&binding_response([1; 12], v6)),
            Some(Binding::Response {
                tx: [1; 12],
                mapped: v6
            })
        );
    }

    #[test]
    fn answers_are_never_larger_than_requests() {
        let v4: SocketAddr = "203.0.113.5:41641".parse().expect("lit");
        let v6: SocketAddr = "[2001:db8::9]:1".parse().expect("lit");
        for from in [v4, v6] {
            let padded = binding_request([3; 12]);
            let a = answer(&padded, from).expect("a padded request is answered");
            assert!(a.len() <= padded.len());
            assert_eq!(
                parse(&a),
                Some(Binding::Response {
                    tx: [3; 12],
                    mapped: from
                })
            );
            let bare = encode(Message::<Attribute>::new(
                MessageClass::Request,
                BINDING,
                TransactionId::new([3; 12]),
            ));
            assert_eq!(
                answer(&bare, from),
                None,
                "an unpadded request gets nothing"
            );
            assert_eq!(answer(&binding_response([3; 12], from), from), None);
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse(&[]), None);
        let mut req = binding_request([1; 12]);
        req.truncate(19);
        assert_eq!(parse(&req), None);
        assert_eq!(parse(&[0u8; 40]), None);
    }
}
