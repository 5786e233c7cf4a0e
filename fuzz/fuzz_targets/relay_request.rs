//! The plaintext of a member's request to its relay (what the relay decodes after opening it):
//! garbage is refused, and what decodes re-encodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn::wire::plain::{decode_relay_request, encode_relay_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_relay_request(data) {
        let _ = (req.ts_ms(), req.network());
        assert_eq!(decode_relay_request(&encode_relay_request(&req)), Ok(req));
    }
});
