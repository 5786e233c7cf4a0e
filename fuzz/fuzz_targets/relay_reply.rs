//! The plaintext of a relay's reply to a member (what the member decodes after opening it):
//! garbage is refused, and what decodes re-encodes to the same reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::plain::{decode_relay_reply, encode_relay_reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = decode_relay_reply(data) {
        assert_eq!(decode_relay_reply(&encode_relay_reply(&reply)), Ok(reply));
    }
});
